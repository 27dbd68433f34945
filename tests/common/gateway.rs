//! Starting `oscore-gateway run` for the gateway tests.

use std::ffi::OsStr;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use super::free_udp_port;
use super::process::{output_text, send_signal, wait_until, ChildGuard};

/// Writes `config` to `DIR/proxy-PORT.toml` and returns its path.
pub fn write_gateway_config(dir: &Path, port: u16, config: &str) -> PathBuf {
    let path = dir.join(format!("proxy-{port}.toml"));
    fs::write(&path, config).unwrap();
    path
}

/// Runs `oscore-gateway run ARGS --coap-bind 127.0.0.1:PORT` in `dir` with info logs and
/// waits (bounded, 20 s) until it reports that it is listening; panics with its log if not.
pub fn spawn_gateway(dir: &Path, args: &[&OsStr], port: u16) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oscore-gateway"));
    cmd.current_dir(dir)
        .arg("run")
        .args(args)
        .arg("--coap-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("OSCORE_GATEWAY_LOG", "info");
    let mut child = ChildGuard::spawn(cmd);
    let ready = wait_until(Duration::from_secs(20), || {
        String::from_utf8_lossy(&child.stderr_so_far()).contains("listening on")
            || !child.is_running()
    });
    assert!(
        ready && child.is_running(),
        "gateway did not start:\n{}",
        String::from_utf8_lossy(&child.stderr_so_far())
    );
    child
}

/// `spawn_gateway` with `--config CONFIG_FILE`.
pub fn spawn_gateway_with_config(dir: &Path, config_file: &Path, port: u16) -> ChildGuard {
    spawn_gateway(dir, &["--config".as_ref(), config_file.as_os_str()], port)
}

/// What the gateway logged so far (empty once it was stopped).
pub fn gateway_log(child: &Option<ChildGuard>) -> String {
    child
        .as_ref()
        .map(|c| String::from_utf8_lossy(&c.stderr_so_far()).into_owned())
        .unwrap_or_default()
}

/// A running `oscore-gateway run` on 127.0.0.1:`port`: SIGTERM on `stop` or drop, and on
/// drop during a panic its log goes to stderr.
pub struct Gateway {
    child: Option<ChildGuard>,
    pub port: u16,
}

#[allow(dead_code)] // each test binary uses its own part of it
impl Gateway {
    /// `--config CONFIG` (written to DIR) on a free port.
    pub fn start(dir: &Path, config: &str) -> Gateway {
        Self::start_on(dir, config, free_udp_port())
    }

    /// `--config CONFIG` (written to DIR) on `port`.
    pub fn start_on(dir: &Path, config: &str, port: u16) -> Gateway {
        let path = write_gateway_config(dir, port, config);
        let child = spawn_gateway_with_config(dir, &path, port);
        Gateway {
            child: Some(child),
            port,
        }
    }

    /// `run ARGS` on `port`.
    pub fn start_with(dir: &Path, args: &[&OsStr], port: u16) -> Gateway {
        Gateway {
            child: Some(spawn_gateway(dir, args, port)),
            port,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What it logged so far (empty once stopped).
    pub fn log(&self) -> String {
        gateway_log(&self.child)
    }

    /// SIGTERM and its exit (waits up to 20 s); an empty `Output` if already stopped.
    pub fn stop(&mut self) -> Output {
        let Some(child) = self.child.take() else {
            return Output {
                status: ExitStatus::default(),
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
        };
        send_signal(child.pid(), libc::SIGTERM);
        child.wait_timeout(Duration::from_secs(20))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.child.is_some() {
            let out = self.stop();
            if std::thread::panicking() {
                eprintln!("[gateway {}] {}", self.port, output_text(&out));
            }
        }
    }
}
