//! The gateway's message layer toward origins (RFC 7252 §4) and its proxying paths, against
//! real peers on loopback: an aiocoap origin that counts executions behind a lossy shim,
//! libcoap's plain client and aiocoap-client through the gateway, a reverse route, two
//! gateways forwarding to each other, and fail-closed contexts proven with wire_check.sh.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::*;
use oscore_gateway::client::{TransmissionParams, UdpClient};
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};

// ------------------------------------------------------------------ harness

fn config(creds: Option<&Path>, extra: &str) -> String {
    let creds = creds.map_or(String::new(), |c| format!("credentials = {c:?}\n"));
    format!("{creds}[policy]\nupstream_timeout_secs = 30\n{extra}")
}

fn venv_bin(name: &str) -> String {
    interop()
        .base
        .join("venv/bin")
        .join(name)
        .display()
        .to_string()
}

/// A CON request with token `token` and the given (unsorted) options and payload.
fn request(code: Code, token: &[u8], opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, MessageType::Confirmable, code, 0, token).unwrap();
    let mut sorted = opts.to_vec();
    sorted.sort_by_key(|o| o.0);
    for (n, v) in sorted {
        b.option(n, v).unwrap();
    }
    b.payload(payload);
    out
}

/// One CON exchange with the gateway through our own client (handles an empty ACK and a
/// separate response); returns the response datagram.
fn exchange(rt: &tokio::runtime::Runtime, gw: SocketAddr, datagram: &[u8]) -> Vec<u8> {
    rt.block_on(async {
        let mut c = UdpClient::connect(gw, TransmissionParams::default())
            .await
            .unwrap();
        let mid = c.next_message_id();
        let mut d = datagram.to_vec();
        d[2..4].copy_from_slice(&mid.to_be_bytes());
        let token = MessageView::parse(&d).unwrap().token.to_vec();
        tokio::time::timeout(Duration::from_secs(90), c.exchange(&d, mid, &token))
            .await
            .expect("bounded")
            .unwrap()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------------------ the lossy shim

/// A UDP relay on loopback between the gateway and an origin that drops `percent` % of
/// the datagrams in each direction, chosen by a seeded SplitMix64 generator (one per
/// direction), so the loss pattern is the same on every run for the same traffic.
/// Two threads, each bounded by a 50 ms read timeout and a stop flag; joined on drop.
struct LossShim {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    forwarded: Arc<[AtomicU64; 2]>,
    dropped: Arc<[AtomicU64; 2]>,
}

/// SplitMix64 (Steele et al.): well mixed from the first output on, for any seed.
struct SplitMix(u64);

impl SplitMix {
    fn next_percent(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 100
    }
}

impl LossShim {
    fn start(port: u16, origin: u16, percent: u64, seed: u64) -> LossShim {
        let front = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(("127.0.0.1", origin)).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded: Arc<[AtomicU64; 2]> = Arc::default();
        let dropped: Arc<[AtomicU64; 2]> = Arc::default();
        let gateway: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut threads = Vec::new();
        // direction 0: gateway -> origin
        {
            let (front, back) = (front.try_clone().unwrap(), back.try_clone().unwrap());
            let (stop, fwd, drp, gw) = (
                stop.clone(),
                forwarded.clone(),
                dropped.clone(),
                gateway.clone(),
            );
            threads.push(thread::spawn(move || {
                let mut rng = SplitMix(seed);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *gw.lock().unwrap() = Some(from);
                    if rng.next_percent() < percent {
                        drp[0].fetch_add(1, Ordering::Relaxed);
                    } else {
                        fwd[0].fetch_add(1, Ordering::Relaxed);
                        let _ = back.send(&buf[..n]);
                    }
                }
            }));
        }
        // direction 1: origin -> gateway
        {
            let (stop, fwd, drp, gw) = (
                stop.clone(),
                forwarded.clone(),
                dropped.clone(),
                gateway.clone(),
            );
            threads.push(thread::spawn(move || {
                let mut rng = SplitMix(seed ^ 0x5555_5555_5555_5555);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back.recv(&mut buf) else { continue };
                    let Some(to) = *gw.lock().unwrap() else {
                        continue;
                    };
                    if rng.next_percent() < percent {
                        drp[1].fetch_add(1, Ordering::Relaxed);
                    } else {
                        fwd[1].fetch_add(1, Ordering::Relaxed);
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            }));
        }
        LossShim {
            stop,
            threads,
            forwarded,
            dropped,
        }
    }

    fn stats(&self) -> String {
        let f = |a: &[AtomicU64; 2], i: usize| a[i].load(Ordering::Relaxed);
        format!(
            "to origin: {} forwarded, {} dropped; to gateway: {} forwarded, {} dropped",
            f(&self.forwarded, 0),
            f(&self.dropped, 0),
            f(&self.forwarded, 1),
            f(&self.dropped, 1)
        )
    }
}

impl Drop for LossShim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// tests/interop/counter_server.py: an aiocoap origin whose POST /counter prints one
/// `EXEC <payload>` line per execution.
fn start_counter_server(dir: &Path, port: u16, server_creds: &Path) -> ChildGuard {
    let mut cmd = Command::new(&interop().venv_python);
    cmd.current_dir(dir)
        .arg(interop().test_tool("counter_server.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg(server_creds);
    let mut child = ChildGuard::spawn(cmd);
    assert!(
        child.wait_for_stdout("READY", Duration::from_secs(30)),
        "counter_server.py did not start:\n{}",
        String::from_utf8_lossy(&child.stderr_so_far())
    );
    child
}

// ------------------------------------------------------------------ tests

/// 20 % loss each way between gateway and origin: every request completes by
/// retransmission, byte-exact, and the origin executes each exactly once. The gateway
/// retransmits under the same Message ID, so aiocoap's deduplication answers a request
/// whose response was lost from its cache; a gateway that re-protected or re-numbered a
/// retransmission would make the origin execute it twice (or be rejected as a replay).
#[test]
fn lossy_hop_every_request_completes_and_executes_once() {
    const N: usize = 24;
    let dir = TestDir::new("gwm-loss");
    let origin_port = free_udp_port();
    let shim_port = free_udp_port();
    // the gateway's target is the shim, so the credential names the shim's port
    let ctx = make_contexts_in(&dir.join("ctx"), "127.0.0.1", shim_port, &[("gw", "04")]);
    let mut origin = start_counter_server(dir.path(), origin_port, &ctx.join("server.json"));
    let shim = LossShim::start(shim_port, origin_port, 20, 0x5eed_1234_abcd_0001);
    let gw = Gateway::start(
        dir.path(),
        &config(
            Some(&client_creds(&ctx, "gw")),
            "[coap]\nack_timeout_secs = 0.3\nnstart = 1\n",
        ),
    );
    let rt = runtime();
    let proxy_uri = format!("coap://127.0.0.1:{shim_port}/counter");
    for i in 0..N {
        let body = format!("request-{i:02}");
        let token = (i as u64 + 1).to_be_bytes();
        let r = exchange(
            &rt,
            gw.addr(),
            &request(
                Code::POST,
                &token,
                &[(number::PROXY_URI, proxy_uri.as_bytes())],
                body.as_bytes(),
            ),
        );
        let r = MessageView::parse(&r).unwrap();
        assert_eq!(
            (r.code, r.payload),
            (Code::CHANGED, format!("done:{body}").as_bytes()),
            "request {i}: {} ({})\n{}",
            String::from_utf8_lossy(r.payload),
            shim.stats(),
            gw.log()
        );
    }
    // every request executed exactly once
    let out = String::from_utf8_lossy(&origin.stdout_so_far()).into_owned();
    for i in 0..N {
        let line = format!("EXEC request-{i:02}");
        let n = out.lines().filter(|l| *l == line).count();
        assert_eq!(n, 1, "{line} executed {n} times\n{out}\n{}", shim.stats());
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("EXEC ")).count(),
        N,
        "{out}"
    );
    // the shim really dropped datagrams both ways, so retransmission was exercised
    assert!(
        shim.dropped[0].load(Ordering::Relaxed) >= 3
            && shim.dropped[1].load(Ordering::Relaxed) >= 3,
        "{}",
        shim.stats()
    );
    eprintln!("loss shim: {}", shim.stats());
    origin.kill9();
}

/// libcoap's plain client (Debian's libcoap3-bin, `coap-client-notls -P`, which sends
/// Proxy-Uri) fetches big10k.txt through the gateway byte-exact; wire_check.sh proves no
/// plain request reached the origin. Then aiocoap-client --proxy fetches a 100 kB file
/// (its own Block2 travels end to end inside OSCORE).
#[test]
fn libcoap_and_aiocoap_clients_fetch_through_the_gateway_under_oscore() {
    let dir = TestDir::new("gwm-clients");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let big100k = write_test_file(&data.join("big100k.bin"), 100_000);
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        false,
    );
    let big10k: Vec<u8> = (0..205)
        .map(|i| format!("line {i:05} xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"))
        .collect::<String>()
        .into_bytes();
    fs::write(data.join("big10k.txt"), &big10k).unwrap();
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));

    let got = dir.join("libcoap10k.txt");
    let libcoap = format!(
        "coap-client-notls -B 60 -P coap://127.0.0.1:{} -o {} coap://localhost:{origin_port}/big10k.txt",
        gw.port,
        got.display()
    );
    let out = run_wire_check(
        dir.path(),
        &[origin_port, gw.port],
        Some(origin_port),
        None,
        &["bash", "-c", &libcoap],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("wire_check coap-client-notls", &out),
        gw.log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("no plain CoAP request to port {origin_port}")),
        "{text}"
    );
    assert_same_bytes(
        "big10k.txt via coap-client-notls",
        &fs::read(&got).unwrap(),
        &big10k,
        &text,
    );

    let got = dir.join("aiocoap100k.bin");
    let fetch = format!(
        "{} --proxy coap://127.0.0.1:{} coap://localhost:{origin_port}/big100k.bin > {}",
        venv_bin("aiocoap-client"),
        gw.port,
        got.display()
    );
    let out = run_wire_check(
        dir.path(),
        &[origin_port, gw.port],
        Some(origin_port),
        None,
        &["bash", "-c", &fetch],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("wire_check aiocoap-client", &out),
        gw.log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("no plain CoAP request to port {origin_port}")),
        "{text}"
    );
    assert_same_bytes(
        "big100k.bin via aiocoap-client",
        &fs::read(&got).unwrap(),
        &big100k,
        &text,
    );
}

