//! `oscore-gateway load` against its own peers on loopback: --serve (plain and OSCORE, with
//! the App. B.1.2 Echo exchange), --udp-echo and --udp-relay. Checks that the JSON report
//! is sane: every request counted, no errors, percentiles ordered.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_oscore-gateway");

/// Kills the child by its PID when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGTERM first, so a server closes its contexts; then make sure it is gone.
        sigterm(self.0.id());
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `oscore-gateway load ARGS` as a server and waits until it has bound `port`.
fn start(args: &[&str], port: u16) -> Guard {
    let child = Command::new(BIN)
        .arg("load")
        .args(args)
        .args(["--max-seconds", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let end = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < end, "server on port {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

fn run_load(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("load")
        .args(args)
        .args([
            "--json",
            "--duration-limit",
            "30",
            "--ack-timeout-ms",
            "500",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

fn assert_sane(r: &Value, count: u64) {
    assert_eq!(r["requested"], count, "{r}");
    assert_eq!(r["completed"], count, "{r}");
    assert_eq!(r["ok"], count, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["timeouts"], 0, "{r}");
    assert_eq!(r["unfinished"], 0, "{r}");
    let l = &r["latency_us"];
    let f = |k: &str| l[k].as_f64().unwrap();
    assert!(f("min") > 0.0, "{r}");
    assert!(f("min") <= f("p50"), "{r}");
    assert!(f("p50") <= f("p99"), "{r}");
    assert!(f("p99") <= f("p999"), "{r}");
    assert!(f("p999") <= f("max"), "{r}");
    assert!(r["requests_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn plain_con_and_non_against_serve() {
    let port = free_port();
    let _s = start(&["--serve", &format!("127.0.0.1:{port}")], port);
    let uri = format!("coap://127.0.0.1:{port}/load");
    let r = run_load(&[&uri, "--count", "500", "--window", "8"]);
    assert_sane(&r, 500);
    assert_eq!(r["confirmable"], true);
    let r = run_load(&[
        &uri,
        "--count",
        "300",
        "--window",
        "4",
        "--non",
        "-m",
        "PUT",
        "--payload-size",
        "200",
    ]);
    assert_sane(&r, 300);
    assert_eq!(r["method"], "PUT");
    assert_eq!(r["confirmable"], false);
}

#[test]
fn echo_and_relay() {
    let echo = free_port();
    let _e = start(&["--udp-echo", &format!("127.0.0.1:{echo}")], echo);
    let relay = free_port();
    let _r = start(
        &[
            "--udp-relay",
            &format!("127.0.0.1:{relay}"),
            "--to",
            &format!("127.0.0.1:{echo}"),
        ],
        relay,
    );
    let r = run_load(&[
        &format!("coap://127.0.0.1:{echo}/x"),
        "--count",
        "400",
        "--window",
        "16",
    ]);
    assert_sane(&r, 400);
    let r = run_load(&[
        &format!("coap://127.0.0.1:{relay}/x"),
        "--count",
        "400",
        "--window",
        "16",
    ]);
    assert_sane(&r, 400);
}

fn write_context(dir: &Path, sender: &str, recipient: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("settings.json"),
        format!(
            r#"{{"sender-id_hex": "{sender}", "recipient-id_hex": "{recipient}", "secret_ascii": "load test secret", "algorithm": "AES-CCM-16-64-128"}}"#
        ),
    )
    .unwrap();
}

#[test]
fn oscore_against_serve_with_echo_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let client_dir = tmp.path().join("client");
    let server_dir = tmp.path().join("server");
    write_context(&client_dir, "0b", "66696c65");
    write_context(&server_dir, "66696c65", "0b");
    // The server restarts with an unknown replay window (App. B.1.2): it must answer the
    // first requests with 4.01 + Echo, and the generator re-sends with the Echo.
    std::fs::write(
        server_dir.join("sequence.json"),
        r#"{"next-to-send": 50, "received": "unknown"}"#,
    )
    .unwrap();
    let client_creds = tmp.path().join("client.json");
    std::fs::write(
        &client_creds,
        format!(
            r#"{{"coap://127.0.0.1:{port}/*": {{"oscore": {{"basedir": "{}"}}}}}}"#,
            client_dir.display()
        ),
    )
    .unwrap();
    let server_creds = tmp.path().join("server.json");
    std::fs::write(
        &server_creds,
        format!(
            r#"{{":client": {{"oscore": {{"basedir": "{}"}}}}}}"#,
            server_dir.display()
        ),
    )
    .unwrap();
    let s = start(
        &[
            "--serve",
            &format!("127.0.0.1:{port}"),
            "--credentials",
            server_creds.to_str().unwrap(),
        ],
        port,
    );
    let creds = client_creds.to_str().unwrap();
    let uri = format!("coap://127.0.0.1:{port}/secret");
    let r = run_load(&[
        &uri,
        "--credentials",
        creds,
        "--count",
        "300",
        "--window",
        "8",
    ]);
    assert_sane(&r, 300);
    assert_eq!(r["oscore"], true);
    let echoes = r["echo_retries"].as_u64().unwrap();
    assert!((1..=8).contains(&echoes), "{r}");
    // A second run: the window is initialised now, no Echo; sequence numbers continue.
    let r = run_load(&[
        &uri,
        "--credentials",
        creds,
        "--count",
        "200",
        "--window",
        "4",
    ]);
    assert_sane(&r, 200);
    assert_eq!(r["echo_retries"], 0, "{r}");
    drop(s);
    // The server closed its context on SIGTERM: exact window written, lock released.
    let seq = std::fs::read_to_string(server_dir.join("sequence.json")).unwrap();
    assert!(seq.contains("\"index\""), "{seq}");
    assert!(!server_dir.join("lock").exists());
}

#[test]
fn oscore_without_matching_credential_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("c.json");
    std::fs::write(
        &creds,
        r#"{"coap://example.invalid/*": {"oscore": {"basedir": "x"}}}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "load",
            "coap://127.0.0.1:9/x",
            "--count",
            "1",
            "--credentials",
        ])
        .arg(&creds)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credential"));
}

/// utime + stime of `pid` in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // after "pid (comm) ": state is field 3, utime field 14, stime field 15
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// `[coap] busy_poll_us`: with the spinner on, the gateway forwards as usual, and once
/// traffic stops it stops spinning (a gateway that kept spinning would burn a core: tens of
/// ticks per second even on a loaded machine).
#[test]
fn gateway_with_busy_polling_forwards_then_sleeps() {
    let origin = free_port();
    let _o = start(&["--serve", &format!("127.0.0.1:{origin}")], origin);
    let gw = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[coap]\nbind = [\"127.0.0.1:{gw}\"]\nnstart = 8\nbusy_poll_us = 2000\n\
             [policy]\nplain_forwarding = true\n"
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _g = Guard(child);
    let end = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", gw)).is_ok() {
        assert!(Instant::now() < end, "gateway on port {gw} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = run_load(&[
        &format!("coap://127.0.0.1:{origin}/x"),
        "--proxy",
        &format!("coap://127.0.0.1:{gw}"),
        "--proxy-scheme",
        "--count",
        "500",
        "--window",
        "8",
    ]);
    assert_sane(&r, 500);
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_ticks(pid) - before;
    assert!(
        idle < 20,
        "the gateway used {idle} ticks in 1 s without traffic"
    );
}

/// Starts `oscore-gateway run --config CONFIG [--credentials CREDS]` and waits for its port.
fn start_gateway(config: &Path, creds: Option<&Path>, port: u16) -> Guard {
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(config);
    if let Some(c) = creds {
        cmd.arg("--credentials").arg(c);
    }
    let guard = Guard(cmd.stdout(Stdio::null()).spawn().unwrap());
    let end = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < end, "gateway on port {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

/// Writes `n` context pairs under `dir` (gateway side `gw/cI`, origin side `srv/cI`, each
/// with its own secret and the gateway's Sender ID I), the gateway's credentials (pattern
/// `coap://127.0.0.1:ORIGIN/cI/*` per context, or one `/*` pattern for `gw/c0` when
/// `one_pattern`) and the origin's (`:cI`). Returns (gateway creds, origin creds).
fn write_context_pairs(
    dir: &Path,
    n: usize,
    origin: u16,
    one_pattern: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut gw = serde_json::Map::new();
    let mut srv = serde_json::Map::new();
    for i in 0..n {
        let secret = format!(r#""secret_ascii": "spread secret {i}""#);
        for (side, s, r) in [
            ("gw", format!("{i:06x}"), "01".to_string()),
            ("srv", "01".to_string(), format!("{i:06x}")),
        ] {
            let d = dir.join(side).join(format!("c{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("settings.json"),
                format!(r#"{{"sender-id_hex": "{s}", "recipient-id_hex": "{r}", {secret}}}"#),
            )
            .unwrap();
        }
        let basedir =
            serde_json::json!({"oscore": {"basedir": dir.join("gw").join(format!("c{i}"))}});
        if one_pattern {
            if i == 0 {
                gw.insert(format!("coap://127.0.0.1:{origin}/*"), basedir);
            }
        } else {
            gw.insert(format!("coap://127.0.0.1:{origin}/c{i}/*"), basedir);
        }
        srv.insert(
            format!(":c{i}"),
            serde_json::json!({"oscore": {"basedir": dir.join("srv").join(format!("c{i}"))}}),
        );
    }
    let g = dir.join("gw.json");
    let s = dir.join("server.json");
    std::fs::write(&g, Value::Object(gw).to_string()).unwrap();
    std::fs::write(&s, Value::Object(srv).to_string()).unwrap();
    (g, s)
}

fn oscore_gateway_config(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let p = dir.join("gw.toml");
    std::fs::write(
        &p,
        format!(
            "[coap]\nbind = [\"127.0.0.1:{port}\"]\nnstart = 8\n[policy]\nplain_forwarding = false\n{extra}"
        ),
    )
    .unwrap();
    p
}

/// `n` context pairs, an OSCORE origin and a gateway with one pattern per context; sends
/// `n * per_context` requests at `window` round-robin over them through the gateway
/// (`--spread`), checks that all succeeded, stops both (SIGTERM: the gateway writes each
/// open context's exact sequence number), and checks that every context's sequence.json
/// says it protected at least its share.
fn spread_through_gateway(n: usize, per_context: usize, window: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let origin = free_port();
    let gw_port = free_port();
    let (gw_creds, srv_creds) = write_context_pairs(tmp.path(), n, origin, false);
    let config = oscore_gateway_config(tmp.path(), gw_port, "");
    let o = start(
        &[
            "--serve",
            &format!("127.0.0.1:{origin}"),
            "--credentials",
            srv_creds.to_str().unwrap(),
        ],
        origin,
    );
    let g = start_gateway(&config, Some(&gw_creds), gw_port);
    let count = n * per_context;
    let r = run_load(&[
        &format!("coap://127.0.0.1:{origin}/c{{i}}/x"),
        "--spread",
        &n.to_string(),
        "--proxy",
        &format!("coap://127.0.0.1:{gw_port}"),
        "--proxy-scheme",
        "--count",
        &count.to_string(),
        "--window",
        &window.to_string(),
    ]);
    assert_sane(&r, count as u64);
    drop(g);
    drop(o);
    for i in 0..n {
        let f = tmp
            .path()
            .join("gw")
            .join(format!("c{i}"))
            .join("sequence.json");
        let text = std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("context c{i} was never opened ({}): {e}", f.display()));
        let v: Value = serde_json::from_str(&text).unwrap();
        let next = v["next-to-send"].as_u64().unwrap();
        assert!(
            next >= per_context as u64,
            "context c{i} protected fewer than its {per_context} requests: {text}"
        );
    }
}

/// `--spread 3`: the requests go round-robin to .../c0/x, .../c1/x, .../c2/x, so the gateway
/// uses (opens, on first use) each of the three contexts; after it closed them, every
/// context's sequence.json says it protected its share of the requests.
#[test]
fn spread_uses_every_context() {
    spread_through_gateway(3, 10, 4);
    // --spread needs {i} in the URI
    let out = Command::new(BIN)
        .args(["load", "coap://127.0.0.1:9/x", "--spread", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("{i}"));
}

/// More credentials entries than `gateway::MANY_CONTEXTS`, and a window that makes requests
/// arrive in batches: each batched request then prefetches its memoised context's lines and
/// yields before it protects (`gateway::Arrival`); `load --serve` prefetches its batches
/// too. Every request must still succeed through the right context (each is verified by its
/// own origin-side context), and each context must have protected its share. The first of
/// the four passes opens every context; the later ones take the prefetching way.
#[test]
fn batched_requests_over_many_contexts() {
    spread_through_gateway(oscore_gateway::gateway::MANY_CONTEXTS + 44, 4, 64);
}

/// An OSCORE `load --serve` origin (notifying every 100 ms) behind an OSCORE gateway with
/// `[observe] max_relations`, for the `--observe` tests. `unknown_window`: the origin
/// starts as after a crash (App. B.1.2), so its first answers are 4.01 + Echo.
struct ObserveSetup {
    _tmp: tempfile::TempDir,
    origin: u16,
    gw_port: u16,
    serve: Option<Child>,
    gateway: Option<Guard>,
}

impl ObserveSetup {
    fn start(max_relations: u32, unknown_window: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let origin = free_port();
        let gw_port = free_port();
        let (gw_creds, srv_creds) = write_context_pairs(tmp.path(), 1, origin, true);
        let config = oscore_gateway_config(
            tmp.path(),
            gw_port,
            &format!("[observe]\nmax_relations = {max_relations}\n"),
        );
        if unknown_window {
            std::fs::write(
                tmp.path().join("srv").join("c0").join("sequence.json"),
                r#"{"next-to-send": 50, "received": "unknown"}"#,
            )
            .unwrap();
        }
        let serve = Command::new(BIN)
            .args([
                "load",
                "--serve",
                &format!("127.0.0.1:{origin}"),
                "--credentials",
                srv_creds.to_str().unwrap(),
                "--notify-ms",
                "100",
                "--max-seconds",
                "60",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while UdpSocket::bind(("127.0.0.1", origin)).is_ok() {
            assert!(Instant::now() < end, "origin did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let gateway = start_gateway(&config, Some(&gw_creds), gw_port);
        Self {
            _tmp: tmp,
            origin,
            gw_port,
            serve: Some(serve),
            gateway: Some(gateway),
        }
    }

    /// `load --observe` arguments toward the origin's /obs through the gateway.
    fn target_args(&self) -> [String; 4] {
        [
            format!("coap://127.0.0.1:{}/obs", self.origin),
            "--proxy".into(),
            format!("coap://127.0.0.1:{}", self.gw_port),
            "--proxy-scheme".into(),
        ]
    }

    /// `load --observe RELATIONS --window WINDOW --hold HOLD` through the gateway; its
    /// JSON report (the run must succeed).
    fn observe(&self, relations: &str, window: &str, hold: &str) -> Value {
        let t = self.target_args();
        run_load(&[
            &t[0],
            &t[1],
            &t[2],
            &t[3],
            "--observe",
            relations,
            "--window",
            window,
            "--hold",
            hold,
        ])
    }

    /// Stops the gateway, then the origin (SIGTERM); the origin's exit summary (stdout).
    fn stop(&mut self) -> String {
        drop(self.gateway.take());
        let Some(o) = self.serve.take() else {
            return String::new();
        };
        sigterm(o.id());
        String::from_utf8_lossy(&o.wait_with_output().unwrap().stdout).into_owned()
    }
}

impl Drop for ObserveSetup {
    fn drop(&mut self) {
        if let Some(mut o) = self.serve.take() {
            let _ = o.kill();
            let _ = o.wait();
        }
    }
}

/// `--observe 20` through the gateway to an OSCORE `--serve` origin: every relation is
/// registered, gets notifications and is deregistered; the origin then holds none.
#[test]
fn observe_through_gateway_to_serve() {
    // The origin restarts with an unknown replay window (App. B.1.2): the registrations
    // are the first requests it gets on the context, it answers them 4.01 + Echo and the
    // gateway registers again with the Echo.
    let mut setup = ObserveSetup::start(20, true);
    let r = setup.observe("20", "8", "1.5");
    assert_eq!(r["registered"], 20, "{r}");
    assert_eq!(r["relations_notified"], 20, "{r}");
    assert!(
        r["min_notifications_per_relation"].as_u64().unwrap() >= 3,
        "{r}"
    );
    assert_eq!(r["ended_by_server"], 0, "{r}");
    assert_eq!(r["deregistered"], 20, "{r}");
    assert_eq!(r["timeouts"], 0, "{r}");
    // A 21st relation beyond max_relations = 20 would be refused; 20 were held at once.
    let summary = setup.stop();
    assert!(
        summary.contains("observe relations open at exit 0, registered 20, deregistered 20"),
        "{summary}"
    );
}

/// `--observe` over the gateway's `max_relations`: the relations beyond it are refused
/// with 5.03, and the report says why with the first diagnostic payload of that code.
#[test]
fn observe_report_names_the_refusal_and_its_diagnostic() {
    let mut setup = ObserveSetup::start(2, false);
    let t = setup.target_args();
    let out = Command::new(BIN)
        .arg("load")
        .args(&t)
        .args([
            "--observe",
            "4",
            "--window",
            "4",
            "--hold",
            "0.5",
            "--json",
            "--duration-limit",
            "30",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "some registrations failed");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["registered"], 2, "{r}");
    assert_eq!(r["error_codes"]["5.03 Service Unavailable"], 2, "{r}");
    let diag = r["first_diagnostics"]["5.03 Service Unavailable"]
        .as_str()
        .unwrap_or_default();
    assert!(diag.contains("observe.max_relations"), "{r}");
    setup.stop();
}

/// 200 registrations through the gateway, 64 at once, each on its own upstream socket:
/// they reach the origin in the order of their sequence numbers, so none falls behind the
/// origin's replay window (before the gateway waited for a new socket to be writable
/// before protecting, a few were refused with "Replay detected" and the client got 5.02).
#[test]
fn concurrent_observe_registrations_keep_sequence_order() {
    let mut setup = ObserveSetup::start(200, false);
    let r = setup.observe("200", "64", "0.3");
    assert_eq!(r["registered"], 200, "{r}");
    assert_eq!(r["registration_failures"], 0, "{r}");
    setup.stop();
}
