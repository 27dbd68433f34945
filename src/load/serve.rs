//! `oscore-gateway load --serve ADDR`: a minimal origin that answers every request at once
//! with a fixed-size payload (GET: 2.05 with `--payload-size` bytes; other methods: 2.04),
//! so that the gateway can be measured without a slow origin behind it.
//!
//! With `--credentials`, requests carrying an OSCORE option are verified with the `:label`
//! contexts (found by kid and kid context, RFC 8613 §8.2) and answered protected (§8.3); a
//! context whose replay window is unknown answers 4.01 + Echo first (App. B.1.2), as
//! aiocoap does. Plain requests are answered plain. One thread, one socket, buffers reused.
//!
//! Observe (RFC 7641): a GET with Observe: 0 (plain, or inside OSCORE) registers a relation
//! (bounded by `--max-relations`; past it the answer carries no Observe, §4.1); every
//! relation then gets a NON 2.05 notification every `--notify-ms`, with an increasing
//! Observe value (§4.4), protected under the registration's binding with the origin's own
//! Partial IV behind OSCORE (RFC 8613 §8.3). The notifications go out smoothly (a share of
//! the relations at each turn of the loop), not in bursts. A GET with Observe: 1 on the
//! relation's token (§3.6) or a Reset to a notification (§3.6, §4.5) ends it.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::transport::random_bytes;
use crate::coap::option::{decode_uint, encode_uint};
use crate::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use crate::gateway::mmsg::send_batch_to;
use crate::oscore::{
    parse_request_kid, protect_response, unprotect_request, OscoreError, RequestBinding, RequestKid,
};

use super::oscore_ctx::{server_contexts, OpenedContext};
use super::signal;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bind: String,
    pub credentials: Option<PathBuf>,
    pub payload_size: usize,
    pub max_seconds: Option<Duration>,
    /// Each Observe relation gets a notification this often.
    pub notify_interval: Duration,
    /// Observe relations kept at once, at most.
    pub max_relations: usize,
}

/// Shortest `--notify-ms`: bounds the notification rate per relation.
pub const MIN_NOTIFY_INTERVAL: Duration = Duration::from_millis(10);
/// Largest `--max-relations`.
pub const MAX_RELATIONS_LIMIT: usize = 1_000_000;
/// RFC 7641 §4.4: Observe values are 24 bits.
const OBSERVE_MODULUS: u32 = 1 << 24;

/// Datagrams per recvmmsg, and answers per sendmmsg (`mmsg::SEND_BATCH`).
const BATCH: usize = crate::gateway::mmsg::SEND_BATCH;

/// Serves until SIGINT/SIGTERM or `max_seconds`, then closes the contexts.
pub fn serve(cfg: &ServeConfig) -> Result<(), String> {
    signal::install();
    let addr = cfg
        .bind
        .to_socket_addrs()
        .map_err(|e| format!("--serve {}: {e}", cfg.bind))?
        .next()
        .ok_or_else(|| format!("--serve {}: no address", cfg.bind))?;
    let socket = UdpSocket::bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
    crate::gateway::mmsg::enable_gro(std::os::fd::AsRawFd::as_raw_fd(&socket));
    // Short, so notifications are paced finely and a signal is seen quickly.
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| format!("{addr}: {e}"))?;
    let contexts = match &cfg.credentials {
        Some(c) => server_contexts(c)?,
        None => Vec::new(),
    };
    let mut origin = Origin::new(contexts, cfg.payload_size);
    origin.set_observe(cfg.notify_interval, cfg.max_relations);
    let end = cfg.max_seconds.map(|d| Instant::now() + d);
    // Every datagram waiting is taken in one recvmmsg: one syscall per batch under load.
    let mut batch = crate::gateway::mmsg::RecvBatch::new(BATCH);
    // answer k of a batch and its destination (grown when a batch holds more)
    let mut outs: Vec<(Vec<u8>, SocketAddr)> = (0..BATCH)
        .map(|_| (Vec::with_capacity(2048), addr))
        .collect();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let mut out = Vec::with_capacity(2048);
    let result = loop {
        let now = Instant::now();
        if signal::stop_requested() || end.is_some_and(|d| now >= d) {
            break Ok(());
        }
        origin.notify_due(now, &mut out, |d, to| {
            let _ = socket.send_to(d, to);
        });
        let n = match batch.recv_wait(fd) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => break Err(format!("serve on {addr}: {e}")),
        };
        // The answers to one batch leave in one sendmmsg (a full send buffer is loss, as
        // for any UDP origin; the client retransmits).
        let mut answers = 0;
        if n > 1 && origin.prefetches() {
            for i in 0..n {
                origin.prefetch_for(batch.get(i).0);
            }
        }
        for i in 0..n {
            let (datagram, from) = batch.get(i);
            if let Some(from) = from {
                // a coalesced (GRO) receive can hold more datagrams than the batch has slots
                if answers == outs.len() {
                    outs.push((Vec::with_capacity(2048), addr));
                }
                if origin.handle_from(datagram, from, &mut outs[answers].0) {
                    outs[answers].1 = from;
                    answers += 1;
                }
            }
        }
        let mut done = 0;
        while done < answers {
            let rest = &outs[done..answers];
            let sent = send_batch_to(fd, rest.len(), |k| (rest[k].0.as_slice(), rest[k].1));
            match sent {
                Ok(k) => done += k.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => done += 1,
            }
        }
    };
    for c in &origin.contexts {
        c.close();
    }
    let o = &origin.observe;
    println!(
        "serve: observe relations open at exit {}, registered {}, deregistered {}, \
         notifications sent {}",
        o.relations.len(),
        o.registered,
        o.deregistered,
        o.notifications
    );
    result
}

