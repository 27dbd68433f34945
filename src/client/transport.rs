//! The client side of the CoAP message layer over UDP (RFC 7252 §4): one confirmable
//! exchange at a time, retransmitted with exponential back-off, piggybacked or separate
//! responses, matched by Message ID and token.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::time::{timeout_at, Instant};

use crate::coap::{Code, MessageBuilder, MessageType, MessageView};

/// RFC 7252 §4.8 transmission parameters.
#[derive(Debug, Clone, Copy)]
pub struct TransmissionParams {
    pub ack_timeout: Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    /// How long to wait for a separate response after an empty ACK.
    pub separate_response_timeout: Duration,
}

/// RFC 7252 §4.8 defaults: ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4.
impl Default for TransmissionParams {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            separate_response_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("UDP socket error talking to {peer}: {source}")]
    Io {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("no response from {peer} after {attempts} transmissions")]
    Timeout { peer: SocketAddr, attempts: u32 },
    #[error("{peer} rejected the message with a Reset")]
    Reset { peer: SocketAddr },
}

/// A UDP socket connected to one peer, with Message IDs and tokens of its own.
pub struct UdpClient {
    socket: UdpSocket,
    peer: SocketAddr,
    next_mid: u16,
    params: TransmissionParams,
    buf: Vec<u8>,
}

/// Resolves `host:port`, preferring IPv4 for names (a name such as `localhost` that has
/// both is most often served on 127.0.0.1); IP literals are used as written.
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr, TransportError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| TransportError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| TransportError::NoAddress {
            host: host.to_string(),
        })
}

/// Bytes fetched from the OS's CSPRNG at once by `random_bytes` (per thread).
const RANDOM_POOL: usize = 512;

thread_local! {
    /// Unused output of the OS's CSPRNG and how much of it is already handed out.
    static RANDOM: std::cell::RefCell<([u8; RANDOM_POOL], usize)> =
        const { std::cell::RefCell::new(([0; RANDOM_POOL], RANDOM_POOL)) };
}

/// Random bytes for tokens, Message IDs, Echo values and back-off jitter (RFC 7252 §5.3.1,
/// §4.4; RFC 9175 §2.3). The bytes are the OS's CSPRNG output (getrandom), fetched
/// `RANDOM_POOL` bytes at a time per thread: one system call per ~64 tokens instead of one
/// per token (it was ~2 % of the gateway's CPU time at load). Handed-out bytes are wiped
/// from the pool. Not for key material.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if N > RANDOM_POOL {
        fill_from_os(&mut b);
        return b;
    }
    let pooled = RANDOM.try_with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            return false;
        };
        let (pool, used) = &mut *guard;
        if RANDOM_POOL - *used < N {
            fill_from_os(pool);
            *used = 0;
        }
        b.copy_from_slice(&pool[*used..*used + N]);
        pool[*used..*used + N].fill(0);
        *used += N;
        true
    });
    if pooled != Ok(true) {
        fill_from_os(&mut b); // thread-local storage being torn down
    }
    b
}

fn fill_from_os(b: &mut [u8]) {
    // getrandom only fails where the OS has no entropy source at all; fall back to time.
    if getrandom::fill(b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % t.len()];
        }
    }
}

impl UdpClient {
    pub async fn connect(
        peer: SocketAddr,
        params: TransmissionParams,
    ) -> Result<Self, TransportError> {
        let io = |source| TransportError::Io { peer, source };
        let bind: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(peer).await.map_err(io)?;
        Ok(Self {
            socket,
            peer,
            next_mid: u16::from_be_bytes(random_bytes::<2>()),
            params,
            buf: vec![0; 65536],
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A fresh Message ID for the next message.
    pub fn next_message_id(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Sends `datagram` (a CON request whose Message ID and token are `mid` and `token`)
    /// and returns the response datagram, retransmitting as RFC 7252 §4.2 says.
    pub async fn exchange(
        &mut self,
        datagram: &[u8],
        mid: u16,
        token: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let peer = self.peer;
        let io = |source| TransportError::Io { peer, source };
        let random = f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX);
        let mut wait = self
            .params
            .ack_timeout
            .mul_f64(1.0 + random * (self.params.ack_random_factor - 1.0));
        let mut attempts = 0;
        let mut acked = false;
        let mut deadline = Instant::now();
        loop {
            if !acked {
                if attempts > self.params.max_retransmit {
                    return Err(TransportError::Timeout { peer, attempts });
                }
                self.socket.send(datagram).await.map_err(io)?;
                attempts += 1;
                deadline = Instant::now() + wait;
                wait *= 2;
            }
            let received = match timeout_at(deadline, self.socket.recv(&mut self.buf)).await {
                Err(_elapsed) if acked => return Err(TransportError::Timeout { peer, attempts }),
                Err(_elapsed) => continue,
                // ICMP port unreachable shows up as ECONNREFUSED on a connected socket:
                // treat it like loss and keep retransmitting (the peer may be restarting).
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if !acked {
                        tokio::time::sleep_until(deadline).await;
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(io(e)),
                Ok(Ok(n)) => n,
            };
            let Ok(msg) = MessageView::parse(&self.buf[..received]) else {
                continue; // RFC 7252 §4.2: silently ignore malformed messages
            };
            match msg.mtype {
                MessageType::Reset if msg.message_id == mid => {
                    return Err(TransportError::Reset { peer })
                }
                MessageType::Acknowledgement if msg.message_id == mid => {
                    if msg.code.is_empty() {
                        // separate response follows (§5.2.2)
                        acked = true;
                        deadline = Instant::now() + self.params.separate_response_timeout;
                        continue;
                    }
                    if msg.token == token {
                        return Ok(self.buf[..received].to_vec());
                    }
                }
                MessageType::Confirmable | MessageType::NonConfirmable
                    if msg.token == token && msg.code.is_response() =>
                {
                    if msg.mtype == MessageType::Confirmable {
                        self.send_empty(MessageType::Acknowledgement, msg.message_id)
                            .await?;
                    }
                    return Ok(self.buf[..received].to_vec());
                }
                MessageType::Confirmable => {
                    // a CON we cannot match (e.g. a late notification): reject it (§4.2)
                    self.send_empty(MessageType::Reset, msg.message_id).await?;
                }
                _ => {}
            }
        }
    }

    async fn send_empty(&self, mtype: MessageType, mid: u16) -> Result<(), TransportError> {
        let mut out = Vec::with_capacity(4);
        // An Empty message with no token cannot fail to build.
        if let Ok(b) = MessageBuilder::new(&mut out, mtype, Code::EMPTY, mid, &[]) {
            b.finish();
        }
        self.socket
            .send(&out)
            .await
            .map_err(|source| TransportError::Io {
                peer: self.peer,
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod random_tests {
    use super::*;

    #[test]
    fn pooled_random_bytes_do_not_repeat_across_refills() {
        // 1000 tokens of 8 bytes span ~16 refills of the pool; any reuse of pool bytes
        // (e.g. an off-by-one in the refill) would show up as a duplicate.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(random_bytes::<8>()));
        }
        // odd sizes that do not divide the pool, and one larger than the pool
        let a = random_bytes::<7>();
        let b = random_bytes::<7>();
        assert_ne!(a, b);
        let big = random_bytes::<{ RANDOM_POOL + 1 }>();
        assert!(big.iter().any(|&x| x != 0));
    }

    #[test]
    fn random_bytes_work_on_many_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..100).map(|_| random_bytes::<8>()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for h in handles {
            for t in h.join().unwrap() {
                assert!(all.insert(t));
            }
        }
    }
}
