//! Deduplication of requests from clients (RFC 7252 §4.5): a retransmitted message (same
//! peer and Message ID) within EXCHANGE_LIFETIME is not processed again; it gets the cached
//! response, or is ignored while the first copy is still being answered.
//!
//! Pure: the caller passes the time in. Bounded: at most `capacity` entries; when full the
//! oldest is forgotten (it would be the first to expire anyway, since the lifetime is fixed).

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

/// RFC 7252 §4.8.2 with the default transmission parameters.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// What to do with an incoming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// First copy: process it (an in-flight entry was recorded; its answer is recorded
    /// with this ticket).
    New(Ticket),
    /// Retransmission while the first copy is still being processed: ignore it.
    InFlight,
    /// Retransmission of an answered request: send this response again.
    Answered(Vec<u8>),
}

/// Names the entry `check` recorded for a new request, for `answered` (no second lookup;
/// an answer whose entry was forgotten meanwhile is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Debug)]
enum State {
    InFlight,
    Answered(Vec<u8>),
}

/// What identifies a request for deduplication (§4.5): the peer and the Message ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    peer: SocketAddr,
    mid: u16,
}

#[derive(Debug)]
struct Record {
    at: Instant,
    key: Key,
    /// SipHash of `key`, computed once (the table finds and rehashes entries by it).
    hash: u64,
    state: State,
}

/// The table of recent requests: `records` in insertion order (which is expiry order, the
/// lifetime being fixed), record `s` (its serial) at index `s - first_serial`; `table`
/// holds the serials, found by the SipHash of their key. Per request that is one SipHash
/// (in `check`); expiry and `answered` find their entry without hashing again.
///
/// The keys are chosen by clients, so they are hashed with std's randomly keyed SipHash
/// (HashDoS resistance), not with the gateway's fast hasher.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    lifetime: Duration,
    hasher: RandomState,
    table: HashTable<u64>,
    records: VecDeque<Record>,
    /// Serial of `records[0]` (or of the next record when empty).
    first_serial: u64,
}

