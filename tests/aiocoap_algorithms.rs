//! aiocoap 0.4.17's OSCORE code as an oracle for ours, message by message, through
//! `tests/interop/aiocoap_protect.py` (run with the interop venv's python; see its docstring
//! for the JSON operations).
//!
//! Here now: the tool reproduces RFC 8613 Appendix C, the Rust helper [`aiocoap`] carries
//! a vector through it, and aiocoap accepts every algorithm and hash we implement with the
//! lengths our table says.
//! To come (integrator): our protect ⇄ aiocoap unprotect and aiocoap protect ⇄ our
//! unprotect, for all 12 AEAD algorithms × 3 HKDF hashes, built on [`aiocoap`] and
//! [`context_json`].

mod common;

use std::process::Command;
use std::time::Duration;

use common::{interop, output_text, run_with_input, run_with_timeout};
use oscore_gateway::oscore::{AeadAlgorithm, ContextParams, HkdfAlgorithm, ReplayWindow};
use serde_json::{json, Value};

/// Runs aiocoap_protect.py with `op` (one operation object, or an array of them for one
/// interpreter start) and returns its answer (an object, or an array in the same order).
/// Panics if the tool rejects the input itself; aiocoap refusing to (un)protect is an
/// answer with `"ok": false`.
fn aiocoap(op: Value) -> Value {
    let i = interop();
    let mut cmd = Command::new(&i.venv_python);
    cmd.arg(i.test_tool("aiocoap_protect.py"));
    let input = serde_json::to_vec(&op).unwrap();
    let out = run_with_input(cmd, input, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "aiocoap_protect.py failed on {op}:\n{}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "aiocoap_protect.py answered no JSON ({e}):\n{}",
            output_text(&out)
        )
    })
}

/// A context object for [`aiocoap`]: all byte values as hex.
#[allow(clippy::too_many_arguments)]
fn context_json(
    secret: &[u8],
    salt: &[u8],
    sender_id: &[u8],
    recipient_id: &[u8],
    id_context: Option<&[u8]>,
    aead: AeadAlgorithm,
    hkdf: HkdfAlgorithm,
    role: &str,
) -> Value {
    json!({
        "secret": hex::encode(secret),
        "salt": hex::encode(salt),
        "sender_id": hex::encode(sender_id),
        "recipient_id": hex::encode(recipient_id),
        "id_context": id_context.map(hex::encode),
        "algorithm": aead.name(),
        "kdf_hashfun": hkdf.name(),
        "role": role,
    })
}

fn vectors() -> Vec<Value> {
    let text = std::fs::read_to_string(&interop().vectors).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["vectors"].as_array().unwrap().clone()
}

/// The vector's context in the tool's shape; `swap` gives the peer's side.
fn vector_context(inputs: &Value, swap: bool, role: &str) -> Value {
    let (s, r) = if swap {
        ("recipient_id", "sender_id")
    } else {
        ("sender_id", "recipient_id")
    };
    assert_eq!(inputs["kdf"], "HKDF-SHA-256");
    json!({
        "secret": inputs["master_secret"],
        "salt": inputs["master_salt"].as_str().unwrap_or(""),
        "sender_id": inputs[s],
        "recipient_id": inputs[r],
        "id_context": inputs["id_context"],
        "algorithm": inputs["aead_algorithm_name"],
        "kdf_hashfun": "sha256",
        "role": role,
    })
}

