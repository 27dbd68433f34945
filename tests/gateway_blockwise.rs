//! Block-wise across the gateway (RFC 7959, RFC 9175, RFC 8613 §4.1.3.4) against real
//! peers on loopback: aiocoap-client (plain, --proxy) and hand-made plain clients through
//! `oscore-gateway run` to aiocoap-fileserver holding the OSCORE context, and a fake plain
//! origin that records the gateway's upstream Block1 and Request-Tag options.
//!
//! Outer block-wise (fragmenting a protected message, reassembling outer Block2) is tested
//! by unit tests in src/gateway/blockwise.rs only: aiocoap's server does not reassemble
//! outer Block1 (aiocoap issue #220), so no real peer can take it.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use oscore_gateway::coap::option::{decode_uint, encode_uint};
use oscore_gateway::coap::{number, BlockValue, Code, MessageBuilder, MessageType, MessageView};

fn config(creds: Option<&Path>, extra: &str) -> String {
    let creds = creds.map_or(String::new(), |c| format!("credentials = {:?}\n", c));
    format!("{creds}[policy]\nupstream_timeout_secs = 20\n{extra}")
}

/// Deterministic bytes that differ per `seed` in every 4-byte word (a block from another
/// body, or a misplaced block, is caught by a byte compare).
fn body(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    let mut out = Vec::with_capacity(len + 4);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A plain PUT through the gateway as a forward proxy (Proxy-Scheme + Uri-Host/Port/Path).
fn put(
    origin_port: u16,
    path: &str,
    mid: u16,
    token: &[u8],
    block1: Option<BlockValue>,
    size1: Option<usize>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b =
        MessageBuilder::new(&mut out, MessageType::Confirmable, Code::PUT, mid, token).unwrap();
    let (mut b1, mut s1, mut port) = ([0u8; 8], [0u8; 8], [0u8; 8]);
    b.option(number::URI_HOST, b"localhost").unwrap();
    b.option(
        number::URI_PORT,
        encode_uint(u64::from(origin_port), &mut port),
    )
    .unwrap();
    b.option(number::URI_PATH, path.as_bytes()).unwrap();
    if let Some(v) = block1 {
        b.option(number::BLOCK1, v.encode(&mut b1)).unwrap();
    }
    b.option(number::PROXY_SCHEME, b"coap").unwrap();
    if let Some(s) = size1 {
        b.option(number::SIZE1, encode_uint(s as u64, &mut s1))
            .unwrap();
    }
    b.payload(payload);
    out
}

/// Sends a CON and returns the response: piggybacked, or (after an empty ACK) the separate
/// CON response, which is acknowledged.
fn exchange(sock: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.send_to(datagram, to).unwrap();
    let mid = MessageView::parse(datagram).unwrap().message_id;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer from the gateway: {e}"));
        let m = MessageView::parse(&buf[..n]).unwrap();
        match m.mtype {
            MessageType::Acknowledgement if m.message_id == mid && m.code == Code::EMPTY => {}
            MessageType::Acknowledgement if m.message_id == mid => return buf[..n].to_vec(),
            MessageType::Confirmable if m.code.is_response() => {
                let mut ack = Vec::new();
                MessageBuilder::new(
                    &mut ack,
                    MessageType::Acknowledgement,
                    Code::EMPTY,
                    m.message_id,
                    &[],
                )
                .unwrap()
                .finish();
                sock.send_to(&ack, to).unwrap();
                return buf[..n].to_vec();
            }
            _ => {}
        }
    }
}

fn block(v: &MessageView<'_>, n: u16) -> Option<BlockValue> {
    v.option(n).map(|b| BlockValue::decode(b).unwrap())
}

fn aiocoap_client() -> std::path::PathBuf {
    interop().base.join("venv/bin/aiocoap-client")
}

/// aiocoap-client -m PUT --payload @FILE --proxy coap://GATEWAY coap://localhost:ORIGIN/PATH
fn aiocoap_put(gw: &Gateway, origin_port: u16, file: &Path, path: &str) -> Command {
    let mut c = Command::new(aiocoap_client());
    c.arg("-m")
        .arg("PUT")
        .arg("--payload")
        .arg(format!("@{}", file.display()))
        .arg("--proxy")
        .arg(format!("coap://127.0.0.1:{}", gw.port))
        .arg(format!("coap://localhost:{origin_port}/{path}"));
    c
}

