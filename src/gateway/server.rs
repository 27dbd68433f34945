//! The client side of the message layer over UDP (RFC 7252 §4): one socket per configured
//! address, a task per request, deduplication of retransmitted CONs, piggybacked responses,
//! and a graceful shutdown: stop receiving, let in-flight requests finish up to a grace
//! period, then close every opened security context (exact sequence.json, lock released).
//!
//! A CON whose answer takes longer than `SEPARATE_AFTER` gets an empty ACK at once and the
//! response later as a separate CON (RFC 7252 §5.2.2), retransmitted until the client
//! acknowledges it (or rejects it with a Reset).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::deadlines::Deadlines;
use super::dedup::{Dedup, Seen, Ticket, EXCHANGE_LIFETIME};
use super::mmsg::{send_batch_to, RecvBatch};
use super::reply::{refusal_response, relay_response, reset, ReplyTo};
use super::target::Refusal;
use super::{Gateway, GatewayError};
use crate::client::transport::random_bytes;
use crate::coap::{Code, MessageType, MessageView};

/// Datagrams taken from a listener per recvmmsg call, at most.
const RECV_BATCH: usize = 32;
/// Requests remembered for deduplication per listener.
pub const DEDUP_CAPACITY: usize = 16384;
/// How long in-flight requests may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After this long without an answer from the origin, a CON is acknowledged with an empty
/// ACK and answered later in a separate response (RFC 7252 §5.2.2 leaves the time to the
/// server; 1 s is well below the client's ACK_TIMEOUT of 2 s, so it does not retransmit).
pub const SEPARATE_AFTER: Duration = Duration::from_secs(1);

