//! Acceptance tests of `oscore-gateway request` (an OSCORE-capable CoAP client) against a
//! real aiocoap 0.4.17 origin (`aiocoap-fileserver`), started by ../shared/interop.
//!
//! The CLI under test:
//! `oscore-gateway request [-m METHOD] [--credentials FILE] [--proxy URI]
//!  [--payload STR | --payload-file F] [--content-format N] [-o FILE] URI`:
//! payload to stdout or -o, the response code on stderr (e.g. `2.05 Content`), exit 0 only
//! on 2.xx; block-wise both ways; answers a 4.01+Echo once (RFC 8613 App. B.1.2); with
//! --credentials and no matching pattern it refuses instead of sending plain text. It uses
//! aiocoap's credentials JSON and context directories (settings.json, sequence.json, flock
//! on `lock`).
//!
//! Needs root, tcpdump and tshark (wire_check.sh) and the aiocoap venv (`setup.sh --apt`,
//! see docs/INTEROP-TESTS.md). Each test has its own directory and port, so they run in
//! parallel. `INTEROP_REQUEST_CLIENT=aiocoap` runs them against aiocoap's own client
//! instead, to check the harness (the refusal test must then fail: aiocoap sends plain text).

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;

/// client1's Sender ID (the kid on the wire), as make_contexts.py writes it.
const KID: &str = "01";

/// An aiocoap-fileserver origin with the client1 pair, on its own port and directory.
/// Field order matters: the server is stopped before its directory is removed.
struct Origin {
    server: AiocoapServer,
    port: u16,
    /// make_contexts.py output (client1.json, client1/for-fileserver, server/...)
    ctx: PathBuf,
    /// the served directory (PUTs land here)
    data: PathBuf,
    dir: TestDir,
}

impl Origin {
    fn start(name: &str, writable: bool) -> Origin {
        let dir = TestDir::new(name);
        let port = free_udp_port();
        let ctx = make_contexts(dir.path(), port, &[("client1", KID)]);
        let data = dir.join("data");
        let server = AiocoapServer::start(
            dir.path(),
            port,
            &data,
            Some(&ctx.join("server.json")),
            writable,
        );
        Origin {
            server,
            port,
            ctx,
            data,
            dir,
        }
    }

    fn uri(&self, path: &str) -> String {
        format!("coap://localhost:{}/{path}", self.port)
    }

    fn creds(&self) -> PathBuf {
        client_creds(&self.ctx, "client1")
    }

    fn client_ctx(&self) -> PathBuf {
        client_ctx(&self.ctx, "client1")
    }

