//! The bare UDP echo and the simplest UDP relay: no CoAP parsing at all, so they measure
//! what the kernel and one user-space hop cost on this machine.
//!
//! The relay gives each client address its own upstream socket (like a NAT) and one thread
//! that carries that socket's datagrams back; the main thread carries client datagrams up.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::signal;

/// Client addresses the relay serves at most (each costs a socket and a thread).
const MAX_RELAY_CLIENTS: usize = 256;
/// How often blocking loops look at the stop flag and the deadline.
const POLL: Duration = Duration::from_millis(100);

fn addr(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|e| format!("{text}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text}: no address"))
}

fn bind(text: &str) -> Result<UdpSocket, String> {
    let a = addr(text)?;
    let s = UdpSocket::bind(a).map_err(|e| format!("cannot bind {a}: {e}"))?;
    s.set_read_timeout(Some(POLL))
        .map_err(|e| format!("{a}: {e}"))?;
    Ok(s)
}

fn deadline(max_seconds: Option<f64>) -> Option<Instant> {
    max_seconds.map(|s| Instant::now() + Duration::from_secs_f64(s))
}

fn should_stop(deadline: Option<Instant>) -> bool {
    signal::stop_requested() || deadline.is_some_and(|d| Instant::now() >= d)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Sends every datagram back to its sender until SIGINT/SIGTERM or `max_seconds`.
pub fn udp_echo(bind_addr: &str, max_seconds: Option<f64>) -> Result<(), String> {
    signal::install();
    let socket = bind(bind_addr)?;
    let end = deadline(max_seconds);
    let mut buf = vec![0u8; 65536];
    while !should_stop(end) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A failed send is loss, as on any UDP path.
                let _ = socket.send_to(&buf[..n], from);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(format!("echo on {bind_addr}: {e}")),
        }
    }
    Ok(())
}

/// Relays datagrams from clients on `bind_addr` to `to` and the answers back.
pub fn udp_relay(bind_addr: &str, to: &str, max_seconds: Option<f64>) -> Result<(), String> {
    signal::install();
    let front = Arc::new(bind(bind_addr)?);
    let upstream_addr = addr(to)?;
    let end = deadline(max_seconds);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut threads = Vec::new();
    let mut buf = vec![0u8; 65536];
    let local_any = if upstream_addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    while !should_stop(end) {
        let (n, from) = match front.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(format!("relay on {bind_addr}: {e}")),
        };
        let up = match clients.get(&from) {
            Some(u) => Arc::clone(u),
            None => {
                if clients.len() >= MAX_RELAY_CLIENTS {
                    continue;
                }
                let u = UdpSocket::bind(local_any).map_err(|e| format!("upstream socket: {e}"))?;
                u.connect(upstream_addr)
                    .map_err(|e| format!("upstream {upstream_addr}: {e}"))?;
                u.set_read_timeout(Some(POLL))
                    .map_err(|e| format!("upstream socket: {e}"))?;
                let u = Arc::new(u);
                clients.insert(from, Arc::clone(&u));
                let (back, front2) = (Arc::clone(&u), Arc::clone(&front));
                threads.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !should_stop(end) {
                        match back.recv(&mut buf) {
                            Ok(n) => {
                                let _ = front2.send_to(&buf[..n], from);
                            }
                            Err(e) if is_timeout(&e) => {}
                            // ICMP unreachable from a restarting upstream: keep going.
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                }));
                u
            }
        };
        let _ = up.send(&buf[..n]);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
