//! Sender Sequence Numbers (RFC 8613 §7.2.1) and the persisted high-water mark of App. B.1.1.
//!
//! The pure part: numbers are handed out lock-free from an atomic counter, and only below a
//! limit that the storage layer has already written to disk. Raising that limit (the I/O) is
//! the job of `credentials::persist`, which does it ahead of need so a slow disk never stalls
//! protection.

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// The largest Sender Sequence Number: 2^40 - 1 (RFC 8613 §7.2.1).
pub const MAX_SENDER_SEQUENCE_NUMBER: u64 = (1 << 40) - 1;

/// A Sender Sequence Number, used as Partial IV (at most 5 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SenderSequenceNumber(pub u64);

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SequenceError {
    /// §7.2.1: the context must not be used any more; a new one has to be established.
    #[error(
        "sender sequence numbers exhausted (2^40-1 reached); the security context must be renewed"
    )]
    Exhausted,
    /// App. B.1.1: the next number is not yet covered by a persisted high-water mark.
    #[error("sender sequence number {next} is not yet covered by the persisted mark {persisted}")]
    NotPersisted { next: u64, persisted: u64 },
}

/// Hands out Sender Sequence Numbers, never one at or above the persisted limit.
#[derive(Debug)]
pub struct SenderSequence {
    next: AtomicU64,
    /// Exclusive: every number below it is covered by what is on disk (`next-to-send`).
    persisted_limit: AtomicU64,
}

impl SenderSequence {
    /// `next`: the first number to use; `persisted_limit`: the value already on disk.
    pub fn new(next: u64, persisted_limit: u64) -> Self {
        Self {
            next: AtomicU64::new(next),
            persisted_limit: AtomicU64::new(persisted_limit),
        }
    }

    /// For contexts that are never persisted (tests, vectors): every number may be used.
    pub fn unpersisted(next: u64) -> Self {
        Self::new(next, MAX_SENDER_SEQUENCE_NUMBER + 1)
    }

    /// Takes the next number, lock-free.
    pub fn reserve(&self) -> Result<SenderSequenceNumber, SequenceError> {
        let mut n = self.next.load(Ordering::Acquire);
        loop {
            if n > MAX_SENDER_SEQUENCE_NUMBER {
                return Err(SequenceError::Exhausted);
            }
            let persisted = self.persisted_limit.load(Ordering::Acquire);
            if n >= persisted {
                return Err(SequenceError::NotPersisted { next: n, persisted });
            }
            match self
                .next
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(SenderSequenceNumber(n)),
                Err(current) => n = current,
            }
        }
    }

    /// The next number that `reserve` would hand out (the exact `next-to-send`).
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// The limit currently on disk.
    pub fn persisted_limit(&self) -> u64 {
        self.persisted_limit.load(Ordering::Acquire)
    }

    /// Called by the storage layer AFTER the new mark is durably on disk.
    pub fn raise_persisted_limit(&self, limit: u64) {
        self.persisted_limit.fetch_max(limit, Ordering::AcqRel);
    }

    /// Numbers still usable before the persisted mark is reached.
    pub fn headroom(&self) -> u64 {
        self.persisted_limit().saturating_sub(self.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_unpersisted_numbers() {
        let s = SenderSequence::new(5, 7);
        assert_eq!(s.reserve(), Ok(SenderSequenceNumber(5)));
        assert_eq!(s.reserve(), Ok(SenderSequenceNumber(6)));
        assert_eq!(
            s.reserve(),
            Err(SequenceError::NotPersisted {
                next: 7,
                persisted: 7
            })
        );
        s.raise_persisted_limit(9);
        s.raise_persisted_limit(8); // never lowers
        assert_eq!(s.persisted_limit(), 9);
        assert_eq!(s.reserve(), Ok(SenderSequenceNumber(7)));
    }

    #[test]
    fn stops_at_2_pow_40_minus_1() {
        let s = SenderSequence::unpersisted(MAX_SENDER_SEQUENCE_NUMBER);
        assert_eq!(
            s.reserve(),
            Ok(SenderSequenceNumber(MAX_SENDER_SEQUENCE_NUMBER))
        );
        assert_eq!(s.reserve(), Err(SequenceError::Exhausted));
    }
}
