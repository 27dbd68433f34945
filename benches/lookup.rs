//! Lookups on the per-request path:
//! - outbound: the credential for a request URI (`CredentialsMap` built with `from_json`,
//!   aiocoap's longest-match rule) with 1, 100 and 10 000 patterns;
//! - inbound: the security context for a request's (kid, kid context) among 10 000 contexts.
//!   The gateway has no inbound kid table yet on this branch (issue 4 is in progress), so this
//!   benches the structure the issue describes: a `HashMap<(kid, kid_context), index>`
//!   looked up with a borrowed key, as a server would per request.
//!
//! Quick check: `cargo bench --bench lookup -- --test`. Full run: `cargo bench --bench lookup`.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use oscore_gateway::credentials::CredentialsMap;

/// `n` patterns, each naming its own host, plus wildcard patterns of different lengths; the
/// URI looked up matches the last host (the worst place for a linear scan).
fn credentials_json(n: usize) -> String {
    let mut s = String::from("{");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#""coap://dev{i}.example/*": {{"oscore": {{"basedir": "/nonexistent/ctx{i}"}}}}"#
        ));
    }
    s.push('}');
    s
}

fn credential_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("credentials/lookup");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [1usize, 100, 10_000] {
        let map = CredentialsMap::from_json(&credentials_json(n), Path::new("bench.json")).unwrap();
        let hit = format!("coap://dev{}.example/sensors/temp", n - 1);
        let miss = "coap://other.example/sensors/temp".to_string();
        assert!(map.oscore_for(&hit).unwrap().is_some());
        assert!(map.oscore_for(&miss).unwrap().is_none());
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, uri| {
            b.iter(|| black_box(map.oscore_for(black_box(uri)).unwrap().is_some()))
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, uri| {
            b.iter(|| black_box(map.oscore_for(black_box(uri)).unwrap().is_none()))
        });
    }
    g.finish();
}

type KidKey = (Vec<u8>, Option<Vec<u8>>);
/// kid -> (kid context, context index) candidates.
type ByKid = HashMap<Vec<u8>, Vec<(Option<Vec<u8>>, usize)>>;

fn kid_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("contexts/kid");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [1usize, 10_000] {
        let mut table: HashMap<KidKey, usize> = HashMap::with_capacity(n);
        for i in 0..n {
            // 2-byte kids, every tenth context with a kid context as well
            let kid = (i as u16).to_be_bytes().to_vec();
            let ctx = (i % 10 == 0).then(|| b"group-a".to_vec());
            table.insert((kid, ctx), i);
        }
        let probe_kid = ((n - 1) as u16).to_be_bytes();
        let probe_ctx: Option<&[u8]> = ((n - 1) % 10 == 0).then_some(&b"group-a"[..]);
        // The borrowed form a request gives (kid and kid context are slices of the datagram);
        // the owned key is built per lookup, which costs an allocation — as it would in a
        // naive server.
        g.bench_function(BenchmarkId::new("hashmap-owned-key", n), |b| {
            b.iter(|| {
                let key = (probe_kid.to_vec(), probe_ctx.map(<[u8]>::to_vec));
                black_box(table.get(black_box(&key)).copied())
            })
        });
        // Without the allocation: kid -> candidates, kid context compared after the lookup
        // (what `load --serve` does).
        let mut by_kid: ByKid = HashMap::new();
        for ((kid, ctx), i) in &table {
            by_kid
                .entry(kid.clone())
                .or_default()
                .push((ctx.clone(), *i));
        }
        g.bench_function(BenchmarkId::new("hashmap-by-kid-borrowed", n), |b| {
            b.iter(|| {
                let found = by_kid.get(black_box(&probe_kid[..])).and_then(|v| {
                    v.iter()
                        .find(|(c, _)| c.as_deref() == probe_ctx)
                        .map(|(_, i)| *i)
                });
                black_box(found)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, credential_lookup, kid_lookup);
criterion_main!(benches);
