//! The aiocoap side: contexts (make_contexts.py, sequence.json, lock) and the
//! aiocoap-fileserver origin.

use super::*;

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
