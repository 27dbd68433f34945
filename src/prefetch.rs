//! Cache hints: ask the CPU to load memory that is about to be read, so that several cache
//! misses overlap instead of stalling one after another. Pure: no effect on any result.
//!
//! Used where the gateway knows, a little ahead, which cold memory a request will touch
//! (with thousands of security contexts in turn, each context is cold when its turn
//! comes: see `gateway::Arrival`).
//!
//! Written by hand: on stable Rust no crate wraps the prefetch instructions
//! (`core::intrinsics::prefetch_read_data` is unstable), and this is a few lines over
//! `core::arch`.

/// The cache line size this assumes (x86_64).
pub const LINE: usize = 64;

/// The most lines one call prefetches (4 KiB): a hint for what one operation reads, not
/// a walk over memory.
pub const MAX_LINES: usize = 64;

/// Prefetches the cache lines that hold `len` bytes from address `start`, at most
/// [`MAX_LINES`] of them (x86_64: PREFETCHT0, into every cache level; elsewhere nothing).
#[inline]
pub fn bytes(start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // From the line that holds the first byte to the one that holds the last.
        let first = start - start % LINE;
        let lines = (start % LINE).saturating_add(len).div_ceil(LINE);
        for k in 0..lines.min(MAX_LINES) {
            let line = first.wrapping_add(k * LINE);
            // SAFETY: a prefetch is a hint: it reads nothing into the program, never
            // faults and changes no memory, whatever the address (here an integer, so no
            // pointer provenance is involved either).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// The address of `value`, for [`bytes`].
#[inline]
pub fn address_of<T: ?Sized>(value: &T) -> usize {
    std::ptr::from_ref(value).cast::<u8>() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_address_and_length_is_safe() {
        // Hints never fault: unmapped, null, wrapping and huge spans alike.
        bytes(0, 0);
        bytes(0, 4096);
        bytes(usize::MAX - 10, 100);
        bytes(0x10, usize::MAX);
        let v = vec![0u8; 1000];
        bytes(address_of(&v[..]), v.len());
        assert_eq!(address_of(&v[..]), v.as_ptr() as usize);
    }
}
