//! Issue 4 against real peers on loopback: the gateway as the OSCORE server in front of
//! plain devices (aiocoap OSCORE client → gateway → plain aiocoap-fileserver or the test's
//! own counting device), replay protection and App. B.1.2 recovery after SIGKILL, route
//! access control (`require_oscore`, `allow`), and pass-through of OSCORE the gateway holds
//! no key for (to an aiocoap OSCORE origin).

mod common;

use std::collections::HashSet;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use oscore_gateway::credentials::load_context_params;
use oscore_gateway::oscore::{
    protect_request, unprotect_response, ReplayWindow, RequestBinding, SecurityContext,
    SenderSequenceNumber,
};

// ------------------------------------------------------------------ the gateway process

/// `oscore-gateway run --config CONFIG --coap-bind 127.0.0.1:PORT`; SIGTERM on drop.
struct Gateway {
    child: Option<ChildGuard>,
    port: u16,
    config: PathBuf,
    dir: PathBuf,
}

impl Gateway {
    fn start(dir: &Path, port: u16, config: &str) -> Gateway {
        let path = write_gateway_config(dir, port, config);
        let mut g = Gateway {
            child: None,
            port,
            config: path,
            dir: dir.to_path_buf(),
        };
        g.launch();
        g
    }

    fn launch(&mut self) {
        let child = spawn_gateway_with_config(&self.dir, &self.config, self.port);
        self.child = Some(child);
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        gateway_log(&self.child)
    }

    /// SIGKILL (no clean shutdown: the replay window stays "unknown" on disk).
    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill9();
        let _ = child.wait_timeout(Duration::from_secs(10));
    }

    /// SIGTERM; its output after it exited (bounded).
    fn stop(mut self) -> Output {
        let child = self.child.take().unwrap();
        send_signal(child.pid(), libc::SIGTERM);
        child.wait_timeout(Duration::from_secs(20))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            send_signal(child.pid(), libc::SIGTERM);
            let out = child.wait_timeout(Duration::from_secs(10));
            if thread::panicking() {
                eprintln!("[gateway] {}", output_text(&out));
            }
        }
    }
}

fn config(creds: &Path, extra: &str) -> String {
    format!(
        "credentials = {:?}\n[policy]\nupstream_timeout_secs = 5\n{extra}",
        creds
    )
}

// ------------------------------------------------------------------ a plain counting device

