//! Block-wise transfers across the gateway (pure state; time is passed in as `now`).
//!
//! - Client uploads (RFC 7959 §2.5): the gateway terminates a client's Block1 operation
//!   (a proxy may do so, §2.10): blocks are reassembled per *client transfer*, keyed by the
//!   client's address, the method and every request option except the block-wise ones
//!   (§2.4), which includes the target URI and the client's own Request-Tag (RFC 9175 §3.3).
//!   Each buffer has a byte cap (4.13 with Size1, §2.9.3) and an idle timeout; the table
//!   has a size cap.
//! - Upstream uploads: a body larger than one block goes to the origin as inner Block1 of
//!   `UPSTREAM_SZX`, every block of one transfer carrying the same fresh Request-Tag
//!   (RFC 9175 §3). aiocoap's Block1Spool keys transfers by (address, recipient key,
//!   code, cache key), and Request-Tag is part of the cache key (it is not NoCacheKey), so
//!   two transfers from the gateway's one security context to the same path never mix.
//! - Responses (Block2): relayed block by block to the client, never reassembled: an origin
//!   serves at most 1024-byte inner blocks, which fit a plain datagram to the client, and
//!   a client that did not ask block-wise still gets a correct first block with M=1 (a
//!   reassembled body over ~1 kB would not fit one datagram to it at all).
//! - Outer block-wise (RFC 8613 §4.1.3.4.2): a protected message over the configured
//!   maximum message size is cut into outer Block1 fragments; outer Block2 fragments of a
//!   response (from an intermediary) are reassembled before it is verified.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::coap::option::encode_uint;
use crate::coap::{number, BlockValue, Code, CodecError, MessageBuilder, MessageType, MessageView};

/// Upstream block size: SZX 6 (1024 bytes), as aiocoap uses inside OSCORE (its
/// `OSCOREAddress.maximum_block_size_exp`).
pub const UPSTREAM_SZX: u8 = 6;

/// Caps and timeouts of block-wise buffers (`[blockwise]` and `[coap]` in proxy.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or response body the gateway buffers (bytes).
    pub max_body_size: usize,
    /// A transfer with no new block for this long is dropped.
    pub idle_timeout: Duration,
    /// At most this many client uploads are buffered at once.
    pub max_transfers: usize,
    /// Largest datagram sent upstream; a larger protected message goes as outer Block1.
    pub max_message_size: usize,
}

/// RFC 7252 §4.6: 1152 bytes is the message size to assume without path MTU knowledge.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1152;
pub const DEFAULT_MAX_BODY_SIZE: usize = 1 << 20;
/// RFC 7252 §4.8.2 MAX_TRANSMIT_WAIT (93 s), what aiocoap keeps its Block1Spool entries.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(93);
pub const DEFAULT_MAX_TRANSFERS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_transfers: DEFAULT_MAX_TRANSFERS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// Why a block-wise transfer cannot go on; each maps to the client's response.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockwiseError {
    #[error("request body of {size} bytes exceeds the gateway's limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("Block1 {num} does not continue a transfer the gateway holds (expected offset {expected:?})")]
    Incomplete { num: u32, expected: Option<usize> },
    #[error("Block1 {num} with M=1 carries {len} bytes instead of its block size {size}")]
    BadBlockSize { num: u32, len: usize, size: usize },
    #[error("too many block-wise transfers in progress ({0}); try again later")]
    TooManyTransfers(usize),
    #[error("malformed block-wise option: {0}")]
    Malformed(#[from] CodecError),
    #[error("outer Block2 fragment {num} at offset {offset}, but {have} bytes were received")]
    OuterOutOfOrder {
        num: u32,
        offset: usize,
        have: usize,
    },
}

impl BlockwiseError {
    /// The response code for the client (RFC 7959 §2.9).
    pub fn code(&self) -> Code {
        match self {
            BlockwiseError::TooLarge { .. } => Code::REQUEST_ENTITY_TOO_LARGE,
            BlockwiseError::Incomplete { .. } => Code::REQUEST_ENTITY_INCOMPLETE,
            BlockwiseError::TooManyTransfers(_) => Code::SERVICE_UNAVAILABLE,
            BlockwiseError::OuterOutOfOrder { .. } => Code::BAD_GATEWAY,
            BlockwiseError::BadBlockSize { .. } | BlockwiseError::Malformed(_) => Code::BAD_REQUEST,
        }
    }
}

