//! Message-level tests of protect/unprotect: round trips for every algorithm and hash,
//! replay handling, kid checks, tampering, Proxy-Uri decomposition and Observe.

use super::*;
use crate::coap::{CoapOption, MessageType};
use crate::oscore::algorithm::HkdfAlgorithm;
use crate::oscore::params::ContextParams;
use crate::oscore::replay::{ReplayWindow, ReplayWindowState};
use crate::oscore::unprotect::{parse_request_kid, unprotect_request, unprotect_response};

fn params(aead: crate::oscore::AeadAlgorithm, hkdf: HkdfAlgorithm) -> ContextParams {
    ContextParams {
        master_secret: b"0123456789abcdef0123".to_vec(),
        master_salt: b"salty".to_vec(),
        sender_id: vec![0x01],
        recipient_id: vec![0x02],
        id_context: Some(vec![0xc0, 0xff, 0xee]),
        aead,
        hkdf,
        replay_window: 32,
    }
}

/// A client and a server context for the same parameters.
fn pair_with(p: &ContextParams, server_window: ReplayWindow) -> (SecurityContext, SecurityContext) {
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    (
        SecurityContext::derive(p, ReplayWindow::new_empty(32)).unwrap(),
        SecurityContext::derive(&q, server_window).unwrap(),
    )
}

fn pair() -> (SecurityContext, SecurityContext) {
    pair_with(
        &params(
            crate::oscore::AeadAlgorithm::default(),
            HkdfAlgorithm::Sha256,
        ),
        ReplayWindow::new_empty(32),
    )
}

fn message(
    mtype: MessageType,
    code: Code,
    mid: u16,
    token: &[u8],
    opts: &[(u16, &[u8])],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, mtype, code, mid, token).unwrap();
    for (n, v) in opts {
        b.option(*n, v).unwrap();
    }
    b.payload(payload);
    out
}

fn get(opts: &[(u16, &[u8])]) -> Vec<u8> {
    message(
        MessageType::Confirmable,
        Code::GET,
        0x1234,
        b"tok",
        opts,
        b"",
    )
}

fn view(bytes: &[u8]) -> MessageView<'_> {
    MessageView::parse(bytes).unwrap()
}

fn options(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    view(bytes)
        .options()
        .map(|CoapOption { number, value }| (number, value.to_vec()))
        .collect()
}

fn protect(ctx: &SecurityContext, n: u64, plain: &[u8]) -> (Vec<u8>, RequestBinding) {
    let mut out = Vec::new();
    let b = protect_request(ctx, SenderSequenceNumber(n), &view(plain), &mut out).unwrap();
    (out, b)
}

fn unprotect(ctx: &SecurityContext, wire: &[u8]) -> Result<(Vec<u8>, RequestBinding), OscoreError> {
    let mut out = Vec::new();
    let b = unprotect_request(ctx, &view(wire), &mut out)?;
    Ok((out, b))
}

fn respond(
    ctx: &SecurityContext,
    binding: &RequestBinding,
    own: Option<u64>,
    plain: &[u8],
) -> Result<Vec<u8>, OscoreError> {
    let mut out = Vec::new();
    protect_response(
        ctx,
        binding,
        own.map(SenderSequenceNumber),
        &view(plain),
        &mut out,
    )?;
    Ok(out)
}

fn content(opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    message(
        MessageType::Acknowledgement,
        Code::CONTENT,
        0x1234,
        b"tok",
        opts,
        payload,
    )
}

