//! `oscore-gateway run` against real peers on loopback: aiocoap-client (plain, through the
//! gateway as a forward proxy) and aiocoap-fileserver holding the OSCORE server context;
//! plus the gateway's own answers (fail closed, timeouts, Hop-Limit, deduplication) seen
//! by a hand-made CoAP client and a fake origin.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};

/// A plain CoAP request from a hand-made client: CON, token [0xc1, 0x1e].
fn request(mid: u16, opts: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::Confirmable,
        Code::GET,
        mid,
        &[0xc1, 0x1e],
    )
    .unwrap();
    let mut sorted = opts.to_vec();
    sorted.sort_by_key(|o| o.0);
    for (n, v) in sorted {
        b.option(n, v).unwrap();
    }
    b.finish();
    out
}

/// Forward-proxy options for coap://localhost:PORT/PATH, as aiocoap-client --proxy sends.
fn via_proxy(port: u16, path: &'static str) -> Vec<(u16, Vec<u8>)> {
    vec![
        (number::URI_HOST, b"localhost".to_vec()),
        (number::URI_PORT, port.to_be_bytes().to_vec()),
        (number::URI_PATH, path.as_bytes().to_vec()),
        (number::PROXY_SCHEME, b"coap".to_vec()),
    ]
}

fn as_refs(v: &[(u16, Vec<u8>)]) -> Vec<(u16, &[u8])> {
    v.iter().map(|(n, b)| (*n, b.as_slice())).collect()
}

/// Sends `datagram` to `to` and waits (bounded) for one answer.
fn exchange(sock: &UdpSocket, to: SocketAddr, datagram: &[u8], wait: Duration) -> Vec<u8> {
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send_to(datagram, to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from the gateway within {wait:?}: {e}"));
    buf[..n].to_vec()
}

fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn config(creds: Option<&Path>, extra: &str) -> String {
    let creds = creds.map_or(String::new(), |c| format!("credentials = {:?}\n", c));
    format!("{creds}[policy]\nupstream_timeout_secs = 3\n{extra}")
}

#[test]
fn aiocoap_client_fetches_big_file_through_gateway_under_oscore() {
    let dir = TestDir::new("gw-big");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        false,
    );
    let mut gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let got = dir.join("got10k.txt");
    let fetch = format!(
        "{} --proxy coap://127.0.0.1:{} coap://localhost:{origin_port}/big10k.txt > {}",
        interop().base.join("venv/bin/aiocoap-client").display(),
        gw.port,
        got.display()
    );
    // wire_check.sh: exit 4 if any request without OSCORE reached the origin's port
    let out = run_wire_check(
        dir.path(),
        &[origin_port, gw.port],
        Some(origin_port),
        None,
        &["bash", "-c", &fetch],
    );
    assert!(out.status.success(), "{}", show("wire_check", &out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("no plain CoAP request to port {origin_port}")),
        "{text}"
    );
    assert_same_bytes(
        "big10k.txt through the gateway",
        &fs::read(&got).unwrap(),
        &fs::read(data.join("big10k.txt")).unwrap(),
        &text,
    );

    // Graceful shutdown: exact next-to-send (11 blocks = 11 requests from 0) and no lock.
    let out = gw.stop();
    assert!(out.status.success(), "{}", output_text(&out));
    let client_dir = client_ctx(&ctx, "gw");
    let seq = read_sequence(&client_dir).expect("sequence.json written at shutdown");
    assert_eq!(seq.next_to_send, 11, "{seq:?}");
    assert!(!client_dir.join("lock").exists(), "lock left behind");
}

#[test]
fn no_credential_match_is_refused_and_nothing_reaches_the_origin() {
    let dir = TestDir::new("gw-nomatch");
    let ctx = make_contexts(dir.path(), free_udp_port(), &[("gw", "04")]);
    let unknown_origin = free_udp_port();
    let silence = UdpSilence::bind(unknown_origin);
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let c = client();
    let r = exchange(
        &c,
        gw.addr(),
        &request(1, &as_refs(&via_proxy(unknown_origin, "x"))),
        Duration::from_secs(10),
    );
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(r.code, Code::PROXYING_NOT_SUPPORTED);
    assert_eq!(r.mtype, MessageType::Acknowledgement);
    assert_eq!(r.message_id, 1);
    assert_eq!(r.token, &[0xc1, 0x1e]);
    let diag = String::from_utf8_lossy(r.payload);
    assert!(diag.contains("no credential matches"), "{diag}");
    assert!(
        diag.contains(&format!("coap://localhost:{unknown_origin}/x")),
        "{diag}"
    );
    let seen = silence.received(Duration::from_millis(300));
    assert!(seen.is_empty(), "the origin port received {seen:?}");
}