#[test]
fn aiocoap_protect_tool_reproduces_rfc8613_appendix_c() {
    let i = interop();
    let mut cmd = Command::new(&i.venv_python);
    cmd.arg(i.test_tool("aiocoap_protect.py"))
        .arg("--self-test")
        .arg("--vectors")
        .arg(&i.vectors);
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "self-test failed:\n{}",
        output_text(&out)
    );
    // every vector of the file was checked and passed, not just "no failure"
    let ids: Vec<String> = vectors()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 11, "C.1.1-C.3.2 and C.4-C.8 expected");
    for id in &ids {
        assert!(
            text.lines().any(|l| l == format!("PASS {id}")),
            "no PASS line for {id}:\n{text}"
        );
    }
    // and the round trips cover every algorithm and hash we implement
    for aead in AeadAlgorithm::ALL {
        for hkdf in HkdfAlgorithm::ALL {
            let line = format!("PASS round-trip {} {}", aead.name(), hkdf.name());
            assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
        }
    }
    assert!(text.contains("PASS echo-recovery"), "{text}");
    assert!(text.contains(", 0 failed"), "{text}");
}

#[test]
fn rust_helper_carries_appendix_c_messages_through_aiocoap() {
    let vs = vectors();
    let mut ops = Vec::new();
    let mut expect = Vec::new();
    for v in vs.iter().filter(|v| v["kind"] != "key_derivation") {
        let inp = &v["inputs"];
        let exp = &v["expected"];
        if v["kind"] == "message_request" {
            ops.push(json!({
                "op": "protect-request",
                "context": vector_context(inp, false, "client"),
                "message": inp["unprotected_message"],
                "sequence_number": inp["sender_sequence_number"],
                "kid_context": inp["send_kid_context"],
            }));
            expect.push((v["id"].clone(), exp["protected_message"].clone()));
            // and back: the server side unprotects the RFC's bytes to the RFC's plaintext
            ops.push(json!({
                "op": "unprotect-request",
                "context": vector_context(inp, true, "server"),
                "message": exp["protected_message"],
            }));
            expect.push((v["id"].clone(), exp["plaintext"].clone()));
        } else {
            let mut op = json!({
                "op": "protect-response",
                "context": vector_context(inp, false, "server"),
                "message": inp["unprotected_message"],
                "request_kid": inp["request_kid"],
                "request_piv": inp["request_piv"],
            });
            if inp["response_includes_partial_iv"] == true {
                op["sequence_number"] = inp["sender_sequence_number"].clone();
            }
            ops.push(op);
            expect.push((v["id"].clone(), exp["protected_message"].clone()));
            ops.push(json!({
                "op": "unprotect-response",
                "context": vector_context(inp, true, "client"),
                "message": exp["protected_message"],
                "request_kid": inp["request_kid"],
                "request_piv": inp["request_piv"],
            }));
            expect.push((v["id"].clone(), exp["plaintext"].clone()));
        }
    }
    assert_eq!(ops.len(), 10, "C.4-C.8, both directions");
    let answers = aiocoap(Value::Array(ops.clone()));
    let answers = answers.as_array().expect("an array for an array");
    assert_eq!(answers.len(), ops.len());
    for ((op, answer), (id, want)) in ops.iter().zip(answers).zip(&expect) {
        assert_eq!(answer["ok"], true, "{id}: {op} -> {answer}");
        let got = if op["op"].as_str().unwrap().starts_with("protect") {
            &answer["message"]
        } else {
            &answer["plaintext"]
        };
        assert_eq!(got, want, "{id}: {op} -> {answer}");
    }
    // a single object gets a single object back
    let one = aiocoap(ops[0].clone());
    assert_eq!(one["message"], expect[0].1);
}