/// Reverse proxy: a plain `coap://GATEWAY/sensors/x` goes to the route's OSCORE origin as
/// `/x`. The origin serves a file `x` (a request for /sensors/x would be 4.04 there), and
/// the capture shows only OSCORE requests reached it.
#[test]
fn reverse_route_strips_the_prefix_and_protects() {
    let dir = TestDir::new("gwm-route");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let x = write_test_file(&data.join("x"), 3000);
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        false,
    );
    let gw = Gateway::start(
        dir.path(),
        &config(
            Some(&client_creds(&ctx, "gw")),
            &format!("[[route]]\nmatch_path = \"/sensors\"\ntarget = \"coap://localhost:{origin_port}\"\nstrip_prefix = true\n"),
        ),
    );
    let got = dir.join("x.got");
    let fetch = format!(
        "{} coap://127.0.0.1:{}/sensors/x > {}",
        venv_bin("aiocoap-client"),
        gw.port,
        got.display()
    );
    let pcap = dir.join("route.pcap");
    let out = run_wire_check(
        dir.path(),
        &[origin_port, gw.port],
        Some(origin_port),
        Some(&pcap),
        &["bash", "-c", &fetch],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("wire_check", &out),
        gw.log()
    );
    assert_same_bytes("x via the route", &fs::read(&got).unwrap(), &x, "");
    let msgs = capture_messages(&pcap, origin_port);
    let protected = oscore_requests_to(&msgs, origin_port, "04");
    assert!(!protected.is_empty(), "{}", describe_capture(&msgs));
    assert!(
        plain_requests_to(&msgs, origin_port).is_empty(),
        "{}",
        describe_capture(&msgs)
    );
}

