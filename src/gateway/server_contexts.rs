//! The gateway's server-side security contexts: the `:label` entries of the credentials
//! file (aiocoap's server credentials, research note §1.3), opened once at load and looked
//! up by the request's kid and kid context (RFC 8613 §6.1, §8.2 step 2).
//!
//! Contexts are opened through the gateway's [`ContextCache`], so a directory named by a
//! label and by a URI pattern is opened (and locked) once, and closed with the others at
//! shutdown (exact `sequence.json` and replay window written).
//!
//! Lookup is one hash-map probe keyed by (kid, kid context); "absent" kid context is a key
//! of its own, so a context with an ID Context never answers a request without one and the
//! other way round (as aiocoap). Timing: the hash (SipHash with a per-process random key)
//! runs over the whole key whether or not it exists; a hit adds one comparison of the key
//! with the stored one, a miss usually none. What differs is therefore tens of nanoseconds
//! and depends only on the kid, which travels in the clear anyway; the work after the
//! lookup (AEAD vs. an immediate 4.01) differs far more and reveals the same fact.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::contexts::{error_chain, ContextCache, ContextError, OscoreProtection};
use super::upstream::{LinkParams, Upstream};
use crate::client::transport::random_bytes;
use crate::credentials::{Credential, CredentialsMap};
use crate::oscore::params::HexBytes;
use crate::oscore::RequestKid;

/// Why the server-side contexts could not be loaded.
#[derive(Debug, Error)]
pub enum ServerContextsError {
    #[error("credentials {}: server label {label:?}: {}", file.display(), error_chain(&**source))]
    Open {
        file: PathBuf,
        label: String,
        source: Box<ContextError>,
    },
}

/// One server-side context: the label it was configured under and the open context.
pub struct ServerContext {
    /// The credentials key, e.g. `":client1"` (aiocoap's `authenticated_claims`).
    pub label: String,
    pub protection: Arc<OscoreProtection>,
    /// The message layer toward devices for this client: its own link (socket, Message
    /// IDs, NSTART) per device address, so that a device sees one client endpoint per
    /// OSCORE client (block-wise state at the device is keyed by the remote address, e.g.
    /// aiocoap's `blockwise_key`). No lock is held while an exchange is in flight.
    pub(super) upstream: Upstream,
}

impl std::fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerContext")
            .field("label", &self.label)
            .field("dir", &self.protection.dir())
            .finish()
    }
}

/// The server-side contexts by (kid, kid context), and this process's Echo value for
/// replay-window recovery (RFC 8613 App. B.1.2).
pub struct ServerContexts {
    by_kid: HashMap<Vec<u8>, Arc<ServerContext>>,
    echo: [u8; 8],
}

impl Default for ServerContexts {
    fn default() -> Self {
        Self::empty()
    }
}

/// The lookup key: kid context presence, its length and bytes, then the kid. Unambiguous,
/// so ("ab", none) and ("a", "b") never collide.
fn key(kid: &[u8], kid_context: Option<&[u8]>) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + kid.len() + kid_context.map_or(0, <[u8]>::len));
    match kid_context {
        None => k.push(0),
        Some(c) => {
            k.push(1);
            k.extend_from_slice(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_be_bytes());
            k.extend_from_slice(c);
        }
    }
    k.extend_from_slice(kid);
    k
}

impl ServerContexts {
    /// No server-side contexts: every OSCORE request is for someone else.
    pub fn empty() -> Self {
        Self {
            by_kid: HashMap::new(),
            echo: random_bytes::<8>(),
        }
    }

    /// Opens the OSCORE contexts of every `:label` entry of `map` (file order) through
    /// `cache`. As in aiocoap, the first context with a given Recipient ID and ID Context
    /// wins; later duplicates are reported in the log and not used.
    pub fn load(map: &CredentialsMap, cache: &ContextCache) -> Result<Self, ServerContextsError> {
        Self::load_with_links(map, cache, LinkParams::default())
    }

    /// `load`, with `params` (the gateway's `[coap]` NSTART and ACK_TIMEOUT) for the links
    /// toward devices.
    pub fn load_with_links(
        map: &CredentialsMap,
        cache: &ContextCache,
        params: LinkParams,
    ) -> Result<Self, ServerContextsError> {
        let mut s = Self::empty();
        for (label, credential) in map.server_labels() {
            let Credential::Oscore(oscore) = credential else {
                tracing::info!(
                    "credentials {}: label {label:?} is a {} credential, not OSCORE; not used by the gateway",
                    map.path().display(),
                    credential.kind().name()
                );
                continue;
            };
            let protection = cache.open_at_load(&oscore.basedir).map_err(|source| {
                ServerContextsError::Open {
                    file: map.path().to_owned(),
                    label: label.to_string(),
                    source: Box::new(source),
                }
            })?;
            let ctx = protection.security_context();
            let k = key(ctx.recipient_id(), ctx.id_context());
            if let Some(first) = s.by_kid.get(&k) {
                tracing::warn!(
                    "credentials {}: label {label:?} has the same Recipient ID {} and ID Context as {:?}; the first one is used",
                    map.path().display(),
                    HexBytes(ctx.recipient_id()),
                    first.label
                );
                continue;
            }
            tracing::info!(
                "server-side context {label:?}: kid {} from {}",
                HexBytes(ctx.recipient_id()),
                protection.dir().display()
            );
            s.by_kid.insert(
                k,
                Arc::new(ServerContext {
                    label: label.to_string(),
                    protection,
                    upstream: Upstream::new(params),
                }),
            );
        }
        Ok(s)
    }

