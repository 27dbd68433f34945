//! `proxy.toml` -> a typed, validated gateway configuration. Every error names the file and
//! the key at fault (`proxy.toml: route[2].target: ...`).
//!
//! Relative paths (`credentials`) are resolved against the folder of the config file, so a
//! config works from any working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::coap::CoapUri;
use crate::gateway::blockwise::{self, Limits};

/// RFC 8768 §3: the initial Hop-Limit value a proxy adds when a request has none.
pub const DEFAULT_HOP_LIMIT: u8 = 16;
/// How long the gateway waits for an origin before answering 5.04 (RFC 7252 §5.9.3.5).
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: f64 = 20.0;
/// The default CoAP listener (RFC 7252 §6.1 port on loopback).
pub const DEFAULT_BIND: &str = "127.0.0.1:5683";
/// RFC 7252 §4.7: outstanding interactions per origin.
pub const DEFAULT_NSTART: u16 = 1;
/// RFC 7252 §4.8: ACK_TIMEOUT toward origins.
pub const DEFAULT_ACK_TIMEOUT_SECS: f64 = 2.0;
/// Upper bound of `coap.busy_poll_us` (0.1 s: longer spinning saves nothing more).
pub const MAX_BUSY_POLL_US: u32 = 100_000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type.
    #[error("{}: {key}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        /// The dotted key (`coap.bind`, `route[1].target`) or `(document)`.
        key: String,
        message: String,
    },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// `proxy.toml` as written (serde); see `proxy.toml.example` for the meaning of each key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    credentials: Option<PathBuf>,
    #[serde(default)]
    coap: RawCoap,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    blockwise: RawBlockwise,
    #[serde(default)]
    observe: RawObserve,
    #[serde(default)]
    route: Vec<RawRoute>,
}

/// `[observe]`: observations relayed across the hop (RFC 7641).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawObserve {
    max_relations: usize,
}

impl Default for RawObserve {
    fn default() -> Self {
        Self {
            max_relations: crate::gateway::observe::DEFAULT_MAX_RELATIONS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoap {
    #[serde(default = "default_bind")]
    bind: Vec<String>,
    #[serde(default = "default_max_message_size")]
    max_message_size: usize,
    #[serde(default = "default_nstart")]
    nstart: u16,
    #[serde(default = "default_ack_timeout")]
    ack_timeout_secs: f64,
    #[serde(default)]
    busy_poll_us: u32,
}

impl Default for RawCoap {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            max_message_size: default_max_message_size(),
            nstart: DEFAULT_NSTART,
            ack_timeout_secs: DEFAULT_ACK_TIMEOUT_SECS,
            busy_poll_us: 0,
        }
    }
}

fn default_max_message_size() -> usize {
    blockwise::DEFAULT_MAX_MESSAGE_SIZE
}

/// `[blockwise]`: caps of the gateway's reassembly buffers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBlockwise {
    max_body_size: usize,
    idle_timeout_secs: f64,
    max_transfers: usize,
}

impl Default for RawBlockwise {
    fn default() -> Self {
        Self {
            max_body_size: blockwise::DEFAULT_MAX_BODY_SIZE,
            idle_timeout_secs: blockwise::DEFAULT_IDLE_TIMEOUT.as_secs_f64(),
            max_transfers: blockwise::DEFAULT_MAX_TRANSFERS,
        }
    }
}

fn default_nstart() -> u16 {
    DEFAULT_NSTART
}

fn default_ack_timeout() -> f64 {
    DEFAULT_ACK_TIMEOUT_SECS
}

fn default_bind() -> Vec<String> {
    vec![DEFAULT_BIND.to_string()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    plain_forwarding: bool,
    #[serde(default = "default_timeout")]
    upstream_timeout_secs: f64,
    #[serde(default = "default_hop_limit")]
    hop_limit: u8,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            plain_forwarding: false,
            upstream_timeout_secs: DEFAULT_UPSTREAM_TIMEOUT_SECS,
            hop_limit: DEFAULT_HOP_LIMIT,
        }
    }
}

fn default_timeout() -> f64 {
    DEFAULT_UPSTREAM_TIMEOUT_SECS
}

fn default_hop_limit() -> u8 {
    DEFAULT_HOP_LIMIT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    match_path: Option<String>,
    match_host: Option<String>,
    target: String,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    passthrough: bool,
    #[serde(default)]
    require_oscore: bool,
    #[serde(default)]
    allow: Vec<String>,
}