#[test]
fn locked_context_gives_5_03_and_nothing_reaches_the_origin() {
    let dir = TestDir::new("gw-locked");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let silence = UdpSilence::bind(origin_port);
    // Another process (this test) holds the context's flock, as a running aiocoap would.
    let lock = oscore_gateway::credentials::ContextLock::acquire(&client_ctx(&ctx, "gw")).unwrap();
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let c = client();
    let r = exchange(
        &c,
        gw.addr(),
        &request(2, &as_refs(&via_proxy(origin_port, "hello.txt"))),
        Duration::from_secs(10),
    );
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(r.code, Code::SERVICE_UNAVAILABLE);
    let diag = String::from_utf8_lossy(r.payload);
    assert!(diag.contains("lock"), "{diag}");
    let seen = silence.received(Duration::from_millis(300));
    assert!(seen.is_empty(), "the origin port received {seen:?}");
    drop(lock);
}

#[test]
fn origin_down_gives_5_04_within_the_timeout_and_only_oscore_was_sent() {
    let dir = TestDir::new("gw-down");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    // A socket that never answers: the origin is "down" but we see what reached it.
    let silence = UdpSilence::bind(origin_port);
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let c = client();
    let started = Instant::now();
    let ack = exchange(
        &c,
        gw.addr(),
        &request(3, &as_refs(&via_proxy(origin_port, "hello.txt"))),
        Duration::from_secs(15),
    );
    // slow: an empty ACK first (RFC 7252 §5.2.2), then the 5.04 as a separate CON
    let ack = MessageView::parse(&ack).unwrap();
    assert_eq!(
        (ack.mtype, ack.code),
        (MessageType::Acknowledgement, Code::EMPTY)
    );
    let mut buf = [0u8; 2048];
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let (n, _) = c.recv_from(&mut buf).expect("separate response");
    let took = started.elapsed();
    let r = MessageView::parse(&buf[..n]).unwrap();
    assert_eq!(r.code, Code::GATEWAY_TIMEOUT, "{r:?}");
    assert_eq!(r.mtype, MessageType::Confirmable);
    assert!(String::from_utf8_lossy(r.payload).contains("did not answer"));
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "5.04 after {took:?}, configured 3 s"
    );
    let seen = silence.received(Duration::from_millis(100));
    assert!(!seen.is_empty(), "nothing was sent to the origin");
    for line in &seen {
        let bytes = hex::decode(line.rsplit(' ').next().unwrap()).unwrap();
        let m = MessageView::parse(&bytes).unwrap();
        assert!(
            m.has_option(number::OSCORE),
            "plain request to origin: {line}"
        );
        assert_eq!(m.code, Code::POST);
        assert!(
            !m.has_option(number::URI_PATH),
            "Uri-Path leaked outer: {line}"
        );
    }
}

/// A fake plain origin that answers every request with 2.05 "pong" after `delay`, and
/// reports each request it saw.
fn fake_origin(
    delay: Duration,
) -> (
    u16,
    std::sync::mpsc::Receiver<Vec<u8>>,
    thread::JoinHandle<()>,
) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(m) = MessageView::parse(&buf[..n]) else {
                continue;
            };
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
            thread::sleep(delay);
            let mut out = Vec::new();
            let b = MessageBuilder::new(
                &mut out,
                MessageType::Acknowledgement,
                Code::CONTENT,
                m.message_id,
                m.token,
            )
            .unwrap();
            b.payload(b"pong");
            let _ = sock.send_to(&out, from);
        }
    });
    (port, rx, h)
}