/// Two gateways whose routes point at each other (plain forwarding on, no credentials):
/// Hop-Limit runs down and the client gets 5.08 Hop Limit Reached.
#[test]
fn two_gateways_forwarding_to_each_other_answer_5_08() {
    let dir = TestDir::new("gwm-loop");
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let cfg = |other: u16| {
        format!("[policy]\nplain_forwarding = true\nupstream_timeout_secs = 30\nhop_limit = 6\n[[route]]\ntarget = \"coap://127.0.0.1:{other}\"\n")
    };
    let a = Gateway::start_on(dir.path(), &cfg(pb), pa);
    let b = Gateway::start_on(dir.path(), &cfg(pa), pb);
    let rt = runtime();
    let r = exchange(
        &rt,
        a.addr(),
        &request(Code::GET, &[7; 4], &[(number::URI_PATH, b"loop")], b""),
    );
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(
        r.code,
        Code::HOP_LIMIT_REACHED,
        "{}\n{}\n{}",
        String::from_utf8_lossy(r.payload),
        a.log(),
        b.log()
    );
    assert!(!r.payload.is_empty(), "5.08 carries a diagnostic");
}

/// Runs aiocoap-client --proxy under wire_check.sh and returns (wire_check output, what the
/// client printed).
fn fetch_expecting_error(dir: &Path, gw: &Gateway, origin_port: u16) -> (Output, String) {
    let got = dir.join(format!("err-{}.txt", gw.port));
    let fetch = format!(
        "{} --proxy coap://127.0.0.1:{} coap://localhost:{origin_port}/hello.txt > {} 2>&1; true",
        venv_bin("aiocoap-client"),
        gw.port,
        got.display()
    );
    let out = run_wire_check(
        dir,
        &[origin_port, gw.port],
        Some(origin_port),
        None,
        &["bash", "-c", &fetch],
    );
    (out, fs::read_to_string(&got).unwrap_or_default())
}

