//! The `load` subcommand's flags and the mode they select.

use std::path::PathBuf;
use std::time::Duration;

use crate::coap::CoapUri;

use super::client::{LoadConfig, Method, ProxyForm};
use super::serve::ServeConfig;

/// `oscore-gateway load`: generator by default; `--serve`, `--udp-echo` or `--udp-relay`
/// turn it into one of the peers it is measured against.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Target URI of the generator, e.g. coap://127.0.0.1:5683/load
    pub uri: Option<String>,
    /// Number of requests to complete (answered, failed or timed out)
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Requests outstanding at once
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Stop after this many seconds even if --count is not reached (the rest are reported
    /// as unfinished)
    #[arg(long, default_value_t = 60.0)]
    pub duration_limit: f64,
    /// aiocoap credentials JSON: the generator protects its requests with the context whose
    /// pattern matches the URI (no plain fallback); with --serve, the `:label` entries are
    /// the server's contexts
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Send through this forward proxy, e.g. coap://127.0.0.1:5690
    #[arg(long)]
    pub proxy: Option<String>,
    /// With --proxy: name the target with Proxy-Scheme + Uri-Host + Uri-Port + Uri-Path
    /// instead of Proxy-Uri
    #[arg(long)]
    pub proxy_scheme: bool,
    /// Send NON requests (no retransmission) instead of CON
    #[arg(long)]
    pub non: bool,
    /// GET or PUT
    #[arg(short = 'm', long = "method", default_value = "GET")]
    pub method: String,
    /// Bytes of payload: in each PUT request, or (with --serve) in each response to GET
    #[arg(long, default_value_t = 32)]
    pub payload_size: usize,
    /// Initial retransmission timeout for CON (RFC 7252 ACK_TIMEOUT), in milliseconds
    #[arg(long, default_value_t = 2000)]
    pub ack_timeout_ms: u64,
    /// Retransmissions of a CON request before it counts as timed out (RFC 7252 MAX_RETRANSMIT)
    #[arg(long, default_value_t = 4)]
    pub max_retransmit: u32,
    /// Give up on one request after this many seconds (CON and NON)
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the report as one JSON object
    #[arg(long)]
    pub json: bool,
    /// Serve as a minimal origin on ADDR:PORT (plain; OSCORE too with --credentials)
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["udp_echo", "udp_relay"])]
    pub serve: Option<String>,
    /// Bare UDP echo on ADDR:PORT: every datagram goes back to its sender unchanged
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "udp_relay")]
    pub udp_echo: Option<String>,
    /// Bare UDP relay on ADDR:PORT (needs --to): each client gets its own upstream socket
    #[arg(long, value_name = "ADDR:PORT", requires = "to")]
    pub udp_relay: Option<String>,
    /// Upstream ADDR:PORT of --udp-relay
    #[arg(long, value_name = "ADDR:PORT")]
    pub to: Option<String>,
    /// Spread the requests over N targets: `{i}` in the URI becomes 0..N-1, one target after
    /// the other (round-robin), e.g. coap://origin/c{i}/x with a credential pattern and a
    /// security context per target at the gateway. Plain requests only.
    #[arg(long, value_name = "N")]
    pub spread: Option<u32>,
    /// Hold N Observe relations (RFC 7641) on the URI instead of sending requests: register
    /// them (GET, Observe: 0, at most --window outstanding), count notifications for
    /// --hold seconds, then deregister (Observe: 1)
    #[arg(long, value_name = "N")]
    pub observe: Option<usize>,
    /// With --observe: seconds to hold the relations
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// --serve: each Observe relation gets a notification this often (milliseconds, >= 10)
    #[arg(long, default_value_t = 1000)]
    pub notify_ms: u64,
    /// --serve: Observe relations kept at once, at most
    #[arg(long, default_value_t = 100_000)]
    pub max_relations: usize,
    /// Server modes: exit after this many seconds (default: until SIGINT/SIGTERM)
    #[arg(long)]
    pub max_seconds: Option<f64>,
}

pub enum Mode {
    Load {
        config: Box<LoadConfig>,
        json: bool,
    },
    Serve(ServeConfig),
    Observe {
        config: Box<LoadConfig>,
        relations: usize,
        hold: Duration,
        json: bool,
    },
    Echo {
        bind: String,
        max_seconds: Option<f64>,
    },
    Relay {
        bind: String,
        to: String,
        max_seconds: Option<f64>,
    },
}

