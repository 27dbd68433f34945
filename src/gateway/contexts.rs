//! Security contexts for the outbound leg: choosing the credential for a target URI (as
//! aiocoap does), and opening each context directory once per process (it is locked while
//! open, like aiocoap's), shared by every request that needs it and closed at shutdown.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::client::{ClientError, Protection};
use crate::coap::uri::default_port;
use crate::coap::{number, CoapUri, MessageView};
use crate::credentials::{
    ContextPersister, ContextStore, Credential, CredentialsError, CredentialsMap, Entry,
    OscoreCredential, StoreError,
};
use crate::oscore::{
    protect_request, unprotect_response, DeriveError, RequestBinding, SecurityContext,
};

/// The credential for `uri`, as aiocoap picks it: the URI as written (an explicit default
/// port stays) first, then, if that finds nothing, the form without the default port.
/// `Ok(None)`: no pattern matches.
pub fn find_credential<'m>(
    map: &'m CredentialsMap,
    uri: &CoapUri,
) -> Result<Option<(&'m Entry, &'m OscoreCredential)>, CredentialsError> {
    let found = map.oscore_for(&uri.matching_uri())?;
    if found.is_some() || uri.port != Some(default_port(&uri.scheme)) {
        return Ok(found);
    }
    let normalised = CoapUri {
        port: None,
        ..uri.clone()
    };
    map.oscore_for(&normalised.matching_uri())
}

/// `find_credential`'s answers, remembered by target URI (the same few targets are asked
/// for again and again). A lookup formats the URI and looks it up in the pattern index
/// (~1 000 instructions per request); a hit here is one SipHash of the URI. The URIs come
/// from clients, so the table keeps std's randomly keyed SipHash and is bounded: when full
/// it is emptied (a client cycling through many URIs costs each of its requests one full
/// lookup, as without the cache). Failed lookups are not remembered.
pub struct CredentialCache {
    /// Target URIs with the index of the matching entry in `CredentialsMap::entries`,
    /// found by `hash`.
    known: std::sync::Mutex<hashbrown::HashTable<Known>>,
    hasher: std::hash::RandomState,
    capacity: usize,
}

/// A target URI as `CredentialCache` keys it: its parts in one byte string, each preceded
/// by its length. Comparing it is one `memcmp`, where comparing a stored `CoapUri` followed
/// a pointer per part (scheme, host, path list, each segment).
///
/// A length below 255 is one byte; a longer part (none that CoAP can carry: Uri-Host,
/// Uri-Path and Uri-Query are at most 255 bytes, RFC 7252 §5.10) is 255 and then its length
/// as four bytes. The encoding of each part is prefix-free, so different URIs never make
/// the same key. One-byte lengths keep a usual target's key inline in the 64-byte `Known`.
type UriKey = smallvec::SmallVec<[u8; URI_KEY_INLINE]>;
const URI_KEY_INLINE: usize = 96;

/// One remembered target, one cache line: with 10 000 targets in round-robin use every
/// lookup finds its slot cold, and the 120-byte slot before (four-byte lengths, a 96-byte
/// inline key) cost two or three misses. Keys up to `KNOWN_INLINE` bytes stay in the line
/// (`coap://192.0.2.1/c1234/x` is 27); longer ones on the heap.
#[repr(align(64))]
struct Known {
    key: smallvec::SmallVec<[u8; KNOWN_INLINE]>,
    /// None: no pattern matches.
    entry: Option<u32>,
}
const KNOWN_INLINE: usize = 48;
const _: () = assert!(std::mem::size_of::<Known>() == 64);

