//! Verifying OSCORE messages (RFC 8613 §8.2 requests, §8.4 responses) and the replay
//! check (§7.4, App. B.1.2).
//!
//! The result is a plain CoAP datagram in the caller's buffer: the outer type, Message ID and
//! token, the inner code, the inner options (merged with outer ones as described per
//! function) and the inner payload. Functions never panic on arbitrary input; on error the
//! buffer is cleared, except for [`OscoreError::ReplayWindowUninitialized`].

use subtle::ConstantTimeEq;

use crate::coap::option::{decode_uint, encode_uint};
use crate::coap::{number, sort_options, Code, MessageBuilder, MessageView};

use super::aead::AeadKey;
use super::context::SecurityContext;
use super::cose::{Nonce, OscoreOption};
use super::error::{OscoreError, UninitializedWindow};
use super::options::{class, keep_outer_on_unprotect, OptionClass};
use super::params::HexBytes;
use super::protect::{aad_for, nonce, open_error, OptionList, RequestBinding, ShortBytes};

/// The identifiers a server looks its security context up by (§6.1, §8.2 step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKid<'a> {
    pub kid: &'a [u8],
    pub kid_context: Option<&'a [u8]>,
}

/// What a verified response said about its freshness and ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseInfo {
    /// The server's own Partial IV as a number, when the response had one (Observe
    /// notifications are ordered by it, §7.4.1); `None` when it reused the request's nonce.
    pub partial_iv: Option<u64>,
    /// The outer Observe value as received, when present.
    pub outer_observe: Option<u64>,
    /// The replay window was uninitialised and has been initialised from this response's
    /// Partial IV (fresh because it answers our own request; aiocoap does the same).
    pub replay_window_initialized: bool,
}

fn single_oscore_option<'a>(m: &MessageView<'a>) -> Result<OscoreOption<'a>, OscoreError> {
    let mut values = m.options_of(number::OSCORE);
    let value = values.next().ok_or(OscoreError::NotProtected)?;
    if values.next().is_some() {
        return Err(OscoreError::RepeatedOscoreOption);
    }
    OscoreOption::decode(value).map_err(OscoreError::Decode)
}

/// Finds the kid and kid context of an OSCORE request, for choosing its security context.
pub fn parse_request_kid<'a>(request: &MessageView<'a>) -> Result<RequestKid<'a>, OscoreError> {
    let option = single_oscore_option(request)?;
    Ok(RequestKid {
        kid: option.kid.ok_or(OscoreError::NoKid)?,
        kid_context: option.kid_context,
    })
}

/// Checks the kid and kid context a message carries against the context (aiocoap: absent
/// fields default to the context's values).
fn check_ids(ctx: &SecurityContext, option: &OscoreOption<'_>) -> Result<(), OscoreError> {
    if let Some(kid) = option.kid {
        if kid != ctx.recipient_id() {
            return Err(OscoreError::KidMismatch {
                expected: HexBytes(ctx.recipient_id()).to_string(),
                got: HexBytes(kid).to_string(),
            });
        }
    }
    if let Some(kc) = option.kid_context {
        if Some(kc) != ctx.id_context() {
            return Err(OscoreError::KidContextMismatch {
                expected: ctx
                    .id_context()
                    .map_or_else(|| "(none)".to_string(), |c| HexBytes(c).to_string()),
                got: HexBytes(kc).to_string(),
            });
        }
    }
    Ok(())
}

fn refuse_outer_blockwise(m: &MessageView<'_>) -> Result<(), OscoreError> {
    if m.has_option(number::BLOCK1) || m.has_option(number::BLOCK2) {
        return Err(OscoreError::OuterBlockwise);
    }
    Ok(())
}

/// The AEAD tag length, after checking that the outer payload holds a tag and at least the
/// code byte of the plaintext (aiocoap: "Ciphertext too short").
fn checked_tag_len(outer: &MessageView<'_>, key: &AeadKey) -> Result<usize, OscoreError> {
    let tag_len = key.algorithm().tag_len();
    if outer.payload.len() < tag_len + 1 {
        return Err(OscoreError::CiphertextTooShort {
            len: outer.payload.len(),
            tag_len,
        });
    }
    Ok(tag_len)
}