#[test]
fn round_trip_every_algorithm_and_hash() {
    for aead in crate::oscore::AeadAlgorithm::ALL {
        for hkdf in HkdfAlgorithm::ALL {
            let (client, server) = pair_with(&params(aead, hkdf), ReplayWindow::new_empty(32));
            let plain = message(
                MessageType::NonConfirmable,
                Code::PUT,
                7,
                b"12345678",
                &[
                    (number::URI_HOST, b"h.example"),
                    (number::URI_PATH, b"a"),
                    (number::CONTENT_FORMAT, &[50]),
                ],
                b"{\"x\":1}",
            );
            let (wire, cb) = protect(&client, 5, &plain);
            assert_ne!(wire, plain);
            let (got, sb) = unprotect(&server, &wire).unwrap();
            assert_eq!(got, plain, "{aead} {hkdf}");
            assert_eq!(sb.kid, cb.kid);
            assert_eq!(sb.kid_context.as_deref(), Some(&[0xc0, 0xff, 0xee][..]));

            for own in [None, Some(9)] {
                let resp = content(&[(number::CONTENT_FORMAT, &[0])], b"hello");
                let wire = respond(&server, &sb, own, &resp).unwrap();
                let mut out = Vec::new();
                let info = unprotect_response(&client, &cb, &view(&wire), &mut out).unwrap();
                assert_eq!(out, resp, "{aead} {hkdf} own={own:?}");
                assert_eq!(info.partial_iv, own);
            }
        }
    }
}

#[test]
fn empty_payload_and_empty_ids_round_trip() {
    let mut p = params(crate::oscore::AeadAlgorithm::A256Gcm, HkdfAlgorithm::Sha512);
    p.sender_id = vec![];
    p.id_context = None;
    p.master_salt = vec![];
    let (client, server) = pair_with(&p, ReplayWindow::new_empty(32));
    let plain = get(&[]);
    let (wire, cb) = protect(&client, 0, &plain);
    // kid flag set even for the empty kid; no kid context.
    assert_eq!(view(&wire).option(number::OSCORE), Some(&[0x09, 0x00][..]));
    let (got, sb) = unprotect(&server, &wire).unwrap();
    assert_eq!(got, plain);
    let resp = message(
        MessageType::Acknowledgement,
        Code::DELETED,
        0x1234,
        b"tok",
        &[],
        b"",
    );
    let wire = respond(&server, &sb, None, &resp).unwrap();
    let mut out = Vec::new();
    unprotect_response(&client, &cb, &view(&wire), &mut out).unwrap();
    assert_eq!(out, resp);
}

#[test]
fn outer_message_layout() {
    let (client, _) = pair();
    let plain = message(
        MessageType::Confirmable,
        Code::GET,
        0xbeef,
        b"tk",
        &[
            (number::URI_HOST, b"origin"),
            (number::URI_PATH, b"secret"),
            (number::HOP_LIMIT, &[16]),
            (number::ECHO, b"echo"),
            (4711, b"unknown"),
        ],
        b"",
    );
    let (wire, binding) = protect(&client, 0x0102, &plain);
    let v = view(&wire);
    assert_eq!(v.code, Code::POST);
    assert_eq!(v.mtype, MessageType::Confirmable);
    assert_eq!(v.message_id, 0xbeef);
    assert_eq!(v.token, b"tk");
    assert_eq!(
        options(&wire),
        vec![
            (number::URI_HOST, b"origin".to_vec()),
            // n=2, h, k: PIV 0102, kid context c0ffee, kid 01
            (
                number::OSCORE,
                vec![0x1a, 0x01, 0x02, 0x03, 0xc0, 0xff, 0xee, 0x01]
            ),
            (number::HOP_LIMIT, vec![16]),
        ]
    );
    assert_eq!(binding.piv.as_slice(), [1, 2]);
    assert_eq!(binding.sequence_number(), 0x0102);
    assert!(!wire.windows(6).any(|w| w == b"secret"));
}

