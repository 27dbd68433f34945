//! Observe across the hop (RFC 7641; RFC 8613 §4.1.3.5, §7.4.1) for plain clients and
//! OSCORE origins: a client's GET with Observe: 0 becomes an OSCORE observation at the
//! origin (outer FETCH, inner and outer Observe: `protect_request`).
//!
//! - The pure part: [`NotificationOrder`] (ordering by the origin's Partial IV and the
//!   client's Observe numbers), [`classify`] and [`client_message`].
//! - The driver: one task and one UDP socket of its own per relation (the shared
//!   `upstream` link answers one response per request; an observation keeps receiving).
//!   Notifications are verified against the registration's `RequestBinding`, dropped when
//!   their Partial IV is not greater than the last accepted one, and sent to the client as
//!   NON with the client's token and an increasing Observe value (RFC 7641 §3.4, §4.2).
//! - Cancellation: the client's RST to a notification (matched by its Message ID), the
//!   client's GET with Observe: 1 and the same token, or gateway shutdown make the gateway
//!   send Observe: 1 upstream with the registration's token, which aiocoap honours (its
//!   token manager stops the old request when a new one arrives on the same token).
//! - A notification that fails verification, or a final response (no Observe, or not 2.xx),
//!   ends the relation; the client gets the final response (5.02 for a failed one).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::request::echo_to_repeat;
use crate::client::resolve;
use crate::client::transport::random_bytes;
use crate::coap::option::{decode_uint, encode_uint};
use crate::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use crate::oscore::{unprotect_response, RequestBinding, ResponseInfo};

use super::contexts::OscoreProtection;
use super::inbound::protect_notification;
use super::reply::reset;
use super::server_contexts::ServerContext;
use super::target::{build_upstream_request_with, Refusal, Target, UpstreamBody};

/// Default of `observe.max_relations`.
pub const DEFAULT_MAX_RELATIONS: usize = 64;
/// How long a deregistration waits for the origin's answer (shutdown, client RST).
pub const DEREGISTER_WAIT: Duration = Duration::from_secs(3);
/// RFC 7641 §4.4: Observe values are 24 bits.
const OBSERVE_MODULUS: u32 = 1 << 24;
/// Notification Message IDs remembered per relation for matching the client's RST.
const MIDS_PER_RELATION: usize = 8;

// ------------------------------------------------------------------ pure part

/// The order of one observation's notifications (RFC 8613 §7.4.1, §4.1.3.5.2): the
/// origin's Partial IV is the ordering number (the first response, which reuses the
/// request's nonce, has none and counts as -1, as in aiocoap); a notification whose number
/// is not greater than the last accepted one is older or a replay and is dropped. Accepted
/// ones get the client's Observe numbers, increasing by one (RFC 7641 §3.4, 24 bits).
#[derive(Debug, Clone)]
pub struct NotificationOrder {
    last: Option<i128>,
    /// The last accepted Observe value of a plain origin ([`Self::accept_observe`]).
    last_observe: Option<u32>,
    next_observe: u32,
}

impl Default for NotificationOrder {
    fn default() -> Self {
        Self::new()
    }
}

impl NotificationOrder {
    pub fn new() -> Self {
        // 2: clearly a sequence number, never the registration value 0 or the
        // deregistration value 1 (which are request values only, but easy to confuse).
        Self {
            last: None,
            last_observe: None,
            next_observe: 2,
        }
    }

    fn next_client_observe(&mut self) -> u32 {
        let v = self.next_observe;
        self.next_observe = (self.next_observe + 1) % OBSERVE_MODULUS;
        v
    }

    /// For a plain origin (no Partial IV): the client's Observe value for a notification
    /// with the origin's Observe value `v`, or `None` when it is not fresher than the last
    /// accepted one by RFC 7641 §3.4 (24-bit serial number arithmetic, or more than 128 s
    /// since the last accepted one, `since_last`).
    pub fn accept_observe(&mut self, v: u32, since_last: Duration) -> Option<u32> {
        let v = v % OBSERVE_MODULUS;
        if let Some(last) = self.last_observe {
            let half = OBSERVE_MODULUS / 2;
            let fresh = (last < v && v - last < half)
                || (last > v && last - v > half)
                || since_last > Duration::from_secs(128);
            if !fresh {
                return None;
            }
        }
        self.last_observe = Some(v);
        Some(self.next_client_observe())
    }

    /// The client's Observe value for a verified notification with Partial IV `piv`, or
    /// `None` when it must be dropped (not newer than the last accepted one).
    pub fn accept(&mut self, piv: Option<u64>) -> Option<u32> {
        let n = piv.map_or(-1, i128::from);
        if self.last.is_some_and(|last| n <= last) {
            return None;
        }
        self.last = Some(n);
        Some(self.next_client_observe())
    }
}

