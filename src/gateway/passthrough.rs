//! OSCORE requests the gateway holds no key for: forwarded untouched when they name a
//! forward target, as an OSCORE-unaware proxy would (RFC 8613 §10: only the outer
//! message is seen and changed; no caching, no Observe of our own), else refused like
//! aiocoap's server refuses an unknown kid (4.01 "Security context not found").
//!
//! A forward target is the outer Proxy-Uri / Proxy-Scheme (+ Uri-Host, Uri-Port), or the
//! first `[[route]]` marked `passthrough = true` whose `match_host` fits the outer Uri-Host.
//! Everything end-to-end (the OSCORE option with kid and Partial IV, the ciphertext, the
//! outer code) reaches the origin as the client sent it; the gateway only readdresses the
//! message (its own token and Message ID, Uri-Host for the origin, Hop-Limit).

use crate::coap::{number, Code, MessageView};
use crate::config::Route;

use super::target::{resolve_target, Refusal, Target, TargetKind};

/// The forward target of an OSCORE request the gateway cannot decrypt, if it names one.
/// `Err` when it names one that cannot be used (e.g. an unsupported scheme).
pub fn passthrough_target(
    request: &MessageView<'_>,
    routes: &[Route],
) -> Result<Option<Target>, Refusal> {
    if request.has_option(number::PROXY_URI) || request.has_option(number::PROXY_SCHEME) {
        return resolve_target(request, &[]).map(Some);
    }
    for (i, route) in routes.iter().enumerate() {
        if !route.passthrough {
            continue;
        }
        if let Ok(mut t) = resolve_target(request, std::slice::from_ref(route)) {
            t.kind = TargetKind::Route(i);
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// The answer to an OSCORE request with no context and nowhere to forward it (aiocoap:
/// 4.01 with this payload, research note §5.1).
pub fn context_not_found() -> Refusal {
    Refusal::new(Code::UNAUTHORIZED, "Security context not found")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::{CoapUri, MessageBuilder, MessageType};

    fn oscore_request(opts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Confirmable, Code::POST, 1, &[1]).unwrap();
        for (n, v) in opts {
            b.option(*n, v).unwrap();
        }
        b.payload(b"ciphertext");
        out
    }

    fn route(host: Option<&str>, passthrough: bool, target: &str) -> Route {
        Route {
            match_path: Vec::new(),
            match_host: host.map(String::from),
            target: CoapUri::parse(target).unwrap(),
            strip_prefix: false,
            passthrough,
            require_oscore: false,
            allow: Vec::new(),
        }
    }

    #[test]
    fn forward_options_or_a_passthrough_route() {
        let routes = vec![
            route(None, false, "coap://127.0.0.1:1"),
            route(Some("origin"), true, "coap://127.0.0.1:2"),
        ];
        let m = oscore_request(&[
            (number::URI_HOST, b"localhost"),
            (number::URI_PORT, &[0x5d, 0xc0]),
            (number::OSCORE, &[0x09, 0x05, 0x02]),
            (number::PROXY_SCHEME, b"coap"),
        ]);
        let t = passthrough_target(&MessageView::parse(&m).unwrap(), &routes)
            .unwrap()
            .unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://localhost:24000/");
        assert_eq!(t.kind, TargetKind::Forward);

        let m = oscore_request(&[
            (number::URI_HOST, b"origin"),
            (number::OSCORE, &[0x09, 0x05, 0x02]),
        ]);
        let t = passthrough_target(&MessageView::parse(&m).unwrap(), &routes)
            .unwrap()
            .unwrap();
        assert_eq!(t.kind, TargetKind::Route(1));
        assert_eq!(t.uri.matching_uri(), "coap://127.0.0.1:2/");

        // a route that is not marked passthrough never takes foreign OSCORE
        let m = oscore_request(&[(number::OSCORE, &[0x09, 0x05, 0x02])]);
        assert_eq!(
            passthrough_target(&MessageView::parse(&m).unwrap(), &routes).unwrap(),
            None
        );
    }
}
