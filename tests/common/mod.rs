//! Shared harness for the integration tests that talk to a real aiocoap 0.4.17 peer.
//!
//! It wraps the scripts in `../shared/interop/` (see their README): `setup.sh` (venv with
//! aiocoap, once per test binary), `make_contexts.py`, `start_aiocoap_oscore_server.sh`,
//! `stop_pid.sh` and `wire_check.sh`. Every test gets its own directory ([`TestDir`]) that
//! serves as `INTEROP_DIR` for the scripts (a `venv` symlink points at the shared venv), and
//! its own UDP port ([`free_udp_port`]), so tests can run in parallel. Every wait is bounded
//! and every process a test starts is stopped by PID when its guard is dropped, also when
//! the test panics.
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long setup.sh may take (a first pip install on a slow machine).
const SETUP_TIMEOUT: Duration = Duration::from_secs(1200);
/// Default bound for one `request` run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// wire_check.sh bounds its command by 300 s and tcpdump by 330 s; this is the outer bound.
const WIRE_CHECK_TIMEOUT: Duration = Duration::from_secs(360);

/// Env var: run the `request` tests against another client, to check the harness itself.
/// `aiocoap` = `../shared/interop/aiocoap_oscore_get.py` (takes the same arguments), any
/// other value = path of a binary that is called as `BINARY request ARGS...`.
pub const CLIENT_OVERRIDE_ENV: &str = "INTEROP_REQUEST_CLIENT";

// ------------------------------------------------------------------ paths and setup

/// Where things are. Created once per test binary by [`interop`].
#[derive(Debug)]
pub struct Interop {
    /// The crate root (`CARGO_MANIFEST_DIR`).
    pub repo: PathBuf,
    /// `../shared` next to the crate root (read-only).
    pub shared: PathBuf,
    /// `../shared/interop`, the scripts.
    pub scripts: PathBuf,
    /// `target/interop` of this crate: holds the venv and the per-test directories.
    pub base: PathBuf,
    /// `target/interop/venv/bin/python` (aiocoap 0.4.17).
    pub venv_python: PathBuf,
    /// `../shared/vectors/rfc8613-appendix-c.json`.
    pub vectors: PathBuf,
}

impl Interop {
    pub fn script(&self, name: &str) -> PathBuf {
        self.scripts.join(name)
    }

    /// A file under `tests/interop/` of this crate.
    pub fn test_tool(&self, name: &str) -> PathBuf {
        self.repo.join("tests").join("interop").join(name)
    }
}

/// Runs `setup.sh` once per test binary (a fast no-op when the venv is there) and returns
/// the paths. Panics in every test that calls it if the setup failed.
pub fn interop() -> &'static Interop {
    static INTEROP: OnceLock<Result<Interop, String>> = OnceLock::new();
    let result = INTEROP.get_or_init(|| {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let shared = repo.join("..").join("shared");
        let shared = shared.canonicalize().map_err(|e| {
            format!(
                "{} not found ({e}): the interop tests need the shared folder next to the crate",
                shared.display()
            )
        })?;
        let scripts = shared.join("interop");
        let base = repo.join("target").join("interop");
        fs::create_dir_all(&base).map_err(|e| format!("mkdir {}: {e}", base.display()))?;
        let mut cmd = Command::new(scripts.join("setup.sh"));
        cmd.current_dir(&repo).env("INTEROP_DIR", &base);
        let out = run_with_timeout(cmd, SETUP_TIMEOUT);
        if !out.status.success() {
            return Err(format!(
                "{}/setup.sh failed ({}):\n{}",
                scripts.display(),
                out.status,
                output_text(&out)
            ));
        }
        Ok(Interop {
            venv_python: base.join("venv").join("bin").join("python"),
            vectors: shared.join("vectors").join("rfc8613-appendix-c.json"),
            repo,
            shared,
            scripts,
            base,
        })
    });
    match result {
        Ok(i) => i,
        Err(e) => panic!("interop setup failed: {e}"),
    }
}

