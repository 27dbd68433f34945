//! Issue 4, acceptance "Observe from an OSCORE client through the gateway to a plain device
//! resource that changes", with real aiocoap peers on loopback: the device is
//! tests/interop/observable_server.py --plain (/tick changes every 0.3 s), the client is
//! aiocoap with a `:client1` context the gateway holds (tests/interop/aiocoap_oscore_observe.py,
//! which prints only notifications aiocoap verified). The client's deregistration, and
//! gateway shutdown, must end the observation at the device (its observer count drops to 0).

mod common;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;

/// `oscore-gateway run --config CONFIG --coap-bind 127.0.0.1:PORT`; SIGTERM on drop.
struct Gateway {
    child: Option<ChildGuard>,
}

impl Gateway {
    fn start(dir: &Path, port: u16, config: &str) -> Gateway {
        let path = write_gateway_config(dir, port, config);
        let child = spawn_gateway_with_config(dir, &path, port);
        Gateway { child: Some(child) }
    }

    fn log(&self) -> String {
        gateway_log(&self.child)
    }

    /// SIGTERM and wait (bounded); the log.
    fn stop(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        send_signal(child.pid(), libc::SIGTERM);
        output_text(&child.wait_timeout(Duration::from_secs(15)))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let log = self.stop();
        if thread::panicking() {
            eprintln!("[gateway] {log}");
        }
    }
}

/// The plain device: observable_server.py --plain on `port`.
fn start_device(dir: &Path, port: u16) -> ChildGuard {
    let mut cmd = Command::new(&interop().venv_python);
    cmd.current_dir(dir)
        .arg(interop().test_tool("observable_server.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg("-")
        .arg("--plain");
    let mut child = ChildGuard::spawn(cmd);
    assert!(
        child.wait_for_stdout("READY", Duration::from_secs(30)),
        "observable_server.py did not start:\n{}",
        String::from_utf8_lossy(&child.stderr_so_far())
    );
    child
}

fn out(c: &ChildGuard) -> String {
    String::from_utf8_lossy(&c.stdout_so_far()).into_owned()
}

/// The device's observer counts, in order ("OBSERVERS n" lines).
fn observer_counts(device: &ChildGuard) -> Vec<usize> {
    out(device)
        .lines()
        .filter_map(|l| l.strip_prefix("OBSERVERS "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The client script's verified payloads with prefix `what` ("FIRST", "NOTIFY").
fn lines_with(text: &str, what: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(what))
        .map(|l| l.trim().to_string())
        .collect()
}

struct Setup {
    dir: TestDir,
    device: ChildGuard,
    gw: Gateway,
    url: String,
    creds: std::path::PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = TestDir::new(name);
    let gw_port = free_udp_port();
    let device_port = free_udp_port();
    let ctx = make_contexts(dir.path(), gw_port, &[("client1", "01")]);
    let device = start_device(dir.path(), device_port);
    let config = format!(
        "credentials = {:?}\n[policy]\nupstream_timeout_secs = 5\n\
         [[route]]\ntarget = \"coap://127.0.0.1:{device_port}\"\nrequire_oscore = true\n\
         allow = [\":client1\"]\n",
        ctx.join("server.json")
    );
    let gw = Gateway::start(dir.path(), gw_port, &config);
    Setup {
        creds: client_creds(&ctx, "client1"),
        url: format!("coap://localhost:{gw_port}/tick"),
        dir,
        device,
        gw,
    }
}

fn client_command(s: &Setup, count: usize, extra: &[&str]) -> Command {
    let mut cmd = Command::new(&interop().venv_python);
    cmd.current_dir(s.dir.path())
        .arg(interop().test_tool("aiocoap_oscore_observe.py"))
        .arg(&s.url)
        .arg(&s.creds)
        .arg(count.to_string())
        .args(extra);
    cmd
}

/// At least 3 verified notifications whose payloads change ("tick N" rising).
fn assert_changing_notifications(text: &str, context: &str) {
    let first = lines_with(text, "FIRST ");
    let notes = lines_with(text, "NOTIFY ");
    assert_eq!(first.len(), 1, "{text}\n{context}");
    assert!(
        notes.len() >= 3,
        "fewer than 3 notifications:\n{text}\n{context}"
    );
    let ticks: Vec<u64> = first
        .iter()
        .chain(&notes)
        .map(|p| {
            p.strip_prefix("tick ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected payload {p:?}\n{context}"))
        })
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[0] < w[1]),
        "payloads did not change (or went backwards): {ticks:?}\n{context}"
    );
}

fn assert_device_observers_drop_to_zero(s: &Setup, how: &str) {
    let dropped = wait_until(Duration::from_secs(10), || {
        observer_counts(&s.device).last() == Some(&0)
    });
    assert!(
        dropped && observer_counts(&s.device).contains(&1),
        "device observers after {how}: {:?}\ndevice:\n{}\ngateway:\n{}",
        observer_counts(&s.device),
        out(&s.device),
        s.gw.log()
    );
}

#[test]
fn oscore_client_observes_plain_device_then_deregisters() {
    let s = setup("in-obs-dereg");
    let result = run_with_timeout(client_command(&s, 3, &[]), Duration::from_secs(60));
    let text = String::from_utf8_lossy(&result.stdout).into_owned();
    let context = format!(
        "client: {}\ndevice:\n{}\ngateway:\n{}",
        output_text(&result),
        out(&s.device),
        s.gw.log()
    );
    assert!(result.status.success(), "{context}");
    assert_changing_notifications(&text, &context);
    // the deregistration's answer is the device's (final, verified) response
    assert!(
        text.lines()
            .any(|l| l.starts_with("DEREGISTERED 2.05 Content tick ")),
        "{context}"
    );
    assert_device_observers_drop_to_zero(&s, "the client's deregistration");
    let log = s.gw.log();
    assert!(
        log.contains(":client1: observing coap://127.0.0.1:"),
        "{log}"
    );
    assert!(log.contains("observation cancelled upstream"), "{log}");
}

#[test]
fn gateway_shutdown_cancels_the_inbound_observation() {
    let mut s = setup("in-obs-shutdown");
    let mut client = ChildGuard::spawn(client_command(&s, 3, &["--no-deregister"]));
    let done = client.wait_for_stdout("DONE", Duration::from_secs(30));
    let text = out(&client);
    assert!(
        done,
        "client:\n{text}\n{}\ndevice:\n{}\ngateway:\n{}",
        String::from_utf8_lossy(&client.stderr_so_far()),
        out(&s.device),
        s.gw.log()
    );
    assert_changing_notifications(&text, &s.gw.log());
    assert_eq!(observer_counts(&s.device).last(), Some(&1));
    let log = s.gw.stop();
    assert!(log.contains("observation cancelled upstream"), "{log}");
    assert_device_observers_drop_to_zero(&s, "gateway shutdown");
    drop(client);
}