/// Separate responses waiting for the client's ACK (or RST), by (client, Message ID).
type Pending = Arc<Mutex<std::collections::HashMap<(SocketAddr, u16), oneshot::Sender<()>>>>;

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
            // runs of datagrams from one client arrive as one buffer (mmsg)
            super::mmsg::enable_gro(s.as_raw_fd());
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
    let spinner = gateway
        .activity()
        .map(|a| tokio::spawn(Arc::clone(a).spin(gateway.config().busy_poll)));
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
    if let Some(s) = spinner {
        s.abort();
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, inflight_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; closing anyway");
    }
    // Observations deregister upstream (protected) before their contexts close.
    gateway.observations().shutdown().await;
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
    let pending: Pending = Arc::default();
    let outbox = Arc::new(Outbox::default());
    // One sweeper for every request's "answer separately after SEPARATE_AFTER" (no timer
    // per request); it ends after the listener stopped and the last deadline fired.
    let separate_after = Deadlines::new(SEPARATE_AFTER);
    tokio::spawn(Arc::clone(&separate_after).sweep());
    let _stop_sweeper = StopOnDrop(Arc::clone(&separate_after));
    tokio::spawn(send_answers(
        Arc::clone(&socket),
        Arc::clone(&outbox),
        Arc::clone(&dedup),
    ));
    // The sender outlives this loop until the requests still in flight have been answered
    // (each answer holds an in-flight guard, which `run` waits for); then it ends.
    let _close = WakeOnDrop(Arc::clone(&outbox));
    // Every datagram waiting is taken in one recvmmsg (`mmsg`).
    let mut batch = RecvBatch::new(RECV_BATCH);
    let fd = socket.as_raw_fd();
    loop {
        let received = tokio::select! {
            _ = stop.changed() => return,
            r = socket.async_io(Interest::READABLE, || batch.recv(fd)) => match r {
                Ok(n) => {
                    if let Some(a) = gateway.activity() {
                        a.touch();
                    }
                    n
                }
                Err(e) => {
                    // e.g. ICMP errors surfacing on the socket: not fatal for a server
                    tracing::debug!("recv on {:?}: {e}", socket.local_addr());
                    continue;
                }
            },
        };
        // One clock reading per batch: the arrival time for deduplication and the
        // separate-response deadline of every request in it.
        let now = Instant::now().into_std();
        for i in 0..received {
            let (data, peer) = batch.get(i);
            let Some(peer) = peer else { continue };
            let datagram = data.to_vec();
            let Ok(msg) = MessageView::parse(&datagram) else {
                continue; // RFC 7252 §4.2/4.3: silently ignore malformed messages
            };
            match msg.mtype {
                MessageType::Confirmable | MessageType::NonConfirmable if msg.code.is_request() => {
                }
                MessageType::Confirmable => {
                    // An Empty CON ("ping", §4.3) or a response we never asked for: Reset.
                    let mut out = Vec::with_capacity(4);
                    reset(msg.message_id, &mut out);
                    let _ = socket.send_to(&out, peer).await;
                    continue;
                }
                MessageType::Acknowledgement | MessageType::Reset => {
                    // The client's answer to a separate response.
                    if let Some(done) = lock(&pending).remove(&(peer, msg.message_id)) {
                        let _ = done.send(());
                    } else if msg.mtype == MessageType::Reset {
                        // RFC 7641 §3.6: the client rejects a relayed notification.
                        gateway.observations().client_reset(peer, msg.message_id);
                    }
                    continue;
                }
                _ => continue, // a NON that is not a request: nothing to do
            }
            let seen = lock(&dedup).check(peer, msg.message_id, now);
            let ticket = match seen {
                Seen::New(ticket) => ticket,
                Seen::InFlight => continue,
                Seen::Answered(response) => {
                    let _ = socket.send_to(&response, peer).await;
                    continue;
                }
            };
            let gateway = Arc::clone(&gateway);
            let socket = Arc::clone(&socket);
            let dedup = Arc::clone(&dedup);
            let pending = Arc::clone(&pending);
            let next_mid = Arc::clone(&next_mid);
            let guard = inflight.clone();
            let outbox = Arc::clone(&outbox);
            // §5.2.2: a CON not answered by then is acknowledged first (registered here, in
            // arrival order).
            let separate_wait =
                (msg.mtype == MessageType::Confirmable).then(|| separate_after.wait_from(now));
            let arrival = if received > 1 {
                super::Arrival::InBatch
            } else {
                super::Arrival::Alone
            };
            let fut = async move {
                let guard = guard;
                let Ok(request) = MessageView::parse(&datagram) else {
                    return;
                };
                let fresh_mid = next_mid.fetch_add(1, Ordering::Relaxed);
                let mut to = ReplyTo::for_request(&request, fresh_mid);
                let observing = request.has_option(crate::coap::number::OBSERVE);
                let client = super::observe::ClientLink {
                    socket: Arc::clone(&socket),
                    peer,
                    next_mid: Arc::clone(&next_mid),
                };
                let work = async {
                    if observing {
                        // Boxed: the Observe path's state is large and rare; inline it would
                        // make every request's task (allocated and moved per request) ~2 KiB
                        // bigger (4.4 KiB in all).
                        Box::pin(gateway.handle_observe_request(&request, &datagram, client)).await
                    } else {
                        gateway.handle_arrival(peer, &request, arrival).await
                    }
                };
                tokio::pin!(work);
                let mut separate = false;
                let result = if let Some(separate_wait) = separate_wait {
                    tokio::select! {
                        biased;
                        r = &mut work => r,
                        _ = separate_wait => {
                            // §5.2.2: empty ACK now; retransmissions of the CON get it again.
                            let mut ack = Vec::with_capacity(4);
                            empty_ack(request.message_id, &mut ack);
                            let _ = socket.send_to(&ack, peer).await;
                            lock(&dedup).answered(ticket, ack);
                            separate = true;
                            work.await
                        }
                    }
                } else {
                    work.await
                };
                if separate {
                    to.mtype = MessageType::Confirmable;
                }
                let out = client_response(&result, to, peer);
                if separate {
                    send_confirmable(&socket, peer, fresh_mid, &out, &pending).await;
                } else {
                    outbox.push(Answer {
                        datagram: out,
                        peer,
                        ticket,
                        _guard: guard,
                    });
                }
            };
            // Boxed: the request's future (~2 KiB) is then copied once, into its box; a task
            // holding it inline was copied 5-6 times per request (spawn, set_stage).
            tokio::spawn(Box::pin(fut));
        }
    }
}

/// A piggybacked or NON answer for a client, queued for the listener's sender task.
struct Answer {
    datagram: Vec<u8>,
    peer: SocketAddr,
    /// The request's deduplication entry (for retransmissions of the request).
    ticket: Ticket,
    /// The request counts as in flight until its answer has left.
    _guard: mpsc::Sender<()>,
}