#[test]
fn put_50k_through_the_gateway_lands_byte_exact_under_oscore() {
    let dir = TestDir::new("gwb-put50k");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        true,
    );
    let mut gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let file = dir.join("up50k.bin");
    let want = body(50_000, 50_000);
    fs::write(&file, &want).unwrap();
    // wire_check.sh: exit 4 if any plain request reached the origin's port
    let put = aiocoap_put(&gw, origin_port, &file, "up50k.bin");
    let mut argv: Vec<String> = vec![put.get_program().to_string_lossy().into_owned()];
    argv.extend(put.get_args().map(|a| a.to_string_lossy().into_owned()));
    let out = run_wire_check(
        dir.path(),
        &[origin_port, gw.port],
        Some(origin_port),
        None,
        &argv,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        show("aiocoap-client PUT under wire_check", &out),
        gw.log()
    );
    assert_same_bytes(
        "50 kB PUT through the gateway",
        &fs::read(data.join("up50k.bin")).unwrap(),
        &want,
        &gw.log(),
    );
    // 49 client blocks reassembled, one upstream transfer of 49 blocks with a Request-Tag
    let log = gw.log();
    assert!(
        log.contains("50000 bytes upstream as Block1 SZX 6 with Request-Tag"),
        "{log}"
    );
    assert!(gw.stop().status.success());
}

/// Two clients upload different 20 kB bodies to the SAME path, their blocks interleaved
/// block by block at the gateway and the two upstream transfers running at the same time
/// under the gateway's one security context. Each must get 2.04 and the file must be
/// exactly one of the two bodies (the fileserver writes each complete body atomically,
/// last writer wins): a mix of blocks would be neither.
#[test]
fn two_interleaved_20k_uploads_to_the_same_path_do_not_mix() {
    let dir = TestDir::new("gwb-two");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        true,
    );
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let bodies = [body(0xa, 20_000), body(0xb, 20_000)];
    assert!(bodies[0] != bodies[1]);
    let socks = [
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    ];
    let blocks = 20_000usize.div_ceil(1024);
    // all but the last block, alternating A, B, A, B, ...
    for n in 0..blocks - 1 {
        for (i, s) in socks.iter().enumerate() {
            let b1 = BlockValue::new(n as u32, true, 6).unwrap();
            let chunk = &bodies[i][n * 1024..(n + 1) * 1024];
            let size1 = (n == 0).then_some(20_000);
            let mid = (i * 1000 + n) as u16;
            let r = exchange(
                s,
                gw.addr(),
                &put(
                    origin_port,
                    "same.bin",
                    mid,
                    &[i as u8, 1],
                    Some(b1),
                    size1,
                    chunk,
                ),
            );
            let r = MessageView::parse(&r).unwrap();
            assert_eq!(
                r.code,
                Code::CONTINUE,
                "client {i} block {n}: {:?}",
                r.payload
            );
            assert_eq!(block(&r, number::BLOCK1), Some(b1));
        }
    }
    // both last blocks at once: the two upstream transfers overlap
    let (tx, rx) = mpsc::channel();
    thread::scope(|scope| {
        for (i, s) in socks.iter().enumerate() {
            let tx = tx.clone();
            let bodies = &bodies;
            let gw_addr = gw.addr();
            scope.spawn(move || {
                let n = blocks - 1;
                let b1 = BlockValue::new(n as u32, false, 6).unwrap();
                let r = exchange(
                    s,
                    gw_addr,
                    &put(
                        origin_port,
                        "same.bin",
                        (i * 1000 + n) as u16,
                        &[i as u8, 1],
                        Some(b1),
                        None,
                        &bodies[i][n * 1024..],
                    ),
                );
                tx.send((i, r)).unwrap();
            });
        }
    });
    drop(tx);
    let mut answered = 0;
    for (i, r) in rx {
        let r = MessageView::parse(&r).unwrap();
        assert_eq!(
            r.code,
            Code::CHANGED,
            "client {i}: {}\n{}",
            String::from_utf8_lossy(r.payload),
            gw.log()
        );
        assert_eq!(
            block(&r, number::BLOCK1),
            Some(BlockValue::new(blocks as u32 - 1, false, 6).unwrap()),
            "client {i} sees its own last Block1"
        );
        answered += 1;
    }
    assert_eq!(answered, 2);
    let got = fs::read(data.join("same.bin")).unwrap();
    assert!(
        got == bodies[0] || got == bodies[1],
        "the file is neither body: {} bytes, first 16 {:02x?}\n{}",
        got.len(),
        &got[..16.min(got.len())],
        gw.log()
    );
    // two upstream transfers with two different Request-Tags
    let log = gw.log();
    let tags: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("with Request-Tag ").nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(tags.len(), 2, "{}", gw.log());
    assert_ne!(tags[0], tags[1]);
}