/// Identifies one client upload (RFC 7959 §2.4, RFC 9175 §3.3): the client's address, the
/// method, and every option except Block1/Block2/Size1/Size2/Observe/Echo, in order (so
/// the target URI and the client's Request-Tag, absent being distinct from empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransferKey {
    client: SocketAddr,
    method: Code,
    options: Vec<(u16, Vec<u8>)>,
}

fn is_blockwise_option(n: u16) -> bool {
    matches!(
        n,
        number::BLOCK1
            | number::BLOCK2
            | number::SIZE1
            | number::SIZE2
            | number::OBSERVE
            | number::ECHO
    )
}

impl TransferKey {
    pub fn of(client: SocketAddr, request: &MessageView<'_>) -> Self {
        Self {
            client,
            method: request.code,
            options: request
                .options()
                .filter(|o| !is_blockwise_option(o.number))
                .map(|o| (o.number, o.value.to_vec()))
                .collect(),
        }
    }
}

struct Assembly {
    body: Vec<u8>,
    last_activity: Instant,
}

/// What to do after a client's Block1 block.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// Answer 2.31 Continue with this Block1 (RFC 7959 §2.3).
    Continue(BlockValue),
    /// The body is complete; `last` is the client's final Block1 (echoed in the response).
    Complete { body: Vec<u8>, last: BlockValue },
}

/// The client uploads being reassembled.
pub struct Block1Reassembly {
    transfers: HashMap<TransferKey, Assembly>,
    limits: Limits,
}

impl Block1Reassembly {
    pub fn new(limits: Limits) -> Self {
        Self {
            transfers: HashMap::new(),
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }

    /// Drops transfers idle for longer than the idle timeout.
    pub fn expire(&mut self, now: Instant) {
        let idle = self.limits.idle_timeout;
        self.transfers
            .retain(|_, a| now.saturating_duration_since(a.last_activity) < idle);
    }

    /// Feeds one block (`block1`, its payload and the Size1 the client announced).
    pub fn feed(
        &mut self,
        key: TransferKey,
        block1: BlockValue,
        size1: Option<u64>,
        payload: &[u8],
        now: Instant,
    ) -> Result<Fed, BlockwiseError> {
        self.expire(now);
        let max = self.limits.max_body_size;
        // RFC 7959 §4: Size1 announces the whole body; refuse before buffering anything.
        if let Some(size) = size1 {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > max {
                self.transfers.remove(&key);
                return Err(BlockwiseError::TooLarge { size, max });
            }
        }
        if block1.more && payload.len() != block1.size() {
            self.transfers.remove(&key);
            return Err(BlockwiseError::BadBlockSize {
                num: block1.num,
                len: payload.len(),
                size: block1.size(),
            });
        }
        if block1.num == 0 {
            // A new operation replaces an unfinished one with the same key (§2.5).
            if !self.transfers.contains_key(&key)
                && self.transfers.len() >= self.limits.max_transfers
            {
                return Err(BlockwiseError::TooManyTransfers(self.transfers.len()));
            }
            self.transfers.insert(
                key.clone(),
                Assembly {
                    body: Vec::with_capacity(payload.len() * 2),
                    last_activity: now,
                },
            );
        }
        let Some(a) = self.transfers.get_mut(&key) else {
            return Err(BlockwiseError::Incomplete {
                num: block1.num,
                expected: None,
            });
        };
        let offset = block1.offset();
        if offset != a.body.len() {
            let expected = Some(a.body.len());
            self.transfers.remove(&key);
            return Err(BlockwiseError::Incomplete {
                num: block1.num,
                expected,
            });
        }
        let size = offset + payload.len();
        if size > max {
            self.transfers.remove(&key);
            return Err(BlockwiseError::TooLarge { size, max });
        }
        a.body.extend_from_slice(payload);
        a.last_activity = now;
        if block1.more {
            return Ok(Fed::Continue(block1));
        }
        let body = self
            .transfers
            .remove(&key)
            .map(|a| a.body)
            .unwrap_or_default();
        Ok(Fed::Complete { body, last: block1 })
    }
}

/// Fresh Request-Tags for the gateway's upstream transfers (RFC 9175 §3.4: a tag is not
/// reused while an operation with it may still be in progress at the server): a counter
/// from a random start, 4 bytes, so 2^32 transfers pass before one repeats.
pub struct RequestTags {
    next: AtomicU32,
}

impl RequestTags {
    pub fn new(start: u32) -> Self {
        Self {
            next: AtomicU32::new(start),
        }
    }