/// What a verified (inner) response means for the relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A notification: the observation goes on.
    Notification,
    /// A final response: no Observe, or an error code (RFC 7641 §3.2, §4.2).
    Final,
}

pub fn classify(inner: &MessageView<'_>) -> Step {
    if inner.code.is_success() && inner.has_option(number::OBSERVE) {
        Step::Notification
    } else {
        Step::Final
    }
}

/// Writes `inner` (a plain response) for the client: its header (`mtype`, `mid`, `token`),
/// the response's options with Observe set to `observe` (or removed when `None`), its
/// payload.
pub fn client_message(
    inner: &MessageView<'_>,
    mtype: MessageType,
    mid: u16,
    token: &[u8],
    observe: Option<u32>,
    out: &mut Vec<u8>,
) -> Result<(), crate::coap::CodecError> {
    out.clear();
    let mut obs = [0u8; 8];
    let mut opts: Vec<(u16, &[u8])> = inner
        .options()
        .filter(|o| o.number != number::OBSERVE)
        .map(|o| (o.number, o.value))
        .collect();
    if let Some(v) = observe {
        opts.push((number::OBSERVE, encode_uint(u64::from(v), &mut obs)));
    }
    crate::coap::sort_options(&mut opts);
    let mut b = MessageBuilder::new(out, mtype, inner.code, mid, token)?;
    for (n, v) in &opts {
        b.option(*n, v)?;
    }
    b.payload(inner.payload);
    Ok(())
}

/// The Observe value of a request, if it has a valid one.
pub fn request_observe(request: &MessageView<'_>) -> Option<u64> {
    request.option(number::OBSERVE).and_then(decode_uint)
}

// ------------------------------------------------------------------ the client side

/// Where a relation's notifications go: the listener socket the client used and its
/// address (the server's per-listener Message ID counter keeps IDs fresh).
#[derive(Clone)]
pub struct ClientLink {
    pub socket: Arc<UdpSocket>,
    pub peer: SocketAddr,
    pub next_mid: Arc<AtomicU16>,
}

impl ClientLink {
    fn fresh_mid(&self) -> u16 {
        self.next_mid.fetch_add(1, Ordering::Relaxed)
    }
}

enum Cancel {
    /// The client rejected a notification, or the gateway shuts down.
    Stop,
    /// The client's GET with Observe: 1: the origin's answer is the client's response.
    Deregister(Box<DeregisterRequest>),
}

struct DeregisterRequest {
    request: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, Refusal>>,
}

struct Handle {
    id: u64,
    cancel: mpsc::Sender<Cancel>,
    /// The client registered with OSCORE (inbound relay): only an OSCORE request may
    /// deregister it, and a plain one only a plain relation.
    oscore_client: bool,
    /// Message IDs of the last notifications sent to the client.
    mids: Vec<u16>,
}

type Key = (SocketAddr, Vec<u8>);

/// The relations of one gateway, by (client address, client token).
pub struct Observations {
    max: usize,
    next_id: AtomicU64,
    relations: Mutex<HashMap<Key, Handle>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Observations {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            next_id: AtomicU64::new(1),
            relations: Mutex::default(),
            tasks: Mutex::default(),
        }
    }

    /// Relations open now.
    pub fn len(&self) -> usize {
        lock(&self.relations).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The client at `peer` sent a Reset with `mid`: if it rejects one of our
    /// notifications, that relation ends (RFC 7641 §3.6). Returns whether it did.
    pub fn client_reset(&self, peer: SocketAddr, mid: u16) -> bool {
        let relations = lock(&self.relations);
        for ((p, _), h) in relations.iter() {
            if *p == peer && h.mids.contains(&mid) {
                let _ = h.cancel.try_send(Cancel::Stop);
                return true;
            }
        }
        false
    }

    /// Ends every relation (deregistering upstream, bounded by `DEREGISTER_WAIT`) and
    /// waits for their tasks. Call before the security contexts are closed.
    pub async fn shutdown(&self) {
        let cancels: Vec<_> = lock(&self.relations)
            .values()
            .map(|h| h.cancel.clone())
            .collect();
        for c in cancels {
            let _ = c.try_send(Cancel::Stop);
        }
        let tasks: Vec<_> = lock(&self.tasks).drain(..).collect();
        for t in tasks {
            if tokio::time::timeout(DEREGISTER_WAIT + Duration::from_secs(1), t)
                .await
                .is_err()
            {
                tracing::warn!("an observation did not end in time at shutdown");
            }
        }
    }

    fn remove(&self, key: &Key, id: u64) {
        let mut relations = lock(&self.relations);
        if relations.get(key).is_some_and(|h| h.id == id) {
            relations.remove(key);
        }
    }

    fn remember_mid(&self, key: &Key, id: u64, mid: u16) {
        if let Some(h) = lock(&self.relations).get_mut(key) {
            if h.id == id {
                if h.mids.len() >= MIDS_PER_RELATION {
                    h.mids.remove(0);
                }
                h.mids.push(mid);
            }
        }
    }

    /// The client's GET with Observe: 1 on a relation's token: the relation deregisters
    /// upstream with `request` and the origin's answer (a plain datagram) comes back.
    /// `oscore_client`: `request` is the verified inner request of an OSCORE client (its
    /// answer is protected by the caller). `None`: no such relation.
    pub async fn deregister(
        &self,
        peer: SocketAddr,
        request: &MessageView<'_>,
        datagram: &[u8],
        oscore_client: bool,
    ) -> Option<Result<Vec<u8>, Refusal>> {
        let cancel = {
            let relations = lock(&self.relations);
            let h = relations.get(&(peer, request.token.to_vec()))?;
            if h.oscore_client != oscore_client {
                return None;
            }
            h.cancel.clone()
        };
        let (reply, rx) = oneshot::channel();
        let sent = cancel
            .send(Cancel::Deregister(Box::new(DeregisterRequest {
                request: datagram.to_vec(),
                reply,
            })))
            .await;
        if sent.is_err() {
            return None; // ended meanwhile: forward it like any request
        }
        Some(rx.await.unwrap_or_else(|_| {
            Err(Refusal::new(
                Code::BAD_GATEWAY,
                "the observation ended before it could be cancelled",
            ))
        }))
    }
}