#[test]
fn replayed_request_is_rejected() {
    let (client, server) = pair();
    let (wire, _) = protect(&client, 3, &get(&[]));
    unprotect(&server, &wire).unwrap();
    let err = unprotect(&server, &wire).unwrap_err();
    assert_eq!(err, OscoreError::Replay(3));
    let r = err.server_response().unwrap();
    assert_eq!(
        (r.code, r.diagnostic, r.max_age_zero),
        (Code::UNAUTHORIZED, "Replay detected", true)
    );

    // Same OSCORE payload under a new Message ID and token is still a replay.
    let mut again = wire.clone();
    again[2] ^= 0xff;
    again[4] ^= 0xff;
    assert_eq!(
        unprotect(&server, &again).unwrap_err(),
        OscoreError::Replay(3)
    );

    // Numbers below the window slide out.
    let (w100, _) = protect(&client, 100, &get(&[]));
    unprotect(&server, &w100).unwrap();
    let (w4, _) = protect(&client, 4, &get(&[]));
    assert_eq!(unprotect(&server, &w4).unwrap_err(), OscoreError::Replay(4));
    let (w99, _) = protect(&client, 99, &get(&[]));
    unprotect(&server, &w99).unwrap();
}

#[test]
fn failed_tag_does_not_consume_the_sequence_number() {
    let (client, server) = pair();
    let (wire, _) = protect(&client, 8, &get(&[]));
    let mut forged = wire.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let mut out = vec![1, 2, 3];
    let err = unprotect_request(&server, &view(&forged), &mut out).unwrap_err();
    assert_eq!(err, OscoreError::DecryptionFailed);
    assert!(out.is_empty(), "output cleared on error");
    assert_eq!(
        err.server_response().unwrap().diagnostic,
        "Decryption failed"
    );
    assert_eq!(
        server.replay_window_state(),
        Some(ReplayWindowState {
            index: 0,
            bitfield: 0
        })
    );
    unprotect(&server, &wire).unwrap();
}

#[test]
fn tampering_anywhere_protected_is_detected() {
    let (client, server) = pair();
    let plain = get(&[(number::URI_PATH, b"x")]);
    let (wire, _) = protect(&client, 1, &plain);
    let payload_start = wire.len() - view(&wire).payload.len();
    for i in payload_start..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x80;
        assert_eq!(
            unprotect(&server, &bad).unwrap_err(),
            OscoreError::DecryptionFailed,
            "byte {i}"
        );
    }
    // Changing the Partial IV in the option changes nonce and AAD.
    let mut p = params(
        crate::oscore::AeadAlgorithm::default(),
        HkdfAlgorithm::Sha256,
    );
    p.id_context = None;
    let (client, server) = pair_with(&p, ReplayWindow::new_empty(32));
    let (wire, _) = protect(&client, 1, &plain);
    let opt = view(&wire).option(number::OSCORE).unwrap();
    assert_eq!(opt, &[0x09, 0x01, 0x01]);
    let pos = wire.windows(3).position(|w| w == opt).unwrap();
    let mut bad = wire.clone();
    bad[pos + 1] = 0x02;
    assert_eq!(
        unprotect(&server, &bad).unwrap_err(),
        OscoreError::DecryptionFailed
    );
    // Truncated ciphertext.
    let short = &wire[..wire.len() - view(&wire).payload.len() + 8];
    assert!(matches!(
        unprotect(&server, short).unwrap_err(),
        OscoreError::CiphertextTooShort { len: 8, tag_len: 8 }
    ));
}

