//! `oscore-gateway request`: the operator's OSCORE-capable CoAP client.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use oscore_gateway::client::{
    resolve, run_request, ClientError, ClientResponse, Plain, Protection, RequestSpec,
    TransmissionParams, UdpClient,
};
use oscore_gateway::coap::{CoapUri, Code};

use crate::RequestArgs;

/// Exit status for "no valid response / could not send".
const FAILED: u8 = 2;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(FAILED)
}

pub async fn run(args: RequestArgs) -> ExitCode {
    let Some(method) = Code::parse(&args.method).filter(|c| c.is_request()) else {
        return fail(format!("unknown method {:?}", args.method));
    };
    let uri = match CoapUri::parse(&args.uri) {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    if uri.scheme != "coap" {
        return fail(format!(
            "only coap:// URIs are supported over UDP, not {}://",
            uri.scheme
        ));
    }
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(f)) => match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot read --payload-file {}: {e}", f.display())),
        },
        (None, None) => Vec::new(),
    };
    let (peer_host, peer_port, via_proxy) = match &args.proxy {
        Some(p) => match CoapUri::parse(p) {
            Ok(pu) => (pu.host.clone(), pu.effective_port(), true),
            Err(e) => return fail(format!("--proxy: {e}")),
        },
        None => (uri.host.clone(), uri.effective_port(), false),
    };
    let spec = RequestSpec {
        method,
        uri,
        via_proxy,
        content_format: args.content_format,
        payload,
    };
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));

    let result = if let Some(creds) = &args.credentials {
        match crate::cli_oscore::protection_for(creds, &spec.uri) {
            Ok(p) => {
                let r = send(&peer_host, peer_port, &p, &spec, timeout).await;
                if let Err(e) = p.close() {
                    eprintln!("warning: {e}");
                }
                r
            }
            Err(e) => return fail(e),
        }
    } else {
        send(&peer_host, peer_port, &Plain, &spec, timeout).await
    };
    match result {
        Ok((response, oscore)) => report(&args, response, oscore),
        Err(e) => fail(e),
    }
}

async fn send<P: Protection>(
    host: &str,
    port: u16,
    protection: &P,
    spec: &RequestSpec,
    timeout: Duration,
) -> Result<(ClientResponse, bool), ClientError> {
    let work = async {
        let peer = resolve(host, port).await?;
        let mut client = UdpClient::connect(peer, TransmissionParams::default()).await?;
        run_request(&mut client, protection, spec).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map(|resp| (resp, protection.is_oscore())),
        Err(_) => Err(ClientError::Build(format!(
            "no complete response within {timeout:?}"
        ))),
    }
}

fn report(args: &RequestArgs, response: ClientResponse, oscore: bool) -> ExitCode {
    let written = match &args.output {
        Some(path) => std::fs::write(path, &response.payload)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&response.payload)
                .and_then(|_| out.flush())
                .map_err(|e| format!("cannot write stdout: {e}"))
        }
    };
    eprintln!(
        "{} ({} bytes, {} exchange(s){}, oscore={})",
        response.code,
        response.payload.len(),
        response.exchanges,
        if response.echo_retries > 0 {
            format!(", {} Echo retry", response.echo_retries)
        } else {
            String::new()
        },
        if oscore { "yes" } else { "no" }
    );
    if let Err(e) = written {
        return fail(e);
    }
    if response.code.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