/// A per-test directory under `target/interop/tests/`, used as `INTEROP_DIR` for the
/// scripts. Removed on drop, but kept (and its path printed) when the test panicked.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let i = interop();
        let parent = i.base.join("tests");
        fs::create_dir_all(&parent).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir_in(&parent)
            .unwrap();
        let path = dir.path().to_path_buf();
        // the scripts look for $INTEROP_DIR/venv
        std::os::unix::fs::symlink(i.base.join("venv"), path.join("venv")).unwrap();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if thread::panicking() {
                let kept = dir.keep();
                eprintln!("[harness] test failed: kept {}", kept.display());
            }
        }
    }
}

// ------------------------------------------------------------------ ports

/// A port that is free for UDP and TCP on 127.0.0.1 right now (aiocoap's `--bind` opens
/// both), and not handed out before by this test binary. Picked at random below the
/// kernel's ephemeral range (32768+ on Linux), so client sockets of other processes do not
/// take it between this check and the server's bind.
pub fn free_udp_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    let seed = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..500 {
        let mut h = seed.build_hasher();
        h.write_u32(attempt);
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 12000) as u16;
        let mut set = given.lock().unwrap();
        if set.contains(&port) {
            continue;
        }
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        if udp.is_ok() && tcp.is_ok() {
            set.insert(port);
            return port;
        }
    }
    panic!("no free UDP+TCP port found in 20000..32000 after 500 attempts");
}

// ------------------------------------------------------------------ contexts

/// Runs `make_contexts.py OUTDIR PAIRS... --port PORT` with OUTDIR = `dir/ctx` and returns
/// OUTDIR. `pairs` are (name, hex sender id), e.g. `[("client1", "01")]`. The client
/// credentials `OUTDIR/NAME.json` carry the pattern `coap://localhost:PORT/*`.
pub fn make_contexts(dir: &Path, port: u16, pairs: &[(&str, &str)]) -> PathBuf {
    make_contexts_in(&dir.join("ctx"), "localhost", port, pairs)
}

/// [`make_contexts`] with an explicit output directory and host spelling.
pub fn make_contexts_in(outdir: &Path, host: &str, port: u16, pairs: &[(&str, &str)]) -> PathBuf {
    let i = interop();
    let mut cmd = Command::new(&i.venv_python);
    cmd.arg(i.script("make_contexts.py")).arg(outdir);
    // the pairs must follow OUTDIR directly (argparse: positionals before options)
    for (name, id) in pairs {
        cmd.arg(format!("{name}={id}"));
    }
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--host")
        .arg(host);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "make_contexts.py failed:\n{}",
        output_text(&out)
    );
    outdir.to_path_buf()
}

/// The client side context directory of pair `name` made by [`make_contexts`].
pub fn client_ctx(ctx: &Path, name: &str) -> PathBuf {
    ctx.join(name).join("for-fileserver")
}

/// The server side context directory of pair `name` made by [`make_contexts`].
pub fn server_ctx(ctx: &Path, name: &str) -> PathBuf {
    ctx.join("server").join(format!("from-{name}"))
}

/// The client credentials JSON of pair `name` made by [`make_contexts`].
pub fn client_creds(ctx: &Path, name: &str) -> PathBuf {
    ctx.join(format!("{name}.json"))
}

/// The `received` part of aiocoap's `sequence.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// `"unknown"`: written while a server runs; App. B.1.2 recovery after a crash.
    Unknown,
    /// `{"index": null, "bitfield": null}`, which aiocoap loads like "unknown".
    Null,
    /// `{"index": I, "bitfield": B}`: bit k of B = sequence number I+k was seen.
    Window { index: u64, bitfield: u128 },
}

impl Received {
    /// The highest sequence number the window has marked as seen.
    pub fn highest_seen(&self) -> Option<u64> {
        match self {
            Received::Window { index, bitfield } if *bitfield != 0 => {
                Some(index + u64::from(127 - bitfield.leading_zeros()))
            }
            _ => None,
        }
    }
}

/// aiocoap's `sequence.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceState {
    pub next_to_send: u64,
    pub received: Received,
}

