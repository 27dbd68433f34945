//! CoAP codec costs: parsing a typical request and response into a `MessageView` (with a
//! walk over its options) and building them with `MessageBuilder` into a reused buffer.
//!
//! Quick check: `cargo bench --bench codec -- --test`. Full run: `cargo bench --bench codec`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};

fn request(out: &mut Vec<u8>) {
    let mut b = MessageBuilder::new(
        out,
        MessageType::Confirmable,
        Code::GET,
        0x1234,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    )
    .unwrap();
    b.option(number::URI_HOST, b"origin.example").unwrap();
    b.uint_option(number::URI_PORT, 5683).unwrap();
    b.option(number::URI_PATH, b"sensors").unwrap();
    b.option(number::URI_PATH, b"temperature").unwrap();
    b.uint_option(number::ACCEPT, 50).unwrap();
    b.option(number::PROXY_SCHEME, b"coap").unwrap();
    b.finish();
}

fn response(out: &mut Vec<u8>, payload: &[u8]) {
    let mut b = MessageBuilder::new(
        out,
        MessageType::Acknowledgement,
        Code::CONTENT,
        0x1234,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    )
    .unwrap();
    b.uint_option(number::CONTENT_FORMAT, 50).unwrap();
    b.uint_option(number::MAX_AGE, 60).unwrap();
    b.payload(payload);
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let payload = vec![0x5a; 64];
    let (mut req, mut resp) = (Vec::with_capacity(256), Vec::with_capacity(256));
    request(&mut req);
    response(&mut resp, &payload);

    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("parse/request", |b| {
        b.iter(|| {
            let m = MessageView::parse(black_box(&req)).unwrap();
            black_box(m.options().map(|o| o.value.len()).sum::<usize>())
        })
    });
    g.bench_function("build/request", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            request(&mut out);
            black_box(out.len())
        })
    });
    g.throughput(Throughput::Bytes(resp.len() as u64));
    g.bench_function("parse/response-64B", |b| {
        b.iter(|| {
            let m = MessageView::parse(black_box(&resp)).unwrap();
            black_box((m.option(number::CONTENT_FORMAT), m.payload.len()))
        })
    });
    g.bench_function("build/response-64B", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            response(&mut out, black_box(&payload));
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