/// The same with two real aiocoap-client processes started together.
#[test]
fn two_aiocoap_clients_put_20k_to_the_same_path_at_once() {
    let dir = TestDir::new("gwb-two-aio");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        true,
    );
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let bodies = [body(0x1, 20_000), body(0x2, 20_000)];
    let clients: Vec<ChildGuard> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let file = dir.join(format!("body{i}.bin"));
            fs::write(&file, b).unwrap();
            ChildGuard::spawn(aiocoap_put(&gw, origin_port, &file, "shared.bin"))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_timeout(Duration::from_secs(60));
        // aiocoap-client exits 1 on an unsuccessful response code
        assert!(
            out.status.success(),
            "client {i}: {}\n{}",
            output_text(&out),
            gw.log()
        );
    }
    let got = fs::read(data.join("shared.bin")).unwrap();
    assert!(
        got == bodies[0] || got == bodies[1],
        "the file is neither body ({} bytes)\n{}",
        got.len(),
        gw.log()
    );
}

/// A fake plain origin: answers 2.31 (echoing Block1) to blocks with M=1 and 2.04 to the
/// rest, and reports every request's (Block1, Request-Tag, Size1, payload).
type Seen = (Option<BlockValue>, Option<Vec<u8>>, Option<u64>, Vec<u8>);

fn fake_origin(sock: UdpSocket, count: usize) -> thread::JoinHandle<Vec<Seen>> {
    thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.len() < count {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            let m = MessageView::parse(&buf[..n]).unwrap();
            if !m.code.is_request() {
                continue;
            }
            let b1 = block(&m, number::BLOCK1);
            let (code, echo) = match b1 {
                Some(b) if b.more => (Code::CONTINUE, Some(b)),
                other => (Code::CHANGED, other),
            };
            let mut out = Vec::new();
            let mut r = MessageBuilder::new(
                &mut out,
                MessageType::Acknowledgement,
                code,
                m.message_id,
                m.token,
            )
            .unwrap();
            let mut e = [0u8; 8];
            if let Some(b) = echo {
                r.option(number::BLOCK1, b.encode(&mut e)).unwrap();
            }
            r.finish();
            // a duplicate (retransmission) is answered but reported once
            if !seen.iter().any(|s: &(u16, Seen)| s.0 == m.message_id) {
                seen.push((
                    m.message_id,
                    (
                        b1,
                        m.option(number::REQUEST_TAG).map(<[u8]>::to_vec),
                        m.option(number::SIZE1).and_then(decode_uint),
                        m.payload.to_vec(),
                    ),
                ));
            }
            sock.send_to(&out, from).unwrap();
        }
        seen.into_iter().map(|s| s.1).collect()
    })
}