fn uri_key(uri: &CoapUri) -> UriKey {
    let port = uri.port.map_or([0, 0, 0], |p| {
        let [x, y] = p.to_le_bytes();
        [1, x, y]
    });
    // the count separates the path from the query
    let segments = (uri.path.len() as u32).to_le_bytes();
    let parts = [uri.scheme.as_bytes(), uri.host.as_bytes(), &port, &segments]
        .into_iter()
        .chain(uri.path.iter().map(String::as_bytes))
        .chain(uri.query.iter().map(String::as_bytes));
    let prefix = |len: usize| if len < 255 { 1 } else { 5 };
    let len: usize = parts.clone().map(|p| prefix(p.len()) + p.len()).sum();
    if len <= URI_KEY_INLINE {
        // the common case (so every part is shorter than 255), without a capacity check
        // per part
        let mut buf = [0u8; URI_KEY_INLINE];
        let mut at = 0;
        for part in parts {
            let end = at + 1 + part.len();
            if let (Ok(n), Some(dst)) = (u8::try_from(part.len()), buf.get_mut(at..end)) {
                dst[0] = n;
                dst[1..].copy_from_slice(part);
            }
            at = end;
        }
        return UriKey::from_buf_and_len(buf, at);
    }
    let mut key = UriKey::with_capacity(len);
    for part in parts {
        match u8::try_from(part.len()) {
            Ok(n) if n < u8::MAX => key.push(n),
            _ => {
                key.push(u8::MAX);
                key.extend_from_slice(&(part.len() as u32).to_le_bytes());
            }
        }
        key.extend_from_slice(part);
    }
    key
}

/// What `known` holds for `key`: `Some(Some(i))` entry `i`, `Some(None)` no pattern
/// matches, `None` not remembered.
fn remembered(known: &hashbrown::HashTable<Known>, hash: u64, key: &[u8]) -> Option<Option<usize>> {
    known
        .find(hash, |k| k.key[..] == *key)
        .map(|k| k.entry.map(|i| i as usize))
}

/// The position of `e` in `entries`, from its address (a search by `ptr::eq` was a scan of
/// every entry on each cache miss: 28 % of the gateway's time with 10 000 patterns).
fn entry_index(entries: &[Entry], e: &Entry) -> Option<usize> {
    let size = std::mem::size_of::<Entry>().max(1);
    let offset = (e as *const Entry as usize).checked_sub(entries.as_ptr() as usize)?;
    let i = offset / size;
    (offset % size == 0 && i < entries.len()).then_some(i)
}

/// A credential with its entry's position in `CredentialsMap::entries` (None: not known).
pub type IndexedCredential<'m> = (Option<usize>, &'m Entry, &'m OscoreCredential);

/// Target URIs remembered by `CredentialCache`, at most (`CredentialCache::for_map` sizes
/// it to twice the map's entries when that is more, so that a target set the map was
/// written for fits).
pub const CREDENTIAL_CACHE: usize = 1024;

impl CredentialCache {
    /// A cache for `map`: room for `CREDENTIAL_CACHE` targets or two per entry of the map.
    pub fn for_map(map: Option<&CredentialsMap>) -> Self {
        Self::new(CREDENTIAL_CACHE.max(map.map_or(0, |m| 2 * m.entries().len())))
    }

    pub fn new(capacity: usize) -> Self {
        Self {
            known: std::sync::Mutex::default(),
            hasher: std::hash::RandomState::new(),
            capacity: capacity.max(1),
        }
    }