#[test]
fn kid_and_kid_context_must_match() {
    let (client, server) = pair();
    let (wire, binding) = protect(&client, 1, &get(&[]));
    // A server context for another client (recipient 03).
    let mut p = params(
        crate::oscore::AeadAlgorithm::default(),
        HkdfAlgorithm::Sha256,
    );
    p.sender_id = vec![2];
    p.recipient_id = vec![3];
    let other = SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap();
    let err = unprotect(&other, &wire).unwrap_err();
    assert_eq!(
        err,
        OscoreError::KidMismatch {
            expected: "03".into(),
            got: "01".into()
        }
    );
    assert_eq!(err.to_string(), "kid 01 does not match the recipient ID 03");
    // Same IDs, different ID context.
    let mut p = params(
        crate::oscore::AeadAlgorithm::default(),
        HkdfAlgorithm::Sha256,
    );
    p.sender_id = vec![2];
    p.recipient_id = vec![1];
    p.id_context = Some(vec![1]);
    let other = SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap();
    assert!(matches!(
        unprotect(&other, &wire).unwrap_err(),
        OscoreError::KidContextMismatch { .. }
    ));
    assert_eq!(
        parse_request_kid(&view(&wire)).unwrap(),
        crate::oscore::RequestKid {
            kid: &[1],
            kid_context: Some(&[0xc0, 0xff, 0xee])
        }
    );

    // A response carrying a kid that is not the client's recipient ID.
    let (_, sb) = unprotect(&server, &wire).unwrap();
    let resp = respond(&server, &sb, Some(1), &content(&[], b"x")).unwrap();
    // Replace the option 01 01 (PIV 1) by 09 01 07 (PIV 1, kid 07).
    let v = view(&resp);
    let forged = message(
        v.mtype,
        v.code,
        v.message_id,
        v.token,
        &[(number::OSCORE, &[0x09, 0x01, 0x07])],
        v.payload,
    );
    let mut out = Vec::new();
    assert!(matches!(
        unprotect_response(&client, &binding, &view(&forged), &mut out).unwrap_err(),
        OscoreError::KidMismatch { .. }
    ));
    // With the right kid (02) it verifies: kid is not part of the response AAD.
    let ok = message(
        v.mtype,
        v.code,
        v.message_id,
        v.token,
        &[(number::OSCORE, &[0x09, 0x01, 0x02])],
        v.payload,
    );
    unprotect_response(&client, &binding, &view(&ok), &mut out).unwrap();
}

#[test]
fn request_without_kid_or_piv_or_with_wrong_code() {
    let (client, server) = pair();
    let (wire, _) = protect(&client, 1, &get(&[]));
    let v = view(&wire);
    let rebuilt = |code, opt: &[u8]| {
        message(
            v.mtype,
            code,
            v.message_id,
            v.token,
            &[(number::OSCORE, opt)],
            v.payload,
        )
    };
    // PIV missing (h + k only).
    let no_piv = rebuilt(Code::POST, &[0x18, 0x03, 0xc0, 0xff, 0xee, 0x01]);
    assert_eq!(
        unprotect(&server, &no_piv).unwrap_err(),
        OscoreError::NoPartialIv
    );
    // kid missing: no context can be found.
    let no_kid = rebuilt(Code::POST, &[0x11, 0x01, 0x03, 0xc0, 0xff, 0xee]);
    assert_eq!(
        parse_request_kid(&view(&no_kid)).unwrap_err(),
        OscoreError::NoKid
    );
    assert_eq!(
        OscoreError::NoKid.server_response().unwrap().diagnostic,
        "Security context not found"
    );
    // GET is no OSCORE outer code.
    let get_code = rebuilt(Code::GET, v.option(number::OSCORE).unwrap());
    let err = unprotect(&server, &get_code).unwrap_err();
    assert_eq!(err, OscoreError::UnexpectedOuterCode(Code::GET));
    assert_eq!(
        err.server_response().unwrap().code,
        Code::METHOD_NOT_ALLOWED
    );
    // Reserved bits.
    let reserved = rebuilt(Code::POST, &[0x89, 0x01, 0x01]);
    let err = unprotect(&server, &reserved).unwrap_err();
    assert!(matches!(err, OscoreError::Decode(_)));
    assert_eq!(err.server_response().unwrap().code, Code::BAD_OPTION);
    // No OSCORE option at all.
    assert_eq!(
        unprotect(&server, &get(&[])).unwrap_err(),
        OscoreError::NotProtected
    );
    assert_eq!(OscoreError::NotProtected.server_response(), None);
    // Outer Block1: must be reassembled first.
    let blockwise = message(
        v.mtype,
        Code::POST,
        v.message_id,
        v.token,
        &[
            (number::OSCORE, v.option(number::OSCORE).unwrap()),
            (number::BLOCK1, &[0x08]),
        ],
        v.payload,
    );
    assert_eq!(
        unprotect(&server, &blockwise).unwrap_err(),
        OscoreError::OuterBlockwise
    );
}