// ------------------------------------------------------------------ the upstream side

/// How a relation's notifications reach the client.
pub enum Downstream {
    /// A plain client: notifications as they are (with the client's token and Observe).
    Plain,
    /// An OSCORE client whose registration the gateway verified (inbound, issue 4): each
    /// notification is protected under the registration's `binding` with the gateway's
    /// own Partial IV (`inbound::protect_notification`, RFC 8613 §4.1.3.5.2, §7.4.1).
    Oscore {
        sc: Arc<ServerContext>,
        binding: RequestBinding,
    },
}

impl Downstream {
    /// `plain` as the client must get it; `None` when it cannot be protected.
    async fn for_client(&self, plain: &[u8]) -> Option<Vec<u8>> {
        match self {
            Downstream::Plain => Some(plain.to_vec()),
            Downstream::Oscore { sc, binding } => {
                let out = protect_notification(sc, binding, plain).await;
                // protect_notification answers an unprotected 5.0x when it fails
                let protected =
                    MessageView::parse(&out).is_ok_and(|v| v.has_option(number::OSCORE));
                if !protected {
                    tracing::warn!("{}: a notification could not be protected", sc.label);
                }
                protected.then_some(out)
            }
        }
    }

    /// `for_client` for the response to the registration (an error is the caller's).
    async fn first_for_client(&self, plain: &[u8]) -> Result<Vec<u8>, Refusal> {
        self.for_client(plain).await.ok_or_else(|| {
            Refusal::new(
                Code::INTERNAL_SERVER_ERROR,
                "cannot protect the response for the client",
            )
        })
    }
}

/// What a registration needs from the gateway's decision.
pub struct Registration<'a> {
    /// The (plain) request to observe the origin with: the client's, or for an OSCORE
    /// client its verified inner request.
    pub request: &'a MessageView<'a>,
    /// `request` as received (kept for building the deregistration).
    pub datagram: &'a [u8],
    pub target: &'a Target,
    pub hop_limit: u8,
    /// The origin's OSCORE context; `None`: the origin is a plain device (inbound relay).
    pub protection: Option<Arc<OscoreProtection>>,
    pub downstream: Downstream,
    pub ack_timeout: Duration,
    pub timeout: Duration,
}

thread_local! {
    /// The receive buffer of every relation on this thread (see `recv_datagram`).
    static RECV_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65536]);
}

