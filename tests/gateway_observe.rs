//! Observe across the gateway (issue 3 item 6) against a real aiocoap origin on loopback:
//! a plain client's GET with Observe: 0 becomes an OSCORE observation at the origin
//! (tests/interop/observable_server.py, which serves only OSCORE-protected requests, so
//! every notification that reaches the client went through OSCORE on the origin leg);
//! notifications arrive in order; the client's RST, its Observe: 1, and gateway shutdown
//! each make the origin stop sending.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use oscore_gateway::coap::option::decode_uint;
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};

// ------------------------------------------------------------------ harness

/// tests/interop/observable_server.py on `port`, OSCORE only.
fn start_origin(dir: &Path, port: u16, server_creds: &Path) -> ChildGuard {
    let mut cmd = Command::new(&interop().venv_python);
    cmd.current_dir(dir)
        .arg(interop().test_tool("observable_server.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg(server_creds);
    let mut child = ChildGuard::spawn(cmd);
    assert!(
        child.wait_for_stdout("READY", Duration::from_secs(30)),
        "observable_server.py did not start:\n{}",
        String::from_utf8_lossy(&child.stderr_so_far())
    );
    child
}

fn origin_out(origin: &ChildGuard) -> String {
    String::from_utf8_lossy(&origin.stdout_so_far()).into_owned()
}

fn notify_lines(origin: &ChildGuard) -> usize {
    origin_out(origin)
        .lines()
        .filter(|l| l.starts_with("NOTIFY "))
        .count()
}

fn last_observers(origin: &ChildGuard) -> Option<usize> {
    origin_out(origin)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("OBSERVERS "))
        .and_then(|n| n.trim().parse().ok())
}

/// A plain CoAP client on its own UDP socket.
struct Client {
    socket: UdpSocket,
    gw: SocketAddr,
    next_mid: u16,
}

/// A response or notification as the client saw it.
#[derive(Debug, Clone)]
struct Seen {
    mtype: MessageType,
    code: Code,
    mid: u16,
    observe: Option<u64>,
    payload: String,
}

impl Client {
    fn new(gw: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        Client {
            socket,
            gw,
            next_mid: 0x4000,
        }
    }

    /// Sends a CON GET with Observe `observe` and Proxy-Uri `uri`; returns its MID.
    fn get(&mut self, token: &[u8], observe: u64, uri: &str) -> u16 {
        self.next_mid += 1;
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::Confirmable,
            Code::GET,
            self.next_mid,
            token,
        )
        .unwrap();
        b.uint_option(number::OBSERVE, observe).unwrap();
        b.option(number::PROXY_URI, uri.as_bytes()).unwrap();
        b.finish();
        self.socket.send_to(&out, self.gw).unwrap();
        self.next_mid
    }

    fn reset(&self, mid: u16) {
        let mut out = Vec::new();
        MessageBuilder::new(&mut out, MessageType::Reset, Code::EMPTY, mid, &[])
            .unwrap()
            .finish();
        self.socket.send_to(&out, self.gw).unwrap();
    }

    /// The next response on `token` within `timeout` (CON ones are acknowledged; empty
    /// ACKs and other tokens are skipped).
    fn recv(&self, token: &[u8], timeout: Duration) -> Option<Seen> {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                return None;
            };
            let Ok(m) = MessageView::parse(&buf[..n]) else {
                continue;
            };
            if m.mtype == MessageType::Confirmable {
                let mut ack = Vec::new();
                MessageBuilder::new(
                    &mut ack,
                    MessageType::Acknowledgement,
                    Code::EMPTY,
                    m.message_id,
                    &[],
                )
                .unwrap()
                .finish();
                self.socket.send_to(&ack, self.gw).unwrap();
            }
            if m.code.is_empty() || m.token != token {
                continue;
            }
            return Some(Seen {
                mtype: m.mtype,
                code: m.code,
                mid: m.message_id,
                observe: m.option(number::OBSERVE).and_then(decode_uint),
                payload: String::from_utf8_lossy(m.payload).into_owned(),
            });
        }
    }
}

fn tick_number(s: &Seen) -> u64 {
    s.payload
        .strip_prefix("tick ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {:?}", s.payload))
}

/// Origin, gateway with the origin's OSCORE credential, and a client that registered and
/// received the first response plus 3 notifications, checked for order.
struct Setup {
    _dir: TestDir,
    origin: ChildGuard,
    gw: Gateway,
    client: Client,
    uri: String,
    token: Vec<u8>,
    seen: Vec<Seen>,
}

fn observe_through_gateway(name: &str) -> Setup {
    observe_through_gateway_with(name, false)
}

