//! Differential tests of our CoAP codec against coap-lite (an independent implementation,
//! DESIGN.md §3): both must agree on every valid message.

use coap_lite::{CoapOption as LiteOption, MessageClass, MessageType as LiteType, Packet};
use oscore_gateway::coap::{Code, MessageBuilder, MessageType, MessageView};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Msg {
    mtype: u8,
    code: u8,
    mid: u16,
    token: Vec<u8>,
    options: Vec<(u16, Vec<u8>)>,
    payload: Vec<u8>,
}

fn mtype(t: u8) -> MessageType {
    [
        MessageType::Confirmable,
        MessageType::NonConfirmable,
        MessageType::Acknowledgement,
        MessageType::Reset,
    ][t as usize]
}

fn valid_msg() -> impl Strategy<Value = Msg> {
    (
        0u8..4,
        1u8..=255,
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..=8),
        // option numbers spanning the 0-12, 13-268 and 269+ delta encodings, values spanning
        // the three length encodings
        proptest::collection::vec(
            (
                prop_oneof![1u16..30, 30u16..400, 400u16..3000, 60000u16..=65535],
                proptest::collection::vec(any::<u8>(), 0..300),
            ),
            0..6,
        ),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(mtype, code, mid, token, mut options, payload)| {
            options.sort_by_key(|o| o.0);
            Msg {
                mtype,
                code,
                mid,
                token,
                options,
                payload,
            }
        })
}

fn ours(m: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b =
        MessageBuilder::new(&mut out, mtype(m.mtype), Code(m.code), m.mid, &m.token).unwrap();
    for (n, v) in &m.options {
        b.option(*n, v).unwrap();
    }
    b.payload(&m.payload);
    out
}

fn lite(m: &Msg) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(match m.mtype {
        0 => LiteType::Confirmable,
        1 => LiteType::NonConfirmable,
        2 => LiteType::Acknowledgement,
        _ => LiteType::Reset,
    });
    p.header.code = MessageClass::from(m.code);
    p.header.message_id = m.mid;
    p.set_token(m.token.clone());
    for (n, v) in &m.options {
        p.add_option(LiteOption::from(*n), v.clone());
    }
    p.payload = m.payload.clone();
    p.to_bytes_unlimited().unwrap()
}

/// Asserts that coap-lite reads `bytes` as the same message our view shows.
fn assert_lite_agrees(bytes: &[u8], view: &MessageView) {
    let p = Packet::from_bytes(bytes).expect("coap-lite rejects a message we accept");
    assert_eq!(p.header.get_version(), 1);
    assert_eq!(u8::from(p.header.code), view.code.0);
    assert_eq!(p.header.message_id, view.message_id);
    assert_eq!(p.get_token(), view.token);
    assert_eq!(p.payload.as_slice(), view.payload);
    let theirs: Vec<(u16, Vec<u8>)> = p
        .options()
        .flat_map(|(n, vs)| vs.iter().map(move |v| (*n, v.clone())))
        .collect();
    let mine: Vec<(u16, Vec<u8>)> = view
        .options()
        .map(|o| (o.number, o.value.to_vec()))
        .collect();
    assert_eq!(mine, theirs);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// What we build, coap-lite parses identically, and we parse back to the input.
    #[test]
    fn our_builder_coap_lite_parser(m in valid_msg()) {
        let bytes = ours(&m);
        let view = MessageView::parse(&bytes).unwrap();
        prop_assert_eq!(view.mtype, mtype(m.mtype));
        prop_assert_eq!(view.code, Code(m.code));
        prop_assert_eq!(view.token, m.token.as_slice());
        prop_assert_eq!(view.payload, m.payload.as_slice());
        let opts: Vec<(u16, Vec<u8>)> = view.options().map(|o| (o.number, o.value.to_vec())).collect();
        prop_assert_eq!(&opts, &m.options);
        assert_lite_agrees(&bytes, &view);
    }

    /// What coap-lite builds is byte-identical to what we build.
    #[test]
    fn coap_lite_builder_same_bytes(m in valid_msg()) {
        prop_assert_eq!(lite(&m), ours(&m));
    }

    /// On arbitrary bytes: whatever we accept, coap-lite accepts with the same content.
    #[test]
    fn arbitrary_bytes_agree_when_we_accept(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = bytes;
        if bytes.len() >= 4 {
            bytes[0] = 0x40 | (bytes[0] & 0x3f); // version 1 most of the time
        }
        if let Ok(view) = MessageView::parse(&bytes) {
            assert_lite_agrees(&bytes, &view);
        }
    }
}
