//! The load generator: one connected UDP socket on one thread, `window` requests in flight,
//! each matched to its slot by an 8-byte token (slot index, serial), CON retransmission with
//! exponential back-off (RFC 7252 §4.2, bounded by `max_retransmit` and `timeout`), empty
//! ACKs and separate responses (§5.2.2), and for OSCORE one re-send with the server's Echo
//! (RFC 8613 App. B.1.2). The loop waits in `poll(2)` only when it has nothing to do.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::client::transport::random_bytes;
use crate::coap::option::encode_uint;
use crate::coap::{number, CoapUri, Code, MessageBuilder, MessageType, MessageView};
use crate::gateway::mmsg::{send_batch_with, RecvBatch};
use crate::oscore::{protect_request, unprotect_response, RequestBinding};

use super::oscore_ctx::{client_context, OpenedContext};
use super::stats::{percentiles, process_cpu_time, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

/// How a request names its target when it goes through a forward proxy (RFC 7252 §5.10.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyForm {
    ProxyUri,
    ProxyScheme,
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub uri: CoapUri,
    /// `--spread`: the targets requests go to in turn (round-robin), `uri` being the first;
    /// empty: every request goes to `uri`. Plain requests only (one OSCORE context per
    /// target is not supported); all on the peer of `uri` (or through `proxy`).
    pub spread: Vec<CoapUri>,
    pub proxy: Option<CoapUri>,
    pub proxy_form: ProxyForm,
    pub credentials: Option<PathBuf>,
    pub count: u64,
    pub window: usize,
    pub duration_limit: Duration,
    pub confirmable: bool,
    pub method: Method,
    pub payload_size: usize,
    pub ack_timeout: Duration,
    pub max_retransmit: u32,
    pub timeout: Duration,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{0}")]
    Setup(String),
    #[error("UDP socket error talking to {peer}: {source}")]
    Io {
        peer: SocketAddr,
        source: std::io::Error,
    },
}

const TOKEN_LEN: usize = 8;
/// Byte offset of the token in every request we build (4-byte header, then the token).
const TOKEN_AT: usize = 4;

#[derive(Default)]
struct Slot {
    active: bool,
    serial: u32,
    mid: u16,
    first_sent: Option<Instant>,
    next_retransmit: Option<Instant>,
    wait: Duration,
    retransmits_left: u32,
    give_up: Option<Instant>,
    echo_retried: bool,
    wire: Vec<u8>,
    binding: Option<RequestBinding>,
    /// Index into the generator's templates.
    target: usize,
}

/// Counters while running.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    timeouts: u64,
    retransmissions: u64,
    echo_retries: u64,
    error_codes: BTreeMap<String, u64>,
    samples: Vec<u64>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        *self.error_codes.entry(what).or_default() += 1;
    }
}

struct Generator<'c> {
    cfg: &'c LoadConfig,
    socket: UdpSocket,
    peer: SocketAddr,
    oscore: Option<OpenedContext>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots whose first transmission waits for the next `flush` (one sendmmsg for all).
    unsent: Vec<usize>,
    /// One request template per target (`cfg.spread`, or just `cfg.uri`).
    templates: Vec<Vec<u8>>,
    next_target: usize,
    /// Message ID -> slot index + 1 (0: none), for empty ACKs and Resets.
    mid_slot: Vec<u32>,
    next_mid: u16,
    next_serial: u32,
    plain: Vec<u8>,
    tally: Tally,
    started: u64,
    earliest_deadline: Option<Instant>,
}

pub(crate) fn resolve(uri: &CoapUri) -> Result<SocketAddr, LoadError> {
    let port = uri.effective_port();
    if let Ok(ip) = uri.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (uri.host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| LoadError::Setup(format!("cannot resolve {}: {e}", uri.host)))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| LoadError::Setup(format!("{} resolved to no address", uri.host)))
}

