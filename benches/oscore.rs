//! OSCORE costs: context derivation, and protect + unprotect of a request and of a response
//! for every AEAD algorithm with 64-byte and 1 KiB payloads; and the client side of one
//! outbound exchange (protect a request, unprotect its response) over 1 or 10 000 contexts
//! in round-robin use, the memory cost of many contexts without the network's noise; and
//! the same in batches of 32 in a shuffled order, with and without prefetching each batch's
//! contexts first (`contexts/outbound-batch`).
//!
//! Quick check: `cargo bench --bench oscore -- --test`. Full run: `cargo bench --bench oscore`
//! (about three minutes; filter with e.g. `-- request/AES-CCM-16-64-128`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use oscore_gateway::oscore::{
    protect_request, protect_response, unprotect_request, unprotect_response, AeadAlgorithm,
    ContextParams, HkdfAlgorithm, ReplayWindow, SecurityContext, SenderSequenceNumber,
};
use oscore_gateway::prefetch;

const PAYLOAD_SIZES: [usize; 2] = [64, 1024];

fn params(aead: AeadAlgorithm) -> ContextParams {
    ContextParams {
        master_secret: vec![0x42; 16],
        master_salt: vec![0x9e; 8],
        sender_id: vec![],
        recipient_id: vec![1],
        id_context: None,
        aead,
        hkdf: HkdfAlgorithm::Sha256,
        replay_window: 32,
    }
}

fn pair(aead: AeadAlgorithm) -> (SecurityContext, SecurityContext) {
    pair_from(params(aead))
}

/// The client's context from `p` and the server's matching one (IDs swapped).
fn pair_from(p: ContextParams) -> (SecurityContext, SecurityContext) {
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    (
        SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap(),
        SecurityContext::derive(&q, ReplayWindow::new_empty(32)).unwrap(),
    )
}

fn message(mtype: MessageType, code: Code, opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, mtype, code, 0x1234, &[1, 2, 3, 4]).unwrap();
    for (n, v) in opts {
        b.option(*n, v).unwrap();
    }
    b.payload(payload);
    out
}

fn derivation(c: &mut Criterion) {
    let p = params(AeadAlgorithm::AesCcm16_64_128);
    c.bench_function("derive/AES-CCM-16-64-128/sha256", |b| {
        b.iter(|| SecurityContext::derive(black_box(&p), ReplayWindow::new_empty(32)).unwrap())
    });
}

/// Client protects a request, server unprotects it (replay window included).
fn request(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for aead in AeadAlgorithm::ALL {
        let (client, server) = pair(aead);
        // Shared by both sizes: the server's replay window sees one increasing sequence.
        let mut ssn = 0u64;
        for size in PAYLOAD_SIZES {
            let payload = vec![0xa5; size];
            let plain = message(
                MessageType::Confirmable,
                Code::POST,
                &[
                    (number::URI_HOST, b"origin.example"),
                    (number::URI_PATH, b"sensors"),
                    (number::URI_PATH, b"temp"),
                    (number::CONTENT_FORMAT, &[50]),
                ],
                &payload,
            );
            let view = MessageView::parse(&plain).unwrap();
            let (mut wire, mut back) =
                (Vec::with_capacity(size + 64), Vec::with_capacity(size + 64));
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(
                BenchmarkId::new(
                    format!("{}/protect+unprotect", aead.name().replace('/', "-")),
                    size,
                ),
                &view,
                |b, view| {
                    b.iter(|| {
                        ssn += 1;
                        protect_request(&client, SenderSequenceNumber(ssn), view, &mut wire)
                            .unwrap();
                        let outer = MessageView::parse(&wire).unwrap();
                        unprotect_request(&server, &outer, &mut back).unwrap();
                        black_box(back.len())
                    })
                },
            );
        }
    }
    g.finish();
}

/// Server protects a response reusing the request's nonce, client unprotects it.
fn response(c: &mut Criterion) {
    let mut g = c.benchmark_group("response");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for aead in AeadAlgorithm::ALL {
        let (client, server) = pair(aead);
        let request = message(MessageType::Confirmable, Code::GET, &[], b"");
        let mut wire = Vec::new();
        let client_binding = protect_request(
            &client,
            SenderSequenceNumber(1),
            &MessageView::parse(&request).unwrap(),
            &mut wire,
        )
        .unwrap();
        let mut scratch = Vec::new();
        let server_binding =
            unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut scratch).unwrap();
        for size in PAYLOAD_SIZES {
            let payload = vec![0x5a; size];
            let plain = message(
                MessageType::Acknowledgement,
                Code::CONTENT,
                &[(number::CONTENT_FORMAT, &[50]), (number::MAX_AGE, &[60])],
                &payload,
            );
            let view = MessageView::parse(&plain).unwrap();
            let (mut wire, mut back) =
                (Vec::with_capacity(size + 64), Vec::with_capacity(size + 64));
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(
                BenchmarkId::new(
                    format!("{}/protect+unprotect", aead.name().replace('/', "-")),
                    size,
                ),
                &view,
                |b, view| {
                    b.iter(|| {
                        // Reusing the request nonce for every iteration is fine in a
                        // benchmark and never happens in the gateway (one response each).
                        protect_response(&server, &server_binding, None, view, &mut wire).unwrap();
                        let outer = MessageView::parse(&wire).unwrap();
                        unprotect_response(&client, &client_binding, &outer, &mut back).unwrap();
                        black_box(back.len())
                    })
                },
            );
        }
    }
    g.finish();
}