/// `observe_through_gateway`; with `origin_lost_window` the origin starts as after a crash
/// (sequence.json `"received": "unknown"`), so it answers the first request on the context
/// (the registration) with 4.01 + Echo (RFC 8613 App. B.1.2).
fn observe_through_gateway_with(name: &str, origin_lost_window: bool) -> Setup {
    let dir = TestDir::new(name);
    let origin_port = free_udp_port();
    let ctx = make_contexts_in(&dir.join("ctx"), "127.0.0.1", origin_port, &[("gw", "04")]);
    if origin_lost_window {
        std::fs::write(
            server_ctx(&ctx, "gw").join("sequence.json"),
            r#"{"next-to-send": 100, "received": "unknown"}"#,
        )
        .unwrap();
    }
    let origin = start_origin(dir.path(), origin_port, &ctx.join("server.json"));
    let config = format!(
        "credentials = {:?}\n[policy]\nupstream_timeout_secs = 20\n[observe]\nmax_relations = 4\n",
        client_creds(&ctx, "gw")
    );
    let gw = Gateway::start(dir.path(), &config);
    let mut client = Client::new(gw.addr());
    let uri = format!("coap://127.0.0.1:{origin_port}/tick");
    let token = vec![0x0b, 0x5e, 0x77, 0x01];
    client.get(&token, 0, &uri);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match client.recv(&token, Duration::from_secs(10)) {
            Some(s) => seen.push(s),
            None => panic!(
                "only {} responses through the gateway: {seen:?}\norigin:\n{}\ngateway:\n{}",
                seen.len(),
                origin_out(&origin),
                gw.log()
            ),
        }
    }
    // the first response is the ACK, every later one a notification; all 2.05 with
    // increasing Observe values (RFC 7641 §3.4) and a changing state, in order
    assert_eq!(seen[0].mtype, MessageType::Acknowledgement, "{seen:?}");
    for s in &seen {
        assert_eq!(s.code, Code::CONTENT, "{seen:?}\n{}", gw.log());
        assert!(
            s.observe.is_some(),
            "notification without Observe: {seen:?}"
        );
    }
    for w in seen.windows(2) {
        assert!(
            w[0].observe < w[1].observe,
            "Observe not increasing: {seen:?}"
        );
        assert!(
            tick_number(&w[0]) < tick_number(&w[1]),
            "state not changing in order: {seen:?}"
        );
    }
    // the origin serves only OSCORE (plain requests get 4.01 and no observation):
    // its observer is the gateway's protected registration
    assert_eq!(last_observers(&origin), Some(1), "{}", origin_out(&origin));
    Setup {
        _dir: dir,
        origin,
        gw,
        client,
        uri,
        token,
        seen,
    }
}

/// After a cancellation: the origin's observer count drops to 0 within 5 s and then no
/// more notifications are rendered (nor relayed) for 1.5 s.
fn assert_origin_stops(s: &Setup, how: &str) {
    let stopped = wait_until(Duration::from_secs(5), || {
        last_observers(&s.origin) == Some(0)
    });
    assert!(
        stopped,
        "{how}: origin still has observers:\n{}\ngateway:\n{}",
        origin_out(&s.origin),
        s.gw.log()
    );
    let before = notify_lines(&s.origin);
    // anything already in flight to the client is drained first
    while s
        .client
        .recv(&s.token, Duration::from_millis(400))
        .is_some()
    {}
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        notify_lines(&s.origin),
        before,
        "{how}: origin kept notifying:\n{}",
        origin_out(&s.origin)
    );
    assert!(
        s.client
            .recv(&s.token, Duration::from_millis(500))
            .is_none(),
        "{how}: client still receives notifications"
    );
}

// ------------------------------------------------------------------ tests

/// The client rejects a notification with RST (RFC 7641 §3.6): the gateway cancels the
/// upstream observation and the origin stops sending.
#[test]
fn observe_through_gateway_then_client_reset_cancels() {
    let s = observe_through_gateway("gwo-rst");
    let last = s.seen.last().unwrap().clone();
    // a notification after `last` may already be on its way; reject the newest we have
    s.client.reset(last.mid);
    assert_origin_stops(&s, "RST");
    assert!(
        s.gw.log().contains("observation cancelled upstream"),
        "{}",
        s.gw.log()
    );
}

/// The client deregisters with GET Observe: 1 on the same token (RFC 7641 §3.6): it gets
/// the origin's answer without Observe and the origin stops sending.
#[test]
fn observe_through_gateway_then_deregistration_cancels() {
    let mut s = observe_through_gateway("gwo-dereg");
    let (token, uri) = (s.token.clone(), s.uri.clone());
    let mid = s.client.get(&token, 1, &uri);
    let end = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let r = s
            .client
            .recv(&token, end.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|| panic!("no answer to Observe: 1\n{}", s.gw.log()));
        // notifications sent before the deregistration still carry Observe
        if r.observe.is_none() {
            break r;
        }
    };
    assert_eq!(answer.code, Code::CONTENT, "{answer:?}");
    assert!(answer.payload.starts_with("tick "), "{answer:?}");
    assert!(
        answer.mtype == MessageType::Acknowledgement && answer.mid == mid
            || answer.mtype == MessageType::Confirmable,
        "{answer:?}"
    );
    assert_origin_stops(&s, "Observe: 1");
}

/// Gateway shutdown with an observation open: it deregisters upstream before the context
/// closes, so the origin stops sending.
#[test]
fn gateway_shutdown_cancels_the_observation() {
    let mut s = observe_through_gateway("gwo-shutdown");
    let log = output_text(&s.gw.stop());
    assert!(log.contains("observation cancelled upstream"), "{log}");
    let stopped = wait_until(Duration::from_secs(5), || {
        last_observers(&s.origin) == Some(0)
    });
    assert!(
        stopped,
        "origin:\n{}\ngateway:\n{log}",
        origin_out(&s.origin)
    );
}

/// The registration is the gateway's first request to an origin that lost its replay
/// window: the origin answers 4.01 + Echo, the gateway registers again with the Echo
/// (inner, new sequence number), and the client gets the first response and the
/// notifications (`observe_through_gateway_with` checks the first response plus 3
/// notifications and that the origin's one observer is the protected registration).
#[test]
fn observe_registration_answered_with_echo_is_repeated() {
    let s = observe_through_gateway_with("gwo-echo", true);
    assert!(
        s.gw.log().contains("registering again with its Echo"),
        "{}",
        s.gw.log()
    );
    // exactly one registration held at the origin (the one with the Echo)
    assert_eq!(
        last_observers(&s.origin),
        Some(1),
        "{}",
        origin_out(&s.origin)
    );
}