/// Reads `DIR/sequence.json`; `None` if the file does not exist (fresh context).
/// Panics (naming the file) on anything aiocoap would not have written.
pub fn read_sequence(ctx_dir: &Path) -> Option<SequenceState> {
    let path = ctx_dir.join("sequence.json");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text:?}", path.display()));
    let next_to_send = v["next-to-send"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no integer next-to-send: {text}", path.display()));
    let r = &v["received"];
    let received = if r == "unknown" {
        Received::Unknown
    } else if r["index"].is_null() && r["bitfield"].is_null() && r.is_object() {
        Received::Null
    } else {
        let index = r["index"].as_u64();
        // the bitfield is a Python int; with the default window of 32 it fits easily
        let bitfield = r["bitfield"].as_u64().map(u128::from).or_else(|| {
            r["bitfield"]
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f < 2f64.powi(127))
                .map(|f| f as u128)
        });
        match (index, bitfield) {
            (Some(index), Some(bitfield)) => Received::Window { index, bitfield },
            _ => panic!("{}: cannot read received: {text}", path.display()),
        }
    };
    Some(SequenceState {
        next_to_send,
        received,
    })
}

/// PIDs holding a lock on `path` according to /proc/locks (matched by inode), with the
/// lock type (`FLOCK`, `POSIX`, `OFDLCK`).
pub fn lock_holders(path: &Path) -> Vec<(u32, String)> {
    let Ok(meta) = fs::metadata(path) else {
        return Vec::new();
    };
    let ino = meta.ino().to_string();
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut holders = Vec::new();
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 12345 00:2a:1234 0 EOF" (blocked waiters have "->")
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] == "->" {
            continue;
        }
        if f[5].rsplit(':').next() == Some(ino.as_str()) {
            if let Ok(pid) = f[4].parse() {
                holders.push((pid, f[1].to_string()));
            }
        }
    }
    holders
}

// ------------------------------------------------------------------ processes

/// Text of an Output for failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "--- status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// true if the process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ..." — comm may contain spaces and parentheses
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (a process this test started).
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a PID we started; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits (bounded) until `pid` is gone or a zombie.
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !pid_alive(pid)
}

/// Polls `cond` every 20 ms until it is true or `timeout` passed; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

type SharedBuf = Arc<Mutex<Vec<u8>>>;