/// A single-datagram 1300-byte PUT (no Block1 from the client) goes upstream as inner
/// Block1 SZX 6 (1024 + 276 bytes) with Size1 and one Request-Tag on both blocks; a second
/// upload gets a different tag; the client's answer is 2.04 without Block1. Plain
/// forwarding to a fake origin, so the upstream options are visible.
#[test]
fn single_datagram_body_goes_upstream_as_block1_with_request_tag() {
    let dir = TestDir::new("gwb-1300");
    let origin_port = free_udp_port();
    let origin = fake_origin(UdpSocket::bind(("127.0.0.1", origin_port)).unwrap(), 4);
    let gw = Gateway::start(dir.path(), &config(None, "plain_forwarding = true\n"));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bodies = [body(13, 1300), body(14, 1300)];
    for (i, b) in bodies.iter().enumerate() {
        let r = exchange(
            &c,
            gw.addr(),
            &put(
                origin_port,
                "one",
                10 + i as u16,
                &[9, i as u8],
                None,
                None,
                b,
            ),
        );
        let r = MessageView::parse(&r).unwrap();
        assert_eq!(r.code, Code::CHANGED, "{}", gw.log());
        assert!(!r.has_option(number::BLOCK1), "the client sent no Block1");
    }
    let seen = origin.join().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let mut tags = Vec::new();
    for (i, pair) in seen.chunks(2).enumerate() {
        let (b0, t0, s0, p0) = &pair[0];
        let (b1, t1, s1, p1) = &pair[1];
        assert_eq!(*b0, Some(BlockValue::new(0, true, 6).unwrap()));
        assert_eq!(*b1, Some(BlockValue::new(1, false, 6).unwrap()));
        assert_eq!(*s0, Some(1300), "Size1 on the first block");
        assert_eq!(*s1, None);
        assert!(
            t0.is_some() && t0 == t1,
            "one Request-Tag per transfer: {t0:?} {t1:?}"
        );
        assert_eq!((p0.len(), p1.len()), (1024, 276));
        assert_eq!([&p0[..], &p1[..]].concat(), bodies[i]);
        tags.push(t0.clone());
    }
    assert_ne!(tags[0], tags[1], "each transfer has its own Request-Tag");
}

/// The same 1300-byte single datagram to the real aiocoap-fileserver under OSCORE lands
/// byte-exact (aiocoap reassembles the gateway's inner Block1).
#[test]
fn single_datagram_body_lands_at_aiocoap_under_oscore() {
    let dir = TestDir::new("gwb-1300-aio");
    let origin_port = free_udp_port();
    let ctx = make_contexts(dir.path(), origin_port, &[("gw", "04")]);
    let data = dir.join("data");
    let _origin = AiocoapServer::start(
        dir.path(),
        origin_port,
        &data,
        Some(&ctx.join("server.json")),
        true,
    );
    let gw = Gateway::start(dir.path(), &config(Some(&client_creds(&ctx, "gw")), ""));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let want = body(1300, 1300);
    let r = exchange(
        &c,
        gw.addr(),
        &put(origin_port, "one.bin", 1, &[1], None, None, &want),
    );
    let r = MessageView::parse(&r).unwrap();
    assert_eq!(r.code, Code::CHANGED, "{}", gw.log());
    assert_same_bytes(
        "1300-byte single datagram",
        &fs::read(data.join("one.bin")).unwrap(),
        &want,
        &gw.log(),
    );
    assert!(
        gw.log()
            .contains("1300 bytes upstream as Block1 SZX 6 with Request-Tag"),
        "{}",
        gw.log()
    );
}

