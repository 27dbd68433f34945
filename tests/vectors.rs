//! Every RFC 8613 Appendix C vector, byte-exact and in both directions
//! (../shared/vectors/rfc8613-appendix-c.json, read at test time).

use oscore_gateway::coap::MessageView;
use oscore_gateway::oscore::context::{hkdf_info, InfoType};
use oscore_gateway::oscore::cose::{self, Nonce, OscoreOption, PartialIv};
use oscore_gateway::oscore::{
    derive_keys, protect_request, protect_response, unprotect_request, unprotect_response,
    AeadAlgorithm, AeadKey, ContextParams, HkdfAlgorithm, ReplayWindow, SecurityContext,
    SenderSequenceNumber,
};
use serde_json::Value;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/rfc8613-appendix-c.json"
);

fn load() -> Vec<Value> {
    let text = std::fs::read_to_string(VECTORS)
        .unwrap_or_else(|e| panic!("cannot read the RFC 8613 vectors at {VECTORS}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap();
    json["vectors"].as_array().unwrap().clone()
}

fn hex_of(v: &Value) -> Option<Vec<u8>> {
    v.as_str().map(|s| hex::decode(s).unwrap())
}

fn bytes(v: &Value) -> Vec<u8> {
    hex_of(v).unwrap_or_else(|| panic!("expected a hex string, got {v}"))
}

fn params(inputs: &Value) -> ContextParams {
    let aead =
        AeadAlgorithm::from_cose_id(inputs["aead_algorithm"].as_i64().unwrap() as i32).unwrap();
    assert_eq!(aead.name(), inputs["aead_algorithm_name"].as_str().unwrap());
    assert_eq!(inputs["kdf"].as_str().unwrap(), "HKDF-SHA-256");
    ContextParams {
        master_secret: bytes(&inputs["master_secret"]),
        master_salt: hex_of(&inputs["master_salt"]).unwrap_or_default(),
        sender_id: bytes(&inputs["sender_id"]),
        recipient_id: bytes(&inputs["recipient_id"]),
        id_context: hex_of(&inputs["id_context"]),
        aead,
        hkdf: HkdfAlgorithm::Sha256,
        replay_window: 32,
    }
}

/// The peer's view of the same context.
fn swapped(p: &ContextParams) -> ContextParams {
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    q
}

fn context(p: &ContextParams) -> SecurityContext {
    SecurityContext::derive(p, ReplayWindow::new_empty(32)).unwrap()
}

fn check_derivation(id: &str, p: &ContextParams, exp: &Value) {
    let keys = derive_keys(p).unwrap();
    assert_eq!(hex::encode(&*keys.sender_key), exp["sender_key"], "{id}");
    assert_eq!(
        hex::encode(&*keys.recipient_key),
        exp["recipient_key"],
        "{id}"
    );
    assert_eq!(hex::encode(&keys.common_iv), exp["common_iv"], "{id}");
    let ctx = context(p);
    assert_eq!(hex::encode(ctx.common_iv()), exp["common_iv"], "{id}");
    let piv0 = [0u8];
    assert_eq!(
        hex::encode(
            Nonce::new(&keys.common_iv, &p.sender_id, &piv0)
                .unwrap()
                .as_bytes()
        ),
        exp["sender_nonce_piv0"],
        "{id}"
    );
    assert_eq!(
        hex::encode(
            Nonce::new(&keys.common_iv, &p.recipient_id, &piv0)
                .unwrap()
                .as_bytes()
        ),
        exp["recipient_nonce_piv0"],
        "{id}"
    );
}

#[test]
fn key_derivation_vectors_c1_to_c3() {
    let mut seen = 0;
    for v in load().iter().filter(|v| v["kind"] == "key_derivation") {
        let id = v["id"].as_str().unwrap();
        let p = params(&v["inputs"]);
        let exp = &v["expected"];
        let ctx = p.id_context.as_deref();
        let alg = p.aead;
        let l = alg.key_len();
        assert_eq!(
            hex::encode(hkdf_info(&p.sender_id, ctx, alg, InfoType::Key, l)),
            exp["info_sender_key"],
            "{id}"
        );
        assert_eq!(
            hex::encode(hkdf_info(&p.recipient_id, ctx, alg, InfoType::Key, l)),
            exp["info_recipient_key"],
            "{id}"
        );
        assert_eq!(
            hex::encode(hkdf_info(&[], ctx, alg, InfoType::Iv, alg.nonce_len())),
            exp["info_common_iv"],
            "{id}"
        );
        check_derivation(id, &p, exp);
        seen += 1;
    }
    assert_eq!(seen, 6, "C.1.1-C.3.2");
}

/// The intermediate values of a message vector: option value, AAD, nonce, plaintext and
/// ciphertext, recomputed with the library's building blocks.
fn check_intermediates(id: &str, p: &ContextParams, inputs: &Value, exp: &Value) {
    let keys = derive_keys(p).unwrap();
    let alg = p.aead;
    let is_request = inputs["role"] == "request";
    let ssn = SenderSequenceNumber(inputs["sender_sequence_number"].as_u64().unwrap());
    let (request_kid, request_piv) = if is_request {
        let piv = PartialIv::from_sequence_number(ssn).unwrap();
        assert_eq!(hex::encode(piv.as_bytes()), exp["partial_iv"], "{id}");
        (p.sender_id.clone(), piv.as_bytes().to_vec())
    } else {
        (bytes(&inputs["request_kid"]), bytes(&inputs["request_piv"]))
    };
    let mut ext = Vec::new();
    cose::external_aad(alg, &request_kid, &request_piv, &mut ext);
    assert_eq!(hex::encode(&ext), exp["aad_array"], "{id}");
    let mut aad = Vec::new();
    cose::aad(alg, &request_kid, &request_piv, &mut aad);
    assert_eq!(hex::encode(&aad), exp["aad"], "{id}");

    let own_piv = hex_of(&exp["partial_iv"]);
    let nonce = match (&own_piv, is_request) {
        (Some(piv), _) => Nonce::new(&keys.common_iv, &p.sender_id, piv).unwrap(),
        (None, false) => Nonce::new(&keys.common_iv, &request_kid, &request_piv).unwrap(),
        (None, true) => panic!("{id}: a request without Partial IV"),
    };
    assert_eq!(hex::encode(nonce.as_bytes()), exp["aead_nonce"], "{id}");
    assert_eq!(
        hex::encode(&*keys.sender_key),
        exp["encryption_key"],
        "{id}"
    );

    let (kid_context, kid) = (hex_of(&exp["kid_context"]), hex_of(&exp["kid"]));
    let option = OscoreOption {
        partial_iv: own_piv.as_deref(),
        kid_context: kid_context.as_deref(),
        kid: kid.as_deref(),
    };
    let mut value = Vec::new();
    option.encode(&mut value).unwrap();
    assert_eq!(hex::encode(&value), exp["oscore_option_value"], "{id}");
    let oscore_value = bytes(&exp["oscore_option_value"]);
    let decoded = OscoreOption::decode(&oscore_value).unwrap();
    assert_eq!(
        decoded.partial_iv.map(hex::encode),
        exp["partial_iv"].as_str().map(String::from),
        "{id}"
    );
    assert_eq!(
        decoded.kid.map(hex::encode),
        exp["kid"].as_str().map(String::from),
        "{id}"
    );

    let key = AeadKey::new(alg, &keys.sender_key).unwrap();
    let plaintext = bytes(&exp["plaintext"]);
    let ct = key.encrypt(nonce.as_bytes(), &aad, &plaintext).unwrap();
    assert_eq!(hex::encode(&ct), exp["ciphertext"], "{id}");
    assert_eq!(
        key.decrypt(nonce.as_bytes(), &aad, &ct).unwrap(),
        plaintext,
        "{id}"
    );
}

#[test]
fn request_vectors_c4_to_c6() {
    let mut seen = 0;
    for v in load().iter().filter(|v| v["kind"] == "message_request") {
        let id = v["id"].as_str().unwrap();
        let inputs = &v["inputs"];
        let exp = &v["expected"];
        let client = params(inputs);
        check_derivation(id, &client, exp);
        check_intermediates(id, &client, inputs, exp);
        assert_eq!(
            inputs["send_kid_context"].as_bool().unwrap(),
            client.id_context.is_some(),
            "{id}: kid context is sent exactly when the context has one"
        );

        // Client: protect gives the protected message.
        let plain = bytes(&inputs["unprotected_message"]);
        let ssn = SenderSequenceNumber(inputs["sender_sequence_number"].as_u64().unwrap());
        let ctx = context(&client);
        let mut protected = Vec::new();
        let binding = protect_request(
            &ctx,
            ssn,
            &MessageView::parse(&plain).unwrap(),
            &mut protected,
        )
        .unwrap();
        assert_eq!(hex::encode(&protected), exp["protected_message"], "{id}");
        assert_eq!(hex::encode(&binding.piv), exp["partial_iv"], "{id}");
        assert_eq!(hex::encode(&binding.kid), exp["kid"], "{id}");

        // Server: unprotect gives the unprotected message back.
        let server = context(&swapped(&client));
        let wire = bytes(&exp["protected_message"]);
        let mut unprotected = Vec::new();
        let server_binding = unprotect_request(
            &server,
            &MessageView::parse(&wire).unwrap(),
            &mut unprotected,
        )
        .unwrap();
        assert_eq!(
            hex::encode(&unprotected),
            inputs["unprotected_message"],
            "{id}"
        );
        assert_eq!(server_binding.kid, binding.kid, "{id}");
        assert_eq!(server_binding.piv, binding.piv, "{id}");
        assert_eq!(server_binding.kid_context, binding.kid_context, "{id}");
        seen += 1;
    }
    assert_eq!(seen, 3, "C.4-C.6");
}

#[test]
fn response_vectors_c7_and_c8() {
    let mut seen = 0;
    for v in load().iter().filter(|v| v["kind"] == "message_response") {
        let id = v["id"].as_str().unwrap();
        let inputs = &v["inputs"];
        let exp = &v["expected"];
        let server_params = params(inputs);
        check_derivation(id, &server_params, exp);
        check_intermediates(id, &server_params, inputs, exp);
        let server = context(&server_params);
        let client = context(&swapped(&server_params));
        let request_kid = bytes(&inputs["request_kid"]);
        let request_piv = bytes(&inputs["request_piv"]);
        let own = inputs["response_includes_partial_iv"].as_bool().unwrap();

        // The request these responses answer is C.4's: get its binding from both sides by
        // protecting it on the client and unprotecting it on the server.
        let c4_plain = hex::decode("44015d1f00003974396c6f63616c686f737483747631").unwrap();
        let mut wire = Vec::new();
        let client_binding = protect_request(
            &client,
            SenderSequenceNumber(20),
            &MessageView::parse(&c4_plain).unwrap(),
            &mut wire,
        )
        .unwrap();
        let mut scratch = Vec::new();
        let server_binding =
            unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut scratch).unwrap();
        assert_eq!(server_binding.kid.as_slice(), request_kid, "{id}");
        assert_eq!(server_binding.piv.as_slice(), request_piv, "{id}");

        let plain = bytes(&inputs["unprotected_message"]);
        let own_piv =
            own.then(|| SenderSequenceNumber(inputs["sender_sequence_number"].as_u64().unwrap()));
        let mut protected = Vec::new();
        protect_response(
            &server,
            &server_binding,
            own_piv,
            &MessageView::parse(&plain).unwrap(),
            &mut protected,
        )
        .unwrap();
        assert_eq!(hex::encode(&protected), exp["protected_message"], "{id}");

        let wire = bytes(&exp["protected_message"]);
        let mut unprotected = Vec::new();
        let info = unprotect_response(
            &client,
            &client_binding,
            &MessageView::parse(&wire).unwrap(),
            &mut unprotected,
        )
        .unwrap();
        assert_eq!(
            hex::encode(&unprotected),
            inputs["unprotected_message"],
            "{id}"
        );
        assert_eq!(
            info.partial_iv,
            hex_of(&exp["partial_iv"]).map(|p| p.iter().fold(0, |a, &b| (a << 8) | u64::from(b))),
            "{id}"
        );
        seen += 1;
    }
    assert_eq!(seen, 2, "C.7-C.8");
}