/// One datagram from `socket`, copied out at its own size. Waiting happens in `readable`
/// and the read into one per-thread 64 KiB buffer does not wait, so an idle relation holds
/// no receive buffer: with a 64 KiB buffer per relation task, 10 000 relations took 640 MB
/// of RSS (benches/scale.sh). Cancel-safe (`readable` is).
async fn recv_datagram(socket: &UdpSocket) -> std::io::Result<Vec<u8>> {
    loop {
        socket.readable().await?;
        let got = RECV_BUF.with(|b| {
            let mut b = b.borrow_mut();
            match socket.try_recv(&mut b) {
                Ok(n) => Ok(Some(b[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            }
        });
        if let Some(d) = got? {
            return Ok(d);
        }
    }
}

/// The upstream socket and the registration's identity at the origin.
struct Upstream {
    socket: UdpSocket,
    peer: SocketAddr,
    token: [u8; 8],
    next_mid: u16,
    ack_timeout: Duration,
}

impl Upstream {
    /// Sends the CON `datagram` (Message ID set here) with retransmission (RFC 7252 §4.2)
    /// and returns the first response on our token that `accept` takes, ACKing CON
    /// responses. Bounded by `deadline`.
    async fn request<T>(
        &mut self,
        datagram: &mut [u8],
        deadline: tokio::time::Instant,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<T, Refusal> {
        let mid = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        if datagram.len() >= 4 {
            datagram[2..4].copy_from_slice(&mid.to_be_bytes());
        }
        let mut wait = self.ack_timeout;
        let mut acked = false;
        let mut next_send = tokio::time::Instant::now();
        let mut sends = 0;
        loop {
            if !acked && tokio::time::Instant::now() >= next_send && sends <= 4 {
                let _ = self.socket.send(datagram).await;
                sends += 1;
                next_send = tokio::time::Instant::now() + wait;
                wait *= 2;
            }
            let until = if acked || sends > 4 {
                deadline
            } else {
                next_send.min(deadline)
            };
            let buf = tokio::select! {
                r = recv_datagram(&self.socket) => match r { Ok(d) => d, Err(_) => continue },
                _ = tokio::time::sleep_until(until) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Refusal::new(
                            Code::GATEWAY_TIMEOUT,
                            format!("origin {} did not answer the observation request", self.peer),
                        ));
                    }
                    continue;
                }
            };
            let d = &buf[..];
            let Ok(v) = MessageView::parse(d) else {
                continue;
            };
            if v.code.is_empty() && v.message_id == mid {
                match v.mtype {
                    MessageType::Acknowledgement => acked = true,
                    MessageType::Reset => {
                        return Err(Refusal::new(
                            Code::BAD_GATEWAY,
                            format!("origin {} rejected the request (Reset)", self.peer),
                        ))
                    }
                    _ => {}
                }
                continue;
            }
            if !v.code.is_response() || v.token != self.token {
                self.answer_unknown(&v).await;
                continue;
            }
            self.ack(&v).await;
            if v.mtype == MessageType::Acknowledgement && v.message_id == mid {
                acked = true;
            }
            if let Some(t) = accept(d) {
                return Ok(t);
            }
        }
    }

    /// ACKs a CON response (RFC 7252 §4.2).
    async fn ack(&self, v: &MessageView<'_>) {
        if v.mtype == MessageType::Confirmable {
            let mut out = Vec::with_capacity(4);
            if let Ok(b) = MessageBuilder::new(
                &mut out,
                MessageType::Acknowledgement,
                Code::EMPTY,
                v.message_id,
                &[],
            ) {
                b.finish();
            }
            let _ = self.socket.send(&out).await;
        }
    }

    /// A CON that is not ours: Reset (RFC 7252 §4.2).
    async fn answer_unknown(&self, v: &MessageView<'_>) {
        if v.mtype == MessageType::Confirmable {
            let mut out = Vec::with_capacity(4);
            reset(v.message_id, &mut out);
            let _ = self.socket.send(&out).await;
        }
    }
}

/// A relation's leg toward the origin.
enum Leg {
    /// OSCORE toward the origin: responses are verified against the registration's binding.
    Oscore {
        protection: Arc<OscoreProtection>,
        binding: RequestBinding,
    },
    /// A plain device on a trusted link (the inbound relay, issue 4).
    Plain,
}

impl Leg {
    /// The plain response in `d` and its Partial IV (OSCORE only).
    fn open(&self, d: &[u8]) -> Result<(Vec<u8>, Option<u64>), String> {
        match self {
            Leg::Oscore {
                protection,
                binding,
            } => verify(protection, binding, d).map(|(inner, info)| (inner, info.partial_iv)),
            Leg::Plain => Ok((d.to_vec(), None)),
        }
    }

    /// The client's Observe value for the notification `view` (Partial IV `piv`), or
    /// `None` when it is not newer: ordered by the Partial IV behind OSCORE, by the
    /// device's Observe value on a plain leg (RFC 7641 §3.4).
    fn accept(
        &self,
        order: &mut NotificationOrder,
        piv: Option<u64>,
        view: &MessageView<'_>,
        since_last: Duration,
    ) -> Option<u32> {
        match self {
            Leg::Oscore { .. } => order.accept(piv),
            Leg::Plain => {
                let v = u32::try_from(request_observe(view)?).ok()?;
                order.accept_observe(v, since_last)
            }
        }
    }
}

/// Verifies `datagram` as a response to `binding`; the inner message and its info.
fn verify(
    protection: &OscoreProtection,
    binding: &RequestBinding,
    datagram: &[u8],
) -> Result<(Vec<u8>, ResponseInfo), String> {
    let view = MessageView::parse(datagram).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(datagram.len());
    let info = unprotect_response(protection.security_context(), binding, &view, &mut out)
        .map_err(|e| {
            if !view.has_option(number::OSCORE) {
                format!(
                    "unprotected {} response ({e}): {}",
                    view.code,
                    String::from_utf8_lossy(view.payload)
                )
            } else {
                e.to_string()
            }
        })?;
    Ok((out, info))
}

/// Protects `plain` with a fresh sequence number.
async fn protect(
    protection: &OscoreProtection,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<RequestBinding, Refusal> {
    use crate::client::Protection;
    protection.protect(plain, out).await.map_err(|e| {
        Refusal::new(
            Code::SERVICE_UNAVAILABLE,
            format!("OSCORE context unusable for the observation: {e}"),
        )
    })
}

impl Observations {
    /// Registers the client's observation (`reg.request`, Observe: 0) at the origin. Returns
    /// the first response for the client (with the client's first Observe value); when the
    /// origin accepted the observation, a task relays the later notifications to `client`.
    pub async fn register(
        self: &Arc<Self>,
        reg: Registration<'_>,
        client: ClientLink,
    ) -> Result<Vec<u8>, Refusal> {
        let key: Key = (client.peer, reg.request.token.to_vec());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, rx) = mpsc::channel(4);
        {
            // The slot is taken before the upstream exchange, so concurrent registrations
            // cannot exceed the limit.
            let mut relations = lock(&self.relations);
            // RFC 7641 §4.1: a registration on the token of an existing one replaces it.
            if let Some(old) = relations.remove(&key) {
                let _ = old.cancel.try_send(Cancel::Stop);
            }
            if relations.len() >= self.max {
                return Err(Refusal::new(
                    Code::SERVICE_UNAVAILABLE,
                    format!(
                        "too many observations through the gateway ({}; observe.max_relations)",
                        self.max
                    ),
                ));
            }
            relations.insert(
                key.clone(),
                Handle {
                    id,
                    cancel,
                    oscore_client: matches!(reg.downstream, Downstream::Oscore { .. }),
                    mids: Vec::new(),
                },
            );
        }
        let started = self.start(reg, client, key.clone(), id, rx).await;
        if !matches!(started, Ok((_, true))) {
            self.remove(&key, id);
        }
        started.map(|(first, _)| first)
    }

    /// The upstream registration; `true` when a relation task now runs.
    async fn start(
        self: &Arc<Self>,
        reg: Registration<'_>,
        client: ClientLink,
        key: Key,
        id: u64,
        rx: mpsc::Receiver<Cancel>,
    ) -> Result<(Vec<u8>, bool), Refusal> {
        let uri = reg.target.uri.matching_uri();
        let peer = resolve(&reg.target.uri.host, reg.target.uri.effective_port())
            .await
            .map_err(|e| Refusal::new(Code::BAD_GATEWAY, format!("origin {uri}: {e}")))?;
        let io = |e: std::io::Error| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("UDP socket toward {uri} for the observation: {e}"),
            )
        };
        let bind: SocketAddr = if peer.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(peer).await.map_err(io)?;
        // A new socket's first send waits for the reactor to report it writable. Wait for
        // that here, before a sequence number is taken: between protecting and sending
        // this task must not yield, or registrations running at once reach the origin out
        // of sequence-number order, and one more than the replay window (RFC 8613 §7.4,
        // 32 at aiocoap) behind the newest is refused as a replay ("Replay detected" for
        // a few of 10 000 registrations in benches/scale.sh before this).
        socket.writable().await.map_err(io)?;
        let mut up = Upstream {
            socket,
            peer,
            token: random_bytes::<8>(),
            next_mid: u16::from_be_bytes(random_bytes::<2>()),
            ack_timeout: reg.ack_timeout,
        };
        let mut plain = Vec::with_capacity(reg.request.payload.len() + 128);
        let body = UpstreamBody {
            options: &[],
            payload: reg.request.payload,
        };
        let build = |echo: Option<&[u8]>, token: &[u8; 8], plain: &mut Vec<u8>| {
            build_upstream_request_with(
                reg.request,
                reg.target,
                reg.hop_limit,
                echo,
                body,
                0,
                token,
                plain,
            )
        };
        build(None, &up.token, &mut plain)?;
        let deadline = tokio::time::Instant::now() + reg.timeout;
        let (leg, verified) = match reg.protection {
            Some(protection) => {
                let mut wire = Vec::with_capacity(plain.len() + 64);
                let mut sent_echo = reg.request.has_option(number::ECHO);
                loop {
                    let binding = protect(&protection, &plain, &mut wire).await?;
                    let verified = up
                        .request(&mut wire, deadline, |d| {
                            Some(verify(&protection, &binding, d))
                        })
                        .await?;
                    // RFC 8613 App. B.1.2 / RFC 9175 §2.4: an origin without a replay window
                    // for the context (the registration is its first request) answers 4.01
                    // with an Echo. The client cannot see inside OSCORE, so the gateway
                    // registers once more with that Echo (inner, Class E), under a new
                    // sequence number and on a new token (a late copy of the 4.01 on the
                    // old one cannot then be taken for the answer), as `forward` does.
                    if let Ok((inner, _)) = &verified {
                        let echo = MessageView::parse(inner).ok().and_then(|v| {
                            echo_to_repeat(v.code, v.option(number::ECHO), sent_echo)
                                .map(<[u8]>::to_vec)
                        });
                        if let Some(echo) = echo {
                            tracing::info!(
                                "{uri}: the origin asked for freshness (4.01 + Echo, RFC 8613 \
                                 App. B.1.2); registering again with its Echo"
                            );
                            sent_echo = true;
                            up.token = random_bytes::<8>();
                            build(Some(&echo), &up.token, &mut plain)?;
                            continue;
                        }
                    }
                    let leg = Leg::Oscore {
                        protection,
                        binding,
                    };
                    break (leg, verified.map(|(inner, info)| (inner, info.partial_iv)));
                }
            }
            // a plain device: its first response on our token is the answer
            None => {
                let d = up
                    .request(&mut plain, deadline, |d| Some(d.to_vec()))
                    .await?;
                (Leg::Plain, Ok((d, None)))
            }
        };
        let (inner, piv) = verified.map_err(|e| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("response from {uri} failed OSCORE verification: {e}"),
            )
        })?;
        let view = MessageView::parse(&inner).map_err(|e| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("malformed response from {uri}: {e}"),
            )
        })?;
        let mut order = NotificationOrder::new();
        let mut first = Vec::with_capacity(inner.len() + 4);
        let relayed = |observe, out: &mut Vec<u8>| {
            client_message(&view, view.mtype, view.message_id, view.token, observe, out).map_err(
                |e| {
                    Refusal::new(
                        Code::BAD_GATEWAY,
                        format!("cannot relay {uri}'s response: {e}"),
                    )
                },
            )
        };
        if classify(&view) == Step::Final {
            tracing::info!(
                "{uri}: the origin did not accept the observation ({})",
                view.code
            );
            relayed(None, &mut first)?;
            return Ok((reg.downstream.first_for_client(&first).await?, false));
        }
        let observe = leg.accept(&mut order, piv, &view, Duration::ZERO);
        relayed(observe, &mut first)?;
        // Protected before the relation task runs, so its Partial IV is below those of
        // the notifications.
        let first = reg.downstream.first_for_client(&first).await?;

        tracing::info!(
            "{}: observing {uri} for the client ({} relations)",
            client.peer,
            self.len()
        );
        let relation = Relation {
            observations: Arc::clone(self),
            key,
            id,
            uri,
            up,
            leg,
            downstream: reg.downstream,
            order,
            last_accepted: tokio::time::Instant::now(),
            client,
            registration: reg.datagram.to_vec(),
            hop_limit: reg.hop_limit,
            target: reg.target.clone(),
        };
        let task = tokio::spawn(relation.run(rx));
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Ok((first, true))
    }
}

