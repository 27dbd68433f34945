//! The gateway: the per-request decision (DESIGN.md §1) and its paths.
//!
//! For a plain request from a legacy client: find the target (forward proxy or `[[route]]`,
//! `target`), check the Hop-Limit, then look the target URI up in the credentials:
//! - a credential matches: protect toward the origin with its context (`contexts`,
//!   `forward`); if the context cannot be opened or used the client gets 5.03, never a
//!   plain-text request to the origin;
//! - nothing matches: forward in plain only if `policy.plain_forwarding`, else 5.05.
//!
//! The UDP side (message layer toward clients, deduplication) is in `server`.

pub mod contexts;
pub mod dedup;
pub mod forward;
pub mod reply;
pub mod server;
pub mod target;
pub mod upstream;

use thiserror::Error;

use crate::client::Plain;
use crate::coap::{number, Code, MessageView};
use crate::config::Config;
use crate::credentials::{CredentialsError, CredentialsMap};

pub use contexts::{find_credential, ContextCache, ContextError, OscoreProtection};
pub use server::{run, Listeners};
pub use target::{Refusal, Target, TargetKind};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("credentials (from {}): {}", config.as_deref().map_or("--credentials".into(), |p| p.display().to_string()), contexts::error_chain(source))]
    Credentials {
        config: Option<std::path::PathBuf>,
        source: CredentialsError,
    },
    #[error("cannot bind the CoAP listener {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The configured gateway, shared by every request.
pub struct Gateway {
    config: Config,
    credentials: Option<CredentialsMap>,
    contexts: ContextCache,
    /// The message layer toward origins: one socket and NSTART per origin.
    upstream: upstream::Upstream,
}

impl Gateway {
    /// Loads the credentials named by `config` (contexts are opened at their first use).
    pub fn new(config: Config) -> Result<Self, GatewayError> {
        let credentials =
            match &config.credentials {
                None => None,
                Some(path) => Some(CredentialsMap::load(path).map_err(|source| {
                    GatewayError::Credentials {
                        config: config.source.clone(),
                        source,
                    }
                })?),
            };
        Ok(Self {
            credentials,
            contexts: ContextCache::new(),
            upstream: upstream::Upstream::new(upstream::LinkParams {
                nstart: usize::from(config.upstream.nstart),
                ack_timeout: config.upstream.ack_timeout,
                ..upstream::LinkParams::default()
            }),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn contexts(&self) -> &ContextCache {
        &self.contexts
    }

    /// Decides and carries out one request from a client; returns the plain response
    /// datagram from the origin (its header; the caller re-addresses it) or the gateway's
    /// own error response.
    pub async fn handle_request(&self, request: &MessageView<'_>) -> Result<Vec<u8>, Refusal> {
        if request.has_option(number::OSCORE) {
            // Inbound OSCORE and pass-through are the next slice of the gateway issue.
            return Err(Refusal::new(
                Code::NOT_IMPLEMENTED,
                "OSCORE-protected requests to the gateway are not supported yet",
            ));
        }
        let hop_limit = target::forwarded_hop_limit(request, self.config.policy.hop_limit)?;
        let target = target::resolve_target(request, &self.config.routes)?;
        let uri = target.uri.matching_uri();
        let credential = match &self.credentials {
            None => None,
            Some(map) => find_credential(map, &target.uri).map_err(|e| {
                Refusal::new(
                    Code::SERVICE_UNAVAILABLE,
                    format!("credential for {uri}: {e}"),
                )
            })?,
        };
        let timeout = self.config.policy.upstream_timeout;
        let timed_out = || {
            Refusal::new(
                Code::GATEWAY_TIMEOUT,
                format!("origin {uri} did not answer within {timeout:?}"),
            )
        };
        match credential {
            Some((entry, cred)) => {
                let protection = self.contexts.get(&cred.basedir).await.map_err(|e| {
                    tracing::warn!("{uri}: credential {:?}: {e}", entry.key);
                    Refusal::new(
                        Code::SERVICE_UNAVAILABLE,
                        format!("OSCORE context for {uri} cannot be used: {e}"),
                    )
                })?;
                tokio::time::timeout(
                    timeout,
                    forward::forward(&*protection, request, &target, hop_limit, &self.upstream),
                )
                .await
                .map_err(|_| timed_out())?
            }
            None if self.config.policy.plain_forwarding => tokio::time::timeout(
                timeout,
                forward::forward(&Plain, request, &target, hop_limit, &self.upstream),
            )
            .await
            .map_err(|_| timed_out())?,
            None => Err(Refusal::new(
                Code::PROXYING_NOT_SUPPORTED,
                format!(
                    "no credential matches {uri} and plain forwarding is off (policy.plain_forwarding)"
                ),
            )),
        }
    }
}
