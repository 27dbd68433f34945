//! One outbound exchange of the gateway over loopback, in process (issue 5, item 3):
//! `Gateway::handle_request` for a plain GET naming the origin with Proxy-Scheme, Uri-Host
//! and Uri-Port, protected with OSCORE toward a `load --serve` origin on a thread of this
//! process (127.0.0.1, an ephemeral port), the response verified, i.e. the gateway's whole
//! decision and upstream leg without the client-side listener. Also the same with plain
//! forwarding, to show what OSCORE adds. Wall-clock per exchange: it includes waking the
//! origin thread, which on a VM with 2 cores is most of it (docs/PERFORMANCE.md).
//!
//! Quick check: `cargo bench --bench e2e_inprocess -- --test`.
//! Bounded: the origin threads stop by themselves after `ORIGIN_SECONDS`.

use std::hint::black_box;
use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use oscore_gateway::config::Config;
use oscore_gateway::gateway::Gateway;
use oscore_gateway::load::serve::{serve, ServeConfig};

/// How long each origin thread serves (longer than the bench takes).
const ORIGIN_SECONDS: f64 = 120.0;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `load --serve` on 127.0.0.1:`port` on a thread, with `credentials` if given.
fn start_origin(port: u16, credentials: Option<&Path>) {
    let cfg = ServeConfig {
        bind: format!("127.0.0.1:{port}"),
        credentials: credentials.map(Path::to_owned),
        payload_size: 64,
        max_seconds: Some(Duration::from_secs_f64(ORIGIN_SECONDS)),
        notify_interval: Duration::from_secs(1),
        max_relations: 0,
    };
    std::thread::spawn(move || {
        let _ = serve(&cfg);
    });
    std::thread::sleep(Duration::from_millis(200));
}

/// A GET for coap://127.0.0.1:`port`/x through a forward proxy (Proxy-Scheme form).
fn proxied_get(port: u16) -> Vec<u8> {
    let mut m = Vec::new();
    let mut b =
        MessageBuilder::new(&mut m, MessageType::Confirmable, Code::GET, 1, &[1, 2]).unwrap();
    b.option(number::URI_HOST, b"127.0.0.1").unwrap();
    b.option(number::URI_PORT, &port.to_be_bytes()).unwrap();
    b.option(number::URI_PATH, b"x").unwrap();
    b.option(number::PROXY_SCHEME, b"coap").unwrap();
    b.finish();
    m
}

fn exchange(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (oscore_port, plain_port) = (free_port(), free_port());
    // One context pair in aiocoap's settings.json format.
    for (name, settings) in [
        (
            "gw",
            r#"{"sender-id_hex":"04","recipient-id_ascii":"file","secret_ascii":"bench"}"#,
        ),
        (
            "server",
            r#"{"sender-id_ascii":"file","recipient-id_hex":"04","secret_ascii":"bench"}"#,
        ),
    ] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("settings.json"), settings).unwrap();
    }
    std::fs::write(
        dir.join("gw.json"),
        format!(
            r#"{{"coap://127.0.0.1:{oscore_port}/*": {{"oscore": {{"basedir": {:?}}}}}}}"#,
            dir.join("gw")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("server.json"),
        format!(
            r#"{{":gw": {{"oscore": {{"basedir": {:?}}}}}}}"#,
            dir.join("server")
        ),
    )
    .unwrap();
    start_origin(oscore_port, Some(&dir.join("server.json")));
    start_origin(plain_port, None);
    std::fs::write(
        dir.join("proxy.toml"),
        "credentials = \"gw.json\"\n[policy]\nplain_forwarding = true\n",
    )
    .unwrap();
    let config = Config::load(dir.join("proxy.toml")).unwrap();
    let gateway = Gateway::new(config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("gateway/exchange");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, port) in [("oscore", oscore_port), ("plain", plain_port)] {
        let request = proxied_get(port);
        let view = MessageView::parse(&request).unwrap();
        // The first request opens the context and (OSCORE) recovers the origin's replay
        // window with its Echo (RFC 8613 App. B.1.2); not part of the measurement.
        let first = rt.block_on(gateway.handle_request(&view)).unwrap();
        assert_eq!(MessageView::parse(&first).unwrap().code, Code::CONTENT);
        g.bench_function(format!("{name}/GET 64 B over loopback"), |b| {
            b.iter(|| {
                let response = rt.block_on(gateway.handle_request(black_box(&view)));
                black_box(response.unwrap().len())
            })
        });
    }
    g.finish();
    rt.block_on(async {
        for (d, e) in gateway.contexts().close_all().await {
            eprintln!("closing {}: {e}", d.display());
        }
    });
}

criterion_group!(benches, exchange);
criterion_main!(benches);
