//! Protecting plain CoAP messages (RFC 8613 §8.1 requests, §8.3 responses).
//!
//! The plain message is split by option class (§4.1, see [`super::options`]): the plaintext
//! is the code, the Class E options and the payload (§5.3); the outer message keeps type,
//! Message ID and token, gets the outer code POST/FETCH (requests) or 2.04/2.05 (responses,
//! §4.2), the Class U options, the OSCORE option (§6.1) and the ciphertext as payload.
//!
//! Functions write into a caller's buffer and never panic; on error the buffer is cleared.

use crate::coap::option::encode_uint;
use crate::coap::uri::default_port;
use crate::coap::{number, sort_options, CoapUri, Code, MessageBuilder, MessageView};

use super::aead::{AeadError, AeadKey};
use super::context::SecurityContext;
use super::cose::{self, AadBuf, CoseError, Nonce, OscoreOption, PartialIv};
use super::error::OscoreError;
use super::options::{placement, Placement};
use super::sequence::SenderSequenceNumber;

/// Bytes kept inline up to 16 (no allocation per request): a kid fits the nonce (at most
/// 7 bytes, §5.2), a Partial IV is at most 5 bytes (§6.1); a longer kid context spills to the
/// heap.
pub type ShortBytes = smallvec::SmallVec<[u8; 16]>;

/// Option lists of one message, on the stack unless a message has more than 16 options.
pub(crate) type OptionList<'a> = smallvec::SmallVec<[(u16, &'a [u8]); 16]>;

/// What a request's protection leaves behind for its response (§5.4 "request_kid",
/// "request_piv"; aiocoap's `RequestIdentifiers`). The client keeps it from
/// [`protect_request`] to verify the response; the server gets it from
/// [`unprotect_request`](super::unprotect_request) to protect the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBinding {
    /// The request's kid: the Sender ID of whoever sent the request.
    pub kid: ShortBytes,
    /// The request's Partial IV, exactly as sent.
    pub piv: ShortBytes,
    /// The kid context the request carried, if any.
    pub kid_context: Option<ShortBytes>,
    /// The request's outer code: POST, or FETCH for Observe (§4.1.3.5). Selects the
    /// response's outer code, 2.04 or 2.05.
    pub outer_code: Code,
    /// Whether a response may reuse the request's nonce (an empty OSCORE option, §8.3).
    /// False for requests whose freshness was proven by Echo (App. B.1.2): then the
    /// response carries the server's own Partial IV, as aiocoap does.
    pub can_reuse_nonce: bool,
}

