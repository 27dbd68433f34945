//! Memory latency of this machine by working-set size: a pointer chase through a buffer
//! whose 64-byte lines are linked in a random cycle, so every load depends on the one before
//! and no prefetcher can guess the next line. It explains what 10 000 contexts in
//! round-robin use cost per cache miss (docs/PERFORMANCE.md, "Session 5").
//!
//! `cargo run --release --example mem_latency` (pin it, e.g. `taskset -c 0`); prints ns per
//! load for 256 KB to 256 MB. Bounded: 4 million loads per size, about 3 s in all.

use std::hint::black_box;
use std::time::Instant;

/// usize slots per 64-byte line: only the first slot of each line is used.
const STRIDE: usize = 64 / std::mem::size_of::<usize>();
const LOADS: usize = 4_000_000;

fn main() {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next_random = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for kb in [256usize, 1024, 4096, 8192, 16384, 24576, 65536, 262144] {
        let lines = kb * 1024 / 64;
        // a random cyclic order of the lines (Fisher-Yates)
        let mut order: Vec<usize> = (0..lines).collect();
        for i in (1..lines).rev() {
            let j = (next_random() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut buf = vec![0usize; lines * STRIDE];
        for (k, &line) in order.iter().enumerate() {
            buf[line * STRIDE] = order[(k + 1) % lines] * STRIDE;
        }
        // one lap to warm what fits, then the timed loads
        let mut at = order[0] * STRIDE;
        for _ in 0..lines {
            at = buf[at];
        }
        let started = Instant::now();
        for _ in 0..LOADS {
            at = buf[at];
        }
        let ns = started.elapsed().as_nanos() as f64 / LOADS as f64;
        black_box(at);
        println!("{kb:>7} KB: {ns:6.1} ns per load");
    }
}
