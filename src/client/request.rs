//! One logical CoAP request as the `request` tool makes it: block-wise upload (Block1) and
//! download (Block2) per RFC 7959, and one retry with the server's Echo (RFC 9175 §2.4,
//! RFC 8613 App. B.1.2), over a `Protection` that is either plain or OSCORE.

use thiserror::Error;

use super::transport::{random_bytes, TransportError, UdpClient};
use crate::coap::option::{decode_uint, encode_uint};
use crate::coap::{number, BlockValue, CoapUri, Code, MessageBuilder, MessageType, MessageView};

/// Preferred block size: SZX 6 (1024 bytes), as aiocoap uses inside OSCORE.
pub const DEFAULT_SZX: u8 = 6;
/// Largest body the tool buffers (uploads are read whole, downloads are reassembled).
pub const MAX_BODY: usize = 256 << 20;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("malformed response from {peer}: {reason}")]
    BadResponse {
        peer: std::net::SocketAddr,
        reason: String,
    },
    #[error("OSCORE: {0}")]
    Oscore(String),
    #[error("security context: {0}")]
    Context(String),
    #[error("response body exceeds {MAX_BODY} bytes")]
    TooLarge,
    #[error("cannot build the request: {0}")]
    Build(String),
}

/// How a request leg is secured. `protect` turns a plain request datagram into what goes on
/// the wire; `unprotect` turns the wire response back into a plain response datagram.
#[allow(async_fn_in_trait)]
pub trait Protection {
    type Binding;
    async fn protect(&self, plain: &[u8], out: &mut Vec<u8>) -> Result<Self::Binding, ClientError>;
    fn unprotect(
        &self,
        binding: &Self::Binding,
        wire: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError>;
    /// Whether responses are verified end to end (for the summary line).
    fn is_oscore(&self) -> bool;
}

/// No protection: plain CoAP.
pub struct Plain;

impl Protection for Plain {
    type Binding = ();
    async fn protect(&self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), ClientError> {
        out.clear();
        out.extend_from_slice(plain);
        Ok(())
    }
    fn unprotect(&self, _: &(), wire: &[u8], out: &mut Vec<u8>) -> Result<(), ClientError> {
        out.clear();
        out.extend_from_slice(wire);
        Ok(())
    }
    fn is_oscore(&self) -> bool {
        false
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: Code,
    pub uri: CoapUri,
    /// Sent through a forward proxy: Proxy-Scheme, Uri-Host and Uri-Port are added
    /// (aiocoap-client --proxy style; all three are outer options under OSCORE, §4.1.3.3).
    pub via_proxy: bool,
    pub content_format: Option<u16>,
    pub payload: Vec<u8>,
}

/// The final response, with a body reassembled from all Block2 blocks.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub code: Code,
    pub content_format: Option<u16>,
    pub payload: Vec<u8>,
    /// How many request/response exchanges it took (blocks, Echo retries).
    pub exchanges: usize,
    /// How many of them were answered with 4.01 + Echo and re-sent.
    pub echo_retries: usize,
}

struct Exchange<'a> {
    block1: Option<BlockValue>,
    block2: Option<BlockValue>,
    size1: Option<usize>,
    echo: Option<Vec<u8>>,
    body: &'a [u8],
}

struct PlainResponse {
    code: Code,
    content_format: Option<u16>,
    block1: Option<BlockValue>,
    block2: Option<BlockValue>,
    etag: Option<Vec<u8>>,
    echo: Option<Vec<u8>>,
    payload: Vec<u8>,
}