impl RequestBinding {
    /// The request's sequence number (its Partial IV as an integer).
    pub fn sequence_number(&self) -> u64 {
        self.piv
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// §4.2: 2.05 Content answers FETCH, 2.04 Changed answers POST.
    pub fn response_outer_code(&self) -> Code {
        if self.outer_code == Code::FETCH {
            Code::CONTENT
        } else {
            Code::CHANGED
        }
    }
}

/// A Proxy-Uri split into options (§4.1.3.3, RFC 7252 §6.4).
struct Decomposed {
    scheme: String,
    /// Uri-Host value; IPv6 literals in brackets (RFC 7252 §5.10.1, RFC 3986 IP-literal).
    host: String,
    port: Option<u16>,
    path: Vec<String>,
    query: Vec<String>,
}

fn decompose_proxy_uri(value: &[u8]) -> Result<Decomposed, OscoreError> {
    let bad = |reason: String| OscoreError::ProxyUri {
        uri: String::from_utf8_lossy(value).into_owned(),
        reason,
    };
    let text = std::str::from_utf8(value).map_err(|_| bad("not UTF-8".into()))?;
    let uri = CoapUri::parse(text).map_err(|e| bad(e.to_string()))?;
    let port = uri.port.filter(|&p| p != default_port(&uri.scheme));
    let host = if uri.host.contains(':') {
        format!("[{}]", uri.host)
    } else {
        uri.host.clone()
    };
    Ok(Decomposed {
        scheme: uri.scheme,
        host,
        port,
        path: uri.path,
        query: uri.query,
    })
}

/// Writes the outer message (header, `outer_options`, payload marker) into `out`, the
/// plaintext (§5.3: code, `inner` options, payload) right behind it as the payload, and
/// encrypts that payload in place: no scratch buffer, the plaintext is built where the
/// ciphertext goes.
#[allow(clippy::too_many_arguments)]
fn seal(
    out: &mut Vec<u8>,
    outer: &MessageView<'_>,
    outer_code: Code,
    outer_options: &[(u16, &[u8])],
    code: Code,
    inner: &[(u16, &[u8])],
    payload: &[u8],
    key: &AeadKey,
    nonce: &Nonce,
    aad: &[u8],
) -> Result<(), OscoreError> {
    let mut b = MessageBuilder::new(out, outer.mtype, outer_code, outer.message_id, outer.token)?;
    for (n, v) in outer_options {
        b.option(*n, v)?;
    }
    // The plaintext is never empty (it holds the code), so the marker is always there.
    b.payload(&[code.0]);
    let start = out.len() - 1;
    let mut b = MessageBuilder::append_options(out);
    for (n, v) in inner {
        b.option(*n, v)?;
    }
    b.payload(payload);
    key.encrypt_in_place(nonce.as_bytes(), aad, out, start)
        .map_err(OscoreError::Aead)
}

/// An OSCORE option value on the stack: flags, Partial IV and a kid that fits the nonce
/// take at most 13 bytes; a kid context longer than ~16 bytes spills to the heap.
type OptionValue = super::stackbuf::StackBuf<32>;

fn piv_of(ssn: SenderSequenceNumber) -> Result<PartialIv, OscoreError> {
    PartialIv::from_sequence_number(ssn).map_err(|e| match e {
        CoseError::SequenceNumberTooLarge(n) => OscoreError::SequenceNumberTooLarge(n),
        other => OscoreError::Encode(other),
    })
}

pub(crate) fn nonce(common_iv: &[u8], id: &[u8], piv: &[u8]) -> Result<Nonce, OscoreError> {
    Nonce::new(common_iv, id, piv).map_err(OscoreError::Decode)
}

pub(crate) fn aad_for(ctx: &SecurityContext, request_kid: &[u8], request_piv: &[u8]) -> AadBuf {
    cose::aad_buf(ctx.algorithm(), request_kid, request_piv)
}

fn clear_on_err<T>(out: &mut Vec<u8>, r: Result<T, OscoreError>) -> Result<T, OscoreError> {
    if r.is_err() {
        out.clear();
    }
    r
}

/// Protects a plain request (§8.1) with Sender Sequence Number `ssn`, which the caller has
/// reserved (and whose persistence it has arranged, App. B.1.1).
///
/// - Outer code POST, or FETCH when the request has Observe (§4.1.3.5.1; aiocoap).
/// - Outer options: Uri-Host, Uri-Port, Proxy-Scheme, Hop-Limit, Observe (same value as
///   inner) and the OSCORE option with Partial IV, kid (always, even if empty) and kid context
///   (when the context has an ID Context). A Proxy-Uri is decomposed (§4.1.3.3): Proxy-Scheme,
///   Uri-Host and Uri-Port (when not the scheme's default) outer, Uri-Path/Uri-Query inner.
/// - Type, Message ID and token are the request's.
pub fn protect_request(
    ctx: &SecurityContext,
    ssn: SenderSequenceNumber,
    request: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestBinding, OscoreError> {
    let r = protect_request_inner(ctx, ssn, request, out);
    clear_on_err(out, r)
}

fn protect_request_inner(
    ctx: &SecurityContext,
    ssn: SenderSequenceNumber,
    request: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestBinding, OscoreError> {
    if !request.code.is_request() {
        return Err(OscoreError::NotARequest(request.code));
    }
    let piv = piv_of(ssn)?;

    // Declared before the option lists, which borrow from them (declared after them, it
    // would be dropped first; clippy does not see that).
    #[allow(clippy::needless_late_init)]
    let decomposed: Option<Decomposed>;
    let mut port_buf = [0u8; 8];
    let mut option_value = OptionValue::new();

    // One pass: split the options by placement, find a Proxy-Uri and refuse what cannot
    // be protected.
    let mut inner = OptionList::new();
    let mut outer = OptionList::new();
    let mut observe = false;
    let mut proxy_uri = None;
    let mut has_uri_options = false;
    for o in request.options() {
        match o.number {
            number::OSCORE => return Err(OscoreError::AlreadyProtected),
            number::PROXY_URI => proxy_uri = Some(o.value),
            number::URI_HOST | number::URI_PORT | number::URI_PATH | number::URI_QUERY => {
                has_uri_options = true
            }
            _ => {}
        }
        match placement(o.number) {
            Placement::Inner => inner.push((o.number, o.value)),
            Placement::Outer => outer.push((o.number, o.value)),
            Placement::InnerAndOuter => {
                observe |= o.number == number::OBSERVE;
                inner.push((o.number, o.value));
                outer.push((o.number, o.value));
            }
            // Handled through `decomposed` / refused above.
            Placement::Decompose | Placement::Refuse => {}
        }
    }
    if proxy_uri.is_some() && has_uri_options {
        return Err(OscoreError::ProxyUriWithUriOptions);
    }
    decomposed = proxy_uri.map(decompose_proxy_uri).transpose()?;
    if let Some(d) = &decomposed {
        outer.push((number::PROXY_SCHEME, d.scheme.as_bytes()));
        outer.push((number::URI_HOST, d.host.as_bytes()));
        if let Some(p) = d.port {
            outer.push((number::URI_PORT, encode_uint(u64::from(p), &mut port_buf)));
        }
        inner.extend(d.path.iter().map(|s| (number::URI_PATH, s.as_bytes())));
        inner.extend(d.query.iter().map(|s| (number::URI_QUERY, s.as_bytes())));
    }

    OscoreOption {
        partial_iv: Some(piv.as_bytes()),
        kid_context: ctx.id_context(),
        kid: Some(ctx.sender_id()),
    }
    .encode_into(&mut option_value)
    .map_err(OscoreError::Encode)?;
    outer.push((number::OSCORE, &option_value));
    // The request's own options come in wire order; only the decomposed Proxy-Uri's
    // (and, outer, the OSCORE option) need sorting in.
    if decomposed.is_some() {
        sort_options(&mut inner);
    }
    sort_options(&mut outer);

    let nonce = nonce(ctx.common_iv(), ctx.sender_id(), piv.as_bytes())?;
    let aad = aad_for(ctx, ctx.sender_id(), piv.as_bytes());
    let outer_code = if observe { Code::FETCH } else { Code::POST };
    seal(
        out,
        request,
        outer_code,
        &outer,
        request.code,
        &inner,
        request.payload,
        ctx.sender_key(),
        &nonce,
        &aad,
    )?;
    Ok(RequestBinding {
        kid: ShortBytes::from_slice(ctx.sender_id()),
        piv: ShortBytes::from_slice(piv.as_bytes()),
        kid_context: ctx.id_context().map(ShortBytes::from_slice),
        outer_code,
        can_reuse_nonce: true,
    })
}

/// Protects a plain response (§8.3) to the request `binding` came from.
///
/// - `own_piv: None` reuses the request's nonce and sends an empty OSCORE option (allowed
///   only if `binding.can_reuse_nonce`); `Some(ssn)` uses our own Partial IV (Observe
///   notifications after the first, App. B.1.2 responses), which the caller reserved.
/// - Outer code 2.04, or 2.05 when the request was a FETCH (§4.2).
/// - Observe (§4.1.3.5.2): the plain response's value goes outer, the inner Observe is empty.
/// - Type, Message ID and token are the response's.
pub fn protect_response(
    ctx: &SecurityContext,
    binding: &RequestBinding,
    own_piv: Option<SenderSequenceNumber>,
    response: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<(), OscoreError> {
    let r = protect_response_inner(ctx, binding, own_piv, response, out);
    clear_on_err(out, r)
}

fn protect_response_inner(
    ctx: &SecurityContext,
    binding: &RequestBinding,
    own_piv: Option<SenderSequenceNumber>,
    response: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<(), OscoreError> {
    if !response.code.is_response() {
        return Err(OscoreError::NotAResponse(response.code));
    }
    let mut option_value = OptionValue::new();
    let mut inner = OptionList::new();
    let mut outer = OptionList::new();
    for o in response.options() {
        if o.number == number::OBSERVE {
            inner.push((o.number, &[]));
            outer.push((o.number, o.value));
            continue;
        }
        match placement(o.number) {
            Placement::Refuse => return Err(OscoreError::AlreadyProtected),
            Placement::Inner => inner.push((o.number, o.value)),
            // U options have no meaning in responses; they stay outer if someone adds them.
            Placement::Outer | Placement::Decompose => outer.push((o.number, o.value)),
            Placement::InnerAndOuter => {
                inner.push((o.number, o.value));
                outer.push((o.number, o.value));
            }
        }
    }

    let own = own_piv.map(piv_of).transpose()?;
    let (nonce, option) = match &own {
        Some(piv) => (
            nonce(ctx.common_iv(), ctx.sender_id(), piv.as_bytes())?,
            OscoreOption {
                partial_iv: Some(piv.as_bytes()),
                ..Default::default()
            },
        ),
        None if binding.can_reuse_nonce => (
            nonce(ctx.common_iv(), &binding.kid, &binding.piv)?,
            OscoreOption::default(),
        ),
        None => return Err(OscoreError::NonceReuseForbidden),
    };
    option
        .encode_into(&mut option_value)
        .map_err(OscoreError::Encode)?;
    outer.push((number::OSCORE, &option_value));
    sort_options(&mut outer);

    let aad = aad_for(ctx, &binding.kid, &binding.piv);
    seal(
        out,
        response,
        binding.response_outer_code(),
        &outer,
        response.code,
        &inner,
        response.payload,
        ctx.sender_key(),
        &nonce,
        &aad,
    )
}

/// Maps AEAD failures of verification to the OSCORE error aiocoap reports.
pub(crate) fn open_error(e: AeadError) -> OscoreError {
    match e {
        AeadError::Authentication { .. } => OscoreError::DecryptionFailed,
        other => OscoreError::Aead(other),
    }
}

#[cfg(test)]
#[path = "protect_tests.rs"]
mod tests;