/// Fail closed: the origin's context cannot be loaded (settings.json replaced by a
/// directory, which stops root too, unlike chmod 000), or is locked by another process (a
/// running aiocoap holding it): the client gets 5.03 with a diagnostic, and wire_check
/// shows no plain request reached the origin.
#[test]
fn unloadable_or_locked_context_fails_closed_with_5_03() {
    let dir = TestDir::new("gwm-failclosed");
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
    let cdir = client_ctx(&ctx, "gw");

    // 1. unloadable
    let settings = cdir.join("settings.json");
    let saved = fs::read(&settings).unwrap();
    fs::remove_file(&settings).unwrap();
    fs::create_dir(&settings).unwrap();
    {
        let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
        let (out, client) = fetch_expecting_error(dir.path(), &gw, origin_port);
        assert!(
            out.status.success(),
            "{}\n{client}\n{}",
            show("wire_check", &out),
            gw.log()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("no plain CoAP request to port {origin_port}")),
            "{text}"
        );
        assert!(client.contains("5.03"), "{client}");
        assert!(
            client.contains("settings.json"),
            "the diagnostic names the file: {client}"
        );
    }
    fs::remove_dir(&settings).unwrap();
    fs::write(&settings, saved).unwrap();

    // 2. locked by another process: aiocoap itself holds the context
    let mut holder = hold_context(&cdir);
    assert!(
        holder.wait_for_stdout("LOCKED", Duration::from_secs(30)),
        "{}",
        String::from_utf8_lossy(&holder.stderr_so_far())
    );
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let (out, client) = fetch_expecting_error(dir.path(), &gw, origin_port);
    assert!(
        out.status.success(),
        "{}\n{client}\n{}",
        show("wire_check", &out),
        gw.log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("no plain CoAP request to port {origin_port}")),
        "{text}"
    );
    assert!(client.contains("5.03"), "{client}");
    assert!(
        client.contains("lock"),
        "the diagnostic says it is locked: {client}"
    );
    holder.kill9();
}

/// `aiocoap_context.py hold DIR` (aiocoap loads and locks the context until its stdin
/// closes): stdin is a pipe from `sleep 300`, so it holds for at most 300 s; the whole
/// process group is killed when the guard drops.
fn hold_context(cdir: &Path) -> ChildGuard {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#"sleep 300 | "$0" "$1" hold "$2""#)
        .arg(&interop().venv_python)
        .arg(interop().test_tool("aiocoap_context.py"))
        .arg(cdir);
    ChildGuard::spawn(cmd)
}
