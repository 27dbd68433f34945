//! `oscore-gateway load URI --observe N [--hold S]`: holds N Observe relations (RFC 7641)
//! at once, from one UDP socket, directly or through `--proxy`, and counts what arrives.
//!
//! 1. Registration: GET with Observe: 0, each relation with its own 8-byte token (relation
//!    index, run nonce), at most `--window` outstanding, CON with retransmission (RFC 7252
//!    §4.2). A 2.xx with Observe is a registration; anything else a failure.
//! 2. Hold: `--hold` seconds, counting the notifications (2.xx with Observe on a relation's
//!    token; CON ones are ACKed). Notifications on tokens we do not know are rejected with
//!    a Reset (§3.6).
//! 3. Deregistration: GET with Observe: 1 on each relation's token (§3.6), window-bounded;
//!    the answer without Observe ends the relation.
//!
//! Bounded: every phase has a deadline (`--timeout` per message exchange, `--duration-limit`
//! for the whole run on top of the hold).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::transport::random_bytes;
use crate::coap::option::decode_uint;
use crate::coap::{number, MessageType, MessageView};

use super::client::{build_request_observe, resolve, LoadConfig, LoadError};

const TOKEN_LEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Registering,
    Active,
    Deregistering,
    /// Registration failed, or the server ended the relation.
    Failed,
    Done,
}

struct Rel {
    phase: Phase,
    mid: u16,
    wire: Vec<u8>,
    next_retransmit: Option<Instant>,
    wait: Duration,
    retransmits_left: u32,
    give_up: Instant,
    notifications: u64,
    registered: bool,
}

/// What `--observe` reports (`--json`: this object).
#[derive(Debug, Clone, Serialize)]
pub struct ObserveReport {
    pub target: String,
    pub proxy: Option<String>,
    pub relations: usize,
    pub registered: u64,
    pub registration_failures: u64,
    pub register_s: f64,
    pub hold_s: f64,
    /// Notifications received during the hold (after the first responses).
    pub notifications: u64,
    pub notifications_per_s: f64,
    /// Relations that got at least one notification after their first response.
    pub relations_notified: u64,
    pub min_notifications_per_relation: u64,
    pub max_notifications_per_relation: u64,
    /// Relations the server ended on its own (a final response while active).
    pub ended_by_server: u64,
    pub deregistered: u64,
    pub deregistration_failures: u64,
    /// Message exchanges that ran out of retransmissions or time.
    pub timeouts: u64,
    pub retransmissions: u64,
    pub error_codes: BTreeMap<String, u64>,
    /// The diagnostic payload (RFC 7252 §5.5.2) of the first error response per code, so
    /// that a failure says why (at most 200 bytes, lossy UTF-8).
    pub first_diagnostics: BTreeMap<String, String>,
    pub cpu_s: f64,
}

impl ObserveReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        format!(
            "OBSERVE {} x{} via {}\n\
             registered: {} ok, {} failed in {:.3} s\n\
             hold {:.1} s: {} notifications ({:.0}/s), {} of {} relations notified \
             (per relation min {} max {}), {} ended by the server\n\
             deregistered: {} ok, {} failed; {} timeouts, {} retransmissions{}\n\
             generator CPU {:.3} s\n",
            self.target,
            self.relations,
            self.proxy.as_deref().unwrap_or("(direct)"),
            self.registered,
            self.registration_failures,
            self.register_s,
            self.hold_s,
            self.notifications,
            self.notifications_per_s,
            self.relations_notified,
            self.registered,
            self.min_notifications_per_relation,
            self.max_notifications_per_relation,
            self.ended_by_server,
            self.deregistered,
            self.deregistration_failures,
            self.timeouts,
            self.retransmissions,
            if self.error_codes.is_empty() {
                String::new()
            } else {
                format!(
                    "; errors {:?}, first diagnostics {:?}",
                    self.error_codes, self.first_diagnostics
                )
            },
            self.cpu_s,
        )
    }

    /// Every relation registered, notified and deregistered, nothing failed.
    pub fn all_ok(&self) -> bool {
        self.registered == self.relations as u64
            && self.relations_notified == self.registered
            && self.deregistered == self.registered
            && self.ended_by_server == 0
            && self.timeouts == 0
    }
}