    /// SipHash of a URI's key, in one `write` (SipHash per `write` call of every field of
    /// a derived `Hash` was ~500 instructions per request).
    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.hasher.build_hasher();
        h.write(key);
        h.finish()
    }

    /// What the cache remembers for `uri`, without reading the map: `Some(Some(i))` the
    /// entry at `map.entries()[i]`, `Some(None)` no pattern matches, `None` not known.
    pub fn cached(&self, uri: &CoapUri) -> Option<Option<usize>> {
        let key = uri_key(uri);
        let hash = self.hash(&key);
        remembered(
            &self
                .known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            hash,
            &key,
        )
    }

    /// `find_credential(map, uri)`, from the cache when it was asked before. `map` must be
    /// the same map at every call.
    pub fn find<'m>(
        &self,
        map: &'m CredentialsMap,
        uri: &CoapUri,
    ) -> Result<Option<(&'m Entry, &'m OscoreCredential)>, CredentialsError> {
        Ok(self.find_indexed(map, uri)?.map(|(_, e, o)| (e, o)))
    }

    /// `find`, with the entry's position in `map.entries()` (for per-entry state).
    pub fn find_indexed<'m>(
        &self,
        map: &'m CredentialsMap,
        uri: &CoapUri,
    ) -> Result<Option<IndexedCredential<'m>>, CredentialsError> {
        let lock = || {
            self.known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let key = uri_key(uri);
        let hash = self.hash(&key);
        let cached = remembered(&lock(), hash, &key);
        let entry = |i: usize| match map.entries().get(i) {
            Some(
                e @ Entry {
                    credential: Credential::Oscore(o),
                    ..
                },
            ) => Some((Some(i), e, o)),
            _ => None,
        };
        match cached {
            Some(None) => return Ok(None),
            Some(Some(i)) => {
                if let Some(found) = entry(i) {
                    return Ok(Some(found));
                }
            }
            None => {}
        }
        let found = find_credential(map, uri)?;
        let index = match found {
            None => None,
            Some((e, _)) => match entry_index(map.entries(), e) {
                Some(i) => Some(i),
                // not an entry of `map`'s list (cannot happen): answered, not cached
                None => return Ok(found.map(|(e, o)| (None, e, o))),
            },
        };
        // an index beyond u32 (cannot happen with a credentials file) is answered, not cached
        let Ok(entry) = index.map(u32::try_from).transpose() else {
            return Ok(found.map(|(e, o)| (index, e, o)));
        };
        let mut known = lock();
        if known.len() >= self.capacity {
            known.clear();
        }
        if remembered(&known, hash, &key).is_none() {
            let slot = Known {
                key: smallvec::SmallVec::from_slice(&key),
                entry,
            };
            known.insert_unique(hash, slot, |k| self.hash(&k.key));
        }
        Ok(found.map(|(e, o)| (index, e, o)))
    }

    pub fn len(&self) -> usize {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a context could not be opened.
#[derive(Debug, Error)]
pub enum ContextError {
    #[error("context {}: {}", dir.display(), error_chain(&**source))]
    Open {
        dir: PathBuf,
        source: Box<StoreError>,
    },
    #[error("context {}: {source}", dir.display())]
    Derive { dir: PathBuf, source: DeriveError },
    #[error("context {}: opening it was interrupted", dir.display())]
    Interrupted { dir: PathBuf },
}

/// `e: cause: cause...` for one-line diagnostics.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// The size of an `Arc`'s header (two counters) in front of its value.
const ARC_HEADER: usize = 2 * std::mem::size_of::<usize>();

/// The addresses of what a request through one `OscoreProtection` reads: its allocation's
/// hot fields (the first 128 bytes, with the `Arc` header: see the layout note on
/// `OscoreProtection`), the persister's hot line and both key schedules. Kept beside a
/// memoised context, so that all of them can be prefetched without first reading the
/// context (which would be one miss before the others could start). Plain addresses: a
/// prefetch of a stale one is harmless.
#[derive(Clone, Copy, Debug)]
pub struct ProtectionLines {
    allocation: usize,
    persister: usize,
    sender_key: usize,
    recipient_key: usize,
    key_len: u32,
}

impl ProtectionLines {
    /// Prefetches every line (nine for AES-CCM-16-64-128), all at once.
    #[inline]
    pub fn prefetch(&self) {
        use crate::prefetch::{bytes, LINE};
        bytes(self.allocation, 2 * LINE);
        bytes(self.persister, LINE);
        let key_len = self.key_len as usize;
        bytes(self.sender_key, key_len);
        bytes(self.recipient_key, key_len);
    }
}

/// An open, locked client context: derived keys plus the persister that hands out Sender
/// Sequence Numbers only once they are on disk (RFC 8613 App. B.1.1).
///
/// `repr(C)`, the persister handle first: behind the `Arc`'s 16-byte header, it and the
/// context's hot fields (`SECURITY_CONTEXT_HOT_END`) take the first 114 bytes (two cache
/// lines when the allocation starts a line, three otherwise), where the fields every
/// request reads were spread over all four lines of the 200-byte allocation before.
#[repr(C)]
pub struct OscoreProtection {
    persister: ContextPersister,
    ctx: SecurityContext,
}
const _: () = assert!(
    16 + std::mem::offset_of!(OscoreProtection, ctx) + crate::oscore::SECURITY_CONTEXT_HOT_END
        <= 128
);

impl OscoreProtection {
    /// Locks and loads `dir` (blocking file I/O; from async code use `ContextCache`).
    pub fn open(dir: &Path) -> Result<Self, ContextError> {
        let open = ContextStore::global()
            .open(dir)
            .map_err(|source| ContextError::Open {
                dir: dir.to_owned(),
                source: Box::new(source),
            })?;
        let ctx =
            SecurityContext::derive_with_shared_window(&open.params, open.replay_window.clone())
                .map_err(|source| ContextError::Derive {
                    dir: dir.to_owned(),
                    source,
                })?;
        Ok(Self {
            ctx,
            persister: open.persister,
        })
    }

    pub fn dir(&self) -> &Path {
        self.persister.dir()
    }

    /// Where the memory every request with this context reads lies, so that a caller who
    /// knows a request is coming can prefetch all of it at once ([`ProtectionLines`]).
    pub fn lines(self: &Arc<Self>) -> ProtectionLines {
        let [(sender, len), (recipient, _)] = self.ctx.key_schedule_spans();
        ProtectionLines {
            // the Arc's header (strong and weak counts) comes just before the value
            allocation: (Arc::as_ptr(self) as usize).wrapping_sub(ARC_HEADER),
            persister: self.persister.hot_line(),
            sender_key: sender,
            recipient_key: recipient,
            key_len: u32::try_from(len).unwrap_or(u32::MAX),
        }
    }

    /// The derived context (server side: `unprotect_request` / `protect_response`).
    pub fn security_context(&self) -> &SecurityContext {
        &self.ctx
    }

    /// The persister that hands out this context's Sender Sequence Numbers (server side:
    /// a response's own Partial IV).
    pub fn persister(&self) -> &ContextPersister {
        &self.persister
    }

    /// Writes the exact sequence number and replay window back and releases the lock.
    // StoreError is the credentials module's (large) type; the close path is cold.
    #[allow(clippy::result_large_err)]
    pub fn close(&self) -> Result<(), StoreError> {
        self.persister.close()
    }
}

impl Protection for OscoreProtection {
    type Binding = RequestBinding;

    async fn protect(
        &self,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RequestBinding, ClientError> {
        let request = MessageView::parse(plain).map_err(|e| ClientError::Build(e.to_string()))?;
        let ssn = self
            .persister
            .next_sequence_number_async()
            .await
            .map_err(|e| ClientError::Context(e.to_string()))?;
        // The response will be verified with the Recipient Key: its schedule loads while
        // the request is protected, sent and answered (a cold one is three cache misses).
        self.ctx.recipient_key().prefetch();
        protect_request(&self.ctx, ssn, &request, out)
            .map_err(|e| ClientError::Oscore(e.to_string()))
    }

    fn unprotect(
        &self,
        binding: &RequestBinding,
        wire: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError> {
        let response = MessageView::parse(wire)
            .map_err(|e| ClientError::Oscore(format!("malformed response: {e}")))?;
        unprotect_response(&self.ctx, binding, &response, out).map_err(|e| {
            // A plain error from the server or an intermediary (no OSCORE option): show it.
            if response.code.is_response() && !response.has_option(number::OSCORE) {
                ClientError::Oscore(format!(
                    "unprotected {} response ({e}): {}",
                    response.code,
                    String::from_utf8_lossy(response.payload)
                ))
            } else {
                ClientError::Oscore(e.to_string())
            }
        })?;
        Ok(())
    }

    fn is_oscore(&self) -> bool {
        true
    }
}

/// The contexts this process has opened, by directory. A directory is opened at its first
/// use and kept open (and locked) until `close_all`; a failed open is not remembered, so a
/// context that was locked by another process is tried again by the next request.
///
/// Each directory has its own once-slot: the map's lock is held only to find or insert the
/// slot, never across an open, so opens of different contexts proceed concurrently (their
/// durable writes then share journal commits) while two requests for one directory still
/// never open it twice (the second waits on the slot).
pub struct ContextCache {
    open: std::sync::Mutex<Slots>,
    /// Bounds the opens in flight (each holds a blocking thread): enough for their durable
    /// writes to share journal commits, without a burst of first uses growing the blocking
    /// pool to hundreds of threads.
    opening: tokio::sync::Semaphore,
}

type Slot = tokio::sync::OnceCell<Arc<OscoreProtection>>;

/// The slots, by directory. `by_path` is the table (a `Path` key: "a/b" and "a//b/" are one
/// directory, opened and locked once); `by_spelling` finds the same slots by the exact
/// bytes of the path the caller passed, which is what every request after the first takes:
/// hashing a `Path` walks its components (~450 instructions per request for a typical
/// folder), hashing its bytes is one pass of the fast hasher.
#[derive(Default)]
struct Slots {
    by_path: super::FastMap<PathBuf, Arc<Slot>>,
    by_spelling: super::FastMap<OsString, Arc<Slot>>,
}

impl Slots {
    /// Spellings remembered, at most (they come from the credentials, so a handful per
    /// directory; the bound only guards against an unexpected source).
    fn spelling_bound(&self) -> usize {
        4 * self.by_path.len() + 16
    }
}

fn is_usable(slot: &Slot) -> bool {
    !matches!(slot.get(), Some(p) if p.persister.is_closed())
}

/// Opens in flight at once (see `ContextCache::opening`).
const CONCURRENT_OPENS: usize = 16;

impl Default for ContextCache {
    fn default() -> Self {
        Self {
            open: std::sync::Mutex::default(),
            opening: tokio::sync::Semaphore::new(CONCURRENT_OPENS),
        }
    }
}

impl ContextCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The slot for `dir`; a slot whose context was closed is replaced by an empty one.
    fn slot(&self, dir: &Path) -> Arc<Slot> {
        let mut map = self.map();
        if let Some(slot) = map.by_spelling.get(dir.as_os_str()) {
            if is_usable(slot) {
                return Arc::clone(slot);
            }
        }
        let slot = match map.by_path.get(dir) {
            Some(slot) if is_usable(slot) => Arc::clone(slot),
            _ => {
                let slot = Arc::new(Slot::new());
                map.by_path.insert(dir.to_owned(), Arc::clone(&slot));
                slot
            }
        };
        if map.by_spelling.len() >= map.spelling_bound() {
            map.by_spelling.clear();
        }
        map.by_spelling
            .insert(dir.as_os_str().to_owned(), Arc::clone(&slot));
        slot
    }

    /// The open context for `dir`, opening it (off the async threads) if needed.
    pub async fn get(&self, dir: &Path) -> Result<Arc<OscoreProtection>, ContextError> {
        let slot = self.slot(dir);
        let opened = slot
            .get_or_try_init(|| async {
                // Never closed, so acquire cannot fail; a failure would only skip the bound.
                let _permit = self.opening.acquire().await.ok();
                let owned = dir.to_owned();
                let opened = tokio::task::spawn_blocking(move || OscoreProtection::open(&owned))
                    .await
                    .map_err(|_| ContextError::Interrupted {
                        dir: dir.to_owned(),
                    })??;
                Ok::<_, ContextError>(Arc::new(opened))
            })
            .await?;
        Ok(Arc::clone(opened))
    }

    /// Like `get`, but synchronous, for loading the server-side contexts before the
    /// gateway serves (blocking file I/O; nothing else uses the cache then).
    pub fn open_at_load(&self, dir: &Path) -> Result<Arc<OscoreProtection>, ContextError> {
        let slot = self.slot(dir);
        if let Some(p) = slot.get() {
            return Ok(Arc::clone(p));
        }
        let opened = Arc::new(OscoreProtection::open(dir)?);
        slot.set(Arc::clone(&opened))
            .map_err(|_| ContextError::Interrupted {
                dir: dir.to_owned(),
            })?;
        Ok(opened)
    }

    /// Closes every open context (exact sequence.json written, lock released) and returns
    /// the failures. Blocking file I/O, spread over a few blocking threads so that the
    /// durable writes of many contexts share journal commits.
    pub async fn close_all(&self) -> Vec<(PathBuf, StoreError)> {
        let contexts: Vec<(PathBuf, Arc<OscoreProtection>)> = {
            let mut map = self.map();
            map.by_spelling.clear();
            map.by_path.drain().collect::<Vec<_>>()
        }
        .into_iter()
        .filter_map(|(dir, slot)| slot.get().map(|p| (dir, Arc::clone(p))))
        .collect();
        const CLOSERS: usize = 16;
        let per_closer = contexts.len().div_ceil(CLOSERS).max(1);
        let mut groups = Vec::new();
        let mut rest = contexts;
        while !rest.is_empty() {
            let tail = rest.split_off(per_closer.min(rest.len()));
            groups.push(std::mem::replace(&mut rest, tail));
        }
        let close_group = |group: Vec<(PathBuf, Arc<OscoreProtection>)>| {
            group
                .into_iter()
                .filter_map(|(dir, p)| p.close().err().map(|e| (dir, e)))
                .collect::<Vec<_>>()
        };
        let mut tasks = Vec::new();
        for group in groups {
            tasks.push(tokio::task::spawn_blocking(move || close_group(group)));
        }
        let mut failures = Vec::new();
        for task in tasks {
            // A closer that panicked leaves its contexts to be closed on drop.
            if let Ok(mut f) = task.await {
                failures.append(&mut f);
            }
        }
        failures
    }

    /// The directories open now.
    pub async fn open_dirs(&self) -> Vec<PathBuf> {
        self.map()
            .by_path
            .iter()
            .filter(|(_, slot)| slot.get().is_some_and(|p| !p.persister.is_closed()))
            .map(|(dir, _)| dir.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context_dir(parent: &Path, name: &str) -> PathBuf {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("settings.json"),
            r#"{"sender-id_hex": "01", "recipient-id_ascii": "file", "secret_ascii": "Correct Horse Battery Staple"}"#,
        )
        .unwrap();
        dir
    }

    /// The addresses a memo keeps for prefetching are those of the context's own memory: its
    /// allocation (from the `Arc` header on), its persister's hot line, and the whole of
    /// both key schedules (AES-128: 11 round keys of 16 bytes).
    #[test]
    fn protection_lines_point_at_the_context() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Arc::new(OscoreProtection::open(&context_dir(tmp.path(), "c")).unwrap());
        let lines = p.lines();
        assert_eq!(lines.allocation + ARC_HEADER, Arc::as_ptr(&p) as usize);
        assert_eq!(lines.persister, p.persister().hot_line());
        let [(sender, len), (recipient, rlen)] = p.security_context().key_schedule_spans();
        assert_eq!((lines.sender_key, lines.recipient_key), (sender, recipient));
        assert_eq!(lines.key_len as usize, len);
        assert_eq!(len, rlen);
        assert!(
            len >= 11 * 16,
            "an AES-128 schedule is 176 bytes, span {len}"
        );
        // two heap allocations apart from the context's
        let ctx = (
            lines.allocation,
            lines.allocation + std::mem::size_of::<OscoreProtection>(),
        );
        for key in [sender, recipient] {
            assert!(
                key + len <= ctx.0 || key >= ctx.1,
                "key schedule inside the context"
            );
        }
        assert!(sender + len <= recipient || recipient + len <= sender);
        lines.prefetch();
        p.close().unwrap();
    }

    /// Many tasks asking for the same and for different directories at once: each
    /// directory is opened exactly once (one shared handle; a second open would fail on
    /// the lock), and after `close_all` a directory is opened afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_gets_open_each_directory_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..24)
            .map(|i| context_dir(tmp.path(), &format!("c{i}")))
            .collect();
        let cache = Arc::new(ContextCache::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            for d in &dirs {
                let (cache, d) = (Arc::clone(&cache), d.clone());
                tasks.push(tokio::spawn(
                    async move { cache.get(&d).await.map(|p| (d, p)) },
                ));
            }
        }
        let mut first: std::collections::HashMap<PathBuf, Arc<OscoreProtection>> =
            std::collections::HashMap::new();
        for t in tasks {
            let (d, p) = t.await.unwrap().unwrap();
            let same = first.entry(d).or_insert_with(|| Arc::clone(&p));
            assert!(Arc::ptr_eq(same, &p), "{} opened twice", p.dir().display());
        }
        assert_eq!(first.len(), dirs.len());
        let mut open = cache.open_dirs().await;
        open.sort();
        let mut expected = dirs.clone();
        expected.sort();
        assert_eq!(open, expected);
        drop(first);
        assert!(cache.close_all().await.is_empty());
        assert!(cache.open_dirs().await.is_empty());
        // The locks were released: the directory opens again (a second open while it
        // is open would be refused).
        let again = cache.get(&dirs[0]).await.unwrap();
        assert!(!again.persister().is_closed());
        assert!(cache.close_all().await.is_empty());
    }

    /// One directory written several ways ("d", "d/", "d/.", "parent//d"): one context,
    /// whichever spelling comes first and however many spellings there are; once it is
    /// closed, every spelling gets the freshly opened one.
    #[tokio::test]
    async fn spellings_of_one_directory_share_one_context() {
        let tmp = tempfile::tempdir().unwrap();
        let d = context_dir(tmp.path(), "c");
        let spellings = [
            PathBuf::from(format!("{}/", d.display())),
            d.clone(),
            d.join("."),
            PathBuf::from(format!("{}//c", tmp.path().display())),
        ];
        let cache = ContextCache::new();
        let first = cache.get(&spellings[0]).await.unwrap();
        for s in &spellings {
            assert!(Arc::ptr_eq(&first, &cache.get(s).await.unwrap()), "{s:?}");
        }
        // more spellings than the alias table keeps
        for n in 1..60 {
            let s = PathBuf::from(format!("{}{}", d.display(), "/".repeat(n)));
            assert!(Arc::ptr_eq(&first, &cache.get(&s).await.unwrap()), "{s:?}");
        }
        assert_eq!(cache.open_dirs().await.len(), 1);
        first.close().unwrap();
        let again = cache.get(&spellings[2]).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert!(!again.persister().is_closed());
        for s in &spellings {
            assert!(Arc::ptr_eq(&again, &cache.get(s).await.unwrap()), "{s:?}");
        }
        drop((first, again));
        assert!(cache.close_all().await.is_empty());
    }

    /// The cache answers like `find_credential` for matching and non-matching URIs, the
    /// explicit-default-port fallback, several entries, URIs longer than the hash buffer,
    /// and keeps doing so when it fills up and is emptied; errors are passed through.
    #[test]
    fn credential_cache_answers_like_find_credential() {
        let map = CredentialsMap::from_json(
            r#"{
                "coap://a.example/x/*": {"oscore": {"basedir": "ctx-ax"}},
                "coap://a.example/*": {"oscore": {"basedir": "ctx-a"}},
                "coap://b.example:5683/*": {"oscore": {"basedir": "ctx-b"}},
                "coap://127.0.0.1:48104/*": ":gw",
                ":gw": {"oscore": {"basedir": "ctx-gw"}},
                "coap://d.example/*": {"dtls": {"psk": {"ascii": "x"}, "client-identity": {"ascii": "y"}}}
            }"#,
            Path::new("/etc/gw/creds.json"),
        )
        .unwrap();
        let long = format!("coap://a.example/{}/{}", "p".repeat(150), "q".repeat(300));
        let uris: Vec<CoapUri> = [
            "coap://a.example/x/y",
            "coap://a.example/y?q=1",
            "coap://a.example",
            "coap://b.example/z",
            "coap://b.example:5683/z",
            "coap://127.0.0.1:48104/x",
            "coap://127.0.0.1:48105/x",
            "coap://c.example/x",
            "coap://d.example/x",
            long.as_str(),
            "coap://a.example/xy",
        ]
        .iter()
        .map(|u| CoapUri::parse(u).unwrap())
        .collect();
        let dir = |r: &Result<Option<(&Entry, &OscoreCredential)>, CredentialsError>| match r {
            Ok(Some((e, o))) => Ok(Some((e.key.clone(), o.basedir.clone()))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let cache = CredentialCache::new(4);
        for round in 0..3 {
            for u in &uris {
                let expected = dir(&find_credential(&map, u));
                assert_eq!(dir(&cache.find(&map, u)), expected, "round {round}: {u}");
                assert!(cache.len() <= 4);
            }
        }
        // a cache big enough to hit: the second round comes from it, with the same answers
        let big = CredentialCache::for_map(Some(&map));
        assert!(big.capacity >= CREDENTIAL_CACHE);
        for round in 0..2 {
            for u in &uris {
                assert_eq!(
                    dir(&big.find(&map, u)),
                    dir(&find_credential(&map, u)),
                    "big cache, round {round}: {u}"
                );
            }
        }
        assert_eq!(big.len(), uris.len() - 1, "every URI but the error cached");
        // `cached` tells what a lookup would, without the map: the entry's index, no match,
        // or not known (the error is never remembered)
        for u in &uris {
            let expected = match big.find_indexed(&map, u) {
                Ok(found) => Some(found.map(|(i, _, _)| i.unwrap())),
                Err(_) => None,
            };
            assert_eq!(big.cached(u), expected, "{u}");
        }
        assert_eq!(big.cached(&uris[7]), Some(None), "no pattern matches");
        let unseen = CoapUri::parse("coap://a.example/never/asked").unwrap();
        assert_eq!(big.cached(&unseen), None);
        for (i, e) in map.entries().iter().enumerate() {
            assert_eq!(entry_index(map.entries(), e), Some(i));
        }
        let stranger = map.entries()[0].clone();
        assert_eq!(entry_index(map.entries(), &stranger), None);
        assert!(dir(&cache.find(&map, &uris[8])).is_err(), "dtls entry");
        assert!(matches!(dir(&cache.find(&map, &uris[7])), Ok(None)));
        // equal URIs have equal keys and hash alike; parts that concatenate alike do not
        // make equal keys (uris[10] would get uris[0]'s answer from the big cache)
        let key = |u: &CoapUri| uri_key(u);
        assert_eq!(key(&uris[0]), key(&uris[0].clone()));
        assert_eq!(
            cache.hash(&key(&uris[0])),
            cache.hash(&key(&uris[0].clone()))
        );
        assert_ne!(cache.hash(&key(&uris[0])), cache.hash(&key(&uris[1])));
        assert_ne!(key(&uris[0]), key(&uris[10]));
        let parsed = |u: &str| key(&CoapUri::parse(u).unwrap());
        assert_ne!(parsed("coap://a.example/x"), parsed("coap://a.example?x"));
        assert_ne!(
            parsed("coap://a.example/x/y"),
            parsed("coap://a.example/x?y")
        );
        assert!(key(&uris[9]).spilled(), "a long URI's key is on the heap");
        assert_eq!(key(&uris[9]), key(&uris[9].clone()));
        // one-byte lengths, and the long form from 255 bytes on, which stays unambiguous
        assert_eq!(
            &parsed("coap://h/ab")[..],
            b"\x04coap\x01h\x03\0\0\0\x04\x01\0\0\0\x02ab"
        );
        let long = format!("coap://h/{}", "a".repeat(255));
        let k = parsed(&long);
        assert_eq!(&k[16..21], &[255, 255, 0, 0, 0]);
        assert_eq!(k.len(), 21 + 255);
        // a 254-byte segment followed by one more: not confused with a 255-byte one
        assert_ne!(
            parsed(&format!("coap://h/{}/a", "a".repeat(254))),
            parsed(&format!("coap://h/{}a", "a".repeat(254)))
        );
        // a usual target's key fits the slot's line; a long one lives on the heap
        let short = big.known.lock().unwrap().iter().any(|k| !k.key.spilled());
        let spilled = big.known.lock().unwrap().iter().any(|k| k.key.spilled());
        assert!(short && spilled, "both kinds of slot were exercised");
    }
}
