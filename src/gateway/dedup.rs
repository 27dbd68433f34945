//! Deduplication of requests from clients (RFC 7252 §4.5): a retransmitted message (same
//! peer and Message ID) within EXCHANGE_LIFETIME is not processed again; it gets the cached
//! response, or is ignored while the first copy is still being answered.
//!
//! Pure: the caller passes the time in. Bounded: at most `capacity` entries; when full the
//! oldest is forgotten (it would be the first to expire anyway, since the lifetime is fixed).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 7252 §4.8.2 with the default transmission parameters.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// What to do with an incoming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// First copy: process it (an in-flight entry was recorded).
    New,
    /// Retransmission while the first copy is still being processed: ignore it.
    InFlight,
    /// Retransmission of an answered request: send this response again.
    Answered(Vec<u8>),
}

#[derive(Debug)]
enum State {
    InFlight,
    Answered(Vec<u8>),
}

#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    lifetime: Duration,
    /// Value: (serial of the insertion, state).
    entries: HashMap<(SocketAddr, u16), (u64, State)>,
    /// Insertion order, for expiry and eviction: (time, serial, key).
    order: VecDeque<(Instant, u64, (SocketAddr, u16))>,
    serial: u64,
}

impl Dedup {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            lifetime,
            entries: HashMap::new(),
            order: VecDeque::new(),
            serial: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, serial, key)) = self.order.front() {
            let full = self.entries.len() >= self.capacity;
            if now.saturating_duration_since(t) < self.lifetime && !full {
                break;
            }
            self.order.pop_front();
            // Only remove the entry if it is the one this order slot was made for.
            if let Entry::Occupied(e) = self.entries.entry(key) {
                if e.get().0 == serial {
                    e.remove();
                }
            }
        }
    }

    /// Checks a request from `peer` with `mid`, recording it if it is new.
    pub fn check(&mut self, peer: SocketAddr, mid: u16, now: Instant) -> Seen {
        self.expire(now);
        // One lookup (SipHash of the peer address) for the check and the insertion.
        match self.entries.entry((peer, mid)) {
            Entry::Occupied(e) => match &e.get().1 {
                State::InFlight => Seen::InFlight,
                State::Answered(r) => Seen::Answered(r.clone()),
            },
            Entry::Vacant(v) => {
                self.serial += 1;
                v.insert((self.serial, State::InFlight));
                self.order.push_back((now, self.serial, (peer, mid)));
                Seen::New
            }
        }
    }

    /// Records the response sent for `(peer, mid)`, for retransmissions of the request.
    pub fn answered(&mut self, peer: SocketAddr, mid: u16, response: Vec<u8>) {
        if let Some((_, state)) = self.entries.get_mut(&(peer, mid)) {
            *state = State::Answered(response);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmissions_are_recognised_until_the_lifetime_ends() {
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Dedup::new(10, EXCHANGE_LIFETIME);
        assert_eq!(d.check(peer, 1, t0), Seen::New);
        assert_eq!(d.check(peer, 1, t0), Seen::InFlight);
        assert_eq!(d.check(other, 1, t0), Seen::New);
        d.answered(peer, 1, vec![1, 2, 3]);
        assert_eq!(
            d.check(peer, 1, t0 + Duration::from_secs(200)),
            Seen::Answered(vec![1, 2, 3])
        );
        assert_eq!(d.check(peer, 1, t0 + EXCHANGE_LIFETIME), Seen::New);
    }

    #[test]
    fn bounded() {
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Dedup::new(3, EXCHANGE_LIFETIME);
        for mid in 0..10 {
            assert_eq!(d.check(peer, mid, t0), Seen::New);
            assert!(d.len() <= 3);
        }
        // the oldest were forgotten, the newest are remembered
        assert_eq!(d.check(peer, 9, t0), Seen::InFlight);
    }
}