    pub fn next_tag(&self) -> [u8; 4] {
        self.next.fetch_add(1, Ordering::Relaxed).to_be_bytes()
    }
}

/// The next upstream block of a body of `len` bytes after `offset`, with block size
/// `szx` (RFC 7959 §2.5): the Block1 value and the byte range it carries.
pub fn upstream_block(
    len: usize,
    offset: usize,
    szx: u8,
) -> Result<(BlockValue, std::ops::Range<usize>), BlockwiseError> {
    let size = 1usize << (szx + 4);
    let end = (offset + size).min(len);
    let num = u32::try_from(offset / size).unwrap_or(u32::MAX);
    let block = BlockValue::new(num, end < len, szx)?;
    Ok((block, offset..end))
}

/// Whether a request body goes upstream block-wise: bigger than one upstream block and
/// not already cut by the client.
pub fn needs_upstream_block1(request: &MessageView<'_>) -> bool {
    !request.has_option(number::BLOCK1) && request.payload.len() > 1 << (UPSTREAM_SZX + 4)
}

/// Writes `response` with its Block1 option replaced by `block1` (or removed): the
/// origin's Block1 answers the gateway's upstream blocks, the client must see its own.
pub fn with_block1(
    response: &MessageView<'_>,
    block1: Option<BlockValue>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let mut buf = [0u8; 8];
    let enc = block1.map(|b| b.encode(&mut buf).to_vec());
    let mut opts: Vec<(u16, &[u8])> = response
        .options()
        .filter(|o| o.number != number::BLOCK1)
        .map(|o| (o.number, o.value))
        .collect();
    if let Some(e) = &enc {
        opts.push((number::BLOCK1, e));
    }
    crate::coap::sort_options(&mut opts);
    let mut b = MessageBuilder::new(
        out,
        response.mtype,
        response.code,
        response.message_id,
        response.token,
    )?;
    for (n, v) in opts {
        b.option(n, v)?;
    }
    b.payload(response.payload);
    Ok(())
}

/// A plain response datagram with `code`, `options` and a diagnostic (header fields are
/// replaced by the server when relayed).
pub fn response(code: Code, options: &[(u16, &[u8])], diagnostic: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + diagnostic.len());
    if let Ok(mut b) = MessageBuilder::new(&mut out, MessageType::Acknowledgement, code, 0, &[]) {
        let ok = options.iter().all(|(n, v)| b.option(*n, v).is_ok());
        if ok {
            b.payload(diagnostic.as_bytes());
        }
    }
    out
}

/// 2.31 Continue acknowledging `block1` (RFC 7959 §2.3).
pub fn continue_response(block1: BlockValue) -> Vec<u8> {
    let mut buf = [0u8; 8];
    response(
        Code::CONTINUE,
        &[(number::BLOCK1, block1.encode(&mut buf))],
        "",
    )
}

/// The client's answer for a failed transfer: 4.13 carries Size1 = the limit (§2.9.3).
pub fn error_response(e: &BlockwiseError, max_body_size: usize) -> Vec<u8> {
    let mut buf = [0u8; 8];
    let size1 = encode_uint(max_body_size as u64, &mut buf);
    let diag = e.to_string();
    match e {
        BlockwiseError::TooLarge { .. } => response(e.code(), &[(number::SIZE1, size1)], &diag),
        _ => response(e.code(), &[], &diag),
    }
}