struct Observer<'c> {
    cfg: &'c LoadConfig,
    socket: UdpSocket,
    peer: SocketAddr,
    rels: Vec<Rel>,
    nonce: [u8; 4],
    mid_rel: Vec<u32>,
    next_mid: u16,
    outstanding: usize,
    counting: bool,
    r: ObserveReport,
}

/// Runs `--observe N` for `hold` and reports.
pub fn run_observe(
    cfg: &LoadConfig,
    relations: usize,
    hold: Duration,
) -> Result<ObserveReport, LoadError> {
    if cfg.uri.scheme != "coap" || cfg.credentials.is_some() || !cfg.spread.is_empty() {
        return Err(LoadError::Setup(
            "--observe takes one plain coap:// target (no --credentials, no --spread)".into(),
        ));
    }
    let peer = resolve(cfg.proxy.as_ref().unwrap_or(&cfg.uri))?;
    let io = |source| LoadError::Io { peer, source };
    let socket = UdpSocket::bind(if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .map_err(io)?;
    socket.connect(peer).map_err(io)?;
    socket.set_nonblocking(true).map_err(io)?;
    let now = Instant::now();
    let o = Observer {
        cfg,
        socket,
        peer,
        rels: (0..relations)
            .map(|_| Rel {
                phase: Phase::Idle,
                mid: 0,
                wire: Vec::new(),
                next_retransmit: None,
                wait: cfg.ack_timeout,
                retransmits_left: 0,
                give_up: now,
                notifications: 0,
                registered: false,
            })
            .collect(),
        nonce: random_bytes::<4>(),
        mid_rel: vec![0; 65536],
        next_mid: u16::from_be_bytes(random_bytes::<2>()),
        outstanding: 0,
        counting: false,
        r: ObserveReport {
            target: cfg.uri.to_string(),
            proxy: cfg.proxy.as_ref().map(|p| p.to_string()),
            relations,
            registered: 0,
            registration_failures: 0,
            register_s: 0.0,
            hold_s: 0.0,
            notifications: 0,
            notifications_per_s: 0.0,
            relations_notified: 0,
            min_notifications_per_relation: 0,
            max_notifications_per_relation: 0,
            ended_by_server: 0,
            deregistered: 0,
            deregistration_failures: 0,
            timeouts: 0,
            retransmissions: 0,
            error_codes: BTreeMap::new(),
            first_diagnostics: BTreeMap::new(),
            cpu_s: 0.0,
        },
    };
    o.run(hold)
}

impl Observer<'_> {
    fn run(mut self, hold: Duration) -> Result<ObserveReport, LoadError> {
        let cpu_before = super::stats::process_cpu_time();
        let start = Instant::now();
        let end = start + self.cfg.duration_limit + hold;
        // 1. registrations
        self.phase_exchanges(Phase::Idle, Phase::Registering, 0, end)?;
        self.r.register_s = start.elapsed().as_secs_f64();
        // 2. hold
        self.counting = true;
        let hold_start = Instant::now();
        let hold_end = (hold_start + hold).min(end);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < hold_end {
            self.receive_all(&mut buf)?;
            self.wait_readable(hold_end.saturating_duration_since(Instant::now()));
        }
        self.receive_all(&mut buf)?;
        self.counting = false;
        self.r.hold_s = hold_start.elapsed().as_secs_f64();
        // 3. deregistrations (Observe: 1)
        self.phase_exchanges(Phase::Active, Phase::Deregistering, 1, end)?;
        let active: Vec<u64> = self
            .rels
            .iter()
            .filter(|r| r.registered)
            .map(|r| r.notifications)
            .collect();
        self.r.relations_notified = active.iter().filter(|&&n| n > 0).count() as u64;
        self.r.min_notifications_per_relation = active.iter().copied().min().unwrap_or(0);
        self.r.max_notifications_per_relation = active.iter().copied().max().unwrap_or(0);
        self.r.notifications_per_s = self.r.notifications as f64 / self.r.hold_s.max(1e-9);
        self.r.cpu_s = super::stats::process_cpu_time()
            .saturating_sub(cpu_before)
            .as_secs_f64();
        Ok(self.r)
    }

    /// Sends one exchange (Observe `observe`) for every relation in `from`, moving it to
    /// `during`, at most `window` outstanding, until all have ended or `end`.
    fn phase_exchanges(
        &mut self,
        from: Phase,
        during: Phase,
        observe: u32,
        end: Instant,
    ) -> Result<(), LoadError> {
        let mut buf = vec![0u8; 65536];
        let mut next = 0;
        loop {
            let now = Instant::now();
            while self.outstanding < self.cfg.window && next < self.rels.len() {
                if self.rels[next].phase == from {
                    self.send_exchange(next, during, observe, now)?;
                }
                next += 1;
            }
            self.receive_all(&mut buf)?;
            let now = Instant::now();
            let earliest = self.check_timers(now);
            if (next >= self.rels.len() && self.outstanding == 0) || now >= end {
                return Ok(());
            }
            if self.outstanding >= self.cfg.window || next >= self.rels.len() {
                let wake = earliest.map_or(end, |d| d.min(end));
                self.wait_readable(wake.saturating_duration_since(now));
            }
        }
    }

    fn token(&self, i: usize) -> [u8; TOKEN_LEN] {
        let mut t = [0u8; TOKEN_LEN];
        t[..4].copy_from_slice(&(i as u32).to_be_bytes());
        t[4..].copy_from_slice(&self.nonce);
        t
    }

    fn send_exchange(
        &mut self,
        i: usize,
        during: Phase,
        observe: u32,
        now: Instant,
    ) -> Result<(), LoadError> {
        self.next_mid = self.next_mid.wrapping_add(1);
        let mid = self.next_mid;
        self.mid_rel[usize::from(mid)] = i as u32 + 1;
        let token = self.token(i);
        let mut wire = std::mem::take(&mut self.rels[i].wire);
        build_request_observe(
            self.cfg,
            &self.cfg.uri,
            MessageType::Confirmable,
            mid,
            &token,
            Some(observe),
            None,
            &mut wire,
        )?;
        let random = f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX);
        let r = &mut self.rels[i];
        r.wire = wire;
        r.phase = during;
        r.mid = mid;
        r.wait = self.cfg.ack_timeout.mul_f64(1.0 + random * 0.5);
        r.retransmits_left = self.cfg.max_retransmit;
        r.next_retransmit = Some(now + r.wait);
        r.give_up = now + self.cfg.timeout;
        self.outstanding += 1;
        let _ = self.socket.send(&r.wire);
        Ok(())
    }

    /// Ends relation `i`'s exchange: `ok` moves it on (Registering -> Active,
    /// Deregistering -> Done), else it failed.
    /// Counts an error response by code and keeps the first diagnostic of each code.
    fn count_error(&mut self, msg: &MessageView<'_>) {
        let code = msg.code.to_string();
        if !self.r.first_diagnostics.contains_key(&code) && !msg.payload.is_empty() {
            let text = String::from_utf8_lossy(&msg.payload[..msg.payload.len().min(200)]);
            self.r
                .first_diagnostics
                .insert(code.clone(), text.into_owned());
        }
        *self.r.error_codes.entry(code).or_default() += 1;
    }

    fn finish(&mut self, i: usize, ok: bool) {
        let r = &mut self.rels[i];
        let phase = r.phase;
        r.next_retransmit = None;
        r.wire = Vec::new();
        self.outstanding = self.outstanding.saturating_sub(1);
        match (phase, ok) {
            (Phase::Registering, true) => {
                r.phase = Phase::Active;
                r.registered = true;
                self.r.registered += 1;
            }
            (Phase::Registering, false) => {
                r.phase = Phase::Failed;
                self.r.registration_failures += 1;
            }
            (Phase::Deregistering, true) => {
                r.phase = Phase::Done;
                self.r.deregistered += 1;
            }
            (Phase::Deregistering, false) => {
                r.phase = Phase::Done;
                self.r.deregistration_failures += 1;
            }
            _ => {}
        }
    }

    fn check_timers(&mut self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for i in 0..self.rels.len() {
            let r = &mut self.rels[i];
            if !matches!(r.phase, Phase::Registering | Phase::Deregistering) {
                continue;
            }
            if now >= r.give_up {
                self.r.timeouts += 1;
                self.finish(i, false);
                continue;
            }
            if r.next_retransmit.is_some_and(|t| now >= t) {
                if r.retransmits_left == 0 {
                    self.r.timeouts += 1;
                    self.finish(i, false);
                    continue;
                }
                r.retransmits_left -= 1;
                r.wait *= 2;
                r.next_retransmit = Some(now + r.wait);
                self.r.retransmissions += 1;
                let _ = self.socket.send(&r.wire);
            }
            let r = &self.rels[i];
            let d = r.next_retransmit.map_or(r.give_up, |t| t.min(r.give_up));
            earliest = Some(earliest.map_or(d, |e| e.min(d)));
        }
        earliest
    }

    fn receive_all(&mut self, buf: &mut [u8]) -> Result<(), LoadError> {
        loop {
            match self.socket.recv(buf) {
                Ok(n) => self.on_datagram(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(LoadError::Io {
                        peer: self.peer,
                        source: e,
                    })
                }
            }
        }
    }

    fn send_empty(&self, mtype: MessageType, mid: u16) {
        let mut out = [0u8; 4];
        out[0] = 0x40 | ((mtype as u8) << 4);
        out[2..4].copy_from_slice(&mid.to_be_bytes());
        let _ = self.socket.send(&out);
    }

    fn on_datagram(&mut self, d: &[u8]) {
        let Ok(msg) = MessageView::parse(d) else {
            return;
        };
        if msg.code.is_empty() {
            // empty ACK (separate response follows) or Reset, matched by Message ID
            let v = self.mid_rel[usize::from(msg.message_id)];
            let Some(i) = (v != 0).then(|| v as usize - 1) else {
                return;
            };
            let r = &mut self.rels[i];
            if r.mid != msg.message_id
                || !matches!(r.phase, Phase::Registering | Phase::Deregistering)
            {
                return;
            }
            match msg.mtype {
                MessageType::Acknowledgement => r.next_retransmit = None,
                MessageType::Reset => {
                    *self.r.error_codes.entry("reset".into()).or_default() += 1;
                    self.finish(i, false);
                }
                _ => {}
            }
            return;
        }
        if !msg.code.is_response() {
            return;
        }
        let rel = (msg.token.len() == TOKEN_LEN && msg.token[4..] == self.nonce)
            .then(|| {
                u32::from_be_bytes([msg.token[0], msg.token[1], msg.token[2], msg.token[3]])
                    as usize
            })
            .filter(|&i| i < self.rels.len());
        let known = rel.is_some_and(|i| {
            matches!(
                self.rels[i].phase,
                Phase::Registering | Phase::Active | Phase::Deregistering
            )
        });
        match msg.mtype {
            MessageType::Confirmable if known => {
                self.send_empty(MessageType::Acknowledgement, msg.message_id)
            }
            // RFC 7641 §3.6: reject a notification we do not want (CON or NON)
            MessageType::Confirmable | MessageType::NonConfirmable if !known => {
                self.send_empty(MessageType::Reset, msg.message_id)
            }
            _ => {}
        }
        let Some(i) = rel.filter(|_| known) else {
            return;
        };
        let observing =
            msg.code.is_success() && msg.option(number::OBSERVE).and_then(decode_uint).is_some();
        match self.rels[i].phase {
            Phase::Registering => {
                if !observing {
                    self.count_error(&msg);
                }
                self.finish(i, observing);
            }
            Phase::Active => {
                if observing {
                    if self.counting {
                        self.rels[i].notifications += 1;
                        self.r.notifications += 1;
                    }
                } else {
                    // a final response: the server ended the relation (RFC 7641 §3.2)
                    self.count_error(&msg);
                    self.rels[i].phase = Phase::Failed;
                    self.r.ended_by_server += 1;
                }
            }
            // the answer to Observe: 1 (a late notification has Observe)
            Phase::Deregistering if !observing => {
                let ok = msg.code.is_success();
                if !ok {
                    *self.r.error_codes.entry(msg.code.to_string()).or_default() += 1;
                }
                self.finish(i, ok);
            }
            _ => {}
        }
    }

    fn wait_readable(&self, timeout: Duration) {
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_micros().div_ceil(1000).min(100) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut fd, 1, ms);
        }
    }
}