#[test]
fn aiocoap_accepts_every_algorithm_and_hash_with_our_lengths() {
    // CON GET coap://localhost/x (Uri-Host "localhost", Uri-Path "x"), MID 1, no token
    let get = "40010001396c6f63616c686f73748178";
    let mut ops = Vec::new();
    let mut combos = Vec::new();
    for aead in AeadAlgorithm::ALL {
        for hkdf in HkdfAlgorithm::ALL {
            let ctx = context_json(
                b"0123456789abcdef",
                b"salt",
                &[0x01],
                &[],
                Some(&[0xaa, 0xbb]),
                aead,
                hkdf,
                "client",
            );
            ops.push(json!({"op": "derive", "context": ctx}));
            ops.push(json!({"op": "protect-request", "context": ctx, "message": get, "sequence_number": 5}));
            combos.push((aead, hkdf));
        }
    }
    let answers = aiocoap(Value::Array(ops));
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 2 * combos.len());
    let mut keys = std::collections::HashSet::new();
    for ((aead, hkdf), pair) in combos.iter().zip(answers.chunks(2)) {
        let (derived, protected) = (&pair[0], &pair[1]);
        assert_eq!(derived["ok"], true, "{aead}/{hkdf}: {derived}");
        assert_eq!(protected["ok"], true, "{aead}/{hkdf}: {protected}");
        let hexlen = |v: &Value| v.as_str().unwrap().len() / 2;
        assert_eq!(
            hexlen(&derived["sender_key"]),
            aead.key_len(),
            "{aead}/{hkdf} key length"
        );
        assert_eq!(
            hexlen(&derived["common_iv"]),
            aead.nonce_len(),
            "{aead}/{hkdf} Common IV length"
        );
        assert_eq!(
            hexlen(&protected["ciphertext"]),
            hexlen(&protected["plaintext"]) + aead.tag_len(),
            "{aead}/{hkdf} tag length"
        );
        // the hash function really is an input: no two combinations derive the same key
        assert!(
            keys.insert(derived["sender_key"].as_str().unwrap().to_string()),
            "{aead}/{hkdf} derived a key another combination derived"
        );
    }
}

fn our_context(
    aead: AeadAlgorithm,
    hkdf: HkdfAlgorithm,
    sender_id: &[u8],
    recipient_id: &[u8],
) -> oscore_gateway::oscore::SecurityContext {
    let params = ContextParams {
        master_secret: b"0123456789abcdef0123".to_vec(),
        master_salt: b"salty".to_vec(),
        sender_id: sender_id.to_vec(),
        recipient_id: recipient_id.to_vec(),
        id_context: Some(vec![0x37, 0xcb]),
        aead,
        hkdf,
        replay_window: 32,
    };
    oscore_gateway::oscore::SecurityContext::derive(&params, ReplayWindow::new_empty(32)).unwrap()
}

fn hexs(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap_or_else(|| panic!("not hex: {v}"))).unwrap()
}

