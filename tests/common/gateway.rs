//! Starting `oscore-gateway run` for the gateway tests.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{wait_until, ChildGuard};

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