/// Over `blockwise.max_body_size`: 4.13 with Size1 = the limit (RFC 7959 §2.9.3) for an
/// announced Size1, for blocks that run past it, and for a single datagram; nothing
/// reaches the origin.
#[test]
fn body_over_the_cap_gets_4_13_with_size1() {
    let dir = TestDir::new("gwb-413");
    let origin_port = free_udp_port();
    let silence = UdpSilence::bind(origin_port);
    let gw = Gateway::start(
        dir.path(),
        &config(
            None,
            "plain_forwarding = true\n[blockwise]\nmax_body_size = 4096\n",
        ),
    );
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let big = body(7, 6000);
    let check = |r: Vec<u8>, what: &str| {
        let r = MessageView::parse(&r).unwrap();
        assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE, "{what}");
        assert_eq!(
            r.option(number::SIZE1).and_then(decode_uint),
            Some(4096),
            "{what}"
        );
    };
    // announced with Size1 on block 0
    let b0 = BlockValue::new(0, true, 6).unwrap();
    check(
        exchange(
            &c,
            gw.addr(),
            &put(
                origin_port,
                "x",
                1,
                &[1],
                Some(b0),
                Some(6000),
                &big[..1024],
            ),
        ),
        "Size1 6000",
    );
    // no Size1: blocks 0..3 are accepted, block 4 crosses the cap
    for n in 0..4u32 {
        let b = BlockValue::new(n, true, 6).unwrap();
        let at = n as usize * 1024;
        let r = exchange(
            &c,
            gw.addr(),
            &put(
                origin_port,
                "x",
                10 + n as u16,
                &[2],
                Some(b),
                None,
                &big[at..at + 1024],
            ),
        );
        assert_eq!(MessageView::parse(&r).unwrap().code, Code::CONTINUE);
    }
    let b4 = BlockValue::new(4, true, 6).unwrap();
    check(
        exchange(
            &c,
            gw.addr(),
            &put(origin_port, "x", 20, &[2], Some(b4), None, &big[4096..5120]),
        ),
        "block 4",
    );
    // one datagram of 6000 bytes
    check(
        exchange(
            &c,
            gw.addr(),
            &put(origin_port, "x", 30, &[3], None, None, &big),
        ),
        "single datagram",
    );
    let seen = silence.received(Duration::from_millis(300));
    assert!(seen.is_empty(), "the origin port received {seen:?}");
}

/// The assumption the upstream side rests on, checked against aiocoap-fileserver itself
/// (plain, so the options are ours to set): two Block1 transfers to the same path from ONE
/// address (as the gateway's transfers are once upstream sockets are shared) are kept
/// apart by distinct Request-Tags, and without them the second transfer's block 0
/// discards the first one (aiocoap's Block1Spool keys by address and cache key, and
/// Request-Tag is part of the cache key).
#[test]
fn aiocoap_keeps_transfers_from_one_address_apart_by_request_tag() {
    let dir = TestDir::new("gwb-rtag");
    let origin_port = free_udp_port();
    let data = dir.join("data");
    let _origin = AiocoapServer::start(dir.path(), origin_port, &data, None, true);
    let origin = SocketAddr::from(([127, 0, 0, 1], origin_port));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bodies = [body(0x51, 3000), body(0x52, 3000)];
    let req = |mid: u16, tag: Option<&[u8]>, b1: BlockValue, payload: &[u8]| {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::Confirmable,
            Code::PUT,
            mid,
            &mid.to_be_bytes(),
        )
        .unwrap();
        let mut e = [0u8; 8];
        b.option(number::URI_PATH, b"tagged.bin").unwrap();
        b.option(number::BLOCK1, b1.encode(&mut e)).unwrap();
        if let Some(t) = tag {
            b.option(number::REQUEST_TAG, t).unwrap();
        }
        b.payload(payload);
        out
    };
    // interleave A0 B0 A1 B1 A2 B2 from one socket; returns the final codes
    let run = |tags: [Option<&[u8]>; 2], base: u16| -> Vec<Code> {
        let mut last = vec![Code::EMPTY; 2];
        for n in 0..3usize {
            for i in 0..2 {
                let b1 = BlockValue::new(n as u32, n < 2, 6).unwrap();
                let chunk = &bodies[i][n * 1024..((n + 1) * 1024).min(3000)];
                let mid = base + (n * 2 + i) as u16;
                let r = exchange(&sock, origin, &req(mid, tags[i], b1, chunk));
                last[i] = MessageView::parse(&r).unwrap().code;
            }
        }
        last
    };
    let codes = run([Some(b"A"), Some(b"B")], 100);
    assert_eq!(codes, vec![Code::CHANGED, Code::CHANGED]);
    assert!(fs::read(data.join("tagged.bin")).unwrap() == bodies[1]);
    let codes = run([None, None], 200);
    assert_ne!(
        codes,
        vec![Code::CHANGED, Code::CHANGED],
        "without Request-Tag aiocoap cannot keep the two apart"
    );
}
