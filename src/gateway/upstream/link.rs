//! The message layer toward one origin (RFC 7252 §4), sans-IO: confirmable requests with
//! Message IDs of this leg, retransmitted with exponential back-off under the SAME Message
//! ID (so the origin's deduplication, §4.5, answers a retransmission from its cache instead
//! of executing the request twice), piggybacked or separate responses (§5.2), matched by
//! token, and at most NSTART outstanding interactions (§4.7), the rest queued.
//!
//! Shaped like quinn-proto's `Endpoint`: the caller passes the time and the datagrams in and
//! takes `Event`s (datagrams to send, responses, failures) out; it never touches a socket
//! or a clock, so loss, duplication and timeouts are unit-tested without either.
//!
//! Bounded: at most `max_active` exchanges in flight, `max_queued` waiting for an NSTART
//! slot, and `RECENT_ACKED` remembered CON responses (to ACK their retransmissions again).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::coap::{Code, MessageBuilder, MessageType, MessageView, Token};
use crate::gateway::FastMap;

/// CON responses whose Message ID is remembered, so that a retransmission (our ACK was lost)
/// is acknowledged again instead of reset (§4.5).
pub const RECENT_ACKED: usize = 256;
/// How long a remembered CON response stays (RFC 7252 §4.8.2 EXCHANGE_LIFETIME).
pub const RECENT_ACKED_LIFETIME: Duration = Duration::from_secs(247);

/// RFC 7252 §4.8 transmission parameters plus NSTART (§4.7) and the table bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    pub ack_timeout: Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    /// How long to wait for a separate response after the origin's empty ACK.
    pub separate_response_timeout: Duration,
    /// Outstanding interactions allowed at once (§4.7; default 1).
    pub nstart: usize,
    /// Exchanges in flight (awaiting an ACK or a separate response), at most.
    pub max_active: usize,
    /// Requests waiting for an NSTART slot, at most.
    pub max_queued: usize,
}

impl Default for LinkParams {
    /// RFC 7252 §4.8's transmission parameters (the same set the client uses) and
    /// §4.7's NSTART of 1.
    fn default() -> Self {
        let t = crate::client::TransmissionParams::default();
        Self {
            ack_timeout: t.ack_timeout,
            ack_random_factor: t.ack_random_factor,
            max_retransmit: t.max_retransmit,
            separate_response_timeout: t.separate_response_timeout,
            nstart: 1,
            max_active: 1024,
            max_queued: 1024,
        }
    }
}

/// Why an exchange ended without a response.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    #[error("no response after {attempts} transmissions")]
    Timeout { attempts: u32 },
    #[error("no separate response within {0:?} after the origin's empty ACK")]
    SeparateTimeout(Duration),
    #[error("the origin rejected the request with a Reset")]
    Reset,
    #[error("too many requests to this origin at once ({0} in flight or queued)")]
    Busy(usize),
    #[error("token already in use toward this origin")]
    TokenInUse,
    #[error("not a CoAP request datagram")]
    NotARequest,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Send this datagram to the origin.
    Transmit(Vec<u8>),
    /// The response (piggybacked or separate) to the exchange with this token.
    Response { token: Token, datagram: Vec<u8> },
    /// The exchange with this token ended without a response.
    Failed { token: Token, error: LinkError },
}

#[derive(Debug)]
enum State {
    /// CON sent, neither ACK nor response yet: an outstanding interaction (§4.7).
    AwaitingAck {
        attempts: u32,
        next_at: Instant,
        wait: Duration,
    },
    /// Empty ACK received (§5.2.2); the response comes as its own message.
    AwaitingSeparate { deadline: Instant },
}

#[derive(Debug)]
struct Exchange {
    mid: u16,
    datagram: Vec<u8>,
    state: State,
}

#[derive(Debug)]
struct Queued {
    token: Token,
    datagram: Vec<u8>,
    random: f64,
}

/// The message layer toward one origin.
#[derive(Debug)]
pub struct OriginLink {
    params: LinkParams,
    next_mid: u16,
    active: FastMap<Token, Exchange>,
    by_mid: FastMap<u16, Token>,
    queue: VecDeque<Queued>,
    recent_acked: VecDeque<(u16, Instant)>,
    events: VecDeque<Event>,
    /// Exchanges in `active` that are `AwaitingAck` (counted, not scanned, per event).
    outstanding: usize,
}