/// The validated configuration of `oscore-gateway run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (None: built-in defaults).
    pub source: Option<PathBuf>,
    /// aiocoap credentials JSON, resolved against the config file's folder. None: no
    /// credentials, so no request is protected (and, unless `plain_forwarding`, none is
    /// forwarded).
    pub credentials: Option<PathBuf>,
    /// UDP listeners.
    pub coap_bind: Vec<SocketAddr>,
    /// `coap.busy_poll_us`: after any datagram, the gateway's thread keeps polling its
    /// sockets (instead of sleeping in epoll) for this long, so the next datagram is
    /// picked up without waking a halted CPU. Zero (the default): off. Costs one core
    /// busy while traffic flows, nothing when idle.
    pub busy_poll: Duration,
    pub policy: Policy,
    /// Block-wise buffers and the upstream maximum message size (`[blockwise]`,
    /// `coap.max_message_size`).
    pub blockwise: Limits,
    pub routes: Vec<Route>,
    /// The message layer toward origins (`[coap]`).
    pub upstream: UpstreamConfig,
    /// Observations relayed at once, at most (`observe.max_relations`); each holds one
    /// UDP socket toward its origin.
    pub max_observe_relations: usize,
}

/// `[coap]` keys of the message layer toward origins (RFC 7252 §4.7, §4.8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpstreamConfig {
    /// Outstanding interactions per origin (NSTART, 1..=64).
    pub nstart: u16,
    /// ACK_TIMEOUT: first retransmission after 1-1.5 times this, doubled each time.
    pub ack_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            nstart: DEFAULT_NSTART,
            ack_timeout: Duration::from_secs_f64(DEFAULT_ACK_TIMEOUT_SECS),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Forward requests that match no credential in plain text.
    pub plain_forwarding: bool,
    /// Total time allowed for one upstream exchange (all retransmissions included).
    pub upstream_timeout: Duration,
    /// RFC 8768: Hop-Limit added to forwarded requests that carry none (1..=255).
    pub hop_limit: u8,
}

/// A reverse-proxy route for requests without Proxy-Uri / Proxy-Scheme.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Uri-Path segments the request path must start with (empty: any path).
    pub match_path: Vec<String>,
    /// Uri-Host the request must carry (lower-cased), if set.
    pub match_host: Option<String>,
    /// Origin base URI: scheme, host, port, and optional leading path segments.
    pub target: CoapUri,
    /// Remove `match_path` from the path before appending it to the target's path.
    pub strip_prefix: bool,
    /// OSCORE requests whose kid the gateway holds no context for are forwarded here
    /// untouched (RFC 8613 §10: as an OSCORE-unaware proxy). Only the outer message is
    /// seen, so `match_path` cannot match them (Uri-Path is encrypted); use `match_host`
    /// or no match at all.
    pub passthrough: bool,
    /// Plain (unprotected) requests on this route are refused with 4.01.
    pub require_oscore: bool,
    /// Server-side credential labels (`":client1"`) whose OSCORE requests may use this
    /// route; others get a protected 4.03. Empty: every label. Non-empty implies
    /// `require_oscore` (a plain request has no label to allow).
    pub allow: Vec<String>,
}

impl Route {
    /// Whether a request without OSCORE must be refused on this route.
    pub fn refuses_plain(&self) -> bool {
        self.require_oscore || !self.allow.is_empty()
    }

    /// Whether the server-side credential `label` may use this route.
    pub fn allows_label(&self, label: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|a| a == label)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: None,
            credentials: None,
            coap_bind: vec![DEFAULT_BIND.parse().expect("literal address")],
            busy_poll: Duration::ZERO,
            policy: Policy {
                plain_forwarding: false,
                upstream_timeout: Duration::from_secs_f64(DEFAULT_UPSTREAM_TIMEOUT_SECS),
                hop_limit: DEFAULT_HOP_LIMIT,
            },
            blockwise: Limits::default(),
            routes: Vec::new(),
            upstream: UpstreamConfig::default(),
            max_observe_relations: crate::gateway::observe::DEFAULT_MAX_RELATIONS,
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses `text` as if read from `path` (errors name it, relative paths use its folder).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            key: e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or_else(|| "(document)".into()),
            message: e.message().trim().to_string(),
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let base = path.parent().unwrap_or(Path::new(""));

