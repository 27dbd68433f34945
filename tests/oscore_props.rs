//! Property tests: unprotecting arbitrary or mangled input never panics, and protect ->
//! unprotect is the identity for random messages under every algorithm.

use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use oscore_gateway::oscore::{
    parse_request_kid, protect_request, protect_response, unprotect_request, unprotect_response,
    AeadAlgorithm, ContextParams, HkdfAlgorithm, ReplayWindow, RequestBinding, SecurityContext,
    SenderSequenceNumber,
};
use proptest::prelude::*;

fn contexts(
    aead: AeadAlgorithm,
    id_context: Option<Vec<u8>>,
    window: fn(u32) -> ReplayWindow,
) -> (SecurityContext, SecurityContext) {
    let p = ContextParams {
        master_secret: vec![0x42; 16],
        master_salt: vec![7; 8],
        sender_id: vec![],
        recipient_id: vec![1],
        id_context,
        aead,
        hkdf: HkdfAlgorithm::Sha256,
        replay_window: 32,
    };
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    (
        SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap(),
        SecurityContext::derive(&q, window(32)).unwrap(),
    )
}

fn algorithm() -> impl Strategy<Value = AeadAlgorithm> {
    (0..AeadAlgorithm::ALL.len()).prop_map(|i| AeadAlgorithm::ALL[i])
}

fn mtype() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just(MessageType::Confirmable),
        Just(MessageType::NonConfirmable),
        Just(MessageType::Acknowledgement),
        Just(MessageType::Reset),
    ]
}

/// Options a plain message may carry: Class E ones and Class U ones that survive a round
/// trip (Uri-Host, Uri-Port, Hop-Limit on requests).
fn options(request: bool) -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
    let mut numbers = vec![
        number::IF_MATCH,
        number::ETAG,
        number::URI_PATH,
        number::CONTENT_FORMAT,
        number::MAX_AGE,
        number::URI_QUERY,
        number::ACCEPT,
        number::LOCATION_PATH,
        number::BLOCK2,
        number::BLOCK1,
        number::SIZE2,
        number::ECHO,
        number::NO_RESPONSE,
        number::REQUEST_TAG,
        2,
        4711,
        65000,
    ];
    if request {
        numbers.extend([number::URI_HOST, number::URI_PORT, number::HOP_LIMIT]);
    }
    let n = numbers.len();
    prop::collection::vec(((0..n), prop::collection::vec(any::<u8>(), 0..300)), 0..8).prop_map(
        move |v| {
            let mut v: Vec<(u16, Vec<u8>)> =
                v.into_iter().map(|(i, val)| (numbers[i], val)).collect();
            v.sort_by_key(|(n, _)| *n);
            v
        },
    )
}