impl OriginLink {
    /// `first_mid`: a random start for this leg's Message IDs (§4.4).
    pub fn new(params: LinkParams, first_mid: u16) -> Self {
        Self {
            params,
            next_mid: first_mid,
            active: FastMap::default(),
            by_mid: FastMap::default(),
            queue: VecDeque::new(),
            recent_acked: VecDeque::new(),
            events: VecDeque::new(),
            outstanding: 0,
        }
    }

    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// Exchanges in flight plus queued.
    pub fn len(&self) -> usize {
        self.active.len() + self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Outstanding interactions (§4.7): CONs neither acknowledged nor answered.
    pub fn outstanding(&self) -> usize {
        debug_assert_eq!(
            self.outstanding,
            self.active
                .values()
                .filter(|e| matches!(e.state, State::AwaitingAck { .. }))
                .count()
        );
        self.outstanding
    }

    /// Removes the exchange with `token` from `active` (and its Message ID).
    fn remove_active(&mut self, token: &Token) {
        if let Some(e) = self.active.remove(token) {
            self.by_mid.remove(&e.mid);
            if matches!(e.state, State::AwaitingAck { .. }) {
                self.outstanding -= 1;
            }
        }
    }

    /// Sends the CON request `datagram` (its Message ID is replaced by one of this leg; its
    /// token must be unique among this link's exchanges) now or, when NSTART interactions
    /// are outstanding, as soon as one ends. `random` in [0, 1] picks the initial timeout
    /// in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR] (§4.2). Returns the request's
    /// token, which names the exchange in the `Event`s.
    pub fn submit(
        &mut self,
        now: Instant,
        datagram: Vec<u8>,
        random: f64,
    ) -> Result<Token, LinkError> {
        let view = MessageView::parse(&datagram).map_err(|_| LinkError::NotARequest)?;
        if view.mtype != MessageType::Confirmable || !view.code.is_request() {
            return Err(LinkError::NotARequest);
        }
        // A parsed message's token is at most 8 bytes (§3).
        let token = Token::new(view.token).ok_or(LinkError::NotARequest)?;
        if self.active.contains_key(&token) || self.queue.iter().any(|q| q.token == token) {
            return Err(LinkError::TokenInUse);
        }
        if self.len() >= self.params.max_active + self.params.max_queued {
            return Err(LinkError::Busy(self.len()));
        }
        self.queue.push_back(Queued {
            token,
            datagram,
            random,
        });
        self.start_queued(now);
        Ok(token)
    }

    /// Forgets the exchange with `token` (its requester gave up); frees its NSTART slot.
    pub fn cancel(&mut self, now: Instant, token: &Token) {
        self.queue.retain(|q| q.token != *token);
        self.remove_active(token);
        self.start_queued(now);
    }

    /// Starts queued requests while fewer than NSTART interactions are outstanding.
    fn start_queued(&mut self, now: Instant) {
        while self.outstanding() < self.params.nstart.max(1)
            && self.active.len() < self.params.max_active
        {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            let mid = self.fresh_mid();
            let mut datagram = q.datagram;
            // The Message ID is bytes 2-3 of the fixed header (§3); OSCORE does not cover
            // it (RFC 8613 §4.1.3.2 does not put it in the AAD), so it can be set last.
            datagram[2..4].copy_from_slice(&mid.to_be_bytes());
            let wait = self
                .params
                .ack_timeout
                .mul_f64(1.0 + q.random.clamp(0.0, 1.0) * (self.params.ack_random_factor - 1.0));
            self.events.push_back(Event::Transmit(datagram.clone()));
            self.by_mid.insert(mid, q.token);
            self.outstanding += 1;
            self.active.insert(
                q.token,
                Exchange {
                    mid,
                    datagram,
                    state: State::AwaitingAck {
                        attempts: 1,
                        next_at: now + wait,
                        wait,
                    },
                },
            );
        }
    }

    /// The next Message ID not used by an exchange in flight (§4.4: a MID is not reused
    /// while the exchange it names can still be answered).
    fn fresh_mid(&mut self) -> u16 {
        loop {
            self.next_mid = self.next_mid.wrapping_add(1);
            if !self.by_mid.contains_key(&self.next_mid) {
                return self.next_mid;
            }
        }
    }

    fn finish(&mut self, now: Instant, token: &Token, event: Event) {
        self.remove_active(token);
        self.events.push_back(event);
        self.start_queued(now);
    }

    /// A datagram from the origin.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let Ok(msg) = MessageView::parse(datagram) else {
            return; // §4.2: silently ignore malformed messages
        };
        match msg.mtype {
            MessageType::Reset => {
                if let Some(token) = self.by_mid.get(&msg.message_id).copied() {
                    self.finish(
                        now,
                        &token,
                        Event::Failed {
                            token,
                            error: LinkError::Reset,
                        },
                    );
                }
            }
            MessageType::Acknowledgement => {
                let Some(token) = self.by_mid.get(&msg.message_id).copied() else {
                    return; // a duplicate or late ACK
                };
                if msg.code.is_empty() {
                    // §5.2.2: the response will follow as a separate message.
                    if let Some(e) = self.active.get_mut(&token) {
                        if matches!(e.state, State::AwaitingAck { .. }) {
                            e.state = State::AwaitingSeparate {
                                deadline: now + self.params.separate_response_timeout,
                            };
                            self.outstanding -= 1;
                        }
                    }
                    self.start_queued(now);
                } else if msg.token == token.as_slice() && msg.code.is_response() {
                    self.finish(
                        now,
                        &token,
                        Event::Response {
                            token,
                            datagram: datagram.to_vec(),
                        },
                    );
                }
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {
                let con = msg.mtype == MessageType::Confirmable;
                // A parsed message's token is at most 8 bytes (§3), so `Token::new` is Some.
                let token = Token::new(msg.token)
                    .filter(|t| msg.code.is_response() && self.active.contains_key(t));
                if let Some(token) = token {
                    if con {
                        self.send_empty(MessageType::Acknowledgement, msg.message_id);
                        self.remember_acked(now, msg.message_id);
                    }
                    // A separate response also acknowledges the request (§5.2.2: the
                    // empty ACK may have been lost).
                    self.finish(
                        now,
                        &token,
                        Event::Response {
                            token,
                            datagram: datagram.to_vec(),
                        },
                    );
                } else if con {
                    if self.was_acked(now, msg.message_id) {
                        // our ACK was lost and the origin retransmits: ACK again
                        self.send_empty(MessageType::Acknowledgement, msg.message_id);
                    } else {
                        // §4.2: a CON we cannot process (unknown token, a ping): Reset
                        self.send_empty(MessageType::Reset, msg.message_id);
                    }
                }
            }
        }
    }