/// A message re-built with the same header (`mid`, `token` replaced), its options minus
/// Block1/Block2/Size1/Size2, `extra` options, and `payload`.
fn rebuild(
    message: &MessageView<'_>,
    mid: u16,
    token: &[u8],
    extra: &[(u16, &[u8])],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let mut opts: Vec<(u16, &[u8])> = message
        .options()
        .filter(|o| {
            !matches!(
                o.number,
                number::BLOCK1 | number::BLOCK2 | number::SIZE1 | number::SIZE2
            )
        })
        .map(|o| (o.number, o.value))
        .chain(extra.iter().copied())
        .collect();
    crate::coap::sort_options(&mut opts);
    let mut b = MessageBuilder::new(out, message.mtype, message.code, mid, token)?;
    for (n, v) in opts {
        b.option(n, v)?;
    }
    b.payload(payload);
    Ok(())
}

/// Outer Block1 (RFC 8613 §4.1.3.4.2, RFC 7959): the SZX to cut a protected request into so
/// that each fragment fits `max_message_size`, or None when it fits as it is. Overhead
/// counted: header, token, the outer options, Block1 (≤ 4 bytes), Size1 (≤ 5) and the
/// payload marker.
pub fn outer_block1_szx(
    protected: &MessageView<'_>,
    datagram_len: usize,
    max_message_size: usize,
) -> Result<Option<u8>, BlockwiseError> {
    if datagram_len <= max_message_size {
        return Ok(None);
    }
    let overhead = datagram_len - protected.payload.len() + 4 + 5 + 1;
    let room = max_message_size.saturating_sub(overhead);
    let szx = (0..=6u8).rev().find(|szx| 1usize << (szx + 4) <= room);
    szx.map(Some).ok_or(BlockwiseError::TooLarge {
        size: overhead + 16,
        max: max_message_size,
    })
}