    /// The context for a request's kid and kid context, if we hold one.
    pub fn lookup(&self, kid: &RequestKid<'_>) -> Option<&Arc<ServerContext>> {
        self.by_kid.get(key(kid.kid, kid.kid_context).as_slice())
    }

    /// The labels loaded.
    pub fn labels(&self) -> impl Iterator<Item = &str> + '_ {
        self.by_kid.values().map(|c| c.label.as_str())
    }

    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }

    /// The Echo value this process hands out in App. B.1.2 challenges (8 random bytes per
    /// process, like aiocoap's `echo_recovery`).
    pub fn echo(&self) -> &[u8; 8] {
        &self.echo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(key(b"ab", None), key(b"b", Some(b"a")));
        assert_ne!(key(b"", Some(b"")), key(b"", None));
        assert_ne!(key(b"\x01", Some(b"\x02")), key(b"\x02", Some(b"\x01")));
        assert_eq!(key(b"\x01", Some(b"\x37")), key(b"\x01", Some(b"\x37")));
    }

    fn context_dir(parent: &std::path::Path, name: &str, settings: &str) -> PathBuf {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("settings.json"), settings).unwrap();
        dir
    }

    #[test]
    fn load_keys_by_kid_and_kid_context_and_shares_open_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = r#""secret_ascii": "Correct Horse Battery Staple""#;
        let a = context_dir(
            tmp.path(),
            "a",
            &format!(r#"{{"sender-id_ascii": "gw", "recipient-id_hex": "01", {secret}}}"#),
        );
        let b = context_dir(
            tmp.path(),
            "b",
            &format!(
                r#"{{"sender-id_ascii": "gw", "recipient-id_hex": "01", "id-context_hex": "37cbf3210017a2d3", {secret}}}"#
            ),
        );
        // same Recipient ID and no ID Context as `a`: a duplicate, not used
        let c = context_dir(
            tmp.path(),
            "c",
            &format!(r#"{{"sender-id_ascii": "gx", "recipient-id_hex": "01", {secret}}}"#),
        );
        let json = format!(
            r#"{{"coap://origin/*": {{"oscore": {{"basedir": {a:?}}}}},
                ":alice": {{"oscore": {{"basedir": {a:?}}}}},
                ":bob": {{"oscore": {{"basedir": {b:?}}}}},
                ":carol": {{"oscore": {{"basedir": {c:?}}}}}}}"#
        );
        let map = CredentialsMap::from_json(&json, &tmp.path().join("creds.json")).unwrap();
        let cache = ContextCache::new();
        let server = ServerContexts::load(&map, &cache).unwrap();
        assert_eq!(server.len(), 2);
        let kid = |kid_context| RequestKid {
            kid: b"\x01",
            kid_context,
        };
        assert_eq!(server.lookup(&kid(None)).unwrap().label, ":alice");
        let with_ctx = [0x37, 0xcb, 0xf3, 0x21, 0x00, 0x17, 0xa2, 0xd3];
        assert_eq!(server.lookup(&kid(Some(&with_ctx))).unwrap().label, ":bob");
        assert!(server.lookup(&kid(Some(b"\x00"))).is_none());
        assert!(server
            .lookup(&RequestKid {
                kid: b"\x02",
                kid_context: None
            })
            .is_none());

        // `a` is named by a pattern and a label: one open context, shared with the
        // client side (a second open would fail on the directory's lock)
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let client_side = rt.block_on(cache.get(&a)).unwrap();
        assert!(Arc::ptr_eq(
            &client_side,
            &server.lookup(&kid(None)).unwrap().protection
        ));
        let failures = rt.block_on(cache.close_all());
        assert!(failures.is_empty());
        assert!(!a.join("lock").exists());
    }

    #[test]
    fn empty_has_a_random_echo() {
        let a = ServerContexts::empty();
        let b = ServerContexts::empty();
        assert!(a.is_empty());
        assert_ne!(a.echo(), b.echo());
        assert!(a
            .lookup(&RequestKid {
                kid: b"\x01",
                kid_context: None
            })
            .is_none());
    }
}