        let credentials = raw.credentials.map(|c| base.join(c));
        if raw.coap.bind.is_empty() {
            return Err(invalid(
                "coap.bind".into(),
                "must list at least one ADDR:PORT".into(),
            ));
        }
        let mut coap_bind = Vec::with_capacity(raw.coap.bind.len());
        for (i, b) in raw.coap.bind.iter().enumerate() {
            coap_bind.push(parse_bind(b).map_err(|m| invalid(format!("coap.bind[{i}]"), m))?);
        }
        if !(1..=64).contains(&raw.coap.nstart) {
            return Err(invalid(
                "coap.nstart".into(),
                format!("{} is not 1..=64 (RFC 7252 §4.7)", raw.coap.nstart),
            ));
        }
        let ack = raw.coap.ack_timeout_secs;
        if !(ack.is_finite() && (0.05..=60.0).contains(&ack)) {
            return Err(invalid(
                "coap.ack_timeout_secs".into(),
                format!("{ack} is not a number of seconds in [0.05, 60]"),
            ));
        }
        if raw.coap.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(invalid(
                "coap.busy_poll_us".into(),
                format!(
                    "{} is not in 0..={MAX_BUSY_POLL_US} microseconds",
                    raw.coap.busy_poll_us
                ),
            ));
        }
        let busy_poll = Duration::from_micros(u64::from(raw.coap.busy_poll_us));
        let upstream = UpstreamConfig {
            nstart: raw.coap.nstart,
            ack_timeout: Duration::from_secs_f64(ack),
        };
        let p = raw.policy;
        if !(p.upstream_timeout_secs.is_finite()
            && p.upstream_timeout_secs > 0.0
            && p.upstream_timeout_secs <= 3600.0)
        {
            return Err(invalid(
                "policy.upstream_timeout_secs".into(),
                format!(
                    "{} is not a number of seconds in (0, 3600]",
                    p.upstream_timeout_secs
                ),
            ));
        }
        if p.hop_limit == 0 {
            return Err(invalid(
                "policy.hop_limit".into(),
                "must be 1..=255 (RFC 8768 §3)".into(),
            ));
        }
        let b = raw.blockwise;
        // The smallest outer Block1 fragment (16 bytes) plus a header, token and options
        // must fit; below 64 bytes nothing useful does.
        if raw.coap.max_message_size < 64 {
            return Err(invalid(
                "coap.max_message_size".into(),
                format!("{} is below 64 bytes", raw.coap.max_message_size),
            ));
        }
        if b.max_body_size == 0 {
            return Err(invalid(
                "blockwise.max_body_size".into(),
                "must be at least 1 byte".into(),
            ));
        }
        if !(b.idle_timeout_secs.is_finite()
            && b.idle_timeout_secs > 0.0
            && b.idle_timeout_secs <= 3600.0)
        {
            return Err(invalid(
                "blockwise.idle_timeout_secs".into(),
                format!(
                    "{} is not a number of seconds in (0, 3600]",
                    b.idle_timeout_secs
                ),
            ));
        }
        if b.max_transfers == 0 {
            return Err(invalid(
                "blockwise.max_transfers".into(),
                "must be at least 1".into(),
            ));
        }
        let blockwise = Limits {
            max_body_size: b.max_body_size,
            idle_timeout: Duration::from_secs_f64(b.idle_timeout_secs),
            max_transfers: b.max_transfers,
            max_message_size: raw.coap.max_message_size,
        };
        if raw.observe.max_relations == 0 || raw.observe.max_relations > 65536 {
            return Err(invalid(
                "observe.max_relations".into(),
                format!("{} is not in 1..=65536", raw.observe.max_relations),
            ));
        }
        let mut routes = Vec::with_capacity(raw.route.len());
        for (i, r) in raw.route.into_iter().enumerate() {
            routes.push(validate_route(r).map_err(|(k, m)| invalid(format!("route[{i}].{k}"), m))?);
        }
        Ok(Config {
            source: Some(path.to_owned()),
            credentials,
            coap_bind,
            busy_poll,
            policy: Policy {
                plain_forwarding: p.plain_forwarding,
                upstream_timeout: Duration::from_secs_f64(p.upstream_timeout_secs),
                hop_limit: p.hop_limit,
            },
            blockwise,
            routes,
            upstream,
            max_observe_relations: raw.observe.max_relations,
        })
    }
}

/// `ADDR:PORT`, IPv6 as `[::1]:5683`.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not ADDR:PORT (IPv6 as [::1]:5683)"))
}