fn build_request(
    spec: &RequestSpec,
    ex: &Exchange,
    mid: u16,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ClientError> {
    let mut options: Vec<(u16, Vec<u8>)> = Vec::with_capacity(8 + spec.uri.path.len());
    let mut u = [0u8; 8];
    let uint = |v: u64, u: &mut [u8; 8]| encode_uint(v, u).to_vec();
    if spec.via_proxy || !spec.uri.host_is_ip_literal() {
        options.push((number::URI_HOST, spec.uri.host.as_bytes().to_vec()));
    }
    if spec.via_proxy {
        options.push((
            number::URI_PORT,
            uint(u64::from(spec.uri.effective_port()), &mut u),
        ));
        options.push((number::PROXY_SCHEME, spec.uri.scheme.as_bytes().to_vec()));
    }
    for seg in &spec.uri.path {
        options.push((number::URI_PATH, seg.as_bytes().to_vec()));
    }
    for q in &spec.uri.query {
        options.push((number::URI_QUERY, q.as_bytes().to_vec()));
    }
    if let (Some(cf), false) = (spec.content_format, ex.body.is_empty()) {
        options.push((number::CONTENT_FORMAT, uint(u64::from(cf), &mut u)));
    }
    if let Some(b) = ex.block2 {
        options.push((number::BLOCK2, b.encode(&mut u).to_vec()));
    }
    if let Some(b) = ex.block1 {
        options.push((number::BLOCK1, b.encode(&mut u).to_vec()));
    }
    if let Some(s) = ex.size1 {
        options.push((number::SIZE1, uint(s as u64, &mut u)));
    }
    if let Some(e) = &ex.echo {
        options.push((number::ECHO, e.clone()));
    }
    options.sort_by_key(|o| o.0);
    let mut b = MessageBuilder::new(out, MessageType::Confirmable, spec.method, mid, token)
        .map_err(|e| ClientError::Build(e.to_string()))?;
    for (n, v) in &options {
        b.option(*n, v)
            .map_err(|e| ClientError::Build(e.to_string()))?;
    }
    b.payload(ex.body);
    Ok(())
}

fn read_response(peer: std::net::SocketAddr, bytes: &[u8]) -> Result<PlainResponse, ClientError> {
    let bad = |reason: String| ClientError::BadResponse { peer, reason };
    let m = MessageView::parse(bytes).map_err(|e| bad(e.to_string()))?;
    let block = |n| {
        m.option(n)
            .map(BlockValue::decode)
            .transpose()
            .map_err(|e| bad(e.to_string()))
    };
    Ok(PlainResponse {
        code: m.code,
        content_format: m
            .option(number::CONTENT_FORMAT)
            .and_then(decode_uint)
            .map(|v| v as u16),
        block1: block(number::BLOCK1)?,
        block2: block(number::BLOCK2)?,
        etag: m.option(number::ETAG).map(<[u8]>::to_vec),
        echo: m.option(number::ECHO).map(<[u8]>::to_vec),
        payload: m.payload.to_vec(),
    })
}

/// The Echo value to repeat a request with, when its (verified) response with `code` and
/// Echo option `echo` asks for freshness: RFC 9175 §2.4 / RFC 8613 App. B.1.2, a 4.01
/// Unauthorized with an Echo means the server has no replay window for the context, and
/// the request is repeated once, under a new sequence number, with that Echo. `None`
/// when the request already carried an Echo (`sent_echo`): a second 4.01 is final. Shared
/// by the client, the gateway's forwarding and its Observe registrations.
pub fn echo_to_repeat(code: Code, echo: Option<&[u8]>, sent_echo: bool) -> Option<&[u8]> {
    if code == Code::UNAUTHORIZED && !sent_echo {
        echo
    } else {
        None
    }
}

/// Runs one exchange, re-sending once with the server's Echo if it answers 4.01 + Echo.
async fn exchange<P: Protection>(
    client: &mut UdpClient,
    protection: &P,
    spec: &RequestSpec,
    ex: &mut Exchange<'_>,
    stats: &mut ClientResponse,
) -> Result<PlainResponse, ClientError> {
    let mut plain = Vec::with_capacity(1200);
    let mut wire = Vec::with_capacity(1200);
    let mut out = Vec::with_capacity(1200);
    loop {
        let mid = client.next_message_id();
        let token = random_bytes::<8>();
        build_request(spec, ex, mid, &token, &mut plain)?;
        let binding = protection.protect(&plain, &mut wire).await?;
        let response = client.exchange(&wire, mid, &token).await?;
        stats.exchanges += 1;
        protection.unprotect(&binding, &response, &mut out)?;
        let r = read_response(client.peer(), &out)?;
        if let Some(e) = echo_to_repeat(r.code, r.echo.as_deref(), ex.echo.is_some()) {
            ex.echo = Some(e.to_vec());
            stats.echo_retries += 1;
            continue;
        }
        ex.echo = None;
        return Ok(r);
    }
}

/// Sends `spec` and returns the final response with the whole body.
pub async fn run_request<P: Protection>(
    client: &mut UdpClient,
    protection: &P,
    spec: &RequestSpec,
) -> Result<ClientResponse, ClientError> {
    let mut result = ClientResponse {
        code: Code::EMPTY,
        content_format: None,
        payload: Vec::new(),
        exchanges: 0,
        echo_retries: 0,
    };
    let body = spec.payload.as_slice();
    let mut szx = DEFAULT_SZX;
    let mut offset = 0usize;
    let mut first = true;

    // Block1 upload (RFC 7959 §2.5); a body that fits one block goes without Block1.
    let mut response = loop {
        let size = 1usize << (szx + 4);
        let whole = body.len() <= size && first;
        let end = if whole {
            body.len()
        } else {
            (offset + size).min(body.len())
        };
        let more = end < body.len();
        let block1 = (!whole)
            .then(|| BlockValue::new((offset / size) as u32, more, szx))
            .transpose()
            .map_err(|_| ClientError::TooLarge)?;
        let mut ex = Exchange {
            block1,
            block2: None,
            size1: (first && !whole).then_some(body.len()),
            echo: None,
            body: &body[offset..end],
        };
        let r = exchange(client, protection, spec, &mut ex, &mut result).await?;
        first = false;
        if !more || r.code != Code::CONTINUE {
            break r;
        }
        // The server may ask for smaller blocks (§2.5): continue after what it acknowledged.
        match r.block1 {
            Some(ack) if ack.szx < szx => {
                offset = (ack.num as usize + 1) * ack.size();
                szx = ack.szx;
            }
            _ => offset = end,
        }
    };

    // Block2 download (RFC 7959 §2.4).
    let etag = response.etag.clone();
    result.code = response.code;
    result.content_format = response.content_format;
    loop {
        if result.payload.len() + response.payload.len() > MAX_BODY {
            return Err(ClientError::TooLarge);
        }
        let Some(b2) = response.block2 else {
            result.payload.extend_from_slice(&response.payload);
            break;
        };
        if b2.offset() != result.payload.len() {
            return Err(ClientError::BadResponse {
                peer: client.peer(),
                reason: format!(
                    "Block2 {} at offset {} but {} bytes received so far",
                    b2.num,
                    b2.offset(),
                    result.payload.len()
                ),
            });
        }
        result.payload.extend_from_slice(&response.payload);
        if !b2.more {
            break;
        }
        let next = BlockValue::new(
            b2.num + response.payload.len().div_ceil(b2.size()) as u32,
            false,
            b2.szx,
        )
        .map_err(|_| ClientError::TooLarge)?;
        let mut ex = Exchange {
            block1: None,
            block2: Some(next),
            size1: None,
            echo: None,
            body: &[],
        };
        response = exchange(client, protection, spec, &mut ex, &mut result).await?;
        if response.code != result.code || response.etag != etag {
            return Err(ClientError::BadResponse {
                peer: client.peer(),
                reason: format!(
                    "representation changed during the block-wise transfer (code {}, ETag {:?} vs {:?})",
                    response.code, response.etag, etag
                ),
            });
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_repeated_once_and_only_after_4_01() {
        let e: &[u8] = b"\x01\x02\x03\x04\x05\x06\x07\x08";
        assert_eq!(echo_to_repeat(Code::UNAUTHORIZED, Some(e), false), Some(e));
        // a second 4.01 + Echo (the request already carried one) goes to the caller
        assert_eq!(echo_to_repeat(Code::UNAUTHORIZED, Some(e), true), None);
        // 4.01 without Echo, or an Echo on another code, is not a freshness request
        assert_eq!(echo_to_repeat(Code::UNAUTHORIZED, None, false), None);
        assert_eq!(echo_to_repeat(Code::CONTENT, Some(e), false), None);
    }
}