/// For every AEAD algorithm and HKDF hash aiocoap accepts: aiocoap protects and we
/// unprotect, and we protect and aiocoap unprotects, requests and responses (with and
/// without the server's own Partial IV), with a salt and an ID Context.
#[test]
fn every_algorithm_interoperates_with_aiocoap_both_ways() {
    use oscore_gateway::coap::MessageView;
    use oscore_gateway::oscore::{
        protect_request, protect_response, unprotect_request, unprotect_response,
        SenderSequenceNumber,
    };
    // CON PUT /x?q=1, Content-Format 0, token 0x7a 0x7b, payload "hello from a test"
    let request = {
        let mut out = Vec::new();
        let mut b = oscore_gateway::coap::MessageBuilder::new(
            &mut out,
            oscore_gateway::coap::MessageType::Confirmable,
            oscore_gateway::coap::Code::PUT,
            0x1234,
            &[0x7a, 0x7b],
        )
        .unwrap();
        b.option(11, b"x").unwrap().uint_option(12, 0).unwrap();
        b.option(15, b"q=1").unwrap();
        b.payload(b"hello from a test");
        out
    };
    // ACK 2.04 with the same MID/token, Content-Format 0, payload
    let response = {
        let mut out = Vec::new();
        let mut b = oscore_gateway::coap::MessageBuilder::new(
            &mut out,
            oscore_gateway::coap::MessageType::Acknowledgement,
            oscore_gateway::coap::Code::CHANGED,
            0x1234,
            &[0x7a, 0x7b],
        )
        .unwrap();
        b.uint_option(12, 0).unwrap();
        b.payload(b"stored it");
        out
    };
    let (client_id, server_id) = ([0x01u8], [0x42u8]);
    let mut checked = 0;
    for aead in AeadAlgorithm::ALL {
        for hkdf in HkdfAlgorithm::ALL {
            let their_client = context_json(
                b"0123456789abcdef0123",
                b"salty",
                &client_id,
                &server_id,
                Some(&[0x37, 0xcb]),
                aead,
                hkdf,
                "client",
            );
            let their_server = context_json(
                b"0123456789abcdef0123",
                b"salty",
                &server_id,
                &client_id,
                Some(&[0x37, 0xcb]),
                aead,
                hkdf,
                "server",
            );
            let our_server = our_context(aead, hkdf, &server_id, &client_id);
            let our_client = our_context(aead, hkdf, &client_id, &server_id);
            let ctx = format!("{aead}/{hkdf}");

            // 1. aiocoap protects the request, we unprotect it.
            let p = aiocoap(json!({"op": "protect-request", "context": their_client,
                "message": hex::encode(&request), "sequence_number": 7}));
            assert_eq!(p["ok"], true, "{ctx}: {p}");
            let wire = hexs(&p["message"]);
            let mut plain = Vec::new();
            let binding =
                unprotect_request(&our_server, &MessageView::parse(&wire).unwrap(), &mut plain)
                    .unwrap_or_else(|e| {
                        panic!("{ctx}: we cannot unprotect aiocoap's request: {e}")
                    });
            assert_eq!(plain, request, "{ctx}: request after our unprotect");
            assert_eq!(binding.sequence_number(), 7);

            // 2. we protect the response (request nonce, then own Partial IV), aiocoap
            //    unprotects both.
            for own in [None, Some(SenderSequenceNumber(3))] {
                let mut wire = Vec::new();
                protect_response(
                    &our_server,
                    &binding,
                    own,
                    &MessageView::parse(&response).unwrap(),
                    &mut wire,
                )
                .unwrap();
                let u = aiocoap(json!({"op": "unprotect-response", "context": their_client,
                    "message": hex::encode(&wire), "request_kid": p["request_kid"],
                    "request_piv": p["request_piv"]}));
                assert_eq!(
                    u["ok"], true,
                    "{ctx} own piv {own:?}: aiocoap rejects our response: {u}"
                );
                assert_eq!(
                    hexs(&u["message"]),
                    response,
                    "{ctx}: response after aiocoap's unprotect"
                );
            }

            // 3. we protect a request, aiocoap unprotects it.
            let mut wire = Vec::new();
            let binding = protect_request(
                &our_client,
                SenderSequenceNumber(9),
                &MessageView::parse(&request).unwrap(),
                &mut wire,
            )
            .unwrap();
            let u = aiocoap(json!({"op": "unprotect-request", "context": their_server,
                "message": hex::encode(&wire)}));
            assert_eq!(u["ok"], true, "{ctx}: aiocoap rejects our request: {u}");
            assert_eq!(
                hexs(&u["message"]),
                request,
                "{ctx}: request after aiocoap's unprotect"
            );

            // 4. aiocoap protects the response (request nonce, then own Partial IV), we
            //    unprotect both.
            for own in [None, Some(4)] {
                let mut op = json!({"op": "protect-response", "context": their_server,
                    "message": hex::encode(&response), "request_kid": u["request_kid"],
                    "request_piv": u["request_piv"]});
                if let Some(n) = own {
                    op["sequence_number"] = json!(n);
                }
                let r = aiocoap(op);
                assert_eq!(r["ok"], true, "{ctx}: {r}");
                let wire = hexs(&r["message"]);
                let mut plain = Vec::new();
                let info = unprotect_response(
                    &our_client,
                    &binding,
                    &MessageView::parse(&wire).unwrap(),
                    &mut plain,
                )
                .unwrap_or_else(|e| {
                    panic!("{ctx} own piv {own:?}: we cannot unprotect aiocoap's response: {e}")
                });
                assert_eq!(plain, response, "{ctx}: response after our unprotect");
                assert_eq!(info.partial_iv, own);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}