/// One relation's task state.
struct Relation {
    observations: Arc<Observations>,
    key: Key,
    id: u64,
    uri: String,
    up: Upstream,
    leg: Leg,
    downstream: Downstream,
    order: NotificationOrder,
    /// When the last notification was accepted (RFC 7641 §3.4's 128 s rule).
    last_accepted: tokio::time::Instant,
    client: ClientLink,
    /// The client's registration request (for building the deregistration).
    registration: Vec<u8>,
    hop_limit: u8,
    target: Target,
}

impl Relation {
    async fn run(mut self, mut cancel: mpsc::Receiver<Cancel>) {
        loop {
            tokio::select! {
                c = cancel.recv() => {
                    match c {
                        Some(Cancel::Deregister(d)) => {
                            let r = self.deregister(Some(&d.request)).await;
                            let _ = d.reply.send(r);
                        }
                        Some(Cancel::Stop) | None => {
                            if let Err(e) = self.deregister(None).await {
                                tracing::info!("{}: deregistration: {}", self.uri, e.diagnostic);
                            }
                        }
                    }
                    break;
                }
                r = recv_datagram(&self.up.socket) => {
                    let Ok(d) = r else { continue };
                    if !self.on_datagram(&d).await {
                        break;
                    }
                }
            }
        }
        self.observations.remove(&self.key, self.id);
        tracing::info!(
            "{}: observation of {} ended ({} relations)",
            self.client.peer,
            self.uri,
            self.observations.len()
        );
    }