fn validate_route(r: RawRoute) -> Result<Route, (&'static str, String)> {
    let target = CoapUri::parse(&r.target).map_err(|e| ("target", e.to_string()))?;
    if target.scheme != "coap" {
        return Err((
            "target",
            format!(
                "scheme {}:// is not supported (only coap:// over UDP)",
                target.scheme
            ),
        ));
    }
    if !target.query.is_empty() {
        return Err(("target", "must not have a query".into()));
    }
    let match_path = match r.match_path {
        None => Vec::new(),
        Some(p) => {
            let Some(rest) = p.strip_prefix('/') else {
                return Err(("match_path", format!("{p:?} must start with '/'")));
            };
            rest.split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        }
    };
    if r.strip_prefix && match_path.is_empty() {
        return Err(("strip_prefix", "needs a match_path to strip".to_string()));
    }
    if let Some(bad) = r.allow.iter().find(|l| !l.starts_with(':') || l.len() < 2) {
        return Err((
            "allow",
            format!("{bad:?} is not a credential label (labels start with ':', e.g. \":client1\")"),
        ));
    }
    if r.passthrough && !match_path.is_empty() {
        return Err((
            "match_path",
            "a passthrough route sees only the outer OSCORE message, whose path is encrypted; match on match_host instead".to_string(),
        ));
    }
    Ok(Route {
        match_path,
        match_host: r.match_host.map(|h| h.to_ascii_lowercase()),
        target,
        strip_prefix: r.strip_prefix,
        passthrough: r.passthrough,
        require_oscore: r.require_oscore,
        allow: r.allow,
    })
}

