//! `oscore-gateway run`: configuration (file, then flags), listeners, and the signals that
//! end it (SIGINT, SIGTERM) with a graceful shutdown.

use std::process::ExitCode;

use oscore_gateway::config::{parse_bind, Config};
use oscore_gateway::gateway::{self, Gateway, Listeners};

use crate::RunArgs;

const FAILED: u8 = 2;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(FAILED)
}

pub async fn run(args: RunArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
        None => Config::default(),
    };
    if let Some(c) = args.credentials {
        config.credentials = Some(c);
    }
    if !args.coap_bind.is_empty() {
        let mut binds = Vec::with_capacity(args.coap_bind.len());
        for b in &args.coap_bind {
            match parse_bind(b) {
                Ok(a) => binds.push(a),
                Err(e) => return fail(format!("--coap-bind: {e}")),
            }
        }
        config.coap_bind = binds;
    }
    if config.credentials.is_none() {
        eprintln!(
            "warning: no credentials configured: no request will be OSCORE-protected{}",
            if config.policy.plain_forwarding {
                ", all are forwarded in plain text (policy.plain_forwarding)"
            } else {
                ", and all forward requests are refused (policy.plain_forwarding = false)"
            }
        );
    }
    let listeners = match Listeners::bind(&config.coap_bind).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let gw = match Gateway::new(config) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    for a in listeners.local_addrs() {
        eprintln!("oscore-gateway: listening on coap://{a}");
    }
    gateway::run(gw, listeners, shutdown).await;
    eprintln!("oscore-gateway: stopped");
    ExitCode::SUCCESS
}

/// Completes at the first SIGINT or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