#[test]
fn protect_refuses_bad_input() {
    let (client, server) = pair();
    let mut out = vec![9];
    let resp = content(&[], b"");
    assert_eq!(
        protect_request(&client, SenderSequenceNumber(0), &view(&resp), &mut out).unwrap_err(),
        OscoreError::NotARequest(Code::CONTENT)
    );
    assert!(out.is_empty());
    let already = get(&[(number::OSCORE, &[0x09, 0x00])]);
    assert_eq!(
        protect_request(&client, SenderSequenceNumber(0), &view(&already), &mut out).unwrap_err(),
        OscoreError::AlreadyProtected
    );
    assert_eq!(
        protect_request(
            &client,
            SenderSequenceNumber(1 << 40),
            &view(&get(&[])),
            &mut out
        )
        .unwrap_err(),
        OscoreError::SequenceNumberTooLarge(1 << 40)
    );
    let (wire, _) = protect(&client, 0, &get(&[]));
    let (_, sb) = unprotect(&server, &wire).unwrap();
    assert_eq!(
        respond(&server, &sb, None, &get(&[])).unwrap_err(),
        OscoreError::NotAResponse(Code::GET)
    );
}

#[test]
fn proxy_uri_is_decomposed() {
    let (client, server) = pair();
    let plain = get(&[(number::PROXY_URI, b"coap://Example.com:5690/a/b%20c?x=1&y")]);
    let (wire, _) = protect(&client, 1, &plain);
    let outer = options(&wire);
    assert_eq!(outer[0], (number::URI_HOST, b"example.com".to_vec()));
    assert_eq!(outer[1], (number::URI_PORT, 5690u16.to_be_bytes().to_vec()));
    assert_eq!(outer[2].0, number::OSCORE);
    assert_eq!(outer[3], (number::PROXY_SCHEME, b"coap".to_vec()));
    assert_eq!(outer.len(), 4);
    let (got, _) = unprotect(&server, &wire).unwrap();
    assert_eq!(
        options(&got),
        vec![
            (number::URI_HOST, b"example.com".to_vec()),
            (number::URI_PORT, 5690u16.to_be_bytes().to_vec()),
            (number::URI_PATH, b"a".to_vec()),
            (number::URI_PATH, b"b c".to_vec()),
            (number::URI_QUERY, b"x=1".to_vec()),
            (number::URI_QUERY, b"y".to_vec()),
            (number::PROXY_SCHEME, b"coap".to_vec()),
        ]
    );

    // Default port omitted; IPv6 literal in brackets.
    let plain = get(&[(number::PROXY_URI, b"coap://[::1]:5683/")]);
    let (wire, _) = protect(&client, 2, &plain);
    let outer = options(&wire);
    assert_eq!(outer[0], (number::URI_HOST, b"[::1]".to_vec()));
    assert_eq!(outer[1].0, number::OSCORE);
    assert_eq!(outer[2], (number::PROXY_SCHEME, b"coap".to_vec()));

    let mut out = Vec::new();
    let mixed = get(&[(number::URI_PATH, b"a"), (number::PROXY_URI, b"coap://h/")]);
    assert_eq!(
        protect_request(&client, SenderSequenceNumber(3), &view(&mixed), &mut out).unwrap_err(),
        OscoreError::ProxyUriWithUriOptions
    );
    let bad = get(&[(number::PROXY_URI, b"no scheme")]);
    assert!(matches!(
        protect_request(&client, SenderSequenceNumber(3), &view(&bad), &mut out).unwrap_err(),
        OscoreError::ProxyUri { .. }
    ));
}