/// Builds the plain request: Uri-* or Proxy-* options as `cfg` says, Observe if given
/// (RFC 7641), then Echo if given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_request_observe(
    cfg: &LoadConfig,
    uri: &CoapUri,
    mtype: MessageType,
    mid: u16,
    token: &[u8],
    observe: Option<u32>,
    echo: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), LoadError> {
    let code = match cfg.method {
        Method::Get => Code::GET,
        Method::Put => Code::PUT,
    };
    let e = |e: crate::coap::CodecError| LoadError::Setup(format!("cannot build the request: {e}"));
    let mut b = MessageBuilder::new(out, mtype, code, mid, token).map_err(e)?;
    let via_proxy = cfg.proxy.is_some();
    if via_proxy && cfg.proxy_form == ProxyForm::ProxyScheme {
        b.option(number::URI_HOST, uri.host.as_bytes()).map_err(e)?;
    }
    if let Some(v) = observe {
        let mut buf = [0u8; 8];
        b.option(number::OBSERVE, encode_uint(u64::from(v), &mut buf))
            .map_err(e)?;
    }
    if via_proxy && cfg.proxy_form == ProxyForm::ProxyScheme {
        if let Some(p) = uri.port {
            b.uint_option(number::URI_PORT, u64::from(p)).map_err(e)?;
        }
    }
    if !via_proxy || cfg.proxy_form == ProxyForm::ProxyScheme {
        for seg in &uri.path {
            b.option(number::URI_PATH, seg.as_bytes()).map_err(e)?;
        }
        for q in &uri.query {
            b.option(number::URI_QUERY, q.as_bytes()).map_err(e)?;
        }
    }
    if via_proxy {
        match cfg.proxy_form {
            ProxyForm::ProxyUri => {
                b.option(number::PROXY_URI, uri.to_string().as_bytes())
                    .map_err(e)?;
            }
            ProxyForm::ProxyScheme => {
                b.option(number::PROXY_SCHEME, uri.scheme.as_bytes())
                    .map_err(e)?;
            }
        }
    }
    if let Some(v) = echo {
        b.option(number::ECHO, v).map_err(e)?;
    }
    if cfg.method == Method::Put {
        b.payload(&vec![b'p'; cfg.payload_size]);
    } else {
        b.finish();
    }
    Ok(())
}

/// Builds the plain request (`build_request_observe` without Observe).
fn build_request(
    cfg: &LoadConfig,
    uri: &CoapUri,
    mtype: MessageType,
    mid: u16,
    token: &[u8],
    echo: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), LoadError> {
    build_request_observe(cfg, uri, mtype, mid, token, None, echo, out)
}

/// Runs the generator to completion (`count` requests answered or timed out) or until
/// `duration_limit`, and reports.
pub fn run_load(cfg: &LoadConfig) -> Result<Report, LoadError> {
    if cfg.uri.scheme != "coap" {
        return Err(LoadError::Setup(format!(
            "only coap:// targets are supported, not {}://",
            cfg.uri.scheme
        )));
    }
    let peer = resolve(cfg.proxy.as_ref().unwrap_or(&cfg.uri))?;
    if !cfg.spread.is_empty() {
        if cfg.credentials.is_some() {
            return Err(LoadError::Setup(
                "--spread sends plain requests; it cannot be combined with --credentials".into(),
            ));
        }
        if let Some(u) = cfg.spread.iter().find(|u| u.scheme != "coap") {
            return Err(LoadError::Setup(format!(
                "only coap:// targets are supported, not {u}"
            )));
        }
        if cfg.proxy.is_none() {
            if let Some(u) = cfg.spread.iter().find(|u| resolve(u).ok() != Some(peer)) {
                return Err(LoadError::Setup(format!(
                    "--spread without --proxy needs every target on one host and port; \
                     {u} is not on {peer}"
                )));
            }
        }
    }
    let oscore = match &cfg.credentials {
        Some(c) => Some(client_context(c, &cfg.uri).map_err(LoadError::Setup)?),
        None => None,
    };
    let result = Generator::new(cfg, peer, oscore).and_then(|mut g| {
        let r = g.run();
        if let Some(o) = &g.oscore {
            o.close();
        }
        r
    });
    result
}

