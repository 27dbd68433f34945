//! A byte buffer on the stack with a heap fallback, for the per-message buffers of
//! protect/unprotect (AAD, OSCORE option value, decrypted plaintext).
//!
//! Hand-written rather than `smallvec::SmallVec<[u8; N]>`: under callgrind, SmallVec's
//! generic `extend_from_slice` (insert_from_slice) and the moves of its large inline
//! storage cost more instructions than the allocations they replaced; this type only
//! appends with one bounds check and a `copy_from_slice`.

/// Up to `N` bytes inline; beyond that the content moves to a `Vec`.
pub(crate) struct StackBuf<const N: usize> {
    inline: [u8; N],
    len: usize,
    /// Used (and non-empty) only once the content outgrew `inline`.
    heap: Vec<u8>,
}

impl<const N: usize> StackBuf<N> {
    #[inline]
    pub(crate) fn new() -> Self {
        Self {
            inline: [0; N],
            len: 0,
            heap: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        if self.heap.is_empty() {
            if let Some(dst) = self.inline.get_mut(self.len..self.len + bytes.len()) {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
                return;
            }
            let mut heap = Vec::with_capacity(2 * (self.len + bytes.len()));
            heap.extend_from_slice(self.inline.get(..self.len).unwrap_or_default());
            self.heap = heap;
        }
        self.heap.extend_from_slice(bytes);
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.heap.is_empty() {
            self.inline.get(..self.len).unwrap_or_default()
        } else {
            &self.heap
        }
    }

    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.heap.is_empty() {
            self.inline.get_mut(..self.len).unwrap_or_default()
        } else {
            &mut self.heap
        }
    }
}

impl<const N: usize> std::ops::Deref for StackBuf<N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl<const N: usize> super::cbor::Sink for StackBuf<N> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        StackBuf::put(self, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_to_the_heap_and_keeps_the_content() {
        let mut b = StackBuf::<4>::new();
        b.put(&[1, 2]);
        b.put(&[3]);
        assert_eq!(b.as_slice(), [1, 2, 3]);
        assert!(b.heap.is_empty());
        b.put(&[4, 5]);
        assert_eq!(b.as_slice(), [1, 2, 3, 4, 5]);
        b.put(&[]);
        b.put(&[6]);
        assert_eq!(&*b, [1, 2, 3, 4, 5, 6]);
        b.as_mut_slice()[0] = 9;
        assert_eq!(b.as_slice()[0], 9);
        let mut exact = StackBuf::<2>::new();
        exact.put(&[7, 8]);
        assert_eq!(exact.as_slice(), [7, 8]);
        assert!(exact.heap.is_empty());
    }
}