fn drain(mut r: impl Read + Send + 'static, buf: SharedBuf) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// A child process in its own process group, with stdin from /dev/null and stdout/stderr
/// collected by threads (so a chatty child never blocks on a full pipe). Drop kills the
/// whole group with SIGKILL and reaps the child, so nothing outlives a failing test.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    stdout: SharedBuf,
    stderr: SharedBuf,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(cmd: Command) -> ChildGuard {
        Self::spawn_inner(cmd, None)
    }

    /// Like [`ChildGuard::spawn`], with `input` written to the child's stdin (then closed).
    pub fn spawn_with_input(cmd: Command, input: Vec<u8>) -> ChildGuard {
        Self::spawn_inner(cmd, Some(input))
    }

    fn spawn_inner(mut cmd: Command, input: Option<Vec<u8>>) -> ChildGuard {
        let what = format!("{cmd:?}");
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout: SharedBuf = Arc::default();
        let stderr: SharedBuf = Arc::default();
        let mut readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone()),
            drain(child.stderr.take().unwrap(), stderr.clone()),
        ];
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            // a thread, so a child that does not read cannot block us; EOF on drop
            readers.push(thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut stdin, &data);
            }));
        }
        ChildGuard {
            child: Some(child),
            what,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// true while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => {
                self.status = Some(st);
                false
            }
            Some(Ok(None)) => true,
            _ => false,
        }
    }

    /// What the child wrote to stdout so far.
    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_so_far(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) until stdout contains `needle`; false on timeout or exit.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            String::from_utf8_lossy(&self.stdout_so_far()).contains(needle) || !self.is_running()
        }) && String::from_utf8_lossy(&self.stdout_so_far()).contains(needle)
    }

    /// SIGKILL to the child's process group (the child and whatever it started).
    pub fn kill9(&mut self) {
        if self.is_running() {
            let pid = self.pid();
            // SAFETY: kill(2) on the process group we created for this child.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }

    /// Waits for the child to exit, at most `timeout`; on timeout kills the group and says
    /// so on the returned stderr. Output is whatever was collected.
    pub fn wait_timeout(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while self.is_running() {
            if Instant::now() >= deadline {
                timed_out = true;
                self.kill9();
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let status = self.reap();
        // readers end at EOF; a grandchild still holding the pipe must not hang us
        let readers_deadline = Instant::now() + Duration::from_secs(5);
        for r in self.readers.drain(..) {
            while !r.is_finished() && Instant::now() < readers_deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let mut stderr = self.stderr_so_far();
        if timed_out {
            stderr.extend_from_slice(
                format!(
                    "\n[harness] killed after the {} s timeout: {}\n",
                    timeout.as_secs_f32(),
                    self.what
                )
                .as_bytes(),
            );
        }
        Output {
            status,
            stdout: self.stdout_so_far(),
            stderr,
        }
    }

    fn reap(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        match self.child.as_mut() {
            Some(c) => {
                let st = c.wait().unwrap_or_else(|_| ExitStatus::from_raw(9));
                self.status = Some(st);
                st
            }
            None => ExitStatus::from_raw(9),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
            self.reap();
        }
    }
}

/// Runs `cmd` (stdin /dev/null) and returns its output; kills it after `timeout`.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Output {
    ChildGuard::spawn(cmd).wait_timeout(timeout)
}

/// Runs `cmd` with `input` on stdin and returns its output; kills it after `timeout`.
pub fn run_with_input(cmd: Command, input: Vec<u8>, timeout: Duration) -> Output {
    ChildGuard::spawn_with_input(cmd, input).wait_timeout(timeout)
}

// ------------------------------------------------------------------ the `request` client

/// The command for `oscore-gateway request`, or for the client named by
/// `INTEROP_REQUEST_CLIENT` (see [`CLIENT_OVERRIDE_ENV`]), run in `cwd`. Append the
/// request's arguments.
pub fn request_command(cwd: &Path) -> Command {
    let i = interop();
    let mut cmd = match std::env::var_os(CLIENT_OVERRIDE_ENV) {
        None => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_oscore-gateway"));
            c.arg("request");
            c
        }
        Some(v) if v == "aiocoap" => {
            eprintln!(
                "[harness] {CLIENT_OVERRIDE_ENV}=aiocoap: testing aiocoap_oscore_get.py, NOT oscore-gateway"
            );
            let mut c = Command::new(&i.venv_python);
            c.arg(i.script("aiocoap_oscore_get.py"));
            c
        }
        Some(bin) => {
            eprintln!("[harness] {CLIENT_OVERRIDE_ENV}: testing {bin:?} request, NOT this build");
            let mut c = Command::new(bin);
            c.arg("request");
            c
        }
    };
    cmd.current_dir(cwd).env("INTEROP_DIR", cwd);
    cmd
}

/// Runs one `request` with `args` in `cwd`, bounded by `timeout` (killed after it).
pub fn run_request<S: AsRef<OsStr>>(cwd: &Path, args: &[S], timeout: Duration) -> Output {
    let mut cmd = request_command(cwd);
    cmd.args(args);
    run_with_timeout(cmd, timeout)
}

/// Starts one `request` in the background (killed on drop).
pub fn spawn_request<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> ChildGuard {
    let mut cmd = request_command(cwd);
    cmd.args(args);
    ChildGuard::spawn(cmd)
}

/// The argv of [`request_command`] plus `args`, for wrapping in wire_check.sh.
pub fn request_argv<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> Vec<OsString> {
    let cmd = request_command(cwd);
    let mut v = vec![cmd.get_program().to_os_string()];
    v.extend(cmd.get_args().map(|a| a.to_os_string()));
    v.extend(args.iter().map(|a| a.as_ref().to_os_string()));
    v
}

// ------------------------------------------------------------------ aiocoap-fileserver

/// `aiocoap-fileserver` as an OSCORE origin on 127.0.0.1, started with
/// start_aiocoap_oscore_server.sh and stopped with stop_pid.sh (SIGTERM: clean shutdown,
/// exact sequence.json) when dropped.
pub struct AiocoapServer {
    pub pid: u32,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    interop_dir: PathBuf,
    creds: Option<PathBuf>,
    writable: bool,
    running: bool,
}

impl AiocoapServer {
    /// Starts the server on `port`, serving `data_dir` (created with hello.txt and
    /// big10k.txt if missing), with server credentials `creds` (None: plain CoAP only),
    /// allowing PUT/DELETE if `writable`. `interop_dir` is the test's INTEROP_DIR.
    pub fn start(
        interop_dir: &Path,
        port: u16,
        data_dir: &Path,
        creds: Option<&Path>,
        writable: bool,
    ) -> AiocoapServer {
        let mut s = AiocoapServer {
            pid: 0,
            port,
            data_dir: data_dir.to_path_buf(),
            log: interop_dir
                .join("logs")
                .join(format!("aiocoap-fileserver-{port}.log")),
            interop_dir: interop_dir.to_path_buf(),
            creds: creds.map(Path::to_path_buf),
            writable,
            running: false,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        assert!(
            !self.running,
            "server on port {} is already running",
            self.port
        );
        let i = interop();
        let mut cmd = Command::new(i.script("start_aiocoap_oscore_server.sh"));
        cmd.current_dir(&self.interop_dir)
            .env("INTEROP_DIR", &self.interop_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .arg("-c");
        match &self.creds {
            Some(c) => cmd.arg(c),
            None => cmd.arg("-"),
        };
        if self.writable {
            cmd.arg("-w");
        }
        let out = run_with_timeout(cmd, Duration::from_secs(40));
        let pid = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>();
        match pid {
            Ok(pid) if out.status.success() => {
                self.pid = pid;
                self.running = true;
            }
            _ => panic!(
                "start_aiocoap_oscore_server.sh -p {} failed:\n{}",
                self.port,
                output_text(&out)
            ),
        }
    }

    /// Clean stop (SIGTERM, then SIGKILL after 10 s). Returns true if SIGTERM sufficed,
    /// i.e. aiocoap wrote the exact sequence.json and removed `lock`.
    pub fn stop(&mut self) -> bool {
        if !self.running {
            return true;
        }
        self.running = false;
        let mut cmd = Command::new(interop().script("stop_pid.sh"));
        cmd.arg(self.pid.to_string());
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        wait_pid_gone(self.pid, Duration::from_secs(5));
        out.status.success()
    }

    /// SIGKILL: no clean shutdown, the server's sequence.json keeps "received": "unknown".
    pub fn kill9(&mut self) {
        if self.running {
            send_signal(self.pid, libc::SIGKILL);
            assert!(
                wait_pid_gone(self.pid, Duration::from_secs(10)),
                "aiocoap-fileserver {} survived SIGKILL",
                self.pid
            );
            self.running = false;
        }
    }

    /// Starts it again with the same port, data, credentials (after stop or kill9; a
    /// running server is stopped cleanly first).
    pub fn restart(&mut self) {
        self.stop();
        // the killed process's sockets are closed; the start script re-checks the port
        self.launch();
    }

    pub fn is_running(&self) -> bool {
        self.running && pid_alive(self.pid)
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for AiocoapServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "[harness] aiocoap-fileserver port {} log tail ({}):\n{}",
                self.port,
                self.log.display(),
                self.log_tail(30)
            );
        }
        self.stop();
    }
}

// ------------------------------------------------------------------ wire checks

/// The `wire_check.sh` command line: capture loopback UDP while `cmd` runs, decode `ports`
/// as CoAP, with `require_port` exit 4 if a plain request reached it; keep the capture at
/// `pcap` if given. Temp files go to `interop_dir`.
pub fn wire_check_command<S: AsRef<OsStr>>(
    interop_dir: &Path,
    ports: &[u16],
    require_port: Option<u16>,
    pcap: Option<&Path>,
    cmd: &[S],
) -> Command {
    let mut c = Command::new(interop().script("wire_check.sh"));
    c.current_dir(interop_dir).env("INTEROP_DIR", interop_dir);
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        c.arg("-p").arg(list.join(","));
    }
    if let Some(p) = require_port {
        c.arg("-r").arg(p.to_string());
    }
    if let Some(p) = pcap {
        c.arg("-w").arg(p);
    }
    c.arg("--").args(cmd);
    c
}

/// Runs `cmd` under wire_check.sh (needs root, tcpdump, tshark: `setup.sh --apt`).
/// tcpdump sees all loopback UDP, so judge only this test's own ports. Exit status: the
/// command's, 4 if a plain request reached `require_port`, 5 if no CoAP was captured.
pub fn run_wire_check<S: AsRef<OsStr>>(
    interop_dir: &Path,
    ports: &[u16],
    require_port: Option<u16>,
    pcap: Option<&Path>,
    cmd: &[S],
) -> Output {
    let c = wire_check_command(interop_dir, ports, require_port, pcap, cmd);
    run_with_timeout(c, WIRE_CHECK_TIMEOUT)
}

/// One CoAP message from a capture, as tshark decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    pub frame: u64,
    pub src_port: u16,
    pub dst_port: u16,
    /// 0 CON, 1 NON, 2 ACK, 3 RST
    pub mtype: u8,
    /// outer code as a number (class * 32 + detail): 2 = POST, 68 = 2.04
    pub code: u8,
    pub mid: u16,
    pub token: String,
    /// outer option names, e.g. ["Uri-Host", "OSCORE"]
    pub options: Vec<String>,
    /// kid in the OSCORE option (hex), if any
    pub kid: Option<String>,
    /// Partial IV in the OSCORE option as a number, if any
    pub piv: Option<u64>,
    /// inner code when tshark could decrypt it (make_contexts.py's secret, kids 01..04)
    pub inner_code: Option<u8>,
}