/// Decrypts the outer payload into `out` as a datagram with the outer type, Message ID and
/// token and the inner code, options and payload.
fn open_into(
    outer: &MessageView<'_>,
    key: &AeadKey,
    nonce: &Nonce,
    aad: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), OscoreError> {
    checked_tag_len(outer, key)?;
    // Header with a placeholder code; the decrypted code byte is moved into it below.
    MessageBuilder::new(out, outer.mtype, Code::EMPTY, outer.message_id, outer.token)?.finish();
    let start = out.len();
    out.extend_from_slice(outer.payload);
    key.decrypt_in_place(nonce.as_bytes(), aad, out, start)
        .map_err(open_error)?;
    let code = *out.get(start).ok_or(OscoreError::DecryptionFailed)?;
    if let Some(c) = out.get_mut(1) {
        *c = code;
    }
    out.remove(start);
    Ok(())
}

/// Plaintext of a message up to a usual CoAP datagram size, on the stack; larger ones spill
/// to the heap.
type PlainBuf = super::stackbuf::StackBuf<1280>;

/// Verifies and decrypts the outer payload into `plain` as a pseudo-datagram that
/// [`MessageView::parse`] reads as the inner message: three header bytes in front of the
/// plaintext (code, options, payload; §5.3) put its code byte where a Message ID's second
/// byte goes, and the code is copied to the header's code byte. Token: none; Message ID and
/// type are meaningless (the outer ones are used).
fn open_plain(
    outer: &MessageView<'_>,
    key: &AeadKey,
    nonce: &Nonce,
    aad: &[u8],
    plain: &mut PlainBuf,
) -> Result<(), OscoreError> {
    let tag_len = checked_tag_len(outer, key)?;
    let (body, tag) = outer.payload.split_at(outer.payload.len() - tag_len);
    plain.put(&[0x40, 0, 0]);
    plain.put(body);
    let text = plain.as_mut_slice().get_mut(3..).unwrap_or_default();
    key.decrypt_detached(nonce.as_bytes(), aad, text, tag)
        .map_err(open_error)?;
    let code = *plain.get(3).ok_or(OscoreError::DecryptionFailed)?;
    if let Some(c) = plain.as_mut_slice().get_mut(1) {
        *c = code;
    }
    Ok(())
}

/// Writes the plain result into `out`: the outer type, Message ID and token, the inner code,
/// the inner options `keep_inner` accepts merged with `extra`, and the inner payload.
fn write_plain(
    out: &mut Vec<u8>,
    outer: &MessageView<'_>,
    inner: &MessageView<'_>,
    keep_inner: impl Fn(u16) -> bool,
    extra: &[(u16, &[u8])],
) -> Result<(), OscoreError> {
    let mut opts = OptionList::new();
    opts.extend(
        inner
            .options()
            .filter(|o| keep_inner(o.number))
            .map(|o| (o.number, o.value)),
    );
    if !extra.is_empty() {
        opts.extend_from_slice(extra);
        sort_options(&mut opts);
    }
    let mut b = MessageBuilder::new(out, outer.mtype, inner.code, outer.message_id, outer.token)?;
    for (n, v) in &opts {
        b.option(*n, v)?;
    }
    b.payload(inner.payload);
    Ok(())
}

/// Rewrites `out` (a plain datagram) with the options `keep` accepts merged with `extra`
/// (the rare case where that is only known after decryption).
fn rebuild(
    out: &mut Vec<u8>,
    keep: impl Fn(u16) -> bool,
    extra: &[(u16, &[u8])],
) -> Result<(), OscoreError> {
    let mut plain = PlainBuf::new();
    plain.put(out);
    let view = MessageView::parse(&plain).map_err(OscoreError::InnerDecode)?;
    write_plain(out, &view, &view, keep, extra)
}

/// Checks the decrypted request's code and returns its Echo when the replay window is
/// uninitialised (App. B.1.2 needs it; read before the result is rewritten).
fn check_inner_request(
    inner: &MessageView<'_>,
    initialized: bool,
) -> Result<Option<Vec<u8>>, OscoreError> {
    if !inner.code.is_request() {
        return Err(OscoreError::InnerCode {
            code: inner.code,
            expected: "request method",
        });
    }
    Ok(if initialized {
        None
    } else {
        inner.option(number::ECHO).map(<[u8]>::to_vec)
    })
}

fn clear_on_err<T>(out: &mut Vec<u8>, r: Result<T, OscoreError>) -> Result<T, OscoreError> {
    match &r {
        Err(OscoreError::ReplayWindowUninitialized(_)) | Ok(_) => {}
        Err(_) => out.clear(),
    }
    r
}