    /// Handles one datagram from the origin; false when the relation ends.
    async fn on_datagram(&mut self, d: &[u8]) -> bool {
        let Ok(v) = MessageView::parse(d) else {
            return true;
        };
        if !v.code.is_response() || v.token != self.up.token {
            self.up.answer_unknown(&v).await;
            return true;
        }
        self.up.ack(&v).await;
        let (inner, piv) = match self.leg.open(d) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{}: notification failed OSCORE verification: {e}", self.uri);
                let diag = format!(
                    "notification from {} failed OSCORE verification: {e}",
                    self.uri
                );
                self.send_final_refusal(&Refusal::new(Code::BAD_GATEWAY, diag))
                    .await;
                let _ = self.deregister(None).await;
                return false;
            }
        };
        let Ok(view) = MessageView::parse(&inner) else {
            return true;
        };
        let step = classify(&view);
        let observe = match step {
            Step::Notification => {
                let since_last = self.last_accepted.elapsed();
                match self.leg.accept(&mut self.order, piv, &view, since_last) {
                    Some(o) => {
                        self.last_accepted = tokio::time::Instant::now();
                        Some(o)
                    }
                    None => {
                        tracing::debug!(
                            "{}: dropped a notification (Partial IV {piv:?}; not newer)",
                            self.uri,
                        );
                        return true;
                    }
                }
            }
            Step::Final => None,
        };
        let mid = self.client.fresh_mid();
        let mut out = Vec::with_capacity(inner.len() + 16);
        let token = self.key.1.clone();
        if client_message(
            &view,
            MessageType::NonConfirmable,
            mid,
            &token,
            observe,
            &mut out,
        )
        .is_ok()
        {
            let Some(out) = self.downstream.for_client(&out).await else {
                return step == Step::Notification;
            };
            self.observations.remember_mid(&self.key, self.id, mid);
            if let Err(e) = self.client.socket.send_to(&out, self.client.peer).await {
                tracing::debug!("send to {}: {e}", self.client.peer);
            }
        }
        step == Step::Notification
    }

    async fn send_final_refusal(&self, refusal: &Refusal) {
        let mut out = Vec::with_capacity(64 + refusal.diagnostic.len());
        if let Ok(b) = MessageBuilder::new(
            &mut out,
            MessageType::NonConfirmable,
            refusal.code,
            self.client.fresh_mid(),
            &self.key.1,
        ) {
            b.payload(refusal.diagnostic.as_bytes());
        }
        if let Some(out) = self.downstream.for_client(&out).await {
            let _ = self.client.socket.send_to(&out, self.client.peer).await;
        }
    }

    /// Sends Observe: 1 upstream on the registration's token (with the client's
    /// deregistration request when it sent one, else the registration's own) and returns
    /// the origin's verified answer.
    async fn deregister(&mut self, client_request: Option<&[u8]>) -> Result<Vec<u8>, Refusal> {
        let source = client_request.unwrap_or(&self.registration);
        let request = MessageView::parse(source)
            .map_err(|e| Refusal::new(Code::BAD_REQUEST, format!("deregistration request: {e}")))?;
        let mut plain = Vec::with_capacity(source.len() + 32);
        let body = UpstreamBody {
            options: &[(number::OBSERVE, &[1])],
            payload: request.payload,
        };
        build_upstream_request_with(
            &request,
            &self.target,
            self.hop_limit,
            None,
            body,
            0,
            &self.up.token,
            &mut plain,
        )?;
        let deadline = tokio::time::Instant::now() + DEREGISTER_WAIT;
        // Late notifications of the observation arrive on the same token; behind OSCORE
        // they do not verify against the new binding, from a plain device they carry
        // Observe (the answer to Observe: 1 does not): either way they are skipped.
        let inner = match &self.leg {
            Leg::Oscore { protection, .. } => {
                let mut wire = Vec::with_capacity(plain.len() + 64);
                let binding = protect(protection, &plain, &mut wire).await?;
                self.up
                    .request(&mut wire, deadline, |d| {
                        verify(protection, &binding, d).ok().map(|(inner, _)| inner)
                    })
                    .await?
            }
            Leg::Plain => {
                self.up
                    .request(&mut plain, deadline, |d| {
                        MessageView::parse(d)
                            .is_ok_and(|v| !v.has_option(number::OBSERVE))
                            .then(|| d.to_vec())
                    })
                    .await?
            }
        };
        tracing::info!("{}: observation cancelled upstream", self.uri);
        let view = MessageView::parse(&inner).map_err(|e| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("malformed response from {}: {e}", self.uri),
            )
        })?;
        let mut out = Vec::with_capacity(inner.len());
        client_message(
            &view,
            view.mtype,
            view.message_id,
            view.token,
            None,
            &mut out,
        )
        .map_err(|e| Refusal::new(Code::BAD_GATEWAY, format!("cannot relay the response: {e}")))?;
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_drops_not_newer_partial_ivs() {
        let mut o = NotificationOrder::new();
        assert_eq!(o.accept(None), Some(2)); // first response, request nonce reused
        assert_eq!(o.accept(None), None); // no PIV again: not newer than -1
        assert_eq!(o.accept(Some(5)), Some(3));
        assert_eq!(o.accept(Some(5)), None); // replay
        assert_eq!(o.accept(Some(4)), None); // older, arrived late
        assert_eq!(o.accept(Some(9)), Some(4));
        assert_eq!(o.accept(Some(10)), Some(5));
    }

    #[test]
    fn order_first_with_partial_iv_then_larger() {
        let mut o = NotificationOrder::new();
        assert_eq!(o.accept(Some(0)), Some(2));
        assert_eq!(o.accept(None), None);
        assert_eq!(o.accept(Some(1)), Some(3));
    }

    #[test]
    fn observe_values_wrap_at_24_bits() {
        let mut o = NotificationOrder::new();
        o.next_observe = OBSERVE_MODULUS - 1;
        assert_eq!(o.accept(Some(1)), Some(OBSERVE_MODULUS - 1));
        assert_eq!(o.accept(Some(2)), Some(0));
    }

    #[test]
    fn plain_origin_order_follows_rfc7641_freshness() {
        let mut o = NotificationOrder::new();
        let t = Duration::from_secs(1);
        assert_eq!(o.accept_observe(10, t), Some(2));
        assert_eq!(o.accept_observe(10, t), None); // same value
        assert_eq!(o.accept_observe(9, t), None); // older
        assert_eq!(o.accept_observe(11, t), Some(3));
        // far ahead (more than 2^23): counts as older
        assert_eq!(o.accept_observe(11 + (1 << 23) + 1, t), None);
        // but anything goes after 128 s
        assert_eq!(o.accept_observe(5, Duration::from_secs(129)), Some(4));
        // wrap-around of the 24-bit value is newer
        let mut o = NotificationOrder::new();
        assert_eq!(o.accept_observe(OBSERVE_MODULUS - 2, t), Some(2));
        assert_eq!(o.accept_observe(1, t), Some(3));
    }

    fn response(code: Code, observe: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Acknowledgement, code, 9, &[7, 7]).unwrap();
        if let Some(o) = observe {
            b.uint_option(number::OBSERVE, o).unwrap();
        }
        b.option(number::CONTENT_FORMAT, &[]).unwrap();
        b.payload(b"tick");
        out
    }

    #[test]
    fn classify_notifications_and_final_responses() {
        let n = response(Code::CONTENT, Some(3));
        assert_eq!(
            classify(&MessageView::parse(&n).unwrap()),
            Step::Notification
        );
        let f = response(Code::CONTENT, None);
        assert_eq!(classify(&MessageView::parse(&f).unwrap()), Step::Final);
        let e = response(Code::NOT_FOUND, Some(3));
        assert_eq!(classify(&MessageView::parse(&e).unwrap()), Step::Final);
    }

    #[test]
    fn client_message_rewrites_header_and_observe() {
        let n = response(Code::CONTENT, Some(77));
        let view = MessageView::parse(&n).unwrap();
        let mut out = Vec::new();
        client_message(
            &view,
            MessageType::NonConfirmable,
            300,
            b"tok",
            Some(4),
            &mut out,
        )
        .unwrap();
        let m = MessageView::parse(&out).unwrap();
        assert_eq!(m.mtype, MessageType::NonConfirmable);
        assert_eq!(m.message_id, 300);
        assert_eq!(m.token, b"tok");
        assert_eq!(m.option(number::OBSERVE).and_then(decode_uint), Some(4));
        assert!(m.has_option(number::CONTENT_FORMAT));
        assert_eq!(m.payload, b"tick");
        client_message(
            &view,
            MessageType::NonConfirmable,
            301,
            b"tok",
            None,
            &mut out,
        )
        .unwrap();
        let m = MessageView::parse(&out).unwrap();
        assert!(!m.has_option(number::OBSERVE));
        assert_eq!(m.payload, b"tick");
    }
}