impl WireMessage {
    pub fn is_request(&self) -> bool {
        (1..=31).contains(&self.code)
    }

    pub fn is_oscore(&self) -> bool {
        self.options.iter().any(|o| o == "OSCORE")
    }
}

/// Every CoAP message to or from `port` in `pcap`, in capture order. OSCORE is decrypted
/// for make_contexts.py's contexts with kids 01..04 (as wire_check.sh does) where tshark can.
pub fn capture_messages(pcap: &Path, port: u16) -> Vec<WireMessage> {
    let conf = tempfile::tempdir().unwrap();
    let ws = conf.path().join("wireshark");
    fs::create_dir_all(&ws).unwrap();
    let secret = hex::encode("Correct Horse Battery Staple");
    let file = hex::encode("file");
    let uat: String = ["01", "02", "03", "04"]
        .iter()
        .map(|k| {
            format!("\"{k}\",\"{file}\",\"{secret}\",\"\",\"\",\"AES-CCM-16-64-128 (CCM*)\"\n")
        })
        .collect();
    fs::write(ws.join("oscore_contexts"), uat).unwrap();
    let mut cmd = Command::new("tshark");
    // every occurrence of a field, joined by ',' (several outer options); single-valued
    // fields are read with first()
    cmd.env("XDG_CONFIG_HOME", conf.path())
        .arg("-r")
        .arg(pcap)
        .arg("-d")
        .arg(format!("udp.port=={port},coap"))
        .arg("-Y")
        .arg(format!("coap && udp.port=={port}"))
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=a"])
        .args(["-E", "aggregator=,"]);
    for f in [
        "frame.number",
        "udp.srcport",
        "udp.dstport",
        "coap.type",
        "coap.code",
        "coap.mid",
        "coap.token",
        "coap.opt.name",
        "coap.opt.object_security_kid",
        "coap.opt.object_security_piv",
        "oscore.code",
    ] {
        cmd.arg("-e").arg(f);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "tshark on {} failed:\n{}",
        pcap.display(),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_wire_line(l).unwrap_or_else(|| panic!("unexpected tshark line {l:?}")))
        .collect()
}