/// Verifies and decrypts an OSCORE request (§8.2) with the replay check of §7.4.
///
/// Order: OSCORE option decoded (malformed → [`OscoreError::Decode`]); kid and kid context
/// compared with the context; a Partial IV required; the replay window consulted *before*
/// decryption (a replay → [`OscoreError::Replay`]); after the tag verified, the sequence
/// number is struck out under the lock (a concurrent duplicate loses with `Replay`).
///
/// If the window is uninitialised (App. B.1.2), the request is decrypted into `out` and
/// [`OscoreError::ReplayWindowUninitialized`] is returned with the binding and the inner
/// Echo; see [`UninitializedWindow::accept_with_echo`].
///
/// The result keeps the outer Class U options (Uri-Host, Uri-Port, Proxy-Scheme, Hop-Limit)
/// so the layer above can route and count hops; inner copies of them are ignored. The inner
/// Observe is kept only when the outer Observe is 0 (registration), as aiocoap does.
pub fn unprotect_request(
    ctx: &SecurityContext,
    request: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestBinding, OscoreError> {
    let r = unprotect_request_inner(ctx, request, out);
    clear_on_err(out, r)
}

fn unprotect_request_inner(
    ctx: &SecurityContext,
    request: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestBinding, OscoreError> {
    // One pass over the outer options; the checks below keep their order.
    let mut oscore_values = 0usize;
    let mut oscore_value: &[u8] = &[];
    let mut outer_observe = None;
    let mut outer_blockwise = false;
    let mut outer_kept = OptionList::new();
    for o in request.options() {
        match o.number {
            number::OSCORE => {
                if oscore_values == 0 {
                    oscore_value = o.value;
                }
                oscore_values += 1;
            }
            number::OBSERVE => {
                outer_observe.get_or_insert(o.value);
            }
            number::BLOCK1 | number::BLOCK2 => outer_blockwise = true,
            n if keep_outer_on_unprotect(n, true) => outer_kept.push((n, o.value)),
            _ => {}
        }
    }
    let option = match oscore_values {
        0 => return Err(OscoreError::NotProtected),
        1 => OscoreOption::decode(oscore_value).map_err(OscoreError::Decode)?,
        _ => return Err(OscoreError::RepeatedOscoreOption),
    };
    if request.code != Code::POST && request.code != Code::FETCH {
        return Err(OscoreError::UnexpectedOuterCode(request.code));
    }
    check_ids(ctx, &option)?;
    let piv = option.partial_iv.ok_or(OscoreError::NoPartialIv)?;
    let sequence_number = piv.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if outer_blockwise {
        return Err(OscoreError::OuterBlockwise);
    }

    let initialized = {
        let window = ctx.lock_replay_window();
        if window.is_initialized() && !window.is_valid(sequence_number) {
            return Err(OscoreError::Replay(sequence_number));
        }
        window.is_initialized()
    };

    let nonce = nonce(ctx.common_iv(), ctx.recipient_id(), piv)?;
    let aad = aad_for(ctx, ctx.recipient_id(), piv);
    // §4.1.3.5.1 as aiocoap applies it: the inner Observe counts only with outer Observe 0.
    let keep_observe = outer_observe.and_then(decode_uint) == Some(0);
    let keep_inner = |n: u16| class(n) != OptionClass::U && (n != number::OBSERVE || keep_observe);
    // With outer options to merge in, decrypt to the stack and write the result once;
    // otherwise decrypt straight into `out` and rewrite only if the plaintext holds options
    // to drop.
    let echo = if outer_kept.is_empty() {
        open_into(request, ctx.recipient_key(), &nonce, &aad, out)?;
        let inner = MessageView::parse(out).map_err(OscoreError::InnerDecode)?;
        let echo = check_inner_request(&inner, initialized)?;
        if inner.options().any(|o| !keep_inner(o.number)) {
            rebuild(out, keep_inner, &[])?;
        }
        echo
    } else {
        let mut plain = PlainBuf::new();
        open_plain(request, ctx.recipient_key(), &nonce, &aad, &mut plain)?;
        let inner = MessageView::parse(&plain).map_err(OscoreError::InnerDecode)?;
        let echo = check_inner_request(&inner, initialized)?;
        write_plain(out, request, &inner, keep_inner, &outer_kept)?;
        echo
    };

    let binding = RequestBinding {
        kid: ShortBytes::from_slice(ctx.recipient_id()),
        piv: ShortBytes::from_slice(piv),
        kid_context: option.kid_context.map(ShortBytes::from_slice),
        outer_code: request.code,
        can_reuse_nonce: initialized,
    };
    if !initialized {
        return Err(OscoreError::ReplayWindowUninitialized(Box::new(
            UninitializedWindow {
                binding,
                sequence_number,
                echo,
            },
        )));
    }
    if !ctx.lock_replay_window().strike_out(sequence_number) {
        return Err(OscoreError::Replay(sequence_number));
    }
    Ok(binding)
}

impl UninitializedWindow {
    /// App. B.1.2: if the request's Echo equals `expected_echo` (the value this server sent
    /// in its 4.01), the request is fresh: the window is initialised from its sequence number
    /// and the binding is returned (its response must use an own Partial IV). If another
    /// request initialised the window meanwhile, this one is checked like any other.
    /// A missing or different Echo gives [`OscoreError::EchoMismatch`] (answer 4.01 + Echo).
    pub fn accept_with_echo(
        &self,
        ctx: &SecurityContext,
        expected_echo: &[u8],
    ) -> Result<RequestBinding, OscoreError> {
        let matches = self
            .echo
            .as_deref()
            .is_some_and(|e| bool::from(e.ct_eq(expected_echo)));
        if !matches {
            return Err(OscoreError::EchoMismatch);
        }
        let mut window = ctx.lock_replay_window();
        if window.is_initialized() {
            if !window.strike_out(self.sequence_number) {
                return Err(OscoreError::Replay(self.sequence_number));
            }
        } else {
            window.initialize_from_fresh(self.sequence_number);
        }
        Ok(self.binding.clone())
    }
}

/// Verifies and decrypts an OSCORE response (§8.4) to the request `binding` came from.
///
/// Accepts both forms: an empty OSCORE option (the request's nonce is reused) and one with
/// the server's own Partial IV (nonce from the Recipient ID and that Partial IV; the AAD
/// still names the request's kid and Partial IV). A kid, if present, must be the Recipient
/// ID; a kid context, if present, the ID Context.
///
/// The result has the inner code, options and payload. When the response has an outer
/// Observe, the inner Observe is replaced by the ordering number (aiocoap): the Partial IV
/// modulo 2^24, or 0 when the response reused the request's nonce; the full values are in
/// [`ResponseInfo`].
pub fn unprotect_response(
    ctx: &SecurityContext,
    binding: &RequestBinding,
    response: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<ResponseInfo, OscoreError> {
    let r = unprotect_response_inner(ctx, binding, response, out);
    clear_on_err(out, r)
}

fn unprotect_response_inner(
    ctx: &SecurityContext,
    binding: &RequestBinding,
    response: &MessageView<'_>,
    out: &mut Vec<u8>,
) -> Result<ResponseInfo, OscoreError> {
    let option = single_oscore_option(response)?;
    if !response.code.is_response() {
        return Err(OscoreError::NotAResponse(response.code));
    }
    check_ids(ctx, &option)?;
    refuse_outer_blockwise(response)?;
    let nonce = match option.partial_iv {
        Some(piv) => nonce(ctx.common_iv(), ctx.recipient_id(), piv)?,
        None => nonce(ctx.common_iv(), &binding.kid, &binding.piv)?,
    };
    let aad = aad_for(ctx, &binding.kid, &binding.piv);
    open_into(response, ctx.recipient_key(), &nonce, &aad, out)?;

    let inner_code = MessageView::parse(out)
        .map_err(OscoreError::InnerDecode)?
        .code;
    if !inner_code.is_response() {
        return Err(OscoreError::InnerCode {
            code: inner_code,
            expected: "response code",
        });
    }
    let partial_iv = option
        .partial_iv
        .map(|p| p.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)));
    let outer_observe = match response.option(number::OBSERVE) {
        Some(v) => Some(decode_uint(v).ok_or(OscoreError::BadOption {
            number: number::OBSERVE,
        })?),
        None => None,
    };
    if outer_observe.is_some() {
        let mut buf = [0u8; 8];
        let ordering = encode_uint(partial_iv.unwrap_or(0) & 0xFF_FFFF, &mut buf);
        rebuild(
            out,
            |n| n != number::OBSERVE,
            &[(number::OBSERVE, ordering)],
        )?;
    }

    let mut replay_window_initialized = false;
    if let Some(n) = partial_iv {
        let mut window = ctx.lock_replay_window();
        if !window.is_initialized() {
            window.initialize_from_fresh(n);
            replay_window_initialized = true;
        }
    }
    Ok(ResponseInfo {
        partial_iv,
        outer_observe,
        replay_window_initialized,
    })
}
