//! The replay window of a recipient context (RFC 8613 §7.4), in aiocoap's representation:
//! an `index` (the sequence number of the least significant bit) and a `bitfield` whose bit k
//! says that `index + k` was seen. Numbers below `index` are replays; numbers at or above
//! `index + size` are new and slide the window when accepted. So that `sequence.json`
//! means the same to aiocoap and to us, the sliding rule is aiocoap's exactly.
//!
//! After a restart without a saved window (`"received": "unknown"`) the window is
//! uninitialised and nothing is valid until App. B.1.2's Echo exchange gives a fresh number.

use super::params::MAX_REPLAY_WINDOW;

/// The persisted form (`{"index": I, "bitfield": B}` in `sequence.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindowState {
    pub index: u64,
    pub bitfield: u128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    size: u32,
    state: Option<ReplayWindowState>,
}

impl ReplayWindow {
    /// A fresh window for a new context: every number is valid.
    pub fn new_empty(size: u32) -> Self {
        Self::from_state(
            size,
            Some(ReplayWindowState {
                index: 0,
                bitfield: 0,
            }),
        )
    }

    /// A window whose state was lost (App. B.1.2): nothing is valid until initialised.
    pub fn uninitialized(size: u32) -> Self {
        Self::from_state(size, None)
    }

    /// Restores a persisted window. `size` is clamped to 1..=128; bits at or beyond
    /// `size` cannot be set by this implementation and are dropped.
    pub fn from_state(size: u32, state: Option<ReplayWindowState>) -> Self {
        let size = size.clamp(1, MAX_REPLAY_WINDOW);
        let state = state.map(|s| ReplayWindowState {
            index: s.index,
            bitfield: s.bitfield & mask(size),
        });
        Self { size, state }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn state(&self) -> Option<ReplayWindowState> {
        self.state
    }

    pub fn is_initialized(&self) -> bool {
        self.state.is_some()
    }

    /// Whether `number` has not been seen and is not below the window (§7.4).
    /// Always false while uninitialised.
    pub fn is_valid(&self, number: u64) -> bool {
        let Some(s) = self.state else { return false };
        if number < s.index {
            return false;
        }
        let offset = number - s.index;
        if offset >= u64::from(self.size) {
            return true;
        }
        (s.bitfield >> offset) & 1 == 0
    }

    /// Marks `number` as seen, sliding the window if it is beyond the top.
    /// Returns false (and changes nothing) if the number was not valid.
    pub fn strike_out(&mut self, number: u64) -> bool {
        if !self.is_valid(number) {
            return false;
        }
        let size = u64::from(self.size);
        let Some(s) = self.state.as_mut() else {
            return false;
        };
        let top = s.index + size - 1;
        if number > top {
            let overshoot = number - top;
            s.index += overshoot;
            s.bitfield = if overshoot >= 128 {
                0
            } else {
                s.bitfield >> overshoot
            };
        }
        s.bitfield |= 1u128 << (number - s.index);
        true
    }

    /// App. B.1.2: `number` came in a request that carried our Echo, so it is fresh:
    /// it and everything below become invalid, everything above valid.
    pub fn initialize_from_fresh(&mut self, number: u64) {
        self.state = Some(ReplayWindowState {
            index: number,
            bitfield: 1,
        });
    }
}

fn mask(size: u32) -> u128 {
    if size >= 128 {
        u128::MAX
    } else {
        (1u128 << size) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The doctest of aiocoap's `ReplayWindow`, step by step.
    #[test]
    fn behaves_like_aiocoap() {
        let mut w = ReplayWindow::new_empty(32);
        assert!(w.strike_out(5));
        assert!(w.is_valid(3));
        assert!(!w.is_valid(5));
        assert!(w.strike_out(0) && w.strike_out(1) && w.strike_out(2));
        assert!(!w.is_valid(1));
        assert!(w.is_valid(4));
        assert!(w.strike_out(35));
        assert!(w.is_valid(4));
        assert!(w.strike_out(36));
        assert!(!w.is_valid(4));
        assert!(!w.strike_out(36));
    }

    #[test]
    fn eleven_requests_match_aiocoap_on_disk() {
        let mut w = ReplayWindow::new_empty(32);
        for n in 0..11 {
            assert!(w.strike_out(n));
        }
        assert_eq!(
            w.state(),
            Some(ReplayWindowState {
                index: 0,
                bitfield: 2047
            })
        );
    }

    #[test]
    fn uninitialized_accepts_nothing_until_fresh() {
        let mut w = ReplayWindow::uninitialized(32);
        assert!(!w.is_valid(0) && !w.is_valid(1000));
        w.initialize_from_fresh(40);
        assert!(!w.is_valid(40) && !w.is_valid(39));
        assert!(w.is_valid(41));
    }

    #[test]
    fn far_jump_clears_bitfield() {
        let mut w = ReplayWindow::new_empty(128);
        assert!(w.strike_out(0));
        assert!(w.strike_out(1_000_000));
        assert!(!w.is_valid(1_000_000 - 128));
        assert!(w.is_valid(1_000_000 - 127));
    }
}