fn first(field: &str) -> &str {
    field.split(',').next().unwrap_or("")
}

fn parse_wire_line(line: &str) -> Option<WireMessage> {
    let f: Vec<&str> = line.split('|').collect();
    if f.len() < 11 {
        return None;
    }
    let opt_hex = |s: &str| {
        let s = first(s).replace(':', "");
        (!s.is_empty()).then_some(s)
    };
    Some(WireMessage {
        frame: first(f[0]).parse().ok()?,
        src_port: first(f[1]).parse().ok()?,
        dst_port: first(f[2]).parse().ok()?,
        mtype: first(f[3]).parse().ok()?,
        code: first(f[4]).parse().ok()?,
        mid: first(f[5]).parse().ok()?,
        token: first(f[6]).replace(':', ""),
        options: f[7]
            .split(',')
            .filter(|s| !s.is_empty())
            // tshark 4.0 prefixes each name with "#N: "
            .map(|s| s.rsplit(": ").next().unwrap_or(s).to_string())
            .collect(),
        kid: opt_hex(f[8]),
        piv: opt_hex(f[9])
            .map(|h| u64::from_str_radix(&h, 16).ok())
            .unwrap_or(None),
        inner_code: first(f[10]).parse().ok(),
    })
}

/// Requests in `msgs` sent to `port` whose OSCORE kid is `kid`, without CoAP
/// retransmissions (same source port and MID counted once).
pub fn oscore_requests_to(msgs: &[WireMessage], port: u16, kid: &str) -> Vec<WireMessage> {
    let mut seen = HashSet::new();
    msgs.iter()
        .filter(|m| m.dst_port == port && m.is_request() && m.kid.as_deref() == Some(kid))
        .filter(|m| seen.insert((m.src_port, m.mid)))
        .cloned()
        .collect()
}

