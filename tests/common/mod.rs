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

mod aiocoap;
mod gateway;
mod process;
mod wire;

// not every test binary uses every part
#[allow(unused_imports)]
pub use aiocoap::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use wire::*;

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

/// Panics unless `got == want`, saying where they differ (not thousands of numbers);
/// `context` (e.g. [`show`] of the process output) is added to the message.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8], context: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let excerpt = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.min(b.len())..(at + 60).min(b.len())]).into_owned()
    };
    panic!(
        "{what}: got {} bytes, want {}; first difference at offset {at}: got {:?}, want {:?}\n{context}",
        got.len(),
        want.len(),
        excerpt(got),
        excerpt(want)
    );
}

/// Prints an Output when a check fails (use in assert messages).
pub fn show(what: &str, out: &Output) -> String {
    format!("{what}:\n{}", output_text(out))
}