/// A plain CoAP server on 127.0.0.1 that answers every request 2.05 "n=COUNT PATH" and
/// counts distinct requests (by source and Message ID).
struct CountingDevice {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl CountingDevice {
    fn start() -> CountingDevice {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let handle = thread::spawn(move || {
            let mut ids = HashSet::new();
            let count = AtomicUsize::new(0);
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(m) = MessageView::parse(&buf[..n]) else {
                    continue;
                };
                if !m.code.is_request() {
                    continue;
                }
                let path: Vec<String> = m
                    .options_of(number::URI_PATH)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                let path = path.join("/");
                if ids.insert((peer, m.message_id)) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let opts: Vec<u16> = m.options().map(|o| o.number).collect();
                    seen2
                        .lock()
                        .unwrap()
                        .push(format!("{} /{path} options {opts:?}", m.code));
                }
                let (mtype, mid) = if m.mtype == MessageType::Confirmable {
                    (MessageType::Acknowledgement, m.message_id)
                } else {
                    (MessageType::NonConfirmable, m.message_id.wrapping_add(1))
                };
                let mut out = Vec::new();
                let b = MessageBuilder::new(&mut out, mtype, Code::CONTENT, mid, m.token).unwrap();
                b.payload(format!("n={} /{path}", count.load(Ordering::Relaxed)).as_bytes());
                let _ = sock.send_to(&out, peer);
            }
        });
        CountingDevice {
            port,
            seen,
            stop,
            handle: Some(handle),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for CountingDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ------------------------------------------------------------------ clients

/// aiocoap_oscore_get.py with `args`, in `dir` (INTEROP_DIR), bounded.
fn oscore_get(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(interop().script("aiocoap_oscore_get.py"));
    cmd.current_dir(dir).env("INTEROP_DIR", dir).args(args);
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A client-side context of make_contexts.py, derived by us (to hand-build requests).
fn client_context(ctx: &Path, name: &str) -> SecurityContext {
    let params = load_context_params(&client_ctx(ctx, name)).unwrap();
    SecurityContext::derive(&params, ReplayWindow::new_empty(32)).unwrap()
}

/// A CON GET for coap://localhost/PATH protected with `ctx` and sequence number `ssn`.
fn protected_get(
    ctx: &SecurityContext,
    ssn: u64,
    mid: u16,
    path: &str,
) -> (Vec<u8>, RequestBinding) {
    let mut plain = Vec::new();
    let mut b = MessageBuilder::new(
        &mut plain,
        MessageType::Confirmable,
        Code::GET,
        mid,
        &[0xab, 0xcd],
    )
    .unwrap();
    b.option(number::URI_HOST, b"localhost").unwrap();
    b.option(number::URI_PATH, path.as_bytes()).unwrap();
    b.finish();
    let mut out = Vec::new();
    let binding = protect_request(
        ctx,
        SenderSequenceNumber(ssn),
        &MessageView::parse(&plain).unwrap(),
        &mut out,
    )
    .unwrap();
    (out, binding)
}

fn exchange(sock: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.send_to(datagram, to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from the gateway: {e}"));
    buf[..n].to_vec()
}

fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

// ------------------------------------------------------------------ tests

#[test]
fn aiocoap_oscore_client_reads_and_writes_10k_through_gateway_to_plain_fileserver() {
    let dir = TestDir::new("in-big");
    let gw_port = free_udp_port();
    let device_port = free_udp_port();
    let ctx = make_contexts(dir.path(), gw_port, &[("client1", "01")]);
    let data = dir.join("data");
    // the device: a plain aiocoap-fileserver (`-c -`), writable
    let _device = AiocoapServer::start(dir.path(), device_port, &data, None, true);
    let gw = Gateway::start(
        dir.path(),
        gw_port,
        &config(
            &ctx.join("server.json"),
            &format!(
                "[[route]]\ntarget = \"coap://127.0.0.1:{device_port}\"\nrequire_oscore = true\n"
            ),
        ),
    );
    let creds = client_creds(&ctx, "client1");
    let got = dir.join("got10k.txt");
    let big = data.join("big10k.txt");
    let url = format!("coap://localhost:{gw_port}/big10k.txt");
    let script = interop().script("aiocoap_oscore_get.py");
    // wire_check: exit 4 if any request without OSCORE reached the gateway's port
    let out = run_wire_check(
        dir.path(),
        &[gw_port, device_port],
        Some(gw_port),
        None,
        &[
            s(&script),
            &url,
            "--credentials",
            s(&creds),
            "--expect-file",
            s(&big),
            "-o",
            s(&got),
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("GET via wire_check", &out),
        gw.log()
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("no plain CoAP request to port {gw_port}")),
        "{text}"
    );
    assert_same_bytes(
        "big10k.txt through the gateway",
        &fs::read(&got).unwrap(),
        &fs::read(&big).unwrap(),
        &text,
    );

    let put_url = format!("coap://localhost:{gw_port}/put10k.txt");
    let out = run_wire_check(
        dir.path(),
        &[gw_port, device_port],
        Some(gw_port),
        None,
        &[
            s(&script),
            &put_url,
            "-m",
            "PUT",
            "--payload-file",
            s(&big),
            "--credentials",
            s(&creds),
            "--expect",
            "2.04",
            "-o",
            "/dev/null",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("PUT via wire_check", &out),
        gw.log()
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("no plain CoAP request to port {gw_port}")),
        "{text}"
    );
    assert_same_bytes(
        "put10k.txt written through the gateway",
        &fs::read(data.join("put10k.txt")).unwrap(),
        &fs::read(&big).unwrap(),
        &text,
    );
    assert!(
        gw.log().contains(":client1: inbound"),
        "decision not logged with the label:\n{}",
        gw.log()
    );

    // Clean shutdown closes the server-side context: exact window written, lock gone.
    let out = gw.stop();
    assert!(out.status.success(), "{}", output_text(&out));
    let server_dir = server_ctx(&ctx, "client1");
    let seq = read_sequence(&server_dir).expect("sequence.json written at shutdown");
    assert!(
        matches!(seq.received, Received::Window { .. }),
        "replay window not written at shutdown: {seq:?}"
    );
    assert!(!server_dir.join("lock").exists(), "lock left behind");
}

#[test]
fn replay_is_refused_and_restart_recovers_through_echo() {
    let dir = TestDir::new("in-replay");
    let gw_port = free_udp_port();
    let ctx = make_contexts(dir.path(), gw_port, &[("client1", "01")]);
    let device = CountingDevice::start();
    let mut gw = Gateway::start(
        dir.path(),
        gw_port,
        &config(
            &ctx.join("server.json"),
            &format!("[[route]]\ntarget = \"coap://127.0.0.1:{}\"\n", device.port),
        ),
    );
    let creds = client_creds(&ctx, "client1");
    let url = format!("coap://localhost:{gw_port}/hello");

    // 1. the aiocoap client (sequence numbers from 0)
    let out = oscore_get(
        dir.path(),
        &[&url, "--credentials", s(&creds), "--expect", "2.05"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("first GET", &out),
        gw.log()
    );
    assert_eq!(device.requests().len(), 1, "{:?}", device.requests());

    // 2. our own protected request (sequence number 1000), then the same datagram again
    let c1 = client_context(&ctx, "client1");
    let (datagram, binding) = protected_get(&c1, 1000, 0x1234, "hello");
    let r = exchange(&client(), gw.addr(), &datagram);
    let view = MessageView::parse(&r).unwrap();
    let mut inner = Vec::new();
    unprotect_response(&c1, &binding, &view, &mut inner).expect("response verifies");
    let inner = MessageView::parse(&inner).unwrap();
    assert_eq!(inner.code, Code::CONTENT);
    assert_eq!(inner.payload, b"n=2 /hello");
    assert_eq!(device.requests().len(), 2);

    // the captured datagram re-sent (from another endpoint, so it is not a message-layer
    // retransmission): 4.01 Replay detected, Max-Age 0, unprotected; device untouched
    let r = exchange(&client(), gw.addr(), &datagram);
    let replay = MessageView::parse(&r).unwrap();
    assert_eq!(replay.code, Code::UNAUTHORIZED, "{replay:?}");
    assert_eq!(replay.payload, b"Replay detected");
    assert_eq!(replay.option(number::MAX_AGE), Some(&[][..]));
    assert!(!replay.has_option(number::OSCORE));
    // and with a new Message ID from the same endpoint
    let mut again = datagram.clone();
    again[2..4].copy_from_slice(&0x4321u16.to_be_bytes());
    let r = exchange(&client(), gw.addr(), &again);
    assert_eq!(MessageView::parse(&r).unwrap().code, Code::UNAUTHORIZED);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(device.requests().len(), 2, "{:?}", device.requests());

    // 3. SIGKILL: the window on disk is "unknown"; after the restart the aiocoap client's
    // next request is challenged with Echo, its retry goes through, the device sees it once
    gw.kill9();
    let server_dir = server_ctx(&ctx, "client1");
    let seq = read_sequence(&server_dir).unwrap();
    assert_eq!(seq.received, Received::Unknown, "{seq:?}");
    gw.launch();
    let out = oscore_get(
        dir.path(),
        &[&url, "--credentials", s(&creds), "--expect", "2.05"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("GET after restart", &out),
        gw.log()
    );
    assert_eq!(
        device.requests().len(),
        3,
        "the device must see the recovered request exactly once: {:?}",
        device.requests()
    );
    let log = gw.log();
    assert!(log.contains("protected 4.01 with Echo"), "{log}");
    assert!(log.contains("freshness proven by Echo"), "{log}");
    // no Echo (nor OSCORE) reached the plain device
    for r in device.requests() {
        let opts: Vec<u16> = r
            .rsplit("options [")
            .next()
            .unwrap()
            .trim_end_matches(']')
            .split(", ")
            .filter_map(|n| n.parse().ok())
            .collect();
        assert!(
            !opts.contains(&number::ECHO) && !opts.contains(&number::OSCORE),
            "{r}"
        );
    }
}

#[test]
fn require_oscore_and_allow_per_label() {
    let dir = TestDir::new("in-acl");
    let gw_port = free_udp_port();
    let ctx = make_contexts(
        dir.path(),
        gw_port,
        &[("client1", "01"), ("client2", "02"), ("client3", "03")],
    );
    // the gateway holds :client1 and :client2 only
    let creds = dir.join("gw-server.json");
    fs::write(
        &creds,
        format!(
            "{{\":client1\": {{\"oscore\": {{\"basedir\": {:?}}}}}, \":client2\": {{\"oscore\": {{\"basedir\": {:?}}}}}}}",
            server_ctx(&ctx, "client1"),
            server_ctx(&ctx, "client2")
        ),
    )
    .unwrap();
    let device = CountingDevice::start();
    let gw = Gateway::start(
        dir.path(),
        gw_port,
        &config(
            &creds,
            &format!(
                "[[route]]\nmatch_path = \"/secret\"\ntarget = \"coap://127.0.0.1:{}\"\nrequire_oscore = true\nallow = [\":client1\"]\n",
                device.port
            ),
        ),
    );

    // plain → 4.01 with a diagnostic
    let mut plain = Vec::new();
    let mut b =
        MessageBuilder::new(&mut plain, MessageType::Confirmable, Code::GET, 7, &[1]).unwrap();
    b.option(number::URI_PATH, b"secret").unwrap();
    b.finish();
    let r = exchange(&client(), gw.addr(), &plain);
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(r.code, Code::UNAUTHORIZED);
    assert!(
        String::from_utf8_lossy(r.payload).contains("OSCORE required"),
        "{r:?}"
    );

    // :client2 is held but not allowed → protected 4.03
    let url = format!("coap://localhost:{gw_port}/secret/x");
    let out = oscore_get(
        dir.path(),
        &[
            &url,
            "--credentials",
            s(&client_creds(&ctx, "client2")),
            "--expect",
            "4.03",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("client2", &out),
        gw.log()
    );
    // :client1 → 2.05
    let out = oscore_get(
        dir.path(),
        &[
            &url,
            "--credentials",
            s(&client_creds(&ctx, "client1")),
            "--expect",
            "2.05",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("client1", &out),
        gw.log()
    );
    assert_eq!(device.requests().len(), 1, "{:?}", device.requests());
    assert!(
        gw.log().contains(":client2: not in route[0].allow"),
        "{}",
        gw.log()
    );

    // a kid we hold no context for, nothing to forward to → unprotected 4.01
    let c3 = client_context(&ctx, "client3");
    let (datagram, _) = protected_get(&c3, 0, 9, "secret");
    let r = exchange(&client(), gw.addr(), &datagram);
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(r.code, Code::UNAUTHORIZED);
    assert_eq!(r.payload, b"Security context not found");
    assert!(!r.has_option(number::OSCORE));
    assert_eq!(device.requests().len(), 1);
}

#[test]
fn foreign_oscore_passes_through_untouched_to_aiocoap_origin() {
    let dir = TestDir::new("in-pass");
    let gw_port = free_udp_port();
    let origin_port = free_udp_port();
    // end-to-end pair client2 <-> origin; the gateway holds only its own :client1
    let e2e = make_contexts_in(
        &dir.join("ctx-e2e"),
        "localhost",
        origin_port,
        &[("client2", "02")],
    );
    let own = make_contexts_in(
        &dir.join("ctx-gw"),
        "localhost",
        gw_port,
        &[("client1", "01")],
    );
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&e2e.join("server.json")),
        false,
    );
    let gw = Gateway::start(dir.path(), gw_port, &config(&own.join("server.json"), ""));
    let pcap = dir.join("pass.pcap");
    let script = interop().script("aiocoap_oscore_get.py");
    let proxy = format!("coap://127.0.0.1:{gw_port}");
    let url = format!("coap://localhost:{origin_port}/hello.txt");
    let hello = data.join("hello.txt");
    let out = run_wire_check(
        dir.path(),
        &[gw_port, origin_port],
        Some(origin_port),
        Some(&pcap),
        &[
            s(&script),
            &url,
            "--proxy",
            &proxy,
            "--credentials",
            s(&client_creds(&e2e, "client2")),
            "--expect-file",
            s(&hello),
            "-o",
            "/dev/null",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("pass-through", &out),
        gw.log()
    );
    let to_gw = oscore_requests_to(&capture_messages(&pcap, gw_port), gw_port, "02");
    let to_origin = oscore_requests_to(&capture_messages(&pcap, origin_port), origin_port, "02");
    let pivs = |m: &[WireMessage]| m.iter().map(|m| m.piv).collect::<Vec<_>>();
    assert!(
        !to_gw.is_empty(),
        "no OSCORE request with kid 02 to the gateway"
    );
    assert_eq!(
        pivs(&to_gw),
        pivs(&to_origin),
        "kid 02 requests: gateway leg {to_gw:?}\norigin leg {to_origin:?}"
    );
    assert!(gw.log().contains("pass-through"), "{}", gw.log());
}
