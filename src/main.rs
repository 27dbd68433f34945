//! The `oscore-gateway` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the forwarding path allocates small buffers and
/// one multi-KiB task per request; with glibc, malloc/free were ~15 % of the gateway's
/// CPU under load (every >= 1 KiB request consolidates the fast bins, tokio's aligned task
/// allocations go through `_int_memalign`). See docs/PERFORMANCE.md, branch `hot`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli_oscore;
mod cli_request;
mod cli_run;

#[derive(Parser)]
#[command(
    name = "oscore-gateway",
    version,
    about = "An edge gateway for OSCORE (RFC 8613)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send one CoAP request, OSCORE-protected when --credentials has a matching entry.
    ///
    /// Payload goes to stdout (or -o), the response code to stderr; exit status 0 on 2.xx,
    /// 1 on another response code, 2 when no valid response was received or the request
    /// could not be sent (including: --credentials given but no pattern matches the URI).
    Request(RequestArgs),
    /// Run the gateway until SIGINT/SIGTERM: plain CoAP from clients is forwarded to
    /// origins, OSCORE-protected where the credentials have a matching entry.
    ///
    /// Settings come from --config (proxy.toml, see proxy.toml.example); the flags override
    /// it. Exit status 0 after a clean shutdown, 2 when the configuration, the credentials
    /// or a listener address is unusable.
    Run(RunArgs),
    /// Load-test a CoAP server or proxy (bounded: --count, --duration-limit), or serve as
    /// one of the peers a benchmark needs: --serve (minimal plain/OSCORE origin), --udp-echo,
    /// --udp-relay ... --to ...
    ///
    /// Exit status 0 when every request got a 2.xx answer, 1 when some failed, timed out or
    /// were unfinished, 2 when it could not run.
    Load(oscore_gateway::load::LoadArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// proxy.toml; without it: no credentials, listen on 127.0.0.1:5683
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// aiocoap credentials JSON (overrides the config's `credentials`; relative to the
    /// current directory)
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// UDP listener ADDR:PORT, e.g. 127.0.0.1:5683 or [::1]:5683; repeat for several
    /// (overrides the config's [coap] bind)
    #[arg(long = "coap-bind", value_name = "ADDR:PORT")]
    pub coap_bind: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RequestArgs {
    /// Method: GET, POST, PUT, DELETE, FETCH, PATCH, iPATCH (or a code like 0.01)
    #[arg(short = 'm', long = "method", default_value = "GET")]
    pub method: String,
    /// aiocoap credentials JSON; the URI must match one of its patterns (no plain fallback)
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Forward proxy to send through, e.g. coap://127.0.0.1:5690
    #[arg(long)]
    pub proxy: Option<String>,
    /// Request payload (UTF-8 text)
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the request payload from this file
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Content-Format of the payload (a number, e.g. 0 for text/plain)
    #[arg(long)]
    pub content_format: Option<u16>,
    /// Write the response payload here instead of stdout
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Give up after this many seconds in total
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Target URI, e.g. coap://localhost/file
    pub uri: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OSCORE_GATEWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Every open security context holds its lock file open, every Observe relation a
    // socket: take the descriptors the hard limit allows (a failure shows up, with the
    // limit named, where a lock file cannot be opened).
    if let Err(e) = oscore_gateway::credentials::fd_limit::raise_to_hard() {
        tracing::warn!("cannot raise RLIMIT_NOFILE to the hard limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Request(args) => runtime.block_on(cli_request::run(args)),
        Command::Run(args) => runtime.block_on(cli_run::run(args)),
        // Blocking sockets on their own threads, outside the runtime.
        Command::Load(args) => oscore_gateway::load::run(args),
    }
}