fn seconds(name: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "--{name} must be a positive number of seconds, not {v}"
        ))
    }
}

/// Largest `--observe`: relations share one socket and are told apart by token.
pub const MAX_OBSERVE: usize = 1_000_000;

/// Largest `--spread`: each target keeps one request template (tens of bytes) in memory.
pub const MAX_SPREAD: u32 = 1_000_000;

/// The `--spread N` targets: `{i}` in `template` replaced by 0..N-1.
fn spread_targets(template: &str, n: u32) -> Result<Vec<CoapUri>, String> {
    if n == 0 || n > MAX_SPREAD {
        return Err(format!("--spread must be 1..={MAX_SPREAD}, not {n}"));
    }
    if !template.contains("{i}") {
        return Err(format!(
            "--spread needs {{i}} in the URI (replaced by 0..{}), e.g. coap://host/c{{i}}/x; \
             {template} has none",
            n - 1
        ));
    }
    (0..n)
        .map(|i| {
            let text = template.replace("{i}", &i.to_string());
            CoapUri::parse(&text).map_err(|e| format!("--spread target {text}: {e}"))
        })
        .collect()
}

impl LoadArgs {
    pub fn into_mode(self) -> Result<Mode, String> {
        if let Some(s) = self.max_seconds {
            seconds("max-seconds", s)?;
        }
        if let Some(bind) = self.udp_echo {
            return Ok(Mode::Echo {
                bind,
                max_seconds: self.max_seconds,
            });
        }
        if let (Some(bind), Some(to)) = (self.udp_relay.clone(), self.to.clone()) {
            return Ok(Mode::Relay {
                bind,
                to,
                max_seconds: self.max_seconds,
            });
        }
        if let Some(bind) = self.serve {
            return Ok(Mode::Serve(ServeConfig {
                bind,
                credentials: self.credentials,
                payload_size: self.payload_size,
                max_seconds: self.max_seconds.map(Duration::from_secs_f64),
                notify_interval: Duration::from_millis(self.notify_ms)
                    .max(super::serve::MIN_NOTIFY_INTERVAL),
                max_relations: self.max_relations.min(super::serve::MAX_RELATIONS_LIMIT),
            }));
        }
        let uri_text = self.uri.ok_or(
            "a target URI is needed (or one of --serve, --udp-echo, --udp-relay)".to_string(),
        )?;
        let spread = match self.spread {
            None => Vec::new(),
            Some(n) => spread_targets(&uri_text, n)?,
        };
        let first = uri_text.replace("{i}", "0");
        let uri = CoapUri::parse(&first).map_err(|e| format!("{uri_text}: {e}"))?;
        let proxy = match &self.proxy {
            Some(p) => Some(CoapUri::parse(p).map_err(|e| format!("--proxy {p}: {e}"))?),
            None => None,
        };
        let method = match self.method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            other => return Err(format!("--method must be GET or PUT, not {other:?}")),
        };
        if self.window == 0 || self.window > 65_535 {
            return Err(format!("--window must be 1..=65535, not {}", self.window));
        }
        let config = LoadConfig {
            uri,
            spread,
            proxy,
            proxy_form: if self.proxy_scheme {
                ProxyForm::ProxyScheme
            } else {
                ProxyForm::ProxyUri
            },
            credentials: self.credentials,
            count: self.count,
            window: self.window,
            duration_limit: seconds("duration-limit", self.duration_limit)?,
            confirmable: !self.non,
            method,
            payload_size: self.payload_size,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms.max(1)),
            max_retransmit: self.max_retransmit,
            timeout: seconds("timeout", self.timeout)?,
        };
        if let Some(n) = self.observe {
            if n == 0 || n > MAX_OBSERVE {
                return Err(format!("--observe must be 1..={MAX_OBSERVE}, not {n}"));
            }
            return Ok(Mode::Observe {
                config: Box::new(config),
                relations: n,
                hold: seconds("hold", self.hold)?,
                json: self.json,
            });
        }
        Ok(Mode::Load {
            config: Box::new(config),
            json: self.json,
        })
    }
}