fn build(
    mtype: MessageType,
    code: Code,
    mid: u16,
    token: &[u8],
    opts: &[(u16, Vec<u8>)],
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

/// Runs every verifying entry point on `bytes` if they parse; only panics would fail.
fn poke(
    client: &SecurityContext,
    server: &SecurityContext,
    binding: &RequestBinding,
    bytes: &[u8],
) {
    if let Ok(v) = MessageView::parse(bytes) {
        let mut out = Vec::new();
        let _ = parse_request_kid(&v);
        let _ = unprotect_request(server, &v, &mut out);
        let _ = unprotect_response(client, binding, &v, &mut out);
        let _ = unprotect_response(server, binding, &v, &mut out);
    }
}

fn some_binding(client: &SecurityContext) -> RequestBinding {
    let get = build(MessageType::Confirmable, Code::GET, 1, b"t", &[], b"");
    let mut out = Vec::new();
    protect_request(
        client,
        SenderSequenceNumber(1),
        &MessageView::parse(&get).unwrap(),
        &mut out,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let (client, server) = contexts(AeadAlgorithm::AesCcm16_64_128, None, ReplayWindow::new_empty);
        let binding = some_binding(&client);
        poke(&client, &server, &binding, &bytes);
    }

    /// Structured junk that gets past the codec: POST/FETCH/2.04 with a random OSCORE option
    /// value, random Observe and random payload, against fresh and uninitialised windows.
    #[test]
    fn arbitrary_oscore_messages_never_panic(
        code in prop_oneof![Just(Code::POST), Just(Code::FETCH), Just(Code::CHANGED), any::<u8>().prop_map(Code)],
        option in prop::collection::vec(any::<u8>(), 0..24),
        flags in any::<u8>(),
        observe in prop::option::of(prop::collection::vec(any::<u8>(), 0..10)),
        payload in prop::collection::vec(any::<u8>(), 0..80),
        aead in algorithm(),
        uninit in any::<bool>(),
    ) {
        let window: fn(u32) -> ReplayWindow = if uninit { ReplayWindow::uninitialized } else { ReplayWindow::new_empty };
        let (client, server) = contexts(aead, Some(vec![9, 9]), window);
        let binding = some_binding(&client);
        let mut value = option.clone();
        if let Some(first) = value.first_mut() {
            *first = flags & 0x1f; // mostly valid flag combinations
        }
        // A well-formed option naming the server's recipient (kid 01, kid context 0909), so
        // that decryption, the replay window and the B.1.2 path are reached.
        let n = option.len().min(5);
        let mut reaching = vec![0x18 | n as u8];
        reaching.extend_from_slice(&option[..n]);
        reaching.extend_from_slice(&[2, 9, 9, 1]);
        for v in [&option, &value, &reaching] {
            let mut opts = vec![(number::OSCORE, v.clone())];
            if let Some(o) = &observe {
                opts.insert(0, (number::OBSERVE, o.clone()));
            }
            let code = if code.is_empty() { Code::POST } else { code };
            let msg = build(MessageType::Confirmable, code, 1, b"", &opts, &payload);
            poke(&client, &server, &binding, &msg);
        }
    }

    /// Valid protected messages with bytes flipped, inserted or cut off.
    #[test]
    fn mangled_protected_messages_never_panic(
        aead in algorithm(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let (client, server) = contexts(aead, Some(vec![1, 2, 3]), ReplayWindow::new_empty);
        let plain = build(
            MessageType::Confirmable, Code::GET, 5, b"tok",
            &[(number::URI_HOST, b"h".to_vec()), (number::OBSERVE, vec![]), (number::URI_PATH, b"p".to_vec())],
            b"payload",
        );
        let mut wire = Vec::new();
        let binding = protect_request(&client, SenderSequenceNumber(3), &MessageView::parse(&plain).unwrap(), &mut wire).unwrap();
        let mut bad = wire.clone();
        for (at, byte, op) in edits {
            if bad.is_empty() { break; }
            let i = at.index(bad.len());
            match op {
                0 => bad[i] ^= byte | 1,
                1 => bad.insert(i, byte),
                _ => { bad.remove(i); }
            }
        }
        poke(&client, &server, &binding, &bad);
        let short = &wire[..cut.index(wire.len() + 1)];
        poke(&client, &server, &binding, short);
    }

    #[test]
    fn request_round_trip(
        aead in algorithm(),
        id_context in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        mtype in mtype(),
        method in 1u8..=7,
        mid in any::<u16>(),
        token in prop::collection::vec(any::<u8>(), 0..=8),
        opts in options(true),
        observe_register in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..1100),
        ssn in 0u64..(1 << 40),
    ) {
        let (client, server) = contexts(aead, id_context, ReplayWindow::new_empty);
        let mut opts = opts;
        if observe_register {
            opts.push((number::OBSERVE, vec![]));
            opts.sort_by_key(|(n, _)| *n);
        }
        let plain = build(mtype, Code(method), mid, &token, &opts, &payload);
        let mut wire = Vec::new();
        let cb = protect_request(&client, SenderSequenceNumber(ssn), &MessageView::parse(&plain).unwrap(), &mut wire).unwrap();
        let outer = MessageView::parse(&wire).unwrap();
        prop_assert_eq!(outer.code, if observe_register { Code::FETCH } else { Code::POST });
        let mut got = Vec::new();
        let sb = unprotect_request(&server, &outer, &mut got).unwrap();
        prop_assert_eq!(&got, &plain);
        prop_assert_eq!(&sb.piv, &cb.piv);
        prop_assert_eq!(sb.sequence_number(), ssn);
        // And a second time it is a replay.
        prop_assert!(unprotect_request(&server, &outer, &mut got).is_err());
    }

    #[test]
    fn response_round_trip(
        aead in algorithm(),
        mtype in mtype(),
        class in 2u8..=5,
        detail in 0u8..32,
        opts in options(false),
        payload in prop::collection::vec(any::<u8>(), 0..1100),
        own in prop::option::of(0u64..(1 << 40)),
        observe in prop::option::of(0u32..(1 << 24)),
    ) {
        let (client, server) = contexts(aead, None, ReplayWindow::new_empty);
        let request = build(MessageType::Confirmable, Code::GET, 9, b"ab", &[], b"");
        let mut wire = Vec::new();
        let cb = protect_request(&client, SenderSequenceNumber(17), &MessageView::parse(&request).unwrap(), &mut wire).unwrap();
        let mut scratch = Vec::new();
        let sb = unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut scratch).unwrap();

        let mut opts = opts;
        if let Some(o) = observe {
            let mut buf = [0u8; 8];
            opts.push((number::OBSERVE, oscore_gateway::coap::option::encode_uint(u64::from(o), &mut buf).to_vec()));
            opts.sort_by_key(|(n, _)| *n);
        }
        let plain = build(mtype, Code::new(class, detail), 9, b"ab", &opts, &payload);
        let mut wire = Vec::new();
        protect_response(&server, &sb, own.map(SenderSequenceNumber), &MessageView::parse(&plain).unwrap(), &mut wire).unwrap();
        let outer = MessageView::parse(&wire).unwrap();
        prop_assert_eq!(outer.code, Code::CHANGED);
        let mut got = Vec::new();
        let info = unprotect_response(&client, &cb, &outer, &mut got).unwrap();
        prop_assert_eq!(info.partial_iv, own);
        prop_assert_eq!(info.outer_observe, observe.map(u64::from));
        if observe.is_none() {
            prop_assert_eq!(&got, &plain);
        } else {
            // Observe now carries the ordering number; everything else is unchanged.
            let g = MessageView::parse(&got).unwrap();
            let p = MessageView::parse(&plain).unwrap();
            prop_assert_eq!(g.code, p.code);
            prop_assert_eq!(g.payload, p.payload);
            let strip = |m: &MessageView| m.options().filter(|o| o.number != number::OBSERVE).map(|o| (o.number, o.value.to_vec())).collect::<Vec<_>>();
            prop_assert_eq!(strip(&g), strip(&p));
            let ordering = oscore_gateway::coap::option::decode_uint(g.option(number::OBSERVE).unwrap()).unwrap();
            prop_assert_eq!(ordering, own.unwrap_or(0) & 0xFF_FFFF);
        }
    }
}