/// Requests in `msgs` sent to `port` without an OSCORE option.
pub fn plain_requests_to(msgs: &[WireMessage], port: u16) -> Vec<WireMessage> {
    msgs.iter()
        .filter(|m| m.dst_port == port && m.is_request() && !m.is_oscore())
        .cloned()
        .collect()
}

/// A per-port summary for failure messages.
pub fn describe_capture(msgs: &[WireMessage]) -> String {
    let mut per_port: BTreeMap<(u16, bool), usize> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.is_request()) {
        *per_port.entry((m.dst_port, m.is_oscore())).or_default() += 1;
    }
    let mut s = String::new();
    for m in msgs.iter().take(60) {
        s.push_str(&format!("{m:?}\n"));
    }
    if msgs.len() > 60 {
        s.push_str(&format!("... {} more\n", msgs.len() - 60));
    }
    for ((port, oscore), n) in per_port {
        s.push_str(&format!(
            "requests to {port} ({}): {n}\n",
            if oscore { "OSCORE" } else { "plain" }
        ));
    }
    s
}

// ------------------------------------------------------------------ misc

/// A plain UDP socket on 127.0.0.1:port and, where IPv6 loopback exists, [::1]:port, to
/// prove that nothing is sent to a port.
pub struct UdpSilence {
    sockets: Vec<UdpSocket>,
}

impl UdpSilence {
    pub fn bind(port: u16) -> UdpSilence {
        let mut sockets = vec![UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:{port}: {e}"))];
        if let Ok(s) = UdpSocket::bind((Ipv6Addr::LOCALHOST, port)) {
            sockets.push(s);
        }
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
        }
        UdpSilence { sockets }
    }

    /// Every datagram that arrived so far, waiting `grace` for late ones, as
    /// "source: hex" lines.
    pub fn received(&self, grace: Duration) -> Vec<String> {
        thread::sleep(grace);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for s in &self.sockets {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                got.push(format!("{from}: {}", hex::encode(&buf[..n])));
            }
        }
        got
    }
}

/// Writes `len` bytes of deterministic, non-repeating-looking content (so a misplaced block
/// is caught by a byte compare).
pub fn write_test_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    let mut x: u32 = 0x1234_5678 ^ len as u32;
    while data.len() < len {
        // xorshift32
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    fs::write(path, &data).unwrap();
    data
}

/// Prints an Output when a check fails (use in assert messages).
pub fn show(what: &str, out: &Output) -> String {
    format!("{what}:\n{}", output_text(out))
}
