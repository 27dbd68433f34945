//! The gateway: the per-request decision (DESIGN.md §1) and its paths.
//!
//! For a plain request from a legacy client: find the target (forward proxy or `[[route]]`,
//! `target`), check the Hop-Limit, then look the target URI up in the credentials:
//! - a credential matches: protect toward the origin with its context (`contexts`,
//!   `forward`); if the context cannot be opened or used the client gets 5.03, never a
//!   plain-text request to the origin;
//! - nothing matches: forward in plain only if `policy.plain_forwarding`, else 5.05.
//!
//! A request with an OSCORE option goes to `inbound` (our kid: verify, forward plain,
//! protect back), `passthrough` (someone else's kid and a forward target: untouched) or is
//! refused 4.01; routes may refuse plain requests (`require_oscore`, `allow`).
//!
//! The UDP side (message layer toward clients, deduplication) is in `server`.

pub mod blockwise;
pub mod busy_poll;
pub mod contexts;
pub mod deadlines;
pub mod dedup;
pub mod forward;
pub mod inbound;
mod inbound_observe;
pub mod mmsg;
pub mod observe;
pub mod passthrough;
pub mod reply;
pub mod server;
pub mod server_contexts;
pub mod target;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;

use blockwise::{Block1Reassembly, BlockwiseError, Fed, RequestTags, TransferKey};

use crate::client::Plain;
use crate::coap::option::decode_uint;
use crate::coap::{number, BlockValue, Code, MessageBuilder, MessageView};
use crate::config::Config;
use crate::credentials::{CredentialsError, CredentialsMap};

pub use contexts::{find_credential, ContextCache, ContextError, OscoreProtection};
pub use server::{run, Listeners};
pub use server_contexts::{ServerContext, ServerContexts, ServerContextsError};
pub use target::{Refusal, Target, TargetKind};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("credentials (from {}): {}", config.as_deref().map_or("--credentials".into(), |p| p.display().to_string()), contexts::error_chain(source))]
    Credentials {
        config: Option<std::path::PathBuf>,
        source: CredentialsError,
    },
    /// A server-side (`:label`) context cannot be opened (e.g. locked by aiocoap).
    #[error(transparent)]
    ServerContexts(#[from] ServerContextsError),
    #[error("{}: route[{index}].allow: {label:?} is not a server-side OSCORE label of the credentials", config.as_deref().map_or("proxy.toml".into(), |p| p.display().to_string()))]
    UnknownLabel {
        config: Option<std::path::PathBuf>,
        index: usize,
        label: String,
    },
    #[error("cannot bind the CoAP listener {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How a request reached the gateway, for one scheduling choice.
///
/// A request that came in one receive batch with others (`InBatch`), toward a target seen
/// before, prefetches what its context's use will read and yields (twice: the memo's line,
/// then the lines whose addresses the memo holds): the batch's other requests then do the
/// same, and when each resumes, its lines are in the cache. With thousands of contexts used
/// in turn every context is cold when its turn comes: its hot fields, its persister's line
/// and its two key schedules are nine cache misses with AES-CCM-16-64-128
/// (`ProtectionLines`). Taken one request after another they stall in sequence; prefetched
/// across the batch, from addresses kept beside the memoised context, they overlap. Only with more than [`MANY_CONTEXTS`] credentials entries: with fewer, the
/// contexts stay in the cache and the yield would cost without saving. A request alone in
/// its batch (W=1) never yields: nothing could overlap, and the yield costs a driver poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    Alone,
    InBatch,
}

/// Credentials entries beyond which a batched request prefetches and yields (`Arrival`):
/// 256 contexts with their key schedules (~700 bytes each, with the lookup slots) fit in a
/// fifth of a 1 MB L2, so they stay cached whatever the order of use.
pub const MANY_CONTEXTS: usize = 256;

/// A credentials entry's opened context, with the addresses of what a request through it
/// reads (for `Arrival::InBatch`).
struct Memo {
    protection: Arc<OscoreProtection>,
    lines: contexts::ProtectionLines,
}

/// One entry's memo in one cache line: with 10 000 entries in turn every memo is cold when
/// its turn comes, and one line is one miss.
#[derive(Default)]
#[repr(align(64))]
struct MemoSlot(Mutex<Option<Memo>>);
const _: () = assert!(std::mem::size_of::<MemoSlot>() == 64);