/// The dotted key at byte offset `at` of a TOML document, for error messages: the last
/// `[table]` / `[[array]]` header before it (arrays of tables counted, `route[1]`) plus the
/// key on that line, if any. A heuristic for simple files like proxy.toml, not a TOML parser.
fn key_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = text[line_start..line_end].trim();
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    // A header line at `at` (e.g. a missing key of that table) counts as the table itself.
    let scan_end = if line.starts_with('[') {
        line_end
    } else {
        line_start
    };
    for l in text[..scan_end].lines().map(str::trim) {
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let key = if line.starts_with('[') {
        None
    } else {
        line.split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
    };
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(document)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/gw/proxy.toml"))
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
credentials = "creds.json"
[coap]
bind = ["127.0.0.1:5683", "[::1]:5683"]
[policy]
plain_forwarding = true
upstream_timeout_secs = 2.5
hop_limit = 8
[[route]]
match_path = "/sensors"
target = "coap://127.0.0.1:5684/base"
strip_prefix = true
[[route]]
match_host = "Light.example"
target = "coap://[::1]"
"#,
        )
        .unwrap();
        assert_eq!(c.credentials, Some(PathBuf::from("/etc/gw/creds.json")));
        assert_eq!(c.coap_bind.len(), 2);
        assert!(c.coap_bind[1].is_ipv6());
        assert!(c.policy.plain_forwarding);
        assert_eq!(c.policy.upstream_timeout, Duration::from_millis(2500));
        assert_eq!(c.policy.hop_limit, 8);
        assert_eq!(c.routes[0].match_path, vec!["sensors"]);
        assert_eq!(c.routes[0].target.path, vec!["base"]);
        assert!(c.routes[0].strip_prefix);
        assert_eq!(c.routes[1].match_host.as_deref(), Some("light.example"));
        assert!(!c.routes[0].refuses_plain());
        assert!(c.routes[0].allows_label(":anyone"));
    }

    #[test]
    fn access_control_and_passthrough_keys() {
        let c = parse(
            r#"
[[route]]
match_path = "/dev"
target = "coap://127.0.0.1:5690"
require_oscore = true
allow = [":client1", ":client2"]
[[route]]
match_host = "origin.example"
target = "coap://127.0.0.1:5691"
passthrough = true
[[route]]
match_path = "/open"
target = "coap://127.0.0.1:5692"
allow = [":client1"]
"#,
        )
        .unwrap();
        assert!(c.routes[0].require_oscore && c.routes[0].refuses_plain());
        assert!(c.routes[0].allows_label(":client2"));
        assert!(!c.routes[0].allows_label(":client3"));
        assert!(c.routes[1].passthrough && !c.routes[1].refuses_plain());
        // allow without require_oscore still refuses plain: plain requests carry no label
        assert!(c.routes[2].refuses_plain());

        let e = parse("[[route]]\ntarget = \"coap://a\"\nallow = [\"client1\"]\n").unwrap_err();
        assert!(e.to_string().contains("route[0].allow"), "{e}");
        let e =
            parse("[[route]]\ntarget = \"coap://a\"\nmatch_path = \"/x\"\npassthrough = true\n")
                .unwrap_err();
        assert!(e.to_string().contains("route[0].match_path"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.credentials, None);
        assert_eq!(c.coap_bind, vec!["127.0.0.1:5683".parse().unwrap()]);
        assert!(!c.policy.plain_forwarding);
        assert_eq!(c.policy.hop_limit, DEFAULT_HOP_LIMIT);
        assert_eq!(c.upstream, UpstreamConfig::default());
        assert_eq!(c.upstream.nstart, 1);
    }

    #[test]
    fn upstream_message_layer_keys() {
        let c = parse("[coap]\nnstart = 4\nack_timeout_secs = 0.5\n").unwrap();
        assert_eq!(c.upstream.nstart, 4);
        assert_eq!(c.upstream.ack_timeout, Duration::from_millis(500));
        let e = parse("[coap]\nnstart = 0\n").unwrap_err();
        assert!(e.to_string().contains("coap.nstart"), "{e}");
        let e = parse("[coap]\nack_timeout_secs = 0\n").unwrap_err();
        assert!(e.to_string().contains("coap.ack_timeout_secs"), "{e}");
    }

    #[test]
    fn busy_poll_is_off_by_default_and_bounded() {
        assert_eq!(parse("").unwrap().busy_poll, Duration::ZERO);
        assert_eq!(Config::default().busy_poll, Duration::ZERO);
        let c = parse("[coap]\nbusy_poll_us = 50\n").unwrap();
        assert_eq!(c.busy_poll, Duration::from_micros(50));
        let e = parse("[coap]\nbusy_poll_us = 100001\n").unwrap_err();
        assert!(e.to_string().contains("coap.busy_poll_us"), "{e}");
    }

    #[test]
    fn blockwise_limits() {
        let c = parse(
            "[coap]\nmax_message_size = 600\n[blockwise]\nmax_body_size = 4096\nidle_timeout_secs = 5\nmax_transfers = 2\n",
        )
        .unwrap();
        assert_eq!(
            c.blockwise,
            Limits {
                max_body_size: 4096,
                idle_timeout: Duration::from_secs(5),
                max_transfers: 2,
                max_message_size: 600,
            }
        );
        assert_eq!(parse("").unwrap().blockwise, Limits::default());
        for (text, key) in [
            ("[coap]\nmax_message_size = 10\n", "coap.max_message_size"),
            (
                "[blockwise]\nmax_body_size = 0\n",
                "blockwise.max_body_size",
            ),
            (
                "[blockwise]\nidle_timeout_secs = -1\n",
                "blockwise.idle_timeout_secs",
            ),
            (
                "[blockwise]\nmax_transfers = 0\n",
                "blockwise.max_transfers",
            ),
        ] {
            let s = parse(text).unwrap_err().to_string();
            assert!(s.starts_with(&format!("/etc/gw/proxy.toml: {key}:")), "{s}");
        }
    }

    #[test]
    fn observe_max_relations() {
        assert_eq!(
            parse("").unwrap().max_observe_relations,
            crate::gateway::observe::DEFAULT_MAX_RELATIONS
        );
        let c = parse("[observe]\nmax_relations = 3\n").unwrap();
        assert_eq!(c.max_observe_relations, 3);
        let s = parse("[observe]\nmax_relations = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            s.starts_with("/etc/gw/proxy.toml: observe.max_relations:"),
            "{s}"
        );
        assert!(parse("[observe]\nmax = 3\n").is_err());
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse("[policy]\nplain_forwarding = \"yes\"\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/gw/proxy.toml: policy.plain_forwarding:"),
            "{s}"
        );

        let e = parse("[[route]]\ntarget = \"coap://a\"\n[[route]]\ntarget = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("route[1].target"), "{e}");

        let e = parse("[[route]]\nmatch_path = \"/a\"\n").unwrap_err();
        assert!(
            e.to_string().contains("route[0]: missing field `target`"),
            "{e}"
        );
        let e = parse("[[route]]\ntarget = \"coap://a\"\n[[route]]\nmatch_path = \"/a\"\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("route[1]: missing field `target`"),
            "{e}"
        );

        let e = parse("[coap]\nbind = [\"localhost\"]\n").unwrap_err();
        assert!(e.to_string().contains("coap.bind[0]"), "{e}");

        let e = parse("[coap]\nbnd = []\n").unwrap_err();
        assert!(e.to_string().contains("coap.bnd"), "{e}");

        let e = parse("[policy]\nupstream_timeout_secs = 0\n").unwrap_err();
        assert!(
            e.to_string().contains("policy.upstream_timeout_secs"),
            "{e}"
        );

        let e = parse("[[route]]\ntarget = \"coaps://h\"\n").unwrap_err();
        assert!(e.to_string().contains("route[0].target"), "{e}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml.example");
        let c = Config::load(&path).unwrap();
        assert!(c.credentials.is_none() || c.credentials.as_ref().unwrap().exists());
    }
}