/// Outer Block1 fragment `num` of `protected` with block size `szx`: the outer options,
/// Block1, Size1 on the first fragment, and its slice of the OSCORE payload. Returns the
/// Block1 value (M tells whether more follow).
pub fn outer_block1_fragment(
    protected: &MessageView<'_>,
    num: u32,
    szx: u8,
    mid: u16,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Result<BlockValue, BlockwiseError> {
    let len = protected.payload.len();
    let (block, range) = upstream_block(len, num as usize * (1usize << (szx + 4)), szx)?;
    if range.start >= len && len > 0 {
        return Err(BlockwiseError::Incomplete {
            num,
            expected: Some(len),
        });
    }
    let mut b1 = [0u8; 8];
    let mut s1 = [0u8; 8];
    let mut extra: Vec<(u16, &[u8])> = vec![(number::BLOCK1, block.encode(&mut b1))];
    if num == 0 {
        extra.push((number::SIZE1, encode_uint(len as u64, &mut s1)));
    }
    rebuild(
        protected,
        mid,
        token,
        &extra,
        &protected.payload[range],
        out,
    )?;
    Ok(block)
}

/// The protected request again, asking the intermediary for outer Block2 `block`
/// (RFC 7959 §2.4: the same request with Block2 set; the OSCORE payload is unchanged).
pub fn outer_block2_request(
    protected: &MessageView<'_>,
    block: BlockValue,
    mid: u16,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), BlockwiseError> {
    let mut b2 = [0u8; 8];
    rebuild(
        protected,
        mid,
        token,
        &[(number::BLOCK2, block.encode(&mut b2))],
        &[],
        out,
    )?;
    Ok(())
}

/// Reassembly of a protected response that arrives in outer Block2 fragments; the result
/// is the whole protected response (first fragment's header and outer options without
/// the block-wise ones), ready to be verified.
pub struct OuterBlock2 {
    first: Vec<u8>,
    payload: Vec<u8>,
    max: usize,
    next: Option<BlockValue>,
}

impl OuterBlock2 {
    /// Starts with the first fragment; `Ok(None)` when it is not block-wise at all.
    pub fn start(response: &[u8], max_body_size: usize) -> Result<Option<Self>, BlockwiseError> {
        let view = MessageView::parse(response)?;
        if view.option(number::BLOCK2).is_none() {
            return Ok(None);
        }
        let mut s = Self {
            first: response.to_vec(),
            payload: Vec::new(),
            max: max_body_size,
            next: None,
        };
        s.feed(response)?;
        Ok(Some(s))
    }

    /// Adds the next fragment; it must continue at the offset received so far, with the
    /// first fragment's code.
    pub fn feed(&mut self, fragment: &[u8]) -> Result<(), BlockwiseError> {
        let view = MessageView::parse(fragment)?;
        let first_code = MessageView::parse(&self.first)?.code;
        let b = BlockValue::decode(view.option(number::BLOCK2).unwrap_or(&[]))?;
        if view.code != first_code || b.offset() != self.payload.len() {
            return Err(BlockwiseError::OuterOutOfOrder {
                num: b.num,
                offset: b.offset(),
                have: self.payload.len(),
            });
        }
        let size = self.payload.len() + view.payload.len();
        if size > self.max {
            return Err(BlockwiseError::TooLarge {
                size,
                max: self.max,
            });
        }
        self.payload.extend_from_slice(view.payload);
        self.next = if b.more {
            let num = u32::try_from(self.payload.len() / b.size()).unwrap_or(u32::MAX);
            Some(BlockValue::new(num, false, b.szx)?)
        } else {
            None
        };
        Ok(())
    }

    /// The Block2 to ask for next, or None when the response is complete.
    pub fn next_block(&self) -> Option<BlockValue> {
        self.next
    }

    /// The whole protected response (once `next_block` is None).
    pub fn finish(self) -> Result<Vec<u8>, BlockwiseError> {
        let view = MessageView::parse(&self.first)?;
        let mut out = Vec::with_capacity(self.first.len() + self.payload.len());
        rebuild(
            &view,
            view.message_id,
            view.token,
            &[],
            &self.payload,
            &mut out,
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oscore::{
        protect_request, protect_response, unprotect_request, unprotect_response, ContextParams,
        HkdfAlgorithm, OscoreError, ReplayWindow, SecurityContext, SenderSequenceNumber,
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn put(path: &str, tag: Option<&[u8]>, block1: Option<BlockValue>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Confirmable, Code::PUT, 1, &[7]).unwrap();
        b.option(number::URI_PATH, path.as_bytes()).unwrap();
        let mut buf = [0u8; 8];
        if let Some(b1) = block1 {
            b.option(number::BLOCK1, b1.encode(&mut buf)).unwrap();
        }
        if let Some(t) = tag {
            b.option(number::REQUEST_TAG, t).unwrap();
        }
        b.payload(payload);
        out
    }

    fn key(port: u16, path: &str, tag: Option<&[u8]>) -> TransferKey {
        TransferKey::of(
            addr(port),
            &MessageView::parse(&put(
                path,
                tag,
                Some(BlockValue::new(0, true, 0).unwrap()),
                b"x",
            ))
            .unwrap(),
        )
    }

    fn limits() -> Limits {
        Limits {
            max_body_size: 100,
            idle_timeout: Duration::from_secs(10),
            max_transfers: 3,
            max_message_size: 200,
        }
    }

    fn b(num: u32, more: bool) -> BlockValue {
        BlockValue::new(num, more, 0).unwrap() // 16-byte blocks
    }

    #[test]
    fn key_separates_clients_paths_and_request_tags_but_not_block_options() {
        assert_eq!(key(1, "a", None), key(1, "a", None));
        assert_ne!(key(1, "a", None), key(2, "a", None));
        assert_ne!(key(1, "a", None), key(1, "b", None));
        assert_ne!(key(1, "a", None), key(1, "a", Some(b"")));
        assert_ne!(key(1, "a", Some(b"1")), key(1, "a", Some(b"2")));
        let other_block = TransferKey::of(
            addr(1),
            &MessageView::parse(&put("a", None, Some(b(5, false)), b"yy")).unwrap(),
        );
        assert_eq!(key(1, "a", None), other_block);
    }

    #[test]
    fn interleaved_transfers_to_the_same_path_do_not_mix() {
        let now = Instant::now();
        let mut r = Block1Reassembly::new(limits());
        let (ka, kb) = (key(1, "f", None), key(2, "f", None));
        let (a, bb) = ([b'a'; 40], [b'b'; 40]);
        for (num, more, range) in [(0, true, 0..16), (1, true, 16..32)] {
            assert_eq!(
                r.feed(ka.clone(), b(num, more), None, &a[range.clone()], now),
                Ok(Fed::Continue(b(num, more)))
            );
            assert_eq!(
                r.feed(kb.clone(), b(num, more), None, &bb[range], now),
                Ok(Fed::Continue(b(num, more)))
            );
        }
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.feed(kb, b(2, false), None, &bb[32..], now),
            Ok(Fed::Complete {
                body: bb.to_vec(),
                last: b(2, false)
            })
        );
        assert_eq!(
            r.feed(ka, b(2, false), None, &a[32..], now),
            Ok(Fed::Complete {
                body: a.to_vec(),
                last: b(2, false)
            })
        );
        assert!(r.is_empty());
    }

    #[test]
    fn byte_cap_gives_4_13_with_size1_from_size1_or_from_the_data() {
        let now = Instant::now();
        let mut r = Block1Reassembly::new(limits());
        let e = r
            .feed(key(1, "f", None), b(0, true), Some(101), &[0; 16], now)
            .unwrap_err();
        assert_eq!(
            e,
            BlockwiseError::TooLarge {
                size: 101,
                max: 100
            }
        );
        assert!(r.is_empty(), "nothing buffered for a refused body");
        let k = key(1, "f", None);
        let mut n = 0;
        let e = loop {
            match r.feed(k.clone(), b(n, true), None, &[0; 16], now) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(
            e,
            BlockwiseError::TooLarge {
                size: 112,
                max: 100
            }
        );
        assert_eq!(n, 6);
        assert!(r.is_empty(), "the buffer is dropped");
        let resp = error_response(&e, 100);
        let v = MessageView::parse(&resp).unwrap();
        assert_eq!(v.code, Code::REQUEST_ENTITY_TOO_LARGE);
        assert_eq!(v.option(number::SIZE1), Some(&[100u8][..]));
    }

    #[test]
    fn idle_transfers_expire_and_gaps_are_incomplete() {
        let t0 = Instant::now();
        let mut r = Block1Reassembly::new(limits());
        let k = key(1, "f", None);
        r.feed(k.clone(), b(0, true), None, &[1; 16], t0).unwrap();
        // a gap: block 2 after block 0
        let e = r
            .feed(k.clone(), b(2, true), None, &[1; 16], t0)
            .unwrap_err();
        assert_eq!(e.code(), Code::REQUEST_ENTITY_INCOMPLETE);
        r.feed(k.clone(), b(0, true), None, &[1; 16], t0).unwrap();
        let later = t0 + Duration::from_secs(11);
        let e = r.feed(k, b(1, true), None, &[1; 16], later).unwrap_err();
        assert_eq!(
            e,
            BlockwiseError::Incomplete {
                num: 1,
                expected: None
            }
        );
        // wrong size for a non-final block
        let e = r
            .feed(key(3, "f", None), b(0, true), None, &[1; 15], t0)
            .unwrap_err();
        assert_eq!(e.code(), Code::BAD_REQUEST);
    }

    #[test]
    fn transfer_table_is_capped() {
        let now = Instant::now();
        let mut r = Block1Reassembly::new(limits());
        for port in 1..=3 {
            r.feed(key(port, "f", None), b(0, true), None, &[0; 16], now)
                .unwrap();
        }
        let e = r
            .feed(key(4, "f", None), b(0, true), None, &[0; 16], now)
            .unwrap_err();
        assert_eq!(e, BlockwiseError::TooManyTransfers(3));
        // restarting an existing transfer is allowed; an expired one frees its slot
        r.feed(key(3, "f", None), b(0, true), None, &[0; 16], now)
            .unwrap();
        let later = now + Duration::from_secs(11);
        r.feed(key(4, "f", None), b(0, true), None, &[0; 16], later)
            .unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn upstream_blocks_cover_the_body_and_tags_differ() {
        let mut offset = 0;
        let mut got = Vec::new();
        loop {
            let (blk, range) = upstream_block(2500, offset, UPSTREAM_SZX).unwrap();
            got.push((blk.num, blk.more, range.clone()));
            offset = range.end;
            if !blk.more {
                break;
            }
        }
        assert_eq!(
            got,
            vec![
                (0, true, 0..1024),
                (1, true, 1024..2048),
                (2, false, 2048..2500)
            ]
        );
        let tags = RequestTags::new(u32::MAX);
        assert_ne!(tags.next_tag(), tags.next_tag());
        let big = put("f", None, None, &[0; 1025]);
        assert!(needs_upstream_block1(&MessageView::parse(&big).unwrap()));
        let fits = put("f", None, None, &[0; 1024]);
        assert!(!needs_upstream_block1(&MessageView::parse(&fits).unwrap()));
        let cut = put("f", None, Some(b(0, true)), &[0; 1025]);
        assert!(!needs_upstream_block1(&MessageView::parse(&cut).unwrap()));
    }

    #[test]
    fn response_gets_the_clients_block1() {
        let mut origin = Vec::new();
        let mut bld = MessageBuilder::new(
            &mut origin,
            MessageType::Acknowledgement,
            Code::CHANGED,
            9,
            &[1],
        )
        .unwrap();
        bld.option(number::BLOCK1, &[0x26]).unwrap();
        bld.option(number::SIZE1, &[1]).unwrap();
        bld.finish();
        let v = MessageView::parse(&origin).unwrap();
        let mut out = Vec::new();
        with_block1(&v, Some(BlockValue::new(19, false, 6).unwrap()), &mut out).unwrap();
        let r = MessageView::parse(&out).unwrap();
        let mut buf = [0; 8];
        let want = BlockValue::new(19, false, 6).unwrap();
        assert_eq!(r.option(number::BLOCK1), Some(want.encode(&mut buf)));
        assert_eq!(r.option(number::SIZE1), Some(&[1u8][..]));
        let mut out = Vec::new();
        with_block1(&v, None, &mut out).unwrap();
        assert!(!MessageView::parse(&out).unwrap().has_option(number::BLOCK1));
    }

    fn contexts() -> (SecurityContext, SecurityContext) {
        let p = ContextParams {
            master_secret: b"0123456789abcdef".to_vec(),
            master_salt: Vec::new(),
            sender_id: vec![0x01],
            recipient_id: vec![0x02],
            id_context: None,
            aead: crate::oscore::AeadAlgorithm::default(),
            hkdf: HkdfAlgorithm::Sha256,
            replay_window: 32,
        };
        let mut q = p.clone();
        std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
        (
            SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap(),
            SecurityContext::derive(&q, ReplayWindow::new_empty(32)).unwrap(),
        )
    }

    /// RFC 8613 §4.1.3.4.2 on a real protected message: outer Block1 fragments each fit
    /// the maximum, carry the outer options, and reassembled (as an outer-block-wise
    /// server would) they verify; a single fragment is refused by unprotect.
    #[test]
    fn outer_block1_fragments_fit_and_reassemble_to_a_verifiable_request() {
        let (client, server) = contexts();
        let body: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let plain = put("big", None, None, &body);
        let mut wire = Vec::new();
        protect_request(
            &client,
            SenderSequenceNumber(5),
            &MessageView::parse(&plain).unwrap(),
            &mut wire,
        )
        .unwrap();
        let protected = MessageView::parse(&wire).unwrap();
        let max = 1152;
        assert_eq!(outer_block1_szx(&protected, wire.len(), 4000), Ok(None));
        let szx = outer_block1_szx(&protected, wire.len(), max)
            .unwrap()
            .unwrap();
        assert_eq!(szx, 6);
        let mut payload = Vec::new();
        let mut num = 0;
        let mut first = None;
        loop {
            let mut frag = Vec::new();
            let blk = outer_block1_fragment(
                &protected,
                num,
                szx,
                100 + num as u16,
                &[num as u8],
                &mut frag,
            )
            .unwrap();
            assert!(frag.len() <= max, "fragment {num} is {} bytes", frag.len());
            let v = MessageView::parse(&frag).unwrap();
            assert_eq!(v.code, Code::POST);
            assert_eq!(v.option(number::OSCORE), protected.option(number::OSCORE));
            assert_eq!(
                v.has_option(number::SIZE1),
                num == 0,
                "Size1 only on the first fragment"
            );
            assert_eq!(
                BlockValue::decode(v.option(number::BLOCK1).unwrap()).unwrap(),
                blk
            );
            let mut out = Vec::new();
            assert_eq!(
                unprotect_request(&server, &v, &mut out).unwrap_err(),
                OscoreError::OuterBlockwise
            );
            payload.extend_from_slice(v.payload);
            if first.is_none() {
                first = Some(frag.clone());
            }
            if !blk.more {
                break;
            }
            num += 1;
        }
        assert_eq!(num, 2);
        assert_eq!(payload, protected.payload);
        // Reassemble the way an outer-block-wise server would, then verify.
        let first = first.unwrap();
        let fv = MessageView::parse(&first).unwrap();
        let mut whole = Vec::new();
        rebuild(&fv, 1, &[7], &[], &payload, &mut whole).unwrap();
        let mut out = Vec::new();
        unprotect_request(&server, &MessageView::parse(&whole).unwrap(), &mut out).unwrap();
        assert_eq!(MessageView::parse(&out).unwrap().payload, &body[..]);
        // a maximum too small for even a 16-byte fragment
        assert!(matches!(
            outer_block1_szx(&protected, wire.len(), 20),
            Err(BlockwiseError::TooLarge { .. })
        ));
    }

    /// Outer Block2 from an intermediary: fragments of a protected response are reassembled
    /// and then verify; out-of-order fragments and the byte cap are refused; the request
    /// for the next block is the same protected request with Block2.
    #[test]
    fn outer_block2_reassembles_a_verifiable_response() {
        let (client, server) = contexts();
        let plain = put("x", None, None, b"");
        let mut wire = Vec::new();
        let binding = protect_request(
            &client,
            SenderSequenceNumber(1),
            &MessageView::parse(&plain).unwrap(),
            &mut wire,
        )
        .unwrap();
        let mut out = Vec::new();
        let sbinding =
            unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut out).unwrap();
        let body = vec![0x5a; 2000];
        let mut resp_plain = Vec::new();
        MessageBuilder::new(
            &mut resp_plain,
            MessageType::Acknowledgement,
            Code::CONTENT,
            1,
            &[7],
        )
        .unwrap()
        .payload(&body);
        let mut resp = Vec::new();
        protect_response(
            &server,
            &sbinding,
            None,
            &MessageView::parse(&resp_plain).unwrap(),
            &mut resp,
        )
        .unwrap();
        let rv = MessageView::parse(&resp).unwrap();
        // the intermediary cuts it into 512-byte outer Block2 fragments
        let frags: Vec<Vec<u8>> = rv
            .payload
            .chunks(512)
            .enumerate()
            .map(|(i, c)| {
                let mut f = Vec::new();
                let more = (i + 1) * 512 < rv.payload.len();
                let mut buf = [0; 8];
                let blk = BlockValue::new(i as u32, more, 5).unwrap();
                rebuild(
                    &rv,
                    50 + i as u16,
                    &[7],
                    &[(number::BLOCK2, blk.encode(&mut buf))],
                    c,
                    &mut f,
                )
                .unwrap();
                f
            })
            .collect();
        assert!(OuterBlock2::start(&resp, 1 << 20).unwrap().is_none());
        let mut a = OuterBlock2::start(&frags[0], 1 << 20).unwrap().unwrap();
        let mut i = 1;
        while let Some(next) = a.next_block() {
            assert_eq!(next.num, i as u32);
            let mut req = Vec::new();
            outer_block2_request(&MessageView::parse(&wire).unwrap(), next, 9, &[1], &mut req)
                .unwrap();
            let q = MessageView::parse(&req).unwrap();
            assert_eq!(
                q.option(number::OSCORE),
                MessageView::parse(&wire).unwrap().option(number::OSCORE)
            );
            assert_eq!(
                BlockValue::decode(q.option(number::BLOCK2).unwrap()).unwrap(),
                next
            );
            a.feed(&frags[i]).unwrap();
            i += 1;
        }
        assert_eq!(i, frags.len());
        let whole = a.finish().unwrap();
        let mut out = Vec::new();
        unprotect_response(
            &client,
            &binding,
            &MessageView::parse(&whole).unwrap(),
            &mut out,
        )
        .unwrap();
        assert_eq!(MessageView::parse(&out).unwrap().payload, &body[..]);

        // out of order, and over the cap
        let mut a = OuterBlock2::start(&frags[0], 1 << 20).unwrap().unwrap();
        assert!(matches!(
            a.feed(&frags[2]),
            Err(BlockwiseError::OuterOutOfOrder { .. })
        ));
        let mut a = OuterBlock2::start(&frags[0], 1000).unwrap().unwrap();
        assert!(matches!(
            a.feed(&frags[1]),
            Err(BlockwiseError::TooLarge { .. })
        ));
    }
}