#[test]
fn plain_forwarding_hop_limit_and_deduplication() {
    let dir = TestDir::new("gw-plain");
    let (origin_port, seen, _origin) = fake_origin(Duration::ZERO);
    let gw = Gateway::start(
        dir.path(),
        &config(None, "plain_forwarding = true\nhop_limit = 16\n"),
    );
    let c = client();
    let req = request(
        0x0707,
        &as_refs(&[
            (
                number::PROXY_URI,
                format!("coap://127.0.0.1:{origin_port}/ping?q=1").into_bytes(),
            ),
            (number::HOP_LIMIT, vec![5]),
        ]),
    );
    let first = exchange(&c, gw.addr(), &req, Duration::from_secs(10));
    let r = MessageView::parse(&first).unwrap();
    assert_eq!(r.code, Code::CONTENT);
    assert_eq!(r.payload, b"pong");
    assert_eq!(
        (r.mtype, r.message_id),
        (MessageType::Acknowledgement, 0x0707)
    );
    assert_eq!(r.token, &[0xc1, 0x1e]);

    let upstream = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    let up = MessageView::parse(&upstream).unwrap();
    assert_eq!(
        up.option(number::HOP_LIMIT),
        Some(&[4u8][..]),
        "decremented"
    );
    assert_eq!(up.option(number::URI_PATH), Some(&b"ping"[..]));
    assert_eq!(up.option(number::URI_QUERY), Some(&b"q=1"[..]));
    assert!(!up.has_option(number::PROXY_URI));
    assert!(!up.has_option(number::OSCORE));
    assert_ne!(up.token, &[0xc1, 0x1e], "fresh token upstream");

    // The client's retransmission (same MID): the same answer, not a second upstream request.
    let again = exchange(&c, gw.addr(), &req, Duration::from_secs(10));
    assert_eq!(again, first);
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "a retransmitted CON was forwarded again"
    );

    // No Hop-Limit: the gateway adds 16. Hop-Limit 1: 5.08, nothing forwarded.
    let target = (
        number::PROXY_URI,
        format!("coap://127.0.0.1:{origin_port}/ping").into_bytes(),
    );
    exchange(
        &c,
        gw.addr(),
        &request(0x0708, &as_refs(std::slice::from_ref(&target))),
        Duration::from_secs(10),
    );
    let up = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        MessageView::parse(&up).unwrap().option(number::HOP_LIMIT),
        Some(&[16u8][..])
    );
    let r = exchange(
        &c,
        gw.addr(),
        &request(0x0709, &as_refs(&[target, (number::HOP_LIMIT, vec![1])])),
        Duration::from_secs(10),
    );
    assert_eq!(
        MessageView::parse(&r).unwrap().code,
        Code::HOP_LIMIT_REACHED
    );
    assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn shipped_example_config_runs_and_refuses_without_credentials() {
    let dir = TestDir::new("gw-example");
    let example = interop().repo.join("proxy.toml.example");
    let port = free_udp_port();
    let mut gw = Gateway::start_with(
        dir.path(),
        &["--config".as_ref(), example.as_os_str()],
        port,
    );
    let c = client();
    let r = exchange(
        &c,
        gw.addr(),
        &request(9, &as_refs(&via_proxy(free_udp_port(), "x"))),
        Duration::from_secs(10),
    );
    assert_eq!(
        MessageView::parse(&r).unwrap().code,
        Code::PROXYING_NOT_SUPPORTED
    );
    // CoAP ping (Empty CON) -> Reset
    let mut ping = Vec::new();
    MessageBuilder::new(&mut ping, MessageType::Confirmable, Code::EMPTY, 77, &[])
        .unwrap()
        .finish();
    let r = exchange(&c, gw.addr(), &ping, Duration::from_secs(5));
    let r = MessageView::parse(&r).unwrap();
    assert_eq!((r.mtype, r.message_id), (MessageType::Reset, 77));
    let out = gw.stop();
    assert!(out.status.success(), "{}", output_text(&out));
}

#[test]
fn slow_origin_gets_empty_ack_then_separate_response() {
    let dir = TestDir::new("gw-slow");
    let (origin_port, seen, _origin) = fake_origin(Duration::from_millis(1500));
    let gw = Gateway::start(dir.path(), &config(None, "plain_forwarding = true\n"));
    let c = client();
    let target = (
        number::PROXY_URI,
        format!("coap://127.0.0.1:{origin_port}/slow").into_bytes(),
    );
    let started = Instant::now();
    let ack = exchange(
        &c,
        gw.addr(),
        &request(0x0800, &as_refs(&[target])),
        Duration::from_secs(5),
    );
    let ack = MessageView::parse(&ack).unwrap();
    assert_eq!(
        (ack.mtype, ack.code, ack.message_id),
        (MessageType::Acknowledgement, Code::EMPTY, 0x0800)
    );
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    seen.recv_timeout(Duration::from_secs(5)).unwrap();

    // The separate response: a CON with the request's token; not acknowledged at first, so
    // the gateway retransmits it (same Message ID); then acknowledged, so it stops.
    let mut buf = [0u8; 2048];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, from) = c.recv_from(&mut buf).unwrap();
    let first = buf[..n].to_vec();
    let r = MessageView::parse(&first).unwrap();
    assert_eq!((r.mtype, r.code), (MessageType::Confirmable, Code::CONTENT));
    assert_eq!(r.token, &[0xc1, 0x1e]);
    assert_eq!(r.payload, b"pong");
    let (n, _) = c
        .recv_from(&mut buf)
        .expect("retransmission of the separate response");
    assert_eq!(&buf[..n], &first[..]);
    let mut ack = Vec::new();
    MessageBuilder::new(
        &mut ack,
        MessageType::Acknowledgement,
        Code::EMPTY,
        r.message_id,
        &[],
    )
    .unwrap()
    .finish();
    c.send_to(&ack, from).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(3500)))
        .unwrap();
    assert!(
        c.recv_from(&mut buf).is_err(),
        "separate response retransmitted after the client's ACK"
    );
}