/// The configured gateway, shared by every request.
pub struct Gateway {
    config: Config,
    credentials: Option<CredentialsMap>,
    /// `find_credential` answers by target URI (`credentials` never changes).
    credential_cache: contexts::CredentialCache,
    /// The opened context of each credentials entry (by its position in the map), once
    /// used: a request after the first takes it from here instead of finding the
    /// directory's slot in `contexts` (with 10 000 contexts that lookup was the gateway's
    /// largest cost). A context found closed is fetched from `contexts` again.
    entry_contexts: Vec<MemoSlot>,
    contexts: ContextCache,
    /// Server-side contexts (`:label` entries), opened at load (issue 4).
    server: ServerContexts,
    /// Client Block1 uploads being reassembled (`blockwise`).
    uploads: Mutex<Block1Reassembly>,
    /// Request-Tags of the gateway's own upstream Block1 transfers (RFC 9175 §3).
    tags: RequestTags,
    /// The message layer toward origins: one socket and NSTART per origin.
    upstream: upstream::Upstream,
    /// Observations relayed from OSCORE origins to plain clients (`observe`).
    observations: Arc<observe::Observations>,
    /// Datagram activity for the busy-poll spinner (None: `coap.busy_poll_us` = 0).
    activity: Option<Arc<busy_poll::Activity>>,
    /// `policy.upstream_timeout` for every request (one sweeper, no timer per request).
    pub(crate) upstream_deadline: deadlines::LazyDeadlines,
    /// More than `MANY_CONTEXTS` credentials entries (see `Arrival`).
    many_contexts: bool,
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
        let contexts = ContextCache::new();
        let link_params = upstream::LinkParams {
            nstart: usize::from(config.upstream.nstart),
            ack_timeout: config.upstream.ack_timeout,
            ..upstream::LinkParams::default()
        };
        let server = match &credentials {
            Some(map) => ServerContexts::load_with_links(map, &contexts, link_params)?,
            None => ServerContexts::empty(),
        };
        for (index, route) in config.routes.iter().enumerate() {
            if let Some(label) = route
                .allow
                .iter()
                .find(|l| !server.labels().any(|s| s == l.as_str()))
            {
                return Err(GatewayError::UnknownLabel {
                    config: config.source.clone(),
                    index,
                    label: label.clone(),
                });
            }
        }
        let uploads = Mutex::new(Block1Reassembly::new(config.blockwise));
        let start = u32::from_be_bytes(crate::client::transport::random_bytes::<4>());
        let activity = (!config.busy_poll.is_zero()).then(busy_poll::Activity::new);
        let credential_cache = contexts::CredentialCache::for_map(credentials.as_ref());
        let entries = credentials.as_ref().map_or(0, |m| m.entries().len());
        let entry_contexts = (0..entries).map(|_| MemoSlot::default()).collect();
        Ok(Self {
            uploads,
            tags: RequestTags::new(start),
            credentials,
            credential_cache,
            entry_contexts,
            contexts,
            server,
            upstream: upstream::Upstream::new(link_params).with_activity(activity.clone()),
            activity,
            observations: Arc::new(observe::Observations::new(config.max_observe_relations)),
            upstream_deadline: deadlines::LazyDeadlines::new(config.policy.upstream_timeout),
            many_contexts: entries > MANY_CONTEXTS,
            config,
        })
    }

    /// Datagram activity for busy polling (`coap.busy_poll_us`), when it is on.
    pub fn activity(&self) -> Option<&Arc<busy_poll::Activity>> {
        self.activity.as_ref()
    }

    /// The relayed observations (the server reports clients' Resets and shuts them down).
    pub fn observations(&self) -> &observe::Observations {
        &self.observations
    }

    /// A plain request with an Observe option from `client` (RFC 7641): Observe: 0 to a
    /// target with an OSCORE credential registers an observation relayed by `observe`;
    /// Observe: 1 on the token of a relayed observation cancels it upstream. Everything
    /// else is handled like any request (`handle_request_from`: the origin's first
    /// response only).
    pub async fn handle_observe_request(
        &self,
        request: &MessageView<'_>,
        datagram: &[u8],
        client: observe::ClientLink,
    ) -> Result<Vec<u8>, Refusal> {
        let peer = client.peer;
        if request.has_option(number::OSCORE) {
            // an OSCORE client's registration of a device resource (`inbound_observe`)
            return self.handle_protected_observe(request, client).await;
        }
        let plain_get = !request.has_option(number::OSCORE)
            && matches!(request.code, Code::GET | Code::FETCH)
            && !request.has_option(number::BLOCK1);
        match observe::request_observe(request) {
            Some(1) if plain_get => {
                if let Some(r) = self
                    .observations
                    .deregister(peer, request, datagram, false)
                    .await
                {
                    return r;
                }
            }
            Some(0) if plain_get => {
                if let Some(r) = self.register_observation(request, datagram, client).await {
                    return r;
                }
            }
            _ => {}
        }
        self.handle_request_from(peer, request).await
    }

    /// `None`: the target has no OSCORE credential; the request goes the ordinary way.
    async fn register_observation(
        &self,
        request: &MessageView<'_>,
        datagram: &[u8],
        client: observe::ClientLink,
    ) -> Option<Result<Vec<u8>, Refusal>> {
        let decided = async {
            let hop_limit = target::forwarded_hop_limit(request, self.config.policy.hop_limit)?;
            let target = target::resolve_target(request, &self.config.routes)?;
            if let TargetKind::Route(i) = target.kind {
                if let Some(route) = self.config.routes.get(i) {
                    inbound::refuse_plain(route, i)?;
                }
            }
            let Some(protection) = self.oscore_protection_for(&target).await? else {
                return Ok(None);
            };
            Ok(Some((hop_limit, target, protection)))
        };
        let (hop_limit, target, protection) = match decided.await {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(refusal) => return Some(Err(refusal)),
        };
        let reg = observe::Registration {
            request,
            datagram,
            target: &target,
            hop_limit,
            protection: Some(protection),
            downstream: observe::Downstream::Plain,
            ack_timeout: self.config.upstream.ack_timeout,
            timeout: self.config.policy.upstream_timeout,
        };
        Some(self.observations.register(reg, client).await)
    }

    /// `forward::forward` over the shared upstream links, bounded by
    /// `policy.upstream_timeout`: when it runs out the client gets 5.04 Gateway Timeout
    /// with a diagnostic (RFC 7252 §5.9.3.5).
    pub(crate) async fn forward_bounded<P: crate::client::Protection>(
        &self,
        protection: &P,
        request: &MessageView<'_>,
        target: &Target,
        hop_limit: u8,
    ) -> Result<Vec<u8>, Refusal> {
        let forwarded = forward::forward(
            protection,
            request,
            target,
            hop_limit,
            &self.upstream,
            &self.config.blockwise,
            &self.tags,
        );
        // Pinned where it is (moving it into `select!` copied the whole future).
        tokio::pin!(forwarded);
        // Like `tokio::time::timeout`: the exchange is polled first.
        tokio::select! {
            biased;
            r = &mut forwarded => r,
            _ = self.upstream_deadline.wait() => Err(Refusal::new(
                Code::GATEWAY_TIMEOUT,
                format!(
                    "origin {} did not answer within {:?}",
                    target.uri.matching_uri(),
                    self.upstream_deadline.delay()
                ),
            )),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn contexts(&self) -> &ContextCache {
        &self.contexts
    }

    /// The server-side contexts (closed with the others by `contexts().close_all()`).
    pub fn server_contexts(&self) -> &ServerContexts {
        &self.server
    }

    /// `handle_request` for a request from `client`, with block-wise uploads terminated at
    /// the gateway (RFC 7959 §2.10): each Block1 block is buffered per client transfer
    /// (`blockwise::TransferKey`) and answered 2.31 Continue; the complete body is then
    /// forwarded as one request (cut again upstream with the gateway's own Request-Tag),
    /// and its response carries the client's last Block1. A body over
    /// `blockwise.max_body_size` gets 4.13 with Size1 (§2.9.3).
    pub async fn handle_request_from(
        &self,
        client: SocketAddr,
        request: &MessageView<'_>,
    ) -> Result<Vec<u8>, Refusal> {
        self.handle_arrival(client, request, Arrival::Alone).await
    }

    /// `handle_request_from` for a request that arrived as described by `arrival` (the
    /// listener's way: see [`Arrival`]).
    pub async fn handle_arrival(
        &self,
        client: SocketAddr,
        request: &MessageView<'_>,
        arrival: Arrival,
    ) -> Result<Vec<u8>, Refusal> {
        let max = self.config.blockwise.max_body_size;
        if request.has_option(number::OSCORE) {
            return self.handle_request(request).await;
        }
        if request.payload.len() > max {
            let e = BlockwiseError::TooLarge {
                size: request.payload.len(),
                max,
            };
            tracing::info!("{client}: {e}");
            return Ok(blockwise::error_response(&e, max));
        }
        let Some(value) = request.option(number::BLOCK1) else {
            return self.handle_request_with(request, arrival).await;
        };
        let fed = BlockValue::decode(value)
            .map_err(BlockwiseError::from)
            .and_then(|block1| {
                let size1 = request.option(number::SIZE1).and_then(decode_uint);
                let key = TransferKey::of(client, request);
                lock(&self.uploads).feed(key, block1, size1, request.payload, Instant::now())
            });
        match fed {
            Err(e) => {
                tracing::info!("{client}: {e}");
                Ok(blockwise::error_response(&e, max))
            }
            Ok(Fed::Continue(block1)) => Ok(blockwise::continue_response(block1)),
            Ok(Fed::Complete { body, last }) => {
                let whole = whole_request(request, &body)?;
                let whole = MessageView::parse(&whole).map_err(internal)?;
                let response = self.handle_request(&whole).await?;
                let view = MessageView::parse(&response).map_err(internal)?;
                let mut out = Vec::with_capacity(response.len() + 4);
                blockwise::with_block1(&view, Some(last), &mut out).map_err(internal)?;
                Ok(out)
            }
        }
    }

    /// Decides and carries out one request from a client; returns the plain response
    /// datagram from the origin (its header; the caller re-addresses it) or the gateway's
    /// own error response.
    pub async fn handle_request(&self, request: &MessageView<'_>) -> Result<Vec<u8>, Refusal> {
        self.handle_request_with(request, Arrival::Alone).await
    }

    async fn handle_request_with(
        &self,
        request: &MessageView<'_>,
        arrival: Arrival,
    ) -> Result<Vec<u8>, Refusal> {
        if request.has_option(number::OSCORE) {
            // Inbound, pass-through or 4.01 (issue 4): see `inbound`. Boxed, so that its
            // state does not enlarge every outbound request's future (see server.rs).
            return Box::pin(self.handle_protected(request)).await;
        }
        let hop_limit = target::forwarded_hop_limit(request, self.config.policy.hop_limit)?;
        let target = target::resolve_target(request, &self.config.routes)?;
        if let TargetKind::Route(i) = target.kind {
            if let Some(route) = self.config.routes.get(i) {
                inbound::refuse_plain(route, i)?;
            }
        }
        // Without credentials nothing is looked up (plain forwarding or a refusal).
        let cached = self
            .credentials
            .is_some()
            .then(|| self.credential_cache.cached(&target.uri))
            .flatten();
        if let (Arrival::InBatch, true, Some(Some(i))) = (arrival, self.many_contexts, cached) {
            self.prefetch_memoised(i).await;
        }
        match self.oscore_protection_from(&target, cached).await? {
            Some(protection) => {
                self.forward_bounded(&*protection, request, &target, hop_limit)
                    .await
            }
            None if self.config.policy.plain_forwarding => {
                self.forward_bounded(&Plain, request, &target, hop_limit)
                    .await
            }
            None => Err(Refusal::new(
                Code::PROXYING_NOT_SUPPORTED,
                format!(
                    "no credential matches {} and plain forwarding is off (policy.plain_forwarding)",
                    target.uri.matching_uri()
                ),
            )),
        }
    }

    /// The OSCORE context that the credentials file gives `target` (aiocoap's credential
    /// matching, see `find_credential`), opened or taken from the cache; `None` when no
    /// credential matches. A target that has a credential is OSCORE-only: a credential
    /// that cannot be resolved or a context that cannot be opened (locked, unreadable) is
    /// 5.03 with a diagnostic, never a fall-back to plain text. The one place outbound
    /// requests, Observe registrations and inbound requests toward OSCORE targets decide.
    pub(crate) async fn oscore_protection_for(
        &self,
        target: &Target,
    ) -> Result<Option<Arc<OscoreProtection>>, Refusal> {
        self.oscore_protection_from(target, self.credential_cache.cached(&target.uri))
            .await
    }

    /// `oscore_protection_for`, given what `credential_cache.cached(&target.uri)` said.
    async fn oscore_protection_from(
        &self,
        target: &Target,
        cached: Option<Option<usize>>,
    ) -> Result<Option<Arc<OscoreProtection>>, Refusal> {
        let Some(map) = &self.credentials else {
            return Ok(None);
        };
        // The way of almost every request: a target seen before whose entry's context is
        // open, found without reading the credentials entry itself (with 10 000 entries
        // that read was a cache miss per request).
        match cached {
            Some(None) => return Ok(None),
            Some(Some(i)) => {
                if let Some(p) = self.memoised_context(i) {
                    return Ok(Some(p));
                }
            }
            None => {}
        }
        // Formatted only for a diagnostic, not on the way of every request.
        let uri = || target.uri.matching_uri();
        let credential = self
            .credential_cache
            .find_indexed(map, &target.uri)
            .map_err(|e| {
                Refusal::new(
                    Code::SERVICE_UNAVAILABLE,
                    format!("credential for {}: {e}", uri()),
                )
            })?;
        let Some((index, entry, cred)) = credential else {
            return Ok(None);
        };
        if let Some(p) = index.and_then(|i| self.memoised_context(i)) {
            return Ok(Some(p));
        }
        let protection = self.contexts.get(&cred.basedir).await.map_err(|e| {
            tracing::warn!("{}: credential {:?}: {e}", uri(), entry.key);
            Refusal::new(
                Code::SERVICE_UNAVAILABLE,
                format!("OSCORE context for {} cannot be used: {e}", uri()),
            )
        })?;
        if let Some(memo) = index.and_then(|i| self.entry_contexts.get(i)) {
            lock(&memo.0).replace(Memo {
                lines: protection.lines(),
                protection: Arc::clone(&protection),
            });
        }
        Ok(Some(protection))
    }

    /// The context opened for credentials entry `index`, if it is still open.
    fn memoised_context(&self, index: usize) -> Option<Arc<OscoreProtection>> {
        let memo = lock(&self.entry_contexts.get(index)?.0);
        memo.as_ref()
            .map(|m| &m.protection)
            .filter(|p| !p.persister().is_closed())
            .cloned()
    }

    /// Prefetches what a request through entry `index`'s memoised context reads, yielding
    /// after each step so that the batch's other requests prefetch theirs meanwhile (see
    /// `Arrival`): the memo's own line first (its address follows from the index alone),
    /// then, from the addresses the memo keeps, the context's lines (`ProtectionLines`).
    async fn prefetch_memoised(&self, index: usize) {
        use crate::prefetch::{address_of, bytes, LINE};
        let Some(slot) = self.entry_contexts.get(index) else {
            return;
        };
        bytes(address_of(slot), LINE);
        tokio::task::yield_now().await;
        // the guard is dropped before the second yield
        let prefetched = lock(&slot.0).as_ref().map(|m| m.lines.prefetch()).is_some();
        if prefetched {
            tokio::task::yield_now().await;
        }
    }
}

/// A `HashMap` with foldhash (per-process random seed) for keys the gateway makes itself
/// (its tokens and Message IDs toward origins, origin addresses, context folders):
/// SipHash was ~10 % of the gateway's instructions per request. Tables keyed by what a
/// client chooses (deduplication by peer and Message ID) keep std's SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn internal(e: crate::coap::CodecError) -> Refusal {
    Refusal::new(
        Code::INTERNAL_SERVER_ERROR,
        format!("block-wise reassembly: {e}"),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's request with its whole reassembled body: the last block's header and
/// options without Block1, Size1 and the client's Request-Tag (they belong to the
/// client-gateway operation the gateway terminated).
fn whole_request(last: &MessageView<'_>, body: &[u8]) -> Result<Vec<u8>, Refusal> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut b = MessageBuilder::new(&mut out, last.mtype, last.code, last.message_id, last.token)
        .map_err(internal)?;
    for o in last.options() {
        if !matches!(
            o.number,
            number::BLOCK1 | number::SIZE1 | number::REQUEST_TAG
        ) {
            b.option(o.number, o.value).map_err(internal)?;
        }
    }
    b.payload(body);
    Ok(out)
}