#[test]
fn observe_uses_fetch_and_outer_values() {
    let (client, server) = pair();
    let plain = get(&[(number::OBSERVE, &[]), (number::URI_PATH, b"clock")]);
    let (wire, cb) = protect(&client, 10, &plain);
    let v = view(&wire);
    assert_eq!(v.code, Code::FETCH);
    assert_eq!(v.option(number::OBSERVE), Some(&[][..]));
    assert_eq!(cb.outer_code, Code::FETCH);
    // Registration: the inner Observe survives (outer Observe is 0).
    let (got, sb) = unprotect(&server, &wire).unwrap();
    assert_eq!(got, plain);

    // First response reuses the nonce: outer 2.05, outer Observe carries the value, inner empty.
    let note = content(
        &[(number::OBSERVE, &[0x05]), (number::CONTENT_FORMAT, &[0])],
        b"12:00",
    );
    let first = respond(&server, &sb, None, &note).unwrap();
    let fv = view(&first);
    assert_eq!(fv.code, Code::CONTENT);
    assert_eq!(fv.option(number::OBSERVE), Some(&[0x05][..]));
    assert_eq!(fv.option(number::OSCORE), Some(&[][..]));
    let mut out = Vec::new();
    let info = unprotect_response(&client, &cb, &fv, &mut out).unwrap();
    assert_eq!(info.partial_iv, None);
    assert_eq!(info.outer_observe, Some(5));
    assert_eq!(
        view(&out).option(number::OBSERVE),
        Some(&[][..]),
        "ordering value 0"
    );
    assert_eq!(view(&out).code, Code::CONTENT);

    // Later notifications carry the server's Partial IV, which orders them.
    let later = respond(&server, &sb, Some(0x0100_0007), &note).unwrap();
    let info = unprotect_response(&client, &cb, &view(&later), &mut out).unwrap();
    assert_eq!(info.partial_iv, Some(0x0100_0007));
    // 2^24 modulo: 0x0100_0007 orders as 7.
    assert_eq!(view(&out).option(number::OBSERVE), Some(&[0x07][..]));
    assert_eq!(view(&out).payload, b"12:00");

    // Deregistration (Observe 1): the server drops the inner Observe like aiocoap.
    let dereg = get(&[(number::OBSERVE, &[1]), (number::URI_PATH, b"clock")]);
    let (wire, _) = protect(&client, 11, &dereg);
    let (got, _) = unprotect(&server, &wire).unwrap();
    assert_eq!(got, get(&[(number::URI_PATH, b"clock")]));
}

#[test]
fn uninitialized_window_recovers_with_echo() {
    let p = params(
        crate::oscore::AeadAlgorithm::default(),
        HkdfAlgorithm::Sha256,
    );
    let (client, server) = pair_with(&p, ReplayWindow::uninitialized(32));
    let plain = get(&[(number::URI_PATH, b"r")]);
    let (wire, cb) = protect(&client, 40, &plain);
    let mut out = Vec::new();
    let err = unprotect_request(&server, &view(&wire), &mut out).unwrap_err();
    let OscoreError::ReplayWindowUninitialized(uninit) = err.clone() else {
        panic!("expected an uninitialised window, got {err:?}");
    };
    assert_eq!(err.server_response(), None);
    assert_eq!(out, plain, "the decrypted request is available");
    assert_eq!(uninit.sequence_number, 40);
    assert_eq!(uninit.echo, None);
    assert!(!uninit.binding.can_reuse_nonce);
    assert_eq!(
        uninit.accept_with_echo(&server, b"fresh123"),
        Err(OscoreError::EchoMismatch)
    );
    assert_eq!(server.replay_window_state(), None);

    // The server answers 4.01 + Echo, protected with its own Partial IV.
    let echo_resp = message(
        MessageType::Acknowledgement,
        Code::UNAUTHORIZED,
        0x1234,
        b"tok",
        &[(number::ECHO, b"fresh123")],
        b"",
    );
    assert_eq!(
        respond(&server, &uninit.binding, None, &echo_resp).unwrap_err(),
        OscoreError::NonceReuseForbidden
    );
    let wire_resp = respond(&server, &uninit.binding, Some(0), &echo_resp).unwrap();
    let info = unprotect_response(&client, &cb, &view(&wire_resp), &mut out).unwrap();
    assert_eq!(out, echo_resp);
    assert_eq!(info.partial_iv, Some(0));

    // The client repeats with the Echo and a new sequence number.
    let retry = get(&[(number::URI_PATH, b"r"), (number::ECHO, b"fresh123")]);
    let (wire2, _) = protect(&client, 41, &retry);
    let err = unprotect_request(&server, &view(&wire2), &mut out).unwrap_err();
    let OscoreError::ReplayWindowUninitialized(uninit2) = err else {
        panic!("still uninitialised before acceptance");
    };
    assert_eq!(uninit2.echo.as_deref(), Some(&b"fresh123"[..]));
    let binding = uninit2.accept_with_echo(&server, b"fresh123").unwrap();
    assert_eq!(binding.sequence_number(), 41);
    assert_eq!(
        server.replay_window_state(),
        Some(ReplayWindowState {
            index: 41,
            bitfield: 1
        })
    );
    // Now 41 and everything below are replays, 42 is fine.
    assert_eq!(
        unprotect(&server, &wire2).unwrap_err(),
        OscoreError::Replay(41)
    );
    assert_eq!(
        unprotect(&server, &wire).unwrap_err(),
        OscoreError::Replay(40)
    );
    assert_eq!(
        uninit2.accept_with_echo(&server, b"fresh123"),
        Err(OscoreError::Replay(41))
    );
    let (wire3, _) = protect(&client, 42, &plain);
    unprotect(&server, &wire3).unwrap();
}