    /// Runs `request ARGS` under wire_check.sh (capture kept at `pcap`, plain requests to
    /// the origin's port fail the check) and returns its output.
    fn request_on_wire(
        &self,
        pcap: &str,
        args: &[&std::ffi::OsStr],
    ) -> (std::process::Output, PathBuf) {
        let pcap = self.dir.join(pcap);
        let argv = request_argv(self.dir.path(), args);
        let out = run_wire_check(
            self.dir.path(),
            &[self.port],
            Some(self.port),
            Some(&pcap),
            &argv,
        );
        (out, pcap)
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

// ---------------------------------------------------------------- a. seed example

/// aiocoap's documentation example with our client: a 10660-byte GET (inner Block2) and a
/// 10 kB PUT (inner Block1), byte-exact, and every request to the origin was OSCORE.
#[test]
fn seed_example_get_and_put_10k_are_oscore_on_the_wire() {
    let o = Origin::start("seed", true);
    let creds = o.creds();
    let big = fs::read(o.data.join("big10k.txt")).unwrap();
    assert_eq!(big.len(), 10660, "start script's big10k.txt");

    // GET
    let got = o.dir.join("got10k.txt");
    let uri = o.uri("big10k.txt");
    let (out, pcap) = o.request_on_wire(
        "get.pcap",
        &[
            os(&uri),
            os("--credentials"),
            creds.as_os_str(),
            os("-o"),
            got.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        show("GET big10k.txt under wire_check", &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "require ok: no plain CoAP request to port {}",
            o.port
        )),
        "{}",
        show("wire_check verdict", &out)
    );
    assert!(
        stderr_of(&out).contains("2.05 Content"),
        "{}",
        show("response code on stderr", &out)
    );
    let downloaded = fs::read(&got).unwrap_or_default();
    assert_same_bytes(
        "GET big10k.txt -o",
        &downloaded,
        &big,
        &show("request", &out),
    );
    let msgs = capture_messages(&pcap, o.port);
    let reqs = oscore_requests_to(&msgs, o.port, KID);
    assert!(
        reqs.len() >= 11,
        "10660 bytes need at least 11 block requests:\n{}",
        describe_capture(&msgs)
    );
    assert!(
        plain_requests_to(&msgs, o.port).is_empty(),
        "{}",
        describe_capture(&msgs)
    );

    // PUT, 10 000 bytes (the last Block1 is partial)
    let src = o.dir.join("put-src.bin");
    let body = write_test_file(&src, 10_000);
    let uri = o.uri("put10k.bin");
    let resp = o.dir.join("put-response.txt");
    let (out, pcap) = o.request_on_wire(
        "put.pcap",
        &[
            os("-m"),
            os("PUT"),
            os("--payload-file"),
            src.as_os_str(),
            os("--credentials"),
            creds.as_os_str(),
            os("-o"),
            resp.as_os_str(),
            os(&uri),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        show("PUT put10k.bin under wire_check", &out)
    );
    // aiocoap-fileserver answers 2.04 Changed, also when it creates the file
    assert!(
        stderr_of(&out).contains("2.04"),
        "{}",
        show("response code on stderr", &out)
    );
    let landed = fs::read(o.data.join("put10k.bin")).expect("PUT did not create data/put10k.bin");
    assert_same_bytes(
        "data/put10k.bin after the PUT",
        &landed,
        &body,
        &show("request", &out),
    );
    let msgs = capture_messages(&pcap, o.port);
    let reqs = oscore_requests_to(&msgs, o.port, KID);
    assert!(
        reqs.len() >= 10,
        "10000 bytes need at least 10 Block1 requests:\n{}",
        describe_capture(&msgs)
    );
    assert!(
        plain_requests_to(&msgs, o.port).is_empty(),
        "{}",
        describe_capture(&msgs)
    );
}

/// Payload to stdout when there is no -o, the code on stderr, --payload, and a non-2.xx
/// response gives a non-zero exit.
#[test]
fn stdout_stderr_and_exit_status() {
    let o = Origin::start("stdio", true);
    let creds = o.creds();
    let hello = fs::read(o.data.join("hello.txt")).unwrap();

    let out = run_request(
        o.dir.path(),
        &[
            os(&o.uri("hello.txt")),
            os("--credentials"),
            creds.as_os_str(),
        ],
        REQUEST_TIMEOUT,
    );
    assert!(out.status.success(), "{}", show("GET hello.txt", &out));
    assert_same_bytes(
        "stdout (exactly the payload)",
        &out.stdout,
        &hello,
        &show("GET hello.txt", &out),
    );
    assert!(
        stderr_of(&out).contains("2.05 Content"),
        "{}",
        show("GET hello.txt", &out)
    );

    let out = run_request(
        o.dir.path(),
        &[
            os("-m"),
            os("PUT"),
            os("--payload"),
            os("short text body"),
            os("--credentials"),
            creds.as_os_str(),
            os(&o.uri("short.txt")),
        ],
        REQUEST_TIMEOUT,
    );
    assert!(out.status.success(), "{}", show("PUT --payload", &out));
    assert!(
        stderr_of(&out).contains("2.04"),
        "{}",
        show("PUT --payload", &out)
    );
    let landed = fs::read(o.data.join("short.txt")).unwrap_or_default();
    assert_same_bytes(
        "data/short.txt",
        &landed,
        b"short text body",
        &show("PUT", &out),
    );

    let out = run_request(
        o.dir.path(),
        &[
            os(&o.uri("no-such-file.txt")),
            os("--credentials"),
            creds.as_os_str(),
        ],
        REQUEST_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "{}",
        show("GET of a missing file must not exit 0", &out)
    );
    assert!(
        stderr_of(&out).contains("4.04"),
        "{}",
        show("4.04 on stderr", &out)
    );
}

// ---------------------------------------------------------------- b. sequence numbers

/// Five complete `request` processes of 40 OSCORE requests each (a 40-block GET; the CLI
/// sends one URI per process) and, between them, one killed with SIGKILL in the middle of
/// a 2 MB download. Every run after the kill succeeds (the origin saw no replay), every
/// Partial IV on the wire is used once, each process starts at or above the next-to-send
/// persisted before it, and after each process the client's sequence.json is above every
/// number it sent (RFC 8613 App. B.1.1). The Partial IVs come from a capture of each run
/// (wire_check -w, then tshark), which also covers the killed process; at the end the
/// origin is stopped cleanly and its replay window must end at the highest PIV captured,
/// below the client's next-to-send.
#[test]
fn sequence_numbers_stay_ahead_across_processes_and_sigkill() {
    let mut o = Origin::start("seqno", false);
    let creds = o.creds();
    let cctx = o.client_ctx();
    let seq_file = cctx.join("sequence.json");
    // 40 inner Block2 blocks of 1024 bytes, the last one partial
    let file40 = write_test_file(&o.data.join("file40.bin"), 40 * 1024 - 17);
    write_test_file(&o.data.join("big2m.bin"), 2 * 1024 * 1024 + 5);

    let mut owner_of_piv: HashMap<u64, String> = HashMap::new();
    let mut full_requests = 0;
    let mut highest_sent = 0u64;
    for run in 0..6 {
        let label = format!("run {run}");
        let before = read_sequence(&cctx).map(|s| s.next_to_send).unwrap_or(0);
        let pcap = o.dir.join(format!("run{run}.pcap"));
        let killed = run == 2;
        if !killed {
            let dest = o.dir.join(format!("run{run}.out"));
            let uri = o.uri("file40.bin");
            let argv = request_argv(
                o.dir.path(),
                &[
                    os(&uri),
                    os("--credentials"),
                    creds.as_os_str(),
                    os("-o"),
                    dest.as_os_str(),
                ],
            );
            let out = run_wire_check(o.dir.path(), &[o.port], Some(o.port), Some(&pcap), &argv);
            assert!(
                out.status.success(),
                "{}",
                show(&format!("{label}: GET file40.bin"), &out)
            );
            let got = fs::read(&dest).unwrap_or_default();
            assert_same_bytes(
                &format!("{label}: file40.bin"),
                &got,
                &file40,
                &show(&label, &out),
            );
        } else {
            // `bash -c 'echo $$ > PIDFILE; exec request ...'`: the pid file names the
            // request process itself, which wire_check.sh starts after its capture is up
            let pidfile = o.dir.join("killed.pid");
            let dest = o.dir.join("killed.out");
            let uri = o.uri("big2m.bin");
            let mut argv = vec![
                "bash".into(),
                "-c".into(),
                r#"echo $$ > "$0"; exec "$@""#.into(),
                pidfile.clone().into_os_string(),
            ];
            argv.extend(request_argv(
                o.dir.path(),
                &[
                    os(&uri),
                    os("--credentials"),
                    creds.as_os_str(),
                    os("-o"),
                    dest.as_os_str(),
                ],
            ));
            let seq_before = fs::read(&seq_file).ok();
            let mut wc = ChildGuard::spawn(wire_check_command(
                o.dir.path(),
                &[o.port],
                Some(o.port),
                Some(&pcap),
                &argv,
            ));
            let mut pid = None;
            assert!(
                wait_until(Duration::from_secs(20), || {
                    pid = fs::read_to_string(&pidfile)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    pid.is_some() || !wc.is_running()
                }) && pid.is_some(),
                "{label}: the request process never started: {}",
                String::from_utf8_lossy(&wc.stderr_so_far())
            );
            let pid = pid.unwrap();
            // a client reserves sequence numbers on disk before it sends them (B.1.1), so a
            // changed sequence.json means the transfer is under way
            assert!(
                wait_until(Duration::from_secs(20), || fs::read(&seq_file).ok()
                    != seq_before
                    || !pid_alive(pid)),
                "{label}: sequence.json never changed"
            );
            thread::sleep(Duration::from_millis(300));
            assert!(
                pid_alive(pid),
                "{label}: the 2 MB download ended before the SIGKILL; the test needs it mid-transfer"
            );
            send_signal(pid, libc::SIGKILL);
            let out = wc.wait_timeout(Duration::from_secs(120));
            assert_ne!(
                out.status.code(),
                Some(4),
                "{}",
                show(&format!("{label}: plain CoAP on the wire"), &out)
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("REQUIRE FAILED"),
                "{}",
                show(&label, &out)
            );
        }

        let msgs = capture_messages(&pcap, o.port);
        assert!(
            plain_requests_to(&msgs, o.port).is_empty(),
            "{label}:\n{}",
            describe_capture(&msgs)
        );
        let reqs = oscore_requests_to(&msgs, o.port, KID);
        let pivs: Vec<u64> = reqs
            .iter()
            .map(|m| {
                m.piv
                    .unwrap_or_else(|| panic!("{label}: OSCORE request without Partial IV: {m:?}"))
            })
            .collect();
        if killed {
            assert!(
                pivs.len() >= 2,
                "{label}: killed before it sent anything:\n{}",
                describe_capture(&msgs)
            );
        } else {
            assert!(
                pivs.len() >= 40,
                "{label}: a 40-block GET needs 40 requests:\n{}",
                describe_capture(&msgs)
            );
            full_requests += pivs.len();
        }
        let (min, max) = (*pivs.iter().min().unwrap(), *pivs.iter().max().unwrap());
        assert!(
            min >= before,
            "{label} sent Partial IV {min}, below the next-to-send {before} persisted before it started"
        );
        let after = read_sequence(&cctx)
            .unwrap_or_else(|| panic!("{label}: no client sequence.json"))
            .next_to_send;
        assert!(
            after > max,
            "{label}: client sequence.json says next-to-send {after}, but Partial IV {max} was already sent{}",
            if killed { " (killed: the mark must be written before sending)" } else { "" }
        );
        for piv in pivs {
            if let Some(first) = owner_of_piv.insert(piv, label.clone()) {
                panic!("Partial IV {piv} sent twice (nonce reuse): by {first} and by {label}");
            }
        }
        highest_sent = highest_sent.max(max);
    }
    assert!(
        full_requests >= 200,
        "expected at least 200 requests in 5 full runs, saw {full_requests}"
    );

    // The origin's view: a clean stop writes its exact replay window.
    assert!(
        o.server.stop(),
        "aiocoap-fileserver did not stop on SIGTERM"
    );
    let server_state =
        read_sequence(&server_ctx(&o.ctx, "client1")).expect("server sequence.json after SIGTERM");
    let highest_seen = server_state
        .received
        .highest_seen()
        .unwrap_or_else(|| panic!("server window after a clean stop: {server_state:?}"));
    assert_eq!(
        highest_seen, highest_sent,
        "the origin's replay window must end at the highest Partial IV captured"
    );
    let client_next = read_sequence(&cctx).unwrap().next_to_send;
    assert!(
        client_next > highest_seen,
        "client next-to-send {client_next} must be above the origin's highest seen {highest_seen}"
    );
}

// ---------------------------------------------------------------- c. lock exclusion

/// Loads the context directory argv[1] with aiocoap in a second process: exit 3 on
/// filelock's Timeout, 0 if it could load (then without touching the files).
const AIOCOAP_LOAD: &str = r#"
import sys, filelock
from aiocoap.oscore import FilesystemSecurityContext
try:
    ctx = FilesystemSecurityContext(sys.argv[1])
except filelock.Timeout as e:
    print("filelock.Timeout:", e)
    sys.exit(3)
print("aiocoap loaded the context although another process uses it")
ctx.lockfile.release()
ctx.lockfile = None  # no write-back on exit
"#;

/// Holds the context directory argv[1] the way an aiocoap process does, until killed.
const AIOCOAP_HOLD: &str = r#"
import sys, time
from aiocoap.oscore import FilesystemSecurityContext
ctx = FilesystemSecurityContext(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"#;

#[test]
fn aiocoap_cannot_load_a_context_that_request_is_using() {
    let o = Origin::start("lock-held-by-request", false);
    write_test_file(&o.data.join("big4m.bin"), 4 * 1024 * 1024);
    let cctx = o.client_ctx();
    let lock = cctx.join("lock");
    let dest = o.dir.join("big4m.out");
    let mut req = spawn_request(
        o.dir.path(),
        &[
            os(&o.uri("big4m.bin")),
            os("--credentials"),
            o.creds().as_os_str(),
            os("-o"),
            dest.as_os_str(),
        ],
    );
    let pid = req.pid();
    let held = wait_until(Duration::from_secs(20), || {
        lock_holders(&lock).iter().any(|(p, _)| *p == pid) || !req.is_running()
    });
    assert!(
        held && req.is_running(),
        "request (pid {pid}) never held a lock on {}: holders {:?}\nstderr: {}",
        lock.display(),
        lock_holders(&lock),
        String::from_utf8_lossy(&req.stderr_so_far())
    );
    assert!(
        lock_holders(&lock)
            .iter()
            .any(|(p, kind)| *p == pid && kind == "FLOCK"),
        "aiocoap uses flock(2); request holds {:?}",
        lock_holders(&lock)
    );

    let i = interop();
    let mut cmd = Command::new(&i.venv_python);
    cmd.arg("-c").arg(AIOCOAP_LOAD).arg(&cctx);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        req.is_running(),
        "the 4 MB download ended during the check; it must still hold the context"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        show("aiocoap loading a context in use", &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("could not be acquired"),
        "{}",
        show("filelock timeout message", &out)
    );
    req.kill9();
}

#[test]
fn request_refuses_a_context_that_aiocoap_is_using() {
    let dir = TestDir::new("lock-held-by-aiocoap");
    let port = free_udp_port();
    let ctx = make_contexts(dir.path(), port, &[("client1", KID)]);
    let cctx = client_ctx(&ctx, "client1");
    // no origin: a silent socket proves nothing was sent either
    let silence = UdpSilence::bind(port);

    let i = interop();
    let mut cmd = Command::new(&i.venv_python);
    cmd.arg("-c").arg(AIOCOAP_HOLD).arg(&cctx);
    let mut holder = ChildGuard::spawn(cmd);
    assert!(
        holder.wait_for_stdout("holding", Duration::from_secs(30)),
        "aiocoap did not load the context: {}",
        String::from_utf8_lossy(&holder.stderr_so_far())
    );
    assert!(
        lock_holders(&cctx.join("lock"))
            .iter()
            .any(|(p, _)| *p == holder.pid()),
        "aiocoap should hold {}/lock",
        cctx.display()
    );

    let uri = format!("coap://localhost:{port}/hello.txt");
    let out = run_request(
        dir.path(),
        &[
            os(&uri),
            os("--credentials"),
            client_creds(&ctx, "client1").as_os_str(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "{}",
        show("request on a locked context must fail", &out)
    );
    assert!(
        stderr_of(&out).to_lowercase().contains("lock"),
        "{}",
        show("the error must mention the lock", &out)
    );
    let sent = silence.received(Duration::from_millis(500));
    assert!(
        sent.is_empty(),
        "datagrams were sent although the context was unusable: {sent:?}"
    );
    assert!(
        holder.is_running(),
        "the aiocoap holder must have held the context throughout"
    );
    holder.kill9();
}

// ---------------------------------------------------------------- d. Echo

/// The origin is killed with SIGKILL and restarted on the same contexts: its replay window
/// is unknown, so it answers the first request with a protected 4.01 + Echo carrying its
/// own Partial IV (App. B.1.2). `request` must repeat the request with the Echo and succeed.
#[test]
fn echo_recovery_after_origin_sigkill() {
    let mut o = Origin::start("echo", false);
    let creds = o.creds();
    let hello = fs::read(o.data.join("hello.txt")).unwrap();
    let uri = o.uri("hello.txt");
    let args = [os(&uri), os("--credentials"), creds.as_os_str()];

    let out = run_request(o.dir.path(), &args, REQUEST_TIMEOUT);
    assert!(
        out.status.success(),
        "{}",
        show("GET before the crash", &out)
    );
    assert_same_bytes(
        "GET before the crash",
        &out.stdout,
        &hello,
        &show("request", &out),
    );
    let sctx = server_ctx(&o.ctx, "client1");
    assert_eq!(
        read_sequence(&sctx).map(|s| s.received),
        Some(Received::Unknown),
        "a running aiocoap origin has marked its window unknown"
    );

    o.server.kill9();
    o.server.restart();

    let got = o.dir.join("after-restart.txt");
    let (out, pcap) = o.request_on_wire(
        "echo.pcap",
        &[
            os(&uri),
            os("--credentials"),
            creds.as_os_str(),
            os("-o"),
            got.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        show("GET after the origin's restart", &out)
    );
    let after = fs::read(&got).unwrap_or_default();
    assert_same_bytes(
        "GET after the restart",
        &after,
        &hello,
        &show("request", &out),
    );
    assert!(
        stderr_of(&out).contains("2.05 Content"),
        "{}",
        show("final code", &out)
    );

    let msgs = capture_messages(&pcap, o.port);
    let reqs = oscore_requests_to(&msgs, o.port, KID);
    assert_eq!(
        reqs.len(),
        2,
        "one fetch after the restart: request, 4.01+Echo, request with Echo:\n{}",
        describe_capture(&msgs)
    );
    assert!(
        reqs[1].piv > reqs[0].piv,
        "the retry needs a new Partial IV: {reqs:?}"
    );
    let first_answer = msgs
        .iter()
        .find(|m| {
            m.frame > reqs[0].frame
                && m.src_port == o.port
                && m.dst_port == reqs[0].src_port
                && m.code >= 64
        })
        .unwrap_or_else(|| {
            panic!(
                "no answer to the first request:\n{}",
                describe_capture(&msgs)
            )
        });
    assert!(
        first_answer.is_oscore(),
        "the Echo answer is protected: {first_answer:?}"
    );
    assert!(
        first_answer.piv.is_some(),
        "the Echo answer carries the server's own Partial IV: {first_answer:?}"
    );
    assert_eq!(
        first_answer.inner_code,
        Some(4 * 32 + 1),
        "tshark decrypts the first answer to an inner 4.01: {first_answer:?}"
    );

    // the origin started its window at the retried request
    assert!(
        o.server.stop(),
        "aiocoap-fileserver did not stop on SIGTERM"
    );
    let state = read_sequence(&sctx).unwrap();
    assert_eq!(
        state.received.highest_seen(),
        reqs[1].piv,
        "origin window: {state:?}"
    );
}

// ---------------------------------------------------------------- e. refusal

/// With --credentials whose patterns do not match the URI, `request` must refuse: non-zero
/// exit, an error naming what did not match, and not a single datagram sent (aiocoap would
/// silently send plain text here).
#[test]
fn unmatched_credentials_are_refused_without_sending() {
    let dir = TestDir::new("refuse");
    let port = free_udp_port();
    let other = free_udp_port();
    // patterns for another port, and for another spelling of the host
    let ctx_port = make_contexts_in(
        &dir.join("ctx-other-port"),
        "localhost",
        other,
        &[("client1", KID)],
    );
    let ctx_host = make_contexts_in(
        &dir.join("ctx-ip-host"),
        "127.0.0.1",
        port,
        &[("client1", KID)],
    );
    let silence = UdpSilence::bind(port);
    let uri = format!("coap://localhost:{port}/hello.txt");
    for ctx in [&ctx_port, &ctx_host] {
        let creds = client_creds(ctx, "client1");
        let out = run_request(
            dir.path(),
            &[os(&uri), os("--credentials"), creds.as_os_str()],
            Duration::from_secs(30),
        );
        assert!(
            !out.status.success(),
            "{}",
            show("unmatched credentials must not exit 0", &out)
        );
        let err = stderr_of(&out);
        assert!(
            err.contains(&uri) || err.contains(&creds.display().to_string()),
            "{}",
            show(
                "the error should name the URI or the credentials file",
                &out
            )
        );
    }
    let sent = silence.received(Duration::from_secs(1));
    assert!(
        sent.is_empty(),
        "datagrams reached port {port} although no credential matched: {sent:?}"
    );
}
