//! The upstream message layer (RFC 7252 §4) toward origins: one UDP socket per origin,
//! shared by every request to it, with fresh Message IDs of this leg, retransmission with
//! exponential back-off (same Message ID, so the origin's deduplication works), empty ACK
//! then separate response, and NSTART per origin.
//!
//! `link` is the pure state machine of one origin; this file is its thin tokio driver: a
//! task per origin owns the socket and the `OriginLink` and talks to requesters through
//! channels, so no lock is ever held across an await (the origin table's `std` mutex is
//! only held to look a channel up). Bounded: at most `MAX_ORIGINS` links; a link idle for
//! `IDLE_CLOSE` closes its socket and ends its task.

pub mod link;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use std::os::fd::AsRawFd;

use tokio::io::Interest;

use super::busy_poll::Activity;
use super::mmsg::{send_batch, RecvBatch, SEND_BATCH};
use super::FastMap;
use crate::client::transport::random_bytes;
use crate::coap::Token;
pub use link::{Event, LinkError, LinkParams, OriginLink};

/// Origins with an open link at once, at most.
pub const MAX_ORIGINS: usize = 1024;
/// A link with nothing in flight for this long is closed (it keeps answering
/// retransmitted CON responses until then; RFC 7252 §4.8.2 EXCHANGE_LIFETIME).
pub const IDLE_CLOSE: Duration = Duration::from_secs(247);
/// Datagrams taken from an origin's socket per recvmmsg call, at most.
const LINK_RECV_BATCH: usize = 16;
/// Requests waiting in a link's channel, at most.
const CHANNEL: usize = 256;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("{peer}: {source}")]
    Link { peer: SocketAddr, source: LinkError },
    #[error("UDP socket toward {peer}: {source}")]
    Io {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("too many origins at once ({MAX_ORIGINS})")]
    TooManyOrigins,
    #[error("the link to {peer} closed")]
    Closed { peer: SocketAddr },
}

impl UpstreamError {
    /// True when the origin did not answer (5.04 rather than 5.02).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Link {
                source: LinkError::Timeout { .. } | LinkError::SeparateTimeout(_),
                ..
            }
        )
    }
}

struct Submit {
    datagram: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

/// A link task's answer to a `Submit`.
enum Reply {
    Done(Result<Vec<u8>, UpstreamError>),
    /// The link closed (idle) before taking the request: here it is back, to send on a
    /// new link (no copy of every request is kept for this rare case).
    Closed(Vec<u8>),
}

type Links = Arc<Mutex<FastMap<SocketAddr, mpsc::Sender<Submit>>>>;

/// The links to every origin this gateway talks to.
pub struct Upstream {
    params: LinkParams,
    links: Links,
    /// Told of every datagram from an origin (busy polling, `super::busy_poll`).
    activity: Option<Arc<Activity>>,
}

impl Upstream {
    pub fn new(params: LinkParams) -> Self {
        Self {
            params,
            links: Arc::default(),
            activity: None,
        }
    }

    /// Reports datagrams from origins to `activity` (busy polling).
    pub fn with_activity(mut self, activity: Option<Arc<Activity>>) -> Self {
        self.activity = activity;
        self
    }

    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// Sends the CON request `datagram` to `peer` (its Message ID is replaced by the link's;
    /// its token must be fresh, e.g. 8 random bytes) and returns the response datagram.
    /// Dropping the future cancels the exchange (its NSTART slot is freed).
    pub async fn exchange(
        &self,
        peer: SocketAddr,
        datagram: Vec<u8>,
    ) -> Result<Vec<u8>, UpstreamError> {
        // A link that closed for idleness between lookup and send: open a new one, once.
        let mut datagram = datagram;
        for _ in 0..2 {
            let tx = self.link(peer).await?;
            let (reply, rx) = oneshot::channel();
            if let Err(mpsc::error::SendError(back)) = tx.send(Submit { datagram, reply }).await {
                datagram = back.datagram;
                continue;
            }
            match rx.await {
                Ok(Reply::Done(r)) => return r,
                Ok(Reply::Closed(back)) => datagram = back,
                // the link task ended without answering (it cannot while it holds the
                // request; only if it panicked)
                Err(_) => break,
            }
        }
        Err(UpstreamError::Closed { peer })
    }