/// A 64-byte GET and the origin's 64-byte 2.05 answer to it, for the `contexts/*` benches.
fn exchange_messages() -> (Vec<u8>, Vec<u8>) {
    let request = message(
        MessageType::Confirmable,
        Code::GET,
        &[(number::URI_PATH, b"x")],
        &[0xa5; 64],
    );
    let answer = message(
        MessageType::Acknowledgement,
        Code::CONTENT,
        &[(number::CONTENT_FORMAT, &[0])],
        &[0x5a; 64],
    );
    (request, answer)
}

/// Client context `i` (its own Master Secret), the binding of its protected `request`, and
/// the origin's protected `answer` to it (made here, as the origin would).
fn used_context(
    i: usize,
    request: &MessageView<'_>,
    answer: &MessageView<'_>,
) -> (
    SecurityContext,
    oscore_gateway::oscore::RequestBinding,
    Vec<u8>,
) {
    let mut p = params(AeadAlgorithm::AesCcm16_64_128);
    p.master_secret = (i as u64).to_be_bytes().repeat(2);
    let (client, server) = pair_from(p);
    let mut wire = Vec::new();
    let binding = protect_request(&client, SenderSequenceNumber(0), request, &mut wire).unwrap();
    let mut plain = Vec::new();
    let server_binding =
        unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut plain).unwrap();
    let mut response = Vec::new();
    protect_response(&server, &server_binding, None, answer, &mut response).unwrap();
    (client, binding, response)
}

/// What the gateway does per outbound request with a context, over `n` contexts in turn:
/// protect a 64-byte GET, unprotect the origin's response (made once per context at set-up,
/// as the origin would, so only the client side is measured). With 10 000 contexts each one
/// is cold when its turn comes (docs/PERFORMANCE.md, "Session 5").
fn outbound_contexts(c: &mut Criterion) {
    let mut g = c.benchmark_group("contexts/outbound");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (request, answer) = exchange_messages();
    let (request, answer) = (
        MessageView::parse(&request).unwrap(),
        MessageView::parse(&answer).unwrap(),
    );
    for n in [1usize, 10_000] {
        // (client context, the binding of its request, the origin's protected response)
        let contexts: Vec<_> = (0..n).map(|i| used_context(i, &request, &answer)).collect();
        let (mut wire, mut back) = (Vec::with_capacity(256), Vec::with_capacity(256));
        let (mut turn, mut ssn) = (0usize, 1u64);
        g.bench_function(BenchmarkId::new("AES-CCM-16-64-128", n), |b| {
            b.iter(|| {
                let (client, binding, response) = &contexts[turn];
                turn = (turn + 1) % n;
                ssn += 1;
                protect_request(client, SenderSequenceNumber(ssn), &request, &mut wire).unwrap();
                let outer = MessageView::parse(response).unwrap();
                unprotect_response(client, binding, &outer, &mut back).unwrap();
                black_box((wire.len(), back.len()))
            })
        });
    }
    g.finish();
}

/// `contexts/outbound` as the gateway meets it under load: 10 000 contexts, each in its own
/// allocation, used in a shuffled order, 32 exchanges (one receive batch) per iteration.
/// `in-turn` does the 32 one after the other; `prefetched` first prefetches, for all 32,
/// each context's first 128 bytes and both key schedules from addresses kept beside it (as
/// the gateway's memo keeps them, `gateway::Arrival`), then does the 32. The difference is
/// what overlapping the misses across a batch buys; per exchange it is the time / 32.
fn outbound_batches(c: &mut Criterion) {
    const N: usize = 10_000;
    const BATCH: usize = 32;
    let mut g = c.benchmark_group("contexts/outbound-batch");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(BATCH as u64));
    let (request, answer) = exchange_messages();
    let (request, answer) = (
        MessageView::parse(&request).unwrap(),
        MessageView::parse(&answer).unwrap(),
    );
    let contexts: Vec<Box<_>> = (0..N)
        .map(|i| Box::new(used_context(i, &request, &answer)))
        .collect();
    // addresses kept beside each context: the context itself and its two key schedules
    let lines: Vec<[(usize, usize); 3]> = contexts
        .iter()
        .map(|u| {
            let [s, r] = u.0.key_schedule_spans();
            [(prefetch::address_of(&u.0), 128), s, r]
        })
        .collect();
    // a fixed shuffle (xorshift, Fisher-Yates): no stride for the hardware prefetcher
    let mut order: Vec<usize> = (0..N).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..N).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for prefetched in [false, true] {
        let (mut wire, mut back) = (Vec::with_capacity(256), Vec::with_capacity(256));
        let (mut at, mut ssn) = (0usize, 1u64);
        let name = if prefetched { "prefetched" } else { "in-turn" };
        g.bench_function(BenchmarkId::new("AES-CCM-16-64-128", name), |b| {
            b.iter(|| {
                let batch = &order[at..at + BATCH];
                at = (at + BATCH) % (N - N % BATCH);
                if prefetched {
                    for &i in batch {
                        for (start, len) in lines[i] {
                            prefetch::bytes(start, len);
                        }
                    }
                }
                for &i in batch {
                    let (client, binding, response) = &*contexts[i];
                    ssn += 1;
                    protect_request(client, SenderSequenceNumber(ssn), &request, &mut wire)
                        .unwrap();
                    let outer = MessageView::parse(response).unwrap();
                    unprotect_response(client, binding, &outer, &mut back).unwrap();
                    black_box((wire.len(), back.len()));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    derivation,
    request,
    response,
    outbound_contexts,
    outbound_batches
);
criterion_main!(benches);
