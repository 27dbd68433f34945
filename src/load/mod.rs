//! `oscore-gateway load`: a bounded CoAP load generator and the minimal peers it is measured
//! against (issue 5).
//!
//! - [`client`]: the generator. One UDP socket, one thread, up to `--window` requests
//!   outstanding, matched by token; CON requests are retransmitted (RFC 7252 §4.2) a bounded
//!   number of times; plain or OSCORE (RFC 8613, with the library's context store).
//! - [`serve`]: `--serve ADDR`: a minimal origin answering every request with a fixed-size
//!   payload, plain or OSCORE (server side, with the App. B.1.2 Echo exchange).
//! - [`relay`]: `--udp-echo ADDR` and `--udp-relay ADDR --to ADDR`: the bare UDP echo and the
//!   simplest relay, which together are the machine's ceiling for one forwarding hop.
//! - [`observe`]: `--observe N`: N Observe relations held at once, notifications counted.
//! - [`stats`]: latency percentiles and the report (text or `--json`).
//!
//! Everything here is an I/O edge and uses blocking std sockets on dedicated threads: a
//! load tool must not be the bottleneck, and a single-threaded loop with `poll(2)` is the
//! cheapest way to drive one socket.

pub mod args;
pub mod client;
pub mod observe;
mod oscore_ctx;
pub mod relay;
pub mod serve;
mod signal;
pub mod stats;

pub use args::LoadArgs;
pub use client::{run_load, LoadConfig, LoadError, Method, ProxyForm};
pub use stats::Report;

use std::process::ExitCode;

/// Runs the `load` subcommand: one of the server modes, or the generator.
pub fn run(args: LoadArgs) -> ExitCode {
    match args.into_mode() {
        Ok(args::Mode::Echo { bind, max_seconds }) => exit(relay::udp_echo(&bind, max_seconds)),
        Ok(args::Mode::Relay {
            bind,
            to,
            max_seconds,
        }) => exit(relay::udp_relay(&bind, &to, max_seconds)),
        Ok(args::Mode::Serve(cfg)) => exit(serve::serve(&cfg).map_err(|e| e.to_string())),
        Ok(args::Mode::Observe {
            config,
            relations,
            hold,
            json,
        }) => match observe::run_observe(&config, relations, hold) {
            Ok(r) => print_report(json, || r.to_json(), || r.to_text(), r.all_ok()),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Ok(args::Mode::Load { config, json }) => match run_load(&config) {
            Ok(r) => {
                let ok = r.errors == 0 && r.timeouts == 0 && r.unfinished == 0;
                print_report(json, || r.to_json(), || r.to_text(), ok)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn exit(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints a run's report (one JSON object with `--json`, else text); exit status 0 when
/// everything succeeded, 1 otherwise.
fn print_report(
    json: bool,
    to_json: impl FnOnce() -> String,
    to_text: impl FnOnce() -> String,
    ok: bool,
) -> ExitCode {
    if json {
        println!("{}", to_json());
    } else {
        print!("{}", to_text());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