    /// The channel of `peer`'s link, opening the link (socket + task) if needed.
    async fn link(&self, peer: SocketAddr) -> Result<mpsc::Sender<Submit>, UpstreamError> {
        {
            let mut links = lock(&self.links);
            if let Some(tx) = links.get(&peer) {
                if !tx.is_closed() {
                    return Ok(tx.clone());
                }
                links.remove(&peer);
            }
        }
        let io = |source| UpstreamError::Io { peer, source };
        let bind: SocketAddr = if peer.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(peer).await.map_err(io)?;
        // the origin's answers to a run of requests arrive as one buffer (mmsg)
        super::mmsg::enable_gro(socket.as_raw_fd());
        let mut links = lock(&self.links);
        if let Some(tx) = links.get(&peer) {
            if !tx.is_closed() {
                return Ok(tx.clone()); // another request opened it meanwhile
            }
        }
        if links.len() >= MAX_ORIGINS {
            links.retain(|_, tx| !tx.is_closed());
            if links.len() >= MAX_ORIGINS {
                return Err(UpstreamError::TooManyOrigins);
            }
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        links.insert(peer, tx.clone());
        let link = OriginLink::new(self.params, u16::from_be_bytes(random_bytes::<2>()));
        tokio::spawn(drive(
            peer,
            socket,
            link,
            rx,
            Arc::clone(&self.links),
            tx.downgrade(),
            self.activity.clone(),
        ));
        Ok(tx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_unit() -> f64 {
    f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX)
}

/// Hands one request to the link; its requester is answered when the link says so.
fn submit(
    link: &mut OriginLink,
    waiting: &mut FastMap<Token, oneshot::Sender<Reply>>,
    peer: SocketAddr,
    now: std::time::Instant,
    Submit { datagram, reply }: Submit,
) {
    match link.submit(now, datagram, random_unit()) {
        Ok(token) => {
            waiting.insert(token, reply);
        }
        Err(source) => {
            let _ = reply.send(Reply::Done(Err(UpstreamError::Link { peer, source })));
        }
    }
}

/// The task of one origin: feeds the socket, the requests and the clock into the link and
/// carries out its events.
async fn drive(
    peer: SocketAddr,
    socket: UdpSocket,
    mut link: OriginLink,
    mut rx: mpsc::Receiver<Submit>,
    links: Links,
    me: mpsc::WeakSender<Submit>,
    activity: Option<Arc<Activity>>,
) {
    let mut waiting: FastMap<Token, oneshot::Sender<Reply>> = FastMap::default();
    let mut batch = RecvBatch::new(LINK_RECV_BATCH);
    let mut outgoing: Vec<Vec<u8>> = Vec::with_capacity(SEND_BATCH);
    let fd = socket.as_raw_fd();
    let mut idle_since = Instant::now();
    // One timer for the link, armed lazily (re-arming a timer per datagram was a timer
    // wheel insertion and removal each time): `armed` is never later than the link's
    // next deadline. Every deadline the link sets is at least `lead` after the moment it
    // is set, so after each event it suffices to pull `armed` in to now + lead when it is
    // further away; when it fires, it is set to the link's true next deadline.
    let params = link.params();
    let lead = params.ack_timeout.min(params.separate_response_timeout);
    let mut armed = idle_since + IDLE_CLOSE;
    let sleep = tokio::time::sleep_until(armed);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(first) = cmd else { break };
                let now = Instant::now().into_std();
                submit(&mut link, &mut waiting, peer, now, first);
                // and the requests queued behind it: their datagrams leave in one sendmmsg
                for _ in 1..SEND_BATCH {
                    let Ok(next) = rx.try_recv() else { break };
                    submit(&mut link, &mut waiting, peer, now, next);
                }
            }
            r = socket.async_io(Interest::READABLE, || batch.recv(fd)) => match r {
                Ok(n) => {
                    if let Some(a) = &activity {
                        a.touch();
                    }
                    let now = Instant::now().into_std();
                    for i in 0..n {
                        link.handle_datagram(now, batch.get(i).0);
                    }
                }
                // ICMP port unreachable (ECONNREFUSED on a connected socket) and the like:
                // treat as loss, retransmission goes on.
                Err(e) => tracing::debug!("recv from {peer}: {e}"),
            },
            _ = &mut sleep => {
                let now = Instant::now().into_std();
                // requesters that gave up (e.g. the gateway's upstream timeout)
                let gone: Vec<Token> = waiting
                    .iter()
                    .filter(|(_, tx)| tx.is_closed())
                    .map(|(t, _)| *t)
                    .collect();
                for t in gone {
                    waiting.remove(&t);
                    link.cancel(now, &t);
                }
                link.handle_timeout(now);
                if link.is_empty() && Instant::now() >= idle_since + IDLE_CLOSE {
                    break;
                }
                armed = link
                    .poll_timeout()
                    .map(Instant::from_std)
                    .unwrap_or(idle_since + IDLE_CLOSE);
                sleep.as_mut().reset(armed);
            }
        }
        while let Some(ev) = link.poll_event() {
            match ev {
                Event::Transmit(d) => outgoing.push(d),
                Event::Response { token, datagram } => {
                    if let Some(tx) = waiting.remove(&token) {
                        let _ = tx.send(Reply::Done(Ok(datagram)));
                    }
                }
                Event::Failed { token, error } => {
                    if let Some(tx) = waiting.remove(&token) {
                        let _ = tx.send(Reply::Done(Err(UpstreamError::Link {
                            peer,
                            source: error,
                        })));
                    }
                }
            }
        }
        // In the order the link made them (the origin's replay window sees sequence
        // numbers in order), in batches.
        let mut sent = 0;
        while sent < outgoing.len() {
            let rest = &outgoing[sent..];
            match socket
                .async_io(Interest::WRITABLE, || send_batch(fd, rest))
                .await
            {
                Ok(n) => sent += n.max(1),
                Err(e) => {
                    // e.g. ICMP port unreachable on the connected socket: like loss,
                    // retransmission goes on
                    tracing::debug!("send to {peer}: {e}");
                    sent += 1;
                }
            }
        }
        outgoing.clear();
        if !link.is_empty() {
            let now = Instant::now();
            idle_since = now;
            if armed > now + lead {
                armed = now + lead;
                sleep.as_mut().reset(armed);
            }
        }
    }
    // Closing: no new requests reach this task; those already sent are told to retry.
    {
        let mut l = lock(&links);
        let mine = me.upgrade();
        if l.get(&peer)
            .is_some_and(|tx| mine.as_ref().is_some_and(|m| tx.same_channel(m)))
        {
            l.remove(&peer);
        }
    }
    rx.close();
    while let Ok(Submit { datagram, reply }) = rx.try_recv() {
        let _ = reply.send(Reply::Closed(datagram));
    }
}