/// One Observe relation held by the origin.
struct Relation {
    peer: SocketAddr,
    token: Vec<u8>,
    /// OSCORE: the context index and the registration's binding.
    oscore: Option<(usize, RequestBinding)>,
    /// The last Observe value sent.
    observe: u32,
    /// The Message ID of the last notification (a Reset to it ends the relation).
    last_mid: u16,
}

/// The origin's Observe relations, in a Vec (round-robin notifications) with an index.
struct Observers {
    relations: Vec<Relation>,
    index: HashMap<(SocketAddr, Vec<u8>), usize>,
    interval: Duration,
    max: usize,
    cursor: usize,
    /// Notifications owed but not yet sent (fractional), and when it was last computed.
    credit: f64,
    last_tick: Option<Instant>,
    registered: u64,
    deregistered: u64,
    notifications: u64,
}

impl Observers {
    fn new() -> Self {
        Self {
            relations: Vec::new(),
            index: HashMap::new(),
            interval: Duration::from_secs(1),
            max: 0,
            cursor: 0,
            credit: 0.0,
            last_tick: None,
            registered: 0,
            deregistered: 0,
            notifications: 0,
        }
    }

    /// Registers (or re-registers, §4.1) a relation; its first Observe value, or `None`
    /// when the limit is reached (the answer is then a plain response, §4.1).
    fn register(
        &mut self,
        peer: SocketAddr,
        token: &[u8],
        oscore: Option<(usize, RequestBinding)>,
    ) -> Option<u32> {
        let key = (peer, token.to_vec());
        if let Some(&i) = self.index.get(&key) {
            let r = &mut self.relations[i];
            r.oscore = oscore;
            r.observe = (r.observe + 1) % OBSERVE_MODULUS;
            return Some(r.observe);
        }
        if self.relations.len() >= self.max {
            return None;
        }
        self.registered += 1;
        self.index.insert(key, self.relations.len());
        self.relations.push(Relation {
            peer,
            token: token.to_vec(),
            oscore,
            observe: 2,
            last_mid: 0,
        });
        Some(2)
    }

    fn remove_at(&mut self, i: usize) {
        let r = self.relations.swap_remove(i);
        self.index.remove(&(r.peer, r.token));
        if let Some(moved) = self.relations.get(i) {
            self.index.insert((moved.peer, moved.token.clone()), i);
        }
        self.deregistered += 1;
    }

    /// §3.6: GET with Observe: 1 (or any GET without Observe) on the token ends it.
    fn deregister(&mut self, peer: SocketAddr, token: &[u8]) {
        if let Some(&i) = self.index.get(&(peer, token.to_vec())) {
            self.remove_at(i);
        }
    }

    /// §3.6, §4.5: a Reset to a notification ends its relation.
    fn reset(&mut self, peer: SocketAddr, mid: u16) {
        if let Some(i) = self
            .relations
            .iter()
            .position(|r| r.peer == peer && r.last_mid == mid)
        {
            self.remove_at(i);
        }
    }
}