/// Answers of the requests that finished since the sender task last ran: sent together in
/// one sendmmsg, so a burst of answers costs one syscall and wakes the client once.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Vec<Answer>>,
    wake: tokio::sync::Notify,
}

impl Outbox {
    fn push(&self, answer: Answer) {
        let mut q = lock(&self.queue);
        let first = q.is_empty();
        q.push(answer);
        drop(q);
        if first {
            // The sender runs after the tasks already runnable, which add to this batch.
            self.wake.notify_one();
        }
    }
}

/// The listener's sender task: sends queued answers in batches, then records each for
/// deduplication (RFC 7252 §4.5: a retransmitted request gets the same answer).
async fn send_answers(socket: Arc<UdpSocket>, outbox: Arc<Outbox>, dedup: Arc<Mutex<Dedup>>) {
    let fd = socket.as_raw_fd();
    let mut batch: Vec<Answer> = Vec::new();
    loop {
        outbox.wake.notified().await;
        std::mem::swap(&mut *lock(&outbox.queue), &mut batch);
        let mut sent = 0;
        while sent < batch.len() {
            let rest = &batch[sent..];
            let r = socket
                .async_io(Interest::WRITABLE, || {
                    send_batch_to(fd, rest.len(), |i| (&rest[i].datagram, rest[i].peer))
                })
                .await;
            match r {
                Ok(n) => sent += n.max(1),
                Err(e) => {
                    tracing::debug!("send to {}: {e}", rest[0].peer);
                    sent += 1;
                }
            }
        }
        {
            let mut d = lock(&dedup);
            for a in batch.drain(..) {
                d.answered(a.ticket, a.datagram);
            }
        }
        // The listener stopped and no request task is left to queue an answer.
        if Arc::strong_count(&outbox) == 1 && lock(&outbox.queue).is_empty() {
            return;
        }
    }
}

/// Tells the separate-response sweeper that no more requests come when the listener loop
/// ends.
struct StopOnDrop(Arc<Deadlines>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Wakes the sender task when the listener loop ends, so that it can see it is the last.
struct WakeOnDrop(Arc<Outbox>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.wake.notify_one();
    }
}

/// The datagram for the client: the origin's response re-addressed, or the refusal.
fn client_response(
    result: &Result<Vec<u8>, Refusal>,
    to: ReplyTo<'_>,
    peer: SocketAddr,
) -> Vec<u8> {
    // Sized from what is relayed: a request of >= 1 KiB from glibc's malloc consolidates
    // its fast bins every time (malloc_consolidate was ~2 % of the gateway's CPU at load).
    let mut out = Vec::with_capacity(match result {
        Ok(plain) => plain.len() + 16,
        Err(refusal) => refusal.diagnostic.len() + 16,
    });
    let written = match result {
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
    out
}

/// Sends a CON to the client and retransmits it with exponential back-off (RFC 7252 §4.2,
/// default parameters) until it is acknowledged or rejected, or MAX_RETRANSMIT is reached.
async fn send_confirmable(
    socket: &UdpSocket,
    peer: SocketAddr,
    mid: u16,
    datagram: &[u8],
    pending: &Pending,
) {
    let params = crate::client::TransmissionParams::default();
    let (tx, mut rx) = oneshot::channel();
    lock(pending).insert((peer, mid), tx);
    let random = f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX);
    let mut wait = params
        .ack_timeout
        .mul_f64(1.0 + random * (params.ack_random_factor - 1.0));
    for _ in 0..=params.max_retransmit {
        if let Err(e) = socket.send_to(datagram, peer).await {
            tracing::debug!("send to {peer}: {e}");
        }
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(_) => return, // acknowledged, reset, or the listener stopped
            Err(_) => wait *= 2,
        }
    }
    lock(pending).remove(&(peer, mid));
    tracing::info!("{peer} did not acknowledge separate response {mid}");
}

fn empty_ack(mid: u16, out: &mut Vec<u8>) {
    if let Ok(b) =
        crate::coap::MessageBuilder::new(out, MessageType::Acknowledgement, Code::EMPTY, mid, &[])
    {
        b.finish();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