#[test]
fn response_with_piv_initializes_the_clients_window() {
    let p = params(
        crate::oscore::AeadAlgorithm::default(),
        HkdfAlgorithm::Sha256,
    );
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    let client = SecurityContext::derive(&p, ReplayWindow::uninitialized(32)).unwrap();
    let server = SecurityContext::derive(&q, ReplayWindow::new_empty(32)).unwrap();
    let (wire, cb) = protect(&client, 1, &get(&[]));
    let (_, sb) = unprotect(&server, &wire).unwrap();
    let mut out = Vec::new();
    let r = respond(&server, &sb, None, &content(&[], b"a")).unwrap();
    let info = unprotect_response(&client, &cb, &view(&r), &mut out).unwrap();
    assert!(!info.replay_window_initialized);
    let r = respond(&server, &sb, Some(77), &content(&[], b"a")).unwrap();
    let info = unprotect_response(&client, &cb, &view(&r), &mut out).unwrap();
    assert!(info.replay_window_initialized);
    assert_eq!(
        client.replay_window_state(),
        Some(ReplayWindowState {
            index: 77,
            bitfield: 1
        })
    );
}

#[test]
fn response_bound_to_another_request_fails() {
    let (client, server) = pair();
    let (w1, cb1) = protect(&client, 1, &get(&[]));
    let (w2, _) = protect(&client, 2, &get(&[]));
    let (_, sb1) = unprotect(&server, &w1).unwrap();
    let (_, sb2) = unprotect(&server, &w2).unwrap();
    let r2 = respond(&server, &sb2, None, &content(&[], b"two")).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        unprotect_response(&client, &cb1, &view(&r2), &mut out).unwrap_err(),
        OscoreError::DecryptionFailed
    );
    // Even with its own Partial IV the AAD binds the response to the request.
    let r2 = respond(&server, &sb2, Some(5), &content(&[], b"two")).unwrap();
    assert_eq!(
        unprotect_response(&client, &cb1, &view(&r2), &mut out).unwrap_err(),
        OscoreError::DecryptionFailed
    );
    let r1 = respond(&server, &sb1, None, &content(&[], b"one")).unwrap();
    unprotect_response(&client, &cb1, &view(&r1), &mut out).unwrap();
    // A plain (unprotected) error response is reported as such.
    assert_eq!(
        unprotect_response(&client, &cb1, &view(&content(&[], b"plain")), &mut out).unwrap_err(),
        OscoreError::NotProtected
    );
}