/// The origin's request handling, without the socket (so it can be tested and benched).
pub struct Origin {
    contexts: Vec<OpenedContext>,
    /// kid -> indexes into `contexts` (kid contexts are compared after the lookup).
    by_kid: HashMap<Vec<u8>, Vec<usize>>,
    /// The Echo value each context sent in its last 4.01 (App. B.1.2).
    echo: Vec<Option<[u8; 8]>>,
    payload: Vec<u8>,
    next_mid: u16,
    plain_in: Vec<u8>,
    plain_out: Vec<u8>,
    observe: Observers,
}

impl Origin {
    pub(crate) fn new(contexts: Vec<OpenedContext>, payload_size: usize) -> Self {
        let mut by_kid: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, c) in contexts.iter().enumerate() {
            by_kid
                .entry(c.ctx.recipient_id().to_vec())
                .or_default()
                .push(i);
        }
        Self {
            echo: vec![None; contexts.len()],
            contexts,
            by_kid,
            payload: vec![b'x'; payload_size],
            next_mid: u16::from_be_bytes(random_bytes::<2>()),
            plain_in: Vec::with_capacity(2048),
            plain_out: Vec::with_capacity(2048),
            observe: Observers::new(),
        }
    }

    /// Sets the Observe parameters (`--notify-ms`, `--max-relations`).
    pub fn set_observe(&mut self, interval: Duration, max_relations: usize) {
        self.observe.interval = interval.max(MIN_NOTIFY_INTERVAL);
        self.observe.max = max_relations.min(MAX_RELATIONS_LIMIT);
    }

    /// Observe relations open now.
    pub fn relations(&self) -> usize {
        self.observe.relations.len()
    }

    /// Writes the answer to `datagram` into `out`; false when nothing is to be sent.
    /// Without the sender's address: no Observe relations are kept.
    pub fn handle(&mut self, datagram: &[u8], out: &mut Vec<u8>) -> bool {
        self.handle_inner(datagram, None, out)
    }

    /// `handle` for a datagram from `peer` (Observe relations are kept per peer and token).
    pub fn handle_from(&mut self, datagram: &[u8], peer: SocketAddr, out: &mut Vec<u8>) -> bool {
        self.handle_inner(datagram, Some(peer), out)
    }

    /// Whether the serve loop should prefetch before answering a batch (`prefetch_for`):
    /// with more contexts than the gateway's threshold, `gateway::MANY_CONTEXTS`.
    pub fn prefetches(&self) -> bool {
        self.contexts.len() > crate::gateway::MANY_CONTEXTS
    }

    /// The index in `contexts` of the context a request's kid (and kid context) names.
    fn context_for(&self, k: &RequestKid<'_>) -> Option<usize> {
        self.by_kid.get(k.kid).and_then(|v| {
            v.iter()
                .copied()
                .find(|&i| self.contexts[i].ctx.id_context() == k.kid_context)
        })
    }

    /// Prefetches what answering the OSCORE request `datagram` will read: its context's
    /// fields, both key schedules and its replay window. With thousands of contexts in
    /// turn each is cold when its turn comes; the serve loop calls this for every datagram
    /// of a batch first, so that those misses overlap, instead of stalling each answer in
    /// turn. The origin stands in for devices in the benchmarks, and its misses would
    /// otherwise be counted against the gateway on a shared machine. A hint: no effect on
    /// any answer.
    pub fn prefetch_for(&self, datagram: &[u8]) {
        use crate::prefetch::{address_of, bytes};
        let Ok(req) = MessageView::parse(datagram) else {
            return;
        };
        let Ok(k) = parse_request_kid(&req) else {
            return;
        };
        let Some(c) = self.context_for(&k).map(|i| &self.contexts[i]) else {
            return;
        };
        bytes(address_of(c), std::mem::size_of::<OpenedContext>());
        for (start, len) in c.ctx.key_schedule_spans() {
            bytes(start, len);
        }
        let window = c.ctx.replay_window();
        bytes(address_of(window), std::mem::size_of_val(window));
        bytes(c.persister.hot_line(), crate::prefetch::LINE);
    }

    /// Sends the notifications due at `now` through `send` (datagram, peer): each relation
    /// gets one per interval, spread over the interval.
    pub fn notify_due(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        mut send: impl FnMut(&[u8], SocketAddr),
    ) {
        let o = &mut self.observe;
        let last = o.last_tick.replace(now).unwrap_or(now);
        if o.relations.is_empty() {
            o.credit = 0.0;
            return;
        }
        let n = o.relations.len() as f64;
        o.credit += now.duration_since(last).as_secs_f64() / o.interval.as_secs_f64() * n;
        // never more than one round at once
        o.credit = o.credit.min(n);
        while self.observe.credit >= 1.0 && !self.observe.relations.is_empty() {
            self.observe.credit -= 1.0;
            let i = self.observe.cursor % self.observe.relations.len();
            self.observe.cursor = i + 1;
            if self.notification(i, out) {
                self.observe.notifications += 1;
                send(out, self.observe.relations[i].peer);
            }
        }
    }

    /// Writes relation `i`'s next notification into `out`.
    fn notification(&mut self, i: usize, out: &mut Vec<u8>) -> bool {
        self.next_mid = self.next_mid.wrapping_add(1);
        let mid = self.next_mid;
        let r = &mut self.observe.relations[i];
        r.observe = (r.observe + 1) % OBSERVE_MODULUS;
        r.last_mid = mid;
        let observe = r.observe;
        let target = if r.oscore.is_some() {
            &mut self.plain_out
        } else {
            &mut *out
        };
        let built = build(
            target,
            MessageType::NonConfirmable,
            Code::CONTENT,
            mid,
            &r.token,
            Some(observe),
            None,
            &self.payload,
        );
        if !built {
            return false;
        }
        let Some((idx, binding)) = &r.oscore else {
            return true;
        };
        let Ok(plain) = MessageView::parse(&self.plain_out) else {
            return false;
        };
        let ctx = &self.contexts[*idx];
        match ctx.next_ssn() {
            Ok(ssn) => protect_response(&ctx.ctx, binding, Some(ssn), &plain, out).is_ok(),
            Err(e) => {
                eprintln!("warning: {e}");
                false
            }
        }
    }

    fn handle_inner(
        &mut self,
        datagram: &[u8],
        peer: Option<SocketAddr>,
        out: &mut Vec<u8>,
    ) -> bool {
        let Ok(req) = MessageView::parse(datagram) else {
            return false; // RFC 7252 §4.2: silently ignore
        };
        if req.mtype == MessageType::Reset {
            if let Some(p) = peer {
                self.observe.reset(p, req.message_id);
            }
            return false;
        }
        if !req.code.is_request()
            || !matches!(
                req.mtype,
                MessageType::Confirmable | MessageType::NonConfirmable
            )
        {
            return false;
        }
        let (mtype, mid) = if req.mtype == MessageType::Confirmable {
            (MessageType::Acknowledgement, req.message_id)
        } else {
            self.next_mid = self.next_mid.wrapping_add(1);
            (MessageType::NonConfirmable, self.next_mid)
        };
        if !req.has_option(number::OSCORE) {
            let code = answer_code(req.code);
            let obs = req.option(number::OBSERVE).and_then(decode_uint);
            let observe = self.observe_request(req.code, obs, req.token, peer, None);
            let payload = if req.code == Code::GET {
                &self.payload[..]
            } else {
                &[]
            };
            return build(out, mtype, code, mid, req.token, observe, None, payload);
        }
        self.handle_oscore(&req, peer, mtype, mid, out)
    }

    /// Observe for the (plain or inner) GET `req` from `peer`: registers (Observe: 0) and
    /// returns the response's Observe value, or deregisters (any other GET on the token).
    fn observe_request(
        &mut self,
        code: Code,
        observe: Option<u64>,
        token: &[u8],
        peer: Option<SocketAddr>,
        oscore: Option<(usize, RequestBinding)>,
    ) -> Option<u32> {
        let peer = peer?;
        if code != Code::GET {
            return None;
        }
        match observe {
            Some(0) => self.observe.register(peer, token, oscore),
            _ => {
                self.observe.deregister(peer, token);
                None
            }
        }
    }

    fn handle_oscore(
        &mut self,
        req: &MessageView<'_>,
        peer: Option<SocketAddr>,
        mtype: MessageType,
        mid: u16,
        out: &mut Vec<u8>,
    ) -> bool {
        let idx = match parse_request_kid(req) {
            Ok(k) => self.context_for(&k),
            Err(e) => return self.plain_error(&e, req, mtype, mid, out),
        };
        let Some(idx) = idx else {
            return build(
                out,
                mtype,
                Code::UNAUTHORIZED,
                mid,
                req.token,
                None,
                None,
                b"Security context not found",
            );
        };
        let ctx = &self.contexts[idx];
        // the inner request's Observe counts; the outer one is a copy (§4.1.3.5)
        let inner_observe = |plain: &[u8]| {
            MessageView::parse(plain)
                .map(|inner| {
                    (
                        inner.code,
                        inner.option(number::OBSERVE).and_then(decode_uint),
                    )
                })
                .unwrap_or((Code::GET, None))
        };
        match unprotect_request(&ctx.ctx, req, &mut self.plain_in) {
            Ok(binding) => {
                let (code, obs) = inner_observe(&self.plain_in);
                let observe =
                    self.observe_request(code, obs, req.token, peer, Some((idx, binding.clone())));
                self.answer(
                    idx, &binding, false, mtype, mid, req.token, None, observe, out,
                )
            }
            Err(OscoreError::ReplayWindowUninitialized(u)) => {
                if let Some(expected) = self.echo[idx] {
                    if let Ok(binding) = u.accept_with_echo(&ctx.ctx, &expected) {
                        // accepted with the Echo (App. B.1.2): a registration counts too
                        let (code, obs) = inner_observe(&self.plain_in);
                        let observe = self.observe_request(
                            code,
                            obs,
                            req.token,
                            peer,
                            Some((idx, binding.clone())),
                        );
                        return self.answer(
                            idx, &binding, true, mtype, mid, req.token, None, observe, out,
                        );
                    }
                }
                // One value per context until the window is initialised, so that requests
                // in flight at once can all come back with it.
                let echo = *self.echo[idx].get_or_insert_with(random_bytes::<8>);
                self.answer(
                    idx,
                    &u.binding,
                    true,
                    mtype,
                    mid,
                    req.token,
                    Some(&echo),
                    None,
                    out,
                )
            }
            Err(e) => self.plain_error(&e, req, mtype, mid, out),
        }
    }

    /// Protects the answer (2.05/2.04, or 4.01 + `echo`) to a verified request.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        idx: usize,
        binding: &RequestBinding,
        own_piv: bool,
        mtype: MessageType,
        mid: u16,
        token: &[u8],
        echo: Option<&[u8]>,
        observe: Option<u32>,
        out: &mut Vec<u8>,
    ) -> bool {
        let (code, payload) = match echo {
            Some(_) => (Code::UNAUTHORIZED, &[][..]),
            None => {
                let inner_code = MessageView::parse(&self.plain_in)
                    .map(|m| m.code)
                    .unwrap_or(Code::GET);
                let p = if inner_code == Code::GET {
                    &self.payload[..]
                } else {
                    &[]
                };
                (answer_code(inner_code), p)
            }
        };
        if !build(
            &mut self.plain_out,
            mtype,
            code,
            mid,
            token,
            observe,
            echo,
            payload,
        ) {
            return false;
        }
        let Ok(plain) = MessageView::parse(&self.plain_out) else {
            return false;
        };
        let ctx = &self.contexts[idx];
        let ssn = if own_piv || !binding.can_reuse_nonce {
            match ctx.next_ssn() {
                Ok(n) => Some(n),
                Err(e) => {
                    eprintln!("warning: {e}");
                    return build(
                        out,
                        mtype,
                        Code::SERVICE_UNAVAILABLE,
                        mid,
                        token,
                        None,
                        None,
                        b"",
                    );
                }
            }
        } else {
            None
        };
        protect_response(&ctx.ctx, binding, ssn, &plain, out).is_ok()
    }

    fn plain_error(
        &self,
        e: &OscoreError,
        req: &MessageView<'_>,
        mtype: MessageType,
        mid: u16,
        out: &mut Vec<u8>,
    ) -> bool {
        match e.server_response() {
            Some(r) => {
                let Ok(mut b) = MessageBuilder::new(out, mtype, r.code, mid, req.token) else {
                    return false;
                };
                if r.max_age_zero && b.option(number::MAX_AGE, &[]).is_err() {
                    return false;
                }
                b.payload(r.diagnostic.as_bytes());
                true
            }
            None => false,
        }
    }
}

fn answer_code(method: Code) -> Code {
    if method == Code::GET || method == Code::FETCH {
        Code::CONTENT
    } else {
        Code::CHANGED
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    out: &mut Vec<u8>,
    mtype: MessageType,
    code: Code,
    mid: u16,
    token: &[u8],
    observe: Option<u32>,
    echo: Option<&[u8]>,
    payload: &[u8],
) -> bool {
    let Ok(mut b) = MessageBuilder::new(out, mtype, code, mid, token) else {
        return false;
    };
    if let Some(v) = observe {
        let mut buf = [0u8; 8];
        if b.option(number::OBSERVE, encode_uint(u64::from(v), &mut buf))
            .is_err()
        {
            return false;
        }
    }
    if let Some(e) = echo {
        if b.option(number::ECHO, e).is_err() {
            return false;
        }
    }
    b.payload(payload);
    true
}