impl Dedup {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            lifetime,
            hasher: RandomState::new(),
            table: HashTable::new(),
            records: VecDeque::new(),
            first_serial: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.records.front() {
            let full = self.records.len() >= self.capacity;
            if now.saturating_duration_since(front.at) < self.lifetime && !full {
                break;
            }
            let serial = self.first_serial;
            if let Ok(e) = self.table.find_entry(front.hash, |&s| s == serial) {
                e.remove();
            }
            self.records.pop_front();
            self.first_serial += 1;
        }
    }

    /// Checks a request from `peer` with `mid`, recording it if it is new.
    pub fn check(&mut self, peer: SocketAddr, mid: u16, now: Instant) -> Seen {
        self.expire(now);
        let key = Key { peer, mid };
        let hash = self.hasher.hash_one(key);
        let (records, first) = (&self.records, self.first_serial);
        let record = |s: u64| &records[(s - first) as usize];
        if let Some(&s) = self.table.find(hash, |&s| record(s).key == key) {
            return match &record(s).state {
                State::InFlight => Seen::InFlight,
                State::Answered(r) => Seen::Answered(r.clone()),
            };
        }
        let serial = first + records.len() as u64;
        self.table.insert_unique(hash, serial, |&s| record(s).hash);
        self.records.push_back(Record {
            at: now,
            key,
            hash,
            state: State::InFlight,
        });
        Seen::New(Ticket(serial))
    }

    /// Records the response sent for the request `check` gave `ticket` to, for
    /// retransmissions of that request.
    pub fn answered(&mut self, ticket: Ticket, response: Vec<u8>) {
        let Some(i) = ticket.0.checked_sub(self.first_serial) else {
            return; // forgotten meanwhile (expired or evicted)
        };
        if let Some(r) = usize::try_from(i)
            .ok()
            .and_then(|i| self.records.get_mut(i))
        {
            r.state = State::Answered(response);
        }
    }

    pub fn len(&self) -> usize {
        debug_assert_eq!(self.table.len(), self.records.len());
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(s: Seen) -> Ticket {
        match s {
            Seen::New(t) => t,
            other => panic!("expected New, got {other:?}"),
        }
    }

    #[test]
    fn retransmissions_are_recognised_until_the_lifetime_ends() {
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Dedup::new(10, EXCHANGE_LIFETIME);
        let first = new(d.check(peer, 1, t0));
        assert_eq!(d.check(peer, 1, t0), Seen::InFlight);
        let from_other = new(d.check(other, 1, t0));
        assert_ne!(first, from_other);
        d.answered(first, vec![1, 2, 3]);
        assert_eq!(
            d.check(peer, 1, t0 + Duration::from_secs(200)),
            Seen::Answered(vec![1, 2, 3])
        );
        assert_eq!(d.check(other, 1, t0), Seen::InFlight);
        let again = new(d.check(peer, 1, t0 + EXCHANGE_LIFETIME));
        // both earlier entries expired with the lifetime
        assert_eq!(d.len(), 1);
        // a late answer for the expired entry does not touch the new one
        d.answered(first, vec![9]);
        assert_eq!(d.check(peer, 1, t0 + EXCHANGE_LIFETIME), Seen::InFlight);
        d.answered(again, vec![4]);
        assert_eq!(
            d.check(peer, 1, t0 + EXCHANGE_LIFETIME),
            Seen::Answered(vec![4])
        );
    }

    #[test]
    fn bounded() {
        let peer: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Dedup::new(3, EXCHANGE_LIFETIME);
        let mut tickets = Vec::new();
        for mid in 0..10 {
            tickets.push(new(d.check(peer, mid, t0)));
            assert!(d.len() <= 3);
        }
        // the oldest were forgotten, the newest are remembered
        assert_eq!(d.check(peer, 9, t0), Seen::InFlight);
        assert_eq!(d.check(peer, 8, t0), Seen::InFlight);
        // answers for forgotten entries are dropped, for remembered ones kept
        d.answered(tickets[0], vec![0]);
        d.answered(tickets[9], vec![9]);
        assert_eq!(d.check(peer, 9, t0), Seen::Answered(vec![9]));
        assert!(matches!(d.check(peer, 0, t0), Seen::New(_)));
    }

    /// Many peers and Message IDs (the table grows and rehashes from the stored hashes),
    /// IPv4 and IPv6 peers with equal ports, the same MID from different peers: every key
    /// is found again exactly while it is remembered, and checked against a plain map.
    #[test]
    fn agrees_with_a_map_over_many_keys_and_expiry() {
        use std::collections::HashMap;
        let t0 = Instant::now();
        let lifetime = Duration::from_secs(100);
        let capacity = 700;
        let mut d = Dedup::new(capacity, lifetime);
        // model: key -> answer (None: in flight)
        type Model = HashMap<(SocketAddr, u16), Option<Vec<u8>>>;
        let mut model: Model = HashMap::new();
        let mut order: VecDeque<((SocketAddr, u16), usize)> = VecDeque::new();
        let peers: Vec<SocketAddr> = vec![
            "127.0.0.1:5683".parse().unwrap(),
            "127.0.0.2:5683".parse().unwrap(),
            "[::1]:5683".parse().unwrap(),
            "[fe80::1%2]:5683".parse().unwrap(),
            "[fe80::1%3]:5683".parse().unwrap(),
        ];
        let mut x: u32 = 12345;
        for step in 0..5000usize {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let peer = peers[(x >> 8) as usize % peers.len()];
            let mid = ((x >> 16) % 400) as u16;
            let now = t0 + Duration::from_millis(step as u64 * 50);
            // expire the model like the table: by age, then by capacity
            while let Some(&(k, at)) = order.front() {
                let old = now - (t0 + Duration::from_millis(at as u64 * 50)) >= lifetime;
                if !old && order.len() < capacity {
                    break;
                }
                order.pop_front();
                model.remove(&k);
            }
            let expected = match model.get(&(peer, mid)) {
                None => None,
                Some(None) => Some(Seen::InFlight),
                Some(Some(r)) => Some(Seen::Answered(r.clone())),
            };
            let got = d.check(peer, mid, now);
            match (expected, got) {
                (None, Seen::New(t)) => {
                    model.insert((peer, mid), None);
                    order.push_back(((peer, mid), step));
                    if step % 3 != 0 {
                        let answer = step.to_be_bytes().to_vec();
                        d.answered(t, answer.clone());
                        *model.get_mut(&(peer, mid)).unwrap() = Some(answer);
                    }
                }
                (Some(e), g) => assert_eq!(e, g, "step {step}"),
                (None, g) => panic!("step {step}: expected New, got {g:?}"),
            }
            assert_eq!(d.len(), model.len());
        }
    }
}
