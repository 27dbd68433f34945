//! `oscore-gateway load --serve ADDR`: a minimal origin that answers every request at once
//! with a fixed-size payload (GET: 2.05 with `--payload-size` bytes; other methods: 2.04),
//! so that the gateway can be measured without a slow origin behind it.
//!
//! With `--credentials`, requests carrying an OSCORE option are verified with the `:label`
//! contexts (found by kid and kid context, RFC 8613 §8.2) and answered protected (§8.3); a
//! context whose replay window is unknown answers 4.01 + Echo first (App. B.1.2), as
//! aiocoap does. Plain requests are answered plain. One thread, one socket, buffers reused.

use std::collections::HashMap;
use std::net::{ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::transport::random_bytes;
use crate::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use crate::oscore::{
    parse_request_kid, protect_response, unprotect_request, OscoreError, RequestBinding,
};

use super::oscore_ctx::{server_contexts, OpenedContext};
use super::signal;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bind: String,
    pub credentials: Option<PathBuf>,
    pub payload_size: usize,
    pub max_seconds: Option<Duration>,
}

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
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| format!("{addr}: {e}"))?;
    let contexts = match &cfg.credentials {
        Some(c) => server_contexts(c)?,
        None => Vec::new(),
    };
    let mut origin = Origin::new(contexts, cfg.payload_size);
    let end = cfg.max_seconds.map(|d| Instant::now() + d);
    // Every datagram waiting is taken in one recvmmsg: one syscall per batch under load.
    let mut batch = crate::gateway::mmsg::RecvBatch::new(32);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let mut out = Vec::with_capacity(2048);
    let result = loop {
        if signal::stop_requested() || end.is_some_and(|d| Instant::now() >= d) {
            break Ok(());
        }
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
        for i in 0..n {
            let (datagram, from) = batch.get(i);
            if let Some(from) = from {
                if origin.handle(datagram, &mut out) {
                    let _ = socket.send_to(&out, from);
                }
            }
        }
    };
    for c in &origin.contexts {
        c.close();
    }
    result
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
        }
    }

    /// Writes the answer to `datagram` into `out`; false when nothing is to be sent.
    pub fn handle(&mut self, datagram: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(req) = MessageView::parse(datagram) else {
            return false; // RFC 7252 §4.2: silently ignore
        };
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
            let payload = if req.code == Code::GET {
                &self.payload[..]
            } else {
                &[]
            };
            return build(out, mtype, code, mid, req.token, None, payload);
        }
        self.handle_oscore(&req, mtype, mid, out)
    }

    fn handle_oscore(
        &mut self,
        req: &MessageView<'_>,
        mtype: MessageType,
        mid: u16,
        out: &mut Vec<u8>,
    ) -> bool {
        let idx = match parse_request_kid(req) {
            Ok(k) => self.by_kid.get(k.kid).and_then(|v| {
                v.iter()
                    .copied()
                    .find(|&i| self.contexts[i].ctx.id_context() == k.kid_context)
            }),
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
                b"Security context not found",
            );
        };
        let ctx = &self.contexts[idx];
        match unprotect_request(&ctx.ctx, req, &mut self.plain_in) {
            Ok(binding) => self.answer(idx, &binding, false, mtype, mid, req.token, None, out),
            Err(OscoreError::ReplayWindowUninitialized(u)) => {
                if let Some(expected) = self.echo[idx] {
                    if let Ok(binding) = u.accept_with_echo(&ctx.ctx, &expected) {
                        return self.answer(idx, &binding, true, mtype, mid, req.token, None, out);
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
        if !build(&mut self.plain_out, mtype, code, mid, token, echo, payload) {
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
                    return build(out, mtype, Code::SERVICE_UNAVAILABLE, mid, token, None, b"");
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

fn build(
    out: &mut Vec<u8>,
    mtype: MessageType,
    code: Code,
    mid: u16,
    token: &[u8],
    echo: Option<&[u8]>,
    payload: &[u8],
) -> bool {
    let Ok(mut b) = MessageBuilder::new(out, mtype, code, mid, token) else {
        return false;
    };
    if let Some(e) = echo {
        if b.option(number::ECHO, e).is_err() {
            return false;
        }
    }
    b.payload(payload);
    true
}
