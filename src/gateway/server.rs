//! The client side of the message layer over UDP (RFC 7252 §4): one socket per configured
//! address, a task per request, deduplication of retransmitted CONs, piggybacked responses,
//! and a graceful shutdown: stop receiving, let in-flight requests finish up to a grace
//! period, then close every opened security context (exact sequence.json, lock released).
//!
//! Not yet: the empty ACK + separate response for a slow origin (RFC 7252 §5.2.2); a client
//! retransmits its CON meanwhile and the retransmissions are absorbed by deduplication.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::dedup::{Dedup, Seen, EXCHANGE_LIFETIME};
use super::reply::{refusal_response, relay_response, reset, ReplyTo};
use super::target::Refusal;
use super::{Gateway, GatewayError};
use crate::client::transport::random_bytes;
use crate::coap::{Code, MessageType, MessageView};

/// Requests remembered for deduplication per listener.
pub const DEDUP_CAPACITY: usize = 16384;
/// How long in-flight requests may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The bound listeners (bind first, so that errors come before the gateway reports ready).
pub struct Listeners {
    sockets: Vec<Arc<UdpSocket>>,
}

impl Listeners {
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Listeners, GatewayError> {
        let mut sockets = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { addr, source })?;
            sockets.push(Arc::new(s));
        }
        Ok(Listeners { sockets })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// Serves on `listeners` until `shutdown` completes, then shuts down gracefully.
pub async fn run(gateway: Gateway, listeners: Listeners, shutdown: impl Future<Output = ()>) {
    let gateway = Arc::new(gateway);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every request task holds a clone; when all are dropped, `recv` returns None.
    let (inflight_tx, mut inflight_rx) = mpsc::channel::<()>(1);
    let mut loops = Vec::new();
    for socket in listeners.sockets {
        loops.push(tokio::spawn(serve(
            Arc::clone(&gateway),
            socket,
            stop_rx.clone(),
            inflight_tx.clone(),
        )));
    }
    drop(inflight_tx);
    shutdown.await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, inflight_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; closing anyway");
    }
    for (dir, e) in gateway.contexts().close_all().await {
        tracing::error!("closing context {}: {e}", dir.display());
    }
}

async fn serve(
    gateway: Arc<Gateway>,
    socket: Arc<UdpSocket>,
    mut stop: watch::Receiver<bool>,
    inflight: mpsc::Sender<()>,
) {
    let dedup = Arc::new(Mutex::new(Dedup::new(DEDUP_CAPACITY, EXCHANGE_LIFETIME)));
    let next_mid = Arc::new(AtomicU16::new(u16::from_be_bytes(random_bytes::<2>())));
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.changed() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // e.g. ICMP errors surfacing on the socket: not fatal for a server
                    tracing::debug!("recv on {:?}: {e}", socket.local_addr());
                    continue;
                }
            },
        };
        let datagram = buf[..n].to_vec();
        let Ok(msg) = MessageView::parse(&datagram) else {
            continue; // RFC 7252 §4.2/4.3: silently ignore malformed messages
        };
        match msg.mtype {
            MessageType::Confirmable | MessageType::NonConfirmable if msg.code.is_request() => {}
            MessageType::Confirmable => {
                // An Empty CON ("ping", §4.3) or a response we never asked for: Reset.
                let mut out = Vec::with_capacity(4);
                reset(msg.message_id, &mut out);
                let _ = socket.send_to(&out, peer).await;
                continue;
            }
            _ => continue, // ACK/RST/NON responses: nothing outstanding toward clients yet
        }
        let seen = lock(&dedup).check(peer, msg.message_id, Instant::now().into_std());
        match seen {
            Seen::New => {}
            Seen::InFlight => continue,
            Seen::Answered(response) => {
                let _ = socket.send_to(&response, peer).await;
                continue;
            }
        }
        let gateway = Arc::clone(&gateway);
        let socket = Arc::clone(&socket);
        let dedup = Arc::clone(&dedup);
        let mid = next_mid.fetch_add(1, Ordering::Relaxed);
        let guard = inflight.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(request) = MessageView::parse(&datagram) else {
                return;
            };
            let to = ReplyTo::for_request(&request, mid);
            let result = gateway.handle_request(&request).await;
            let mut out = Vec::with_capacity(1200);
            let written = match &result {
                Ok(plain) => match MessageView::parse(plain) {
                    Ok(view) => relay_response(&view, to, &mut out).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(refusal) => {
                    tracing::info!("{peer} {}: {}", refusal.code, refusal.diagnostic);
                    refusal_response(refusal, to, &mut out);
                    Ok(())
                }
            };
            if let Err(e) = written {
                refusal_response(
                    &Refusal::new(
                        Code::BAD_GATEWAY,
                        format!("cannot relay the origin's response: {e}"),
                    ),
                    to,
                    &mut out,
                );
            }
            if let Err(e) = socket.send_to(&out, peer).await {
                tracing::debug!("send to {peer}: {e}");
            }
            lock(&dedup).answered(peer, request.message_id, out);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