    fn send_empty(&mut self, mtype: MessageType, mid: u16) {
        let mut out = Vec::with_capacity(4);
        // An Empty message without a token cannot fail to build.
        if let Ok(b) = MessageBuilder::new(&mut out, mtype, Code::EMPTY, mid, &[]) {
            b.finish();
            self.events.push_back(Event::Transmit(out));
        }
    }

    fn expire_acked(&mut self, now: Instant) {
        while let Some(&(_, at)) = self.recent_acked.front() {
            if now.duration_since(at) < RECENT_ACKED_LIFETIME
                && self.recent_acked.len() <= RECENT_ACKED
            {
                break;
            }
            self.recent_acked.pop_front();
        }
    }

    fn remember_acked(&mut self, now: Instant, mid: u16) {
        self.recent_acked.push_back((mid, now));
        self.expire_acked(now);
    }

    fn was_acked(&mut self, now: Instant, mid: u16) -> bool {
        self.expire_acked(now);
        self.recent_acked.iter().any(|&(m, _)| m == mid)
    }

    /// Retransmissions and timeouts that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let max = self.params.max_retransmit;
        let mut failed = Vec::new();
        for (token, e) in self.active.iter_mut() {
            match &mut e.state {
                State::AwaitingAck {
                    attempts,
                    next_at,
                    wait,
                } if *next_at <= now => {
                    if *attempts > max {
                        failed.push((
                            *token,
                            LinkError::Timeout {
                                attempts: *attempts,
                            },
                        ));
                    } else {
                        // §4.2: same message, same Message ID, timeout doubled
                        *attempts += 1;
                        *wait *= 2;
                        *next_at = now + *wait;
                        self.events.push_back(Event::Transmit(e.datagram.clone()));
                    }
                }
                State::AwaitingSeparate { deadline } if *deadline <= now => {
                    failed.push((
                        *token,
                        LinkError::SeparateTimeout(self.params.separate_response_timeout),
                    ));
                }
                _ => {}
            }
        }
        for (token, error) in failed {
            self.finish(now, &token, Event::Failed { token, error });
        }
        self.expire_acked(now);
    }

    /// When `handle_timeout` must be called next (None: nothing in flight).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active
            .values()
            .map(|e| match e.state {
                State::AwaitingAck { next_at, .. } => next_at,
                State::AwaitingSeparate { deadline } => deadline,
            })
            .min()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn con(token: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Confirmable, Code::POST, 0, token).unwrap();
        b.option(11, b"x").unwrap();
        b.payload(b"body");
        out
    }

    fn response(mtype: MessageType, mid: u16, token: &[u8], code: Code) -> Vec<u8> {
        let mut out = Vec::new();
        let b = MessageBuilder::new(&mut out, mtype, code, mid, token).unwrap();
        b.payload(b"ok");
        out
    }

    fn events(l: &mut OriginLink) -> Vec<Event> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    fn mid_of(d: &[u8]) -> u16 {
        u16::from_be_bytes([d[2], d[3]])
    }

    fn params(nstart: usize) -> LinkParams {
        LinkParams {
            nstart,
            max_active: 4,
            max_queued: 2,
            ..LinkParams::default()
        }
    }

    #[test]
    fn tokens_differing_only_in_a_trailing_zero_are_different_exchanges() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(2), 0);
        assert_eq!(l.submit(t0, con(b"a"), 0.0), Ok(Token::new(b"a").unwrap()));
        assert_eq!(
            l.submit(t0, con(b"a\0"), 0.0),
            Ok(Token::new(b"a\0").unwrap())
        );
        assert_eq!(l.submit(t0, con(b""), 0.0), Ok(Token::new(b"").unwrap()));
        let ev = events(&mut l);
        let mids: Vec<u16> = ev
            .iter()
            .map(|e| match e {
                Event::Transmit(d) => mid_of(d),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(mids, [1, 2]); // NSTART 2: the empty token waits
                                  // the response to "a\0" (MID 2) ends that exchange only
        l.handle_datagram(
            t0,
            &response(MessageType::Acknowledgement, 2, b"a\0", Code::CONTENT),
        );
        let ev = events(&mut l);
        assert!(
            matches!(
                &ev[..],
                [Event::Response { token, .. }, Event::Transmit(_)] if *token == Token::new(b"a\0").unwrap()
            ),
            "{ev:?}"
        );
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn retransmits_same_message_id_with_doubling_timeout_then_fails() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 100);
        l.submit(t0, con(b"t1"), 0.0).unwrap();
        let ev = events(&mut l);
        let Event::Transmit(first) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(mid_of(first), 101);
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            let next = l.poll_timeout().unwrap();
            waits.push(next - at);
            at = next;
            l.handle_timeout(at);
            assert_eq!(events(&mut l), vec![Event::Transmit(first.clone())]);
        }
        assert_eq!(
            waits,
            [2, 4, 8, 16].map(Duration::from_secs).to_vec(),
            "ACK_TIMEOUT doubled per retransmission"
        );
        at = l.poll_timeout().unwrap();
        l.handle_timeout(at);
        assert_eq!(
            events(&mut l),
            vec![Event::Failed {
                token: Token::new(b"t1").unwrap(),
                error: LinkError::Timeout { attempts: 5 }
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn piggybacked_response_matched_by_mid_and_token() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 7);
        l.submit(t0, con(b"aa"), 0.5).unwrap();
        events(&mut l);
        // wrong token in an ACK with our MID: ignored
        l.handle_datagram(
            t0,
            &response(MessageType::Acknowledgement, 8, b"zz", Code::CONTENT),
        );
        assert!(events(&mut l).is_empty());
        let r = response(MessageType::Acknowledgement, 8, b"aa", Code::CONTENT);
        l.handle_datagram(t0, &r);
        assert_eq!(
            events(&mut l),
            vec![Event::Response {
                token: Token::new(b"aa").unwrap(),
                datagram: r.clone()
            }]
        );
        // a duplicate ACK later changes nothing
        l.handle_datagram(t0, &r);
        assert!(events(&mut l).is_empty());
        assert!(l.is_empty());
    }

    #[test]
    fn empty_ack_then_separate_con_response_is_acknowledged_even_when_retransmitted() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 0);
        l.submit(t0, con(b"s"), 0.0).unwrap();
        events(&mut l);
        let mut ack = Vec::new();
        MessageBuilder::new(&mut ack, MessageType::Acknowledgement, Code::EMPTY, 1, &[])
            .unwrap()
            .finish();
        l.handle_datagram(t0, &ack);
        assert!(events(&mut l).is_empty());
        assert_eq!(
            l.outstanding(),
            0,
            "an acknowledged CON is no longer outstanding"
        );
        // no retransmission after the empty ACK
        l.handle_timeout(t0 + Duration::from_secs(30));
        assert!(events(&mut l).is_empty());
        let sep = response(MessageType::Confirmable, 0x5555, b"s", Code::CONTENT);
        l.handle_datagram(t0 + Duration::from_secs(31), &sep);
        let mut empty_ack = Vec::new();
        MessageBuilder::new(
            &mut empty_ack,
            MessageType::Acknowledgement,
            Code::EMPTY,
            0x5555,
            &[],
        )
        .unwrap()
        .finish();
        assert_eq!(
            events(&mut l),
            vec![
                Event::Transmit(empty_ack.clone()),
                Event::Response {
                    token: Token::new(b"s").unwrap(),
                    datagram: sep.clone()
                }
            ]
        );
        // our ACK was lost: the origin retransmits its CON; we ACK again, deliver nothing
        l.handle_datagram(t0 + Duration::from_secs(33), &sep);
        assert_eq!(events(&mut l), vec![Event::Transmit(empty_ack)]);
        // an unknown CON is reset
        l.handle_datagram(
            t0,
            &response(MessageType::Confirmable, 0x7777, b"??", Code::CONTENT),
        );
        let ev = events(&mut l);
        assert!(
            matches!(&ev[..], [Event::Transmit(d)] if d[0] >> 4 & 3 == 3),
            "{ev:?}"
        );
    }

    #[test]
    fn separate_response_times_out() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 0);
        l.submit(t0, con(b"s"), 0.0).unwrap();
        events(&mut l);
        let mut ack = Vec::new();
        MessageBuilder::new(&mut ack, MessageType::Acknowledgement, Code::EMPTY, 1, &[])
            .unwrap()
            .finish();
        l.handle_datagram(t0, &ack);
        l.handle_timeout(t0 + Duration::from_secs(61));
        assert!(matches!(
            &events(&mut l)[..],
            [Event::Failed {
                error: LinkError::SeparateTimeout(_),
                ..
            }]
        ));
    }

    #[test]
    fn nstart_limits_outstanding_interactions_and_queue_is_bounded() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 0);
        l.submit(t0, con(b"1"), 0.0).unwrap();
        l.submit(t0, con(b"2"), 0.0).unwrap();
        l.submit(t0, con(b"3"), 0.0).unwrap();
        assert_eq!(l.submit(t0, con(b"1"), 0.0), Err(LinkError::TokenInUse));
        let ev = events(&mut l);
        assert_eq!(ev.len(), 1, "NSTART = 1: one request on the wire");
        l.handle_datagram(
            t0,
            &response(MessageType::Acknowledgement, 1, b"1", Code::CONTENT),
        );
        let ev = events(&mut l);
        assert!(matches!(&ev[..], [Event::Response { .. }, Event::Transmit(d)] if mid_of(d) == 2));
        // cancel the outstanding one: the next starts
        l.cancel(t0, &Token::new(b"2").unwrap());
        let ev = events(&mut l);
        assert!(
            matches!(&ev[..], [Event::Transmit(d)] if mid_of(d) == 3),
            "{ev:?}"
        );

        let mut l = OriginLink::new(params(2), 0);
        for t in [b"a", b"b", b"c", b"d"] {
            l.submit(t0, con(t), 0.0).unwrap();
        }
        assert_eq!(events(&mut l).len(), 2, "NSTART = 2");
        // max_active 4 + max_queued 2 = 6 at most
        l.submit(t0, con(b"e"), 0.0).unwrap();
        l.submit(t0, con(b"f"), 0.0).unwrap();
        assert_eq!(l.submit(t0, con(b"g"), 0.0), Err(LinkError::Busy(6)));
    }

    #[test]
    fn reset_fails_the_exchange_and_non_requests_are_refused() {
        let t0 = Instant::now();
        let mut l = OriginLink::new(params(1), 0);
        assert_eq!(
            l.submit(
                t0,
                response(MessageType::Confirmable, 0, b"r", Code::CONTENT),
                0.0
            ),
            Err(LinkError::NotARequest)
        );
        l.submit(t0, con(b"r"), 0.0).unwrap();
        events(&mut l);
        let mut rst = Vec::new();
        MessageBuilder::new(&mut rst, MessageType::Reset, Code::EMPTY, 1, &[])
            .unwrap()
            .finish();
        l.handle_datagram(t0, &rst);
        assert_eq!(
            events(&mut l),
            vec![Event::Failed {
                token: Token::new(b"r").unwrap(),
                error: LinkError::Reset
            }]
        );
    }
}