impl<'c> Generator<'c> {
    fn new(
        cfg: &'c LoadConfig,
        peer: SocketAddr,
        oscore: Option<OpenedContext>,
    ) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io { peer, source };
        let local = if peer.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(local).map_err(io)?;
        socket.connect(peer).map_err(io)?;
        socket.set_nonblocking(true).map_err(io)?;
        crate::gateway::mmsg::enable_gro(socket.as_raw_fd());
        let mtype = if cfg.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        };
        let targets = if cfg.spread.is_empty() {
            std::slice::from_ref(&cfg.uri)
        } else {
            &cfg.spread[..]
        };
        let mut templates = Vec::with_capacity(targets.len());
        for uri in targets {
            let mut template = Vec::with_capacity(64 + cfg.payload_size);
            build_request(cfg, uri, mtype, 0, &[0; TOKEN_LEN], None, &mut template)?;
            template.shrink_to_fit();
            templates.push(template);
        }
        let longest = templates.iter().map(Vec::len).max().unwrap_or(0);
        let slots = (0..cfg.window)
            .map(|_| Slot {
                wire: Vec::with_capacity(longest + 64),
                ..Slot::default()
            })
            .collect();
        Ok(Self {
            cfg,
            socket,
            peer,
            oscore,
            slots,
            free: (0..cfg.window).rev().collect(),
            unsent: Vec::with_capacity(cfg.window),
            mid_slot: vec![0; 65536],
            next_mid: u16::from_be_bytes(random_bytes::<2>()),
            next_serial: 0,
            templates,
            next_target: 0,
            plain: Vec::with_capacity(2048),
            tally: Tally {
                samples: Vec::with_capacity(cfg.count.min(10_000_000) as usize),
                ..Tally::default()
            },
            started: 0,
            earliest_deadline: None,
        })
    }

    fn io(&self, source: std::io::Error) -> LoadError {
        LoadError::Io {
            peer: self.peer,
            source,
        }
    }

    fn run(&mut self) -> Result<Report, LoadError> {
        let cpu_before = process_cpu_time();
        let start = Instant::now();
        let end = start + self.cfg.duration_limit;
        // Answers are taken in batches of up to 64 per recvmmsg (the window's worth).
        let mut batch = RecvBatch::new(64);
        let fd = self.socket.as_raw_fd();
        loop {
            let done = self.tally.ok + self.tally.errors + self.tally.timeouts;
            let now = Instant::now();
            if done >= self.cfg.count || now >= end {
                break;
            }
            while self.started < self.cfg.count {
                let Some(i) = self.free.pop() else { break };
                self.start(i, now)?;
            }
            self.flush();
            let mut received = false;
            loop {
                match batch.recv(fd) {
                    Ok(n) => {
                        received = true;
                        for i in 0..n {
                            self.on_datagram(batch.get(i).0, Instant::now())?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP port unreachable: like loss; retransmission or timeout follows.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io(e)),
                }
            }
            let now = Instant::now();
            if self.earliest_deadline.is_some_and(|d| now >= d) {
                self.check_timers(now)?;
            }
            self.flush();
            if !received && (self.free.is_empty() || self.started >= self.cfg.count) {
                let wake = self.earliest_deadline.map_or(end, |d| d.min(end));
                self.wait_readable(wake.saturating_duration_since(now));
            }
        }
        let elapsed = start.elapsed();
        let cpu = process_cpu_time().saturating_sub(cpu_before);
        let in_flight = self.slots.iter().filter(|s| s.active).count() as u64;
        let t = &mut self.tally;
        let completed = t.ok + t.errors + t.timeouts;
        let unfinished = (self.cfg.count - self.started) + in_flight;
        Ok(Report {
            target: self.cfg.uri.to_string(),
            proxy: self.cfg.proxy.as_ref().map(|p| p.to_string()),
            oscore: self.oscore.is_some(),
            confirmable: self.cfg.confirmable,
            method: format!("{:?}", self.cfg.method).to_uppercase(),
            window: self.cfg.window,
            requested: self.cfg.count,
            completed,
            ok: t.ok,
            errors: t.errors,
            timeouts: t.timeouts,
            unfinished,
            retransmissions: t.retransmissions,
            echo_retries: t.echo_retries,
            error_codes: std::mem::take(&mut t.error_codes),
            elapsed_s: elapsed.as_secs_f64(),
            requests_per_s: completed as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_us: percentiles(&mut t.samples),
            cpu_s: cpu.as_secs_f64(),
        })
    }

    fn wait_readable(&self, timeout: Duration) {
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up, so a deadline 0.3 ms away does not spin.
        let ms = timeout.as_micros().div_ceil(1000).min(1000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut fd, 1, ms);
        }
    }

    fn fresh_mid(&mut self, slot: usize) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.mid_slot[usize::from(self.next_mid)] = slot as u32 + 1;
        self.next_mid
    }

    /// Fills slot `i` with a new request and sends it.
    fn start(&mut self, i: usize, now: Instant) -> Result<(), LoadError> {
        self.started += 1;
        self.next_serial = self.next_serial.wrapping_add(1);
        let serial = self.next_serial;
        let mid = self.fresh_mid(i);
        let target = self.next_target;
        self.next_target = (self.next_target + 1) % self.templates.len();
        let s = &mut self.slots[i];
        s.target = target;
        s.active = true;
        s.serial = serial;
        s.echo_retried = false;
        s.first_sent = Some(now);
        s.give_up = Some(now + self.cfg.timeout);
        self.fill_wire(i, mid, None)?;
        self.transmit_first(i, mid, now);
        Ok(())
    }

    /// Writes slot `i`'s datagram with Message ID `mid` (protected if OSCORE).
    fn fill_wire(&mut self, i: usize, mid: u16, echo: Option<&[u8]>) -> Result<(), LoadError> {
        let serial = self.slots[i].serial;
        let target_idx = self.slots[i].target;
        let mut token = [0u8; TOKEN_LEN];
        token[..4].copy_from_slice(&(i as u32).to_be_bytes());
        token[4..].copy_from_slice(&serial.to_be_bytes());
        let target = if self.oscore.is_some() {
            &mut self.plain
        } else {
            &mut self.slots[i].wire
        };
        match echo {
            None => {
                target.clear();
                target.extend_from_slice(&self.templates[target_idx]);
                target[2..4].copy_from_slice(&mid.to_be_bytes());
                target[TOKEN_AT..TOKEN_AT + TOKEN_LEN].copy_from_slice(&token);
            }
            Some(_) => {
                let mtype = if self.cfg.confirmable {
                    MessageType::Confirmable
                } else {
                    MessageType::NonConfirmable
                };
                let uri = self.cfg.spread.get(target_idx).unwrap_or(&self.cfg.uri);
                build_request(self.cfg, uri, mtype, mid, &token, echo, target)?;
            }
        }
        if let Some(o) = &self.oscore {
            let ssn = o
                .next_ssn()
                .map_err(|e| LoadError::Setup(format!("sequence number: {e}")))?;
            let plain = MessageView::parse(&self.plain)
                .map_err(|e| LoadError::Setup(format!("built an invalid request: {e}")))?;
            let s = &mut self.slots[i];
            let binding = protect_request(&o.ctx, ssn, &plain, &mut s.wire)
                .map_err(|e| LoadError::Setup(format!("cannot protect the request: {e}")))?;
            s.binding = Some(binding);
        }
        Ok(())
    }

    fn transmit_first(&mut self, i: usize, mid: u16, now: Instant) {
        let random = f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX);
        let cfg = self.cfg;
        let s = &mut self.slots[i];
        s.mid = mid;
        if cfg.confirmable {
            s.wait = cfg.ack_timeout.mul_f64(1.0 + random * 0.5);
            s.retransmits_left = cfg.max_retransmit;
            s.next_retransmit = Some(now + s.wait);
        } else {
            s.retransmits_left = 0;
            s.next_retransmit = None;
        }
        let d = slot_deadline(s);
        self.earliest_deadline = Some(self.earliest_deadline.map_or(d, |e| e.min(d)));
        self.unsent.push(i);
    }

    /// Sends the first transmissions queued by `transmit_first`, up to `SEND_BATCH` per
    /// sendmmsg: under load the generator's own syscalls per request fall, so that it is
    /// not the bottleneck. A failed send (full buffer) is loss; the retransmission or
    /// timeout handles it.
    fn flush(&mut self) {
        let fd = self.socket.as_raw_fd();
        let mut done = 0;
        while done < self.unsent.len() {
            let rest = &self.unsent[done..];
            let slots = &self.slots;
            match send_batch_with(fd, rest.len(), |k| slots[rest[k]].wire.as_slice()) {
                Ok(n) => done += n.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // e.g. ECONNREFUSED from an earlier ICMP error: that one datagram is lost
                Err(_) => done += 1,
            }
        }
        self.unsent.clear();
    }

    fn complete(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.active = false;
        s.binding = None;
        if self.mid_slot[usize::from(s.mid)] == i as u32 + 1 {
            self.mid_slot[usize::from(s.mid)] = 0;
        }
        self.free.push(i);
    }

    fn check_timers(&mut self, now: Instant) -> Result<(), LoadError> {
        let mut earliest: Option<Instant> = None;
        for i in 0..self.slots.len() {
            if !self.slots[i].active {
                continue;
            }
            let s = &mut self.slots[i];
            if s.give_up.is_some_and(|g| now >= g) {
                self.tally.timeouts += 1;
                self.complete(i);
                continue;
            }
            if s.next_retransmit.is_some_and(|r| now >= r) {
                if s.retransmits_left == 0 {
                    // The last wait after the last retransmission is over (§4.2).
                    self.tally.timeouts += 1;
                    self.complete(i);
                    continue;
                }
                s.retransmits_left -= 1;
                s.wait *= 2;
                s.next_retransmit = Some(now + s.wait);
                self.tally.retransmissions += 1;
                let _ = self.socket.send(&s.wire);
            }
            let d = slot_deadline(&self.slots[i]);
            earliest = Some(earliest.map_or(d, |e| e.min(d)));
        }
        self.earliest_deadline = earliest;
        Ok(())
    }

    fn send_empty(&self, mtype: MessageType, mid: u16) {
        let mut out = [0u8; 4];
        out[0] = 0x40 | ((mtype as u8) << 4);
        out[2..4].copy_from_slice(&mid.to_be_bytes());
        let _ = self.socket.send(&out);
    }

    fn on_datagram(&mut self, datagram: &[u8], now: Instant) -> Result<(), LoadError> {
        let Ok(msg) = MessageView::parse(datagram) else {
            return Ok(()); // RFC 7252 §4.2: silently ignore
        };
        let by_mid = |g: &Self| {
            let v = g.mid_slot[usize::from(msg.message_id)];
            (v != 0)
                .then(|| v as usize - 1)
                .filter(|&i| g.slots[i].active && g.slots[i].mid == msg.message_id)
        };
        match msg.mtype {
            MessageType::Reset => {
                if let Some(i) = by_mid(self) {
                    self.tally.error("reset".into());
                    self.complete(i);
                }
                return Ok(());
            }
            MessageType::Acknowledgement if msg.code.is_empty() => {
                // Separate response follows (§5.2.2): stop retransmitting.
                if let Some(i) = by_mid(self) {
                    self.slots[i].next_retransmit = None;
                }
                return Ok(());
            }
            _ => {}
        }
        let slot = (msg.token.len() == TOKEN_LEN)
            .then(|| {
                let i = u32::from_be_bytes([msg.token[0], msg.token[1], msg.token[2], msg.token[3]])
                    as usize;
                let serial =
                    u32::from_be_bytes([msg.token[4], msg.token[5], msg.token[6], msg.token[7]]);
                (i, serial)
            })
            .filter(|&(i, serial)| {
                i < self.slots.len() && self.slots[i].active && self.slots[i].serial == serial
            })
            .map(|(i, _)| i);
        if let Some(i) =
            slot.filter(|&i| msg.code.is_request() && msg.message_id == self.slots[i].mid)
        {
            // Our own request came back: the peer is a bare UDP echo (benches/e2e.sh (a),
            // (b)); the echoed datagram is the answer.
            self.succeed(i, now);
            return Ok(());
        }
        if msg.mtype == MessageType::Confirmable && msg.code.is_response() {
            // Acknowledge a separate response, reject what we cannot match (§4.2).
            let kind = if slot.is_some() && msg.code.is_response() {
                MessageType::Acknowledgement
            } else {
                MessageType::Reset
            };
            self.send_empty(kind, msg.message_id);
        }
        let Some(i) = slot.filter(|_| msg.code.is_response()) else {
            return Ok(());
        };
        let (code, echo) = match (&self.oscore, &self.slots[i].binding) {
            (Some(o), Some(binding)) => {
                match unprotect_response(&o.ctx, binding, &msg, &mut self.plain) {
                    Ok(_) => match MessageView::parse(&self.plain) {
                        Ok(inner) => (inner.code, inner.option(number::ECHO).map(<[u8]>::to_vec)),
                        Err(_) => (Code::EMPTY, None),
                    },
                    Err(_) => {
                        self.tally.error(format!("oscore ({})", msg.code));
                        self.complete(i);
                        return Ok(());
                    }
                }
            }
            _ => (msg.code, None),
        };
        if code == Code::UNAUTHORIZED && echo.is_some() && !self.slots[i].echo_retried {
            // App. B.1.2: repeat with the Echo under a fresh sequence number and Message ID.
            self.tally.echo_retries += 1;
            self.slots[i].echo_retried = true;
            let mid = self.fresh_mid(i);
            self.fill_wire(i, mid, echo.as_deref())?;
            self.transmit_first(i, mid, now);
            return Ok(());
        }
        if code.is_success() {
            self.succeed(i, now);
        } else {
            self.tally.error(code.to_string());
            self.complete(i);
        }
        Ok(())
    }

    fn succeed(&mut self, i: usize, now: Instant) {
        self.tally.ok += 1;
        if let Some(t0) = self.slots[i].first_sent {
            self.tally
                .samples
                .push(now.duration_since(t0).as_nanos() as u64);
        }
        self.complete(i);
    }
}

fn slot_deadline(s: &Slot) -> Instant {
    match (s.next_retransmit, s.give_up) {
        (Some(r), Some(g)) => r.min(g),
        (Some(r), None) => r,
        (None, Some(g)) => g,
        // Every active slot has a give-up time; this is only a fallback.
        (None, None) => Instant::now(),
    }
}
