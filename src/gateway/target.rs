//! Where a request goes (pure): the target URI of a forward-proxy request (Proxy-Uri, or
//! Proxy-Scheme with Uri-Host / Uri-Port / Uri-Path / Uri-Query, RFC 7252 §5.10.2, §6.5) or
//! of a reverse-proxy route, the Hop-Limit to forward with (RFC 8768), and the plain
//! request to send upstream.

use crate::coap::option::{decode_uint, encode_uint};
use crate::coap::uri::default_port;
use crate::coap::{number, CoapUri, Code, MessageBuilder, MessageType, MessageView};
use crate::config::Route;
use std::net::IpAddr;

/// A request the gateway answers itself, with a diagnostic payload (RFC 7252 §5.5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub diagnostic: String,
}

impl Refusal {
    pub fn new(code: Code, diagnostic: impl Into<String>) -> Self {
        Self {
            code,
            diagnostic: diagnostic.into(),
        }
    }
}

/// How the target was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Proxy-Uri or Proxy-Scheme (forward proxy).
    Forward,
    /// A `[[route]]` (reverse proxy); the index into the configured routes.
    Route(usize),
}

/// The origin a request is forwarded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// In aiocoap's matching form: the port only when it is not the scheme's default.
    pub uri: CoapUri,
    pub kind: TargetKind,
    /// The host when it is an IP literal (parsed once here: the upstream request leaves
    /// out Uri-Host for it, RFC 7252 §6.4 step 5, and it needs no name resolution).
    pub ip: Option<IpAddr>,
}

/// Options that name the target and are replaced by the upstream request's own (RFC 7252
/// §5.7.2: a forward proxy builds the request to the origin from the URI); Hop-Limit is
/// re-added with the decremented value.
fn is_target_option(n: u16) -> bool {
    matches!(
        n,
        number::URI_HOST
            | number::URI_PORT
            | number::URI_PATH
            | number::URI_QUERY
            | number::PROXY_URI
            | number::PROXY_SCHEME
            | number::HOP_LIMIT
    )
}

fn utf8<'a>(v: &'a [u8], what: &str) -> Result<&'a str, Refusal> {
    std::str::from_utf8(v)
        .map_err(|_| Refusal::new(Code::BAD_OPTION, format!("{what} is not UTF-8")))
}

/// Finds the target of `request`: Proxy-Uri, Proxy-Scheme + Uri-*, or the first route that
/// matches; the default port is dropped so the URI is in aiocoap's matching form.
pub fn resolve_target(request: &MessageView<'_>, routes: &[Route]) -> Result<Target, Refusal> {
    // One walk over the options (each `option()` lookup would be another).
    let mut proxy_uri = None;
    let mut proxy_scheme = None;
    let mut host = None;
    let mut port = None;
    // Sized for the usual few segments (skips the first-push growth path).
    let mut path = Vec::with_capacity(4);
    let mut query = Vec::new();
    for o in request.options() {
        match o.number {
            number::URI_HOST => host = Some(utf8(o.value, "Uri-Host")?.to_ascii_lowercase()),
            number::URI_PORT => {
                let p = decode_uint(o.value)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| Refusal::new(Code::BAD_OPTION, "Uri-Port is not a port"))?;
                port = Some(p)
            }
            number::URI_PATH => path.push(utf8(o.value, "Uri-Path")?.to_string()),
            number::URI_QUERY => query.push(utf8(o.value, "Uri-Query")?.to_string()),
            // the first of each, as `option()` would give (they are not repeatable)
            number::PROXY_URI if proxy_uri.is_none() => proxy_uri = Some(o.value),
            number::PROXY_SCHEME if proxy_scheme.is_none() => proxy_scheme = Some(o.value),
            _ => {}
        }
    }
    let mut uri = if let Some(pu) = proxy_uri {
        // RFC 7252 §5.10.2: Proxy-Uri takes precedence over Proxy-Scheme; with Uri-* it is
        // ambiguous, and we refuse rather than guess.
        if host.is_some() || port.is_some() || !path.is_empty() || !query.is_empty() {
            return Err(Refusal::new(
                Code::BAD_OPTION,
                "Proxy-Uri together with Uri-Host/Uri-Port/Uri-Path/Uri-Query",
            ));
        }
        let text = utf8(pu, "Proxy-Uri")?;
        let uri = CoapUri::parse(text)
            .map_err(|e| Refusal::new(Code::BAD_OPTION, format!("Proxy-Uri: {e}")))?;
        (uri, TargetKind::Forward)
    } else if let Some(scheme) = proxy_scheme {
        let scheme = utf8(scheme, "Proxy-Scheme")?.to_ascii_lowercase();
        let Some(host) = host else {
            // §6.5 would use the gateway's own address: a request to ourselves.
            return Err(Refusal::new(
                Code::BAD_REQUEST,
                "Proxy-Scheme without Uri-Host: the gateway does not proxy to itself",
            ));
        };
        (
            CoapUri {
                scheme,
                host,
                port,
                path,
                query,
            },
            TargetKind::Forward,
        )
    } else {
        let (i, route) = routes
            .iter()
            .enumerate()
            .find(|(_, r)| route_matches(r, host.as_deref(), &path))
            .ok_or_else(|| {
                Refusal::new(
                    Code::NOT_FOUND,
                    format!(
                        "no Proxy-Uri/Proxy-Scheme and no [[route]] matches /{}",
                        path.join("/")
                    ),
                )
            })?;
        let rest = if route.strip_prefix {
            &path[route.match_path.len()..]
        } else {
            &path[..]
        };
        let mut uri = route.target.clone();
        uri.path.extend(rest.iter().cloned());
        uri.query = query;
        (uri, TargetKind::Route(i))
    };
    if uri.0.scheme != "coap" {
        return Err(Refusal::new(
            Code::PROXYING_NOT_SUPPORTED,
            format!(
                "scheme {}:// is not supported (only coap:// over UDP)",
                uri.0.scheme
            ),
        ));
    }
    if uri.0.port == Some(default_port(&uri.0.scheme)) {
        uri.0.port = None;
    }
    let ip = uri.0.host.parse::<IpAddr>().ok();
    Ok(Target {
        uri: uri.0,
        kind: uri.1,
        ip,
    })
}

fn route_matches(r: &Route, host: Option<&str>, path: &[String]) -> bool {
    if let Some(h) = &r.match_host {
        if host != Some(h.as_str()) {
            return false;
        }
    }
    path.len() >= r.match_path.len() && path[..r.match_path.len()] == r.match_path[..]
}

/// RFC 8768 §3: the Hop-Limit to forward with: the request's value minus one, or `initial`
/// when it has none. 5.08 when the result would be 0; a malformed value is 4.00.
pub fn forwarded_hop_limit(request: &MessageView<'_>, initial: u8) -> Result<u8, Refusal> {
    let Some(v) = request.option(number::HOP_LIMIT) else {
        return Ok(initial);
    };
    let limit = match v {
        [n] if *n > 0 => *n,
        _ => {
            return Err(Refusal::new(
                Code::BAD_REQUEST,
                "Hop-Limit must be one byte of value 1-255 (RFC 8768 §3)",
            ))
        }
    };
    match limit - 1 {
        0 => Err(Refusal::new(
            Code::HOP_LIMIT_REACHED,
            "Hop-Limit reached 0 at oscore-gateway",
        )),
        n => Ok(n),
    }
}

/// Builds the plain upstream request: a CON with our `mid` and `token`, the target's
/// Uri-Host (unless an IP literal) / Uri-Path / Uri-Query, `hop_limit`, the client's other
/// options (end to end: Block1/Block2, ETag, Accept, ...), an `echo` if given (RFC 9175),
/// and the client's payload.
pub fn build_upstream_request(
    request: &MessageView<'_>,
    target: &Target,
    hop_limit: u8,
    echo: Option<&[u8]>,
    mid: u16,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let upstream = UpstreamBody {
        options: &[],
        payload: request.payload,
    };
    build_upstream_request_with(request, target, hop_limit, echo, upstream, mid, token, out)
}

/// What the gateway itself adds to an upstream request: its own block-wise options
/// (Block1, Size1, Request-Tag; they replace the client's of the same numbers) and the
/// payload to carry (one block of the client's body).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamBody<'a> {
    pub options: &'a [(u16, &'a [u8])],
    pub payload: &'a [u8],
}

/// `build_upstream_request` with the gateway's own block-wise options and payload.
#[allow(clippy::too_many_arguments)]
pub fn build_upstream_request_with(
    request: &MessageView<'_>,
    target: &Target,
    hop_limit: u8,
    echo: Option<&[u8]>,
    upstream: UpstreamBody<'_>,
    mid: u16,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let mut hop = [0u8; 8];
    let hop = encode_uint(u64::from(hop_limit), &mut hop);
    let mut opts: Vec<(u16, &[u8])> = Vec::with_capacity(12);
    let (ip, target) = (target.ip, &target.uri);
    if ip.is_none() {
        opts.push((number::URI_HOST, target.host.as_bytes()));
    }
    opts.extend(target.path.iter().map(|s| (number::URI_PATH, s.as_bytes())));
    opts.extend(
        target
            .query
            .iter()
            .map(|s| (number::URI_QUERY, s.as_bytes())),
    );
    opts.push((number::HOP_LIMIT, hop));
    for o in request.options() {
        if is_target_option(o.number)
            || (echo.is_some() && o.number == number::ECHO)
            || upstream.options.iter().any(|(n, _)| *n == o.number)
        {
            continue;
        }
        opts.push((o.number, o.value));
    }
    opts.extend_from_slice(upstream.options);
    if let Some(e) = echo {
        opts.push((number::ECHO, e));
    }
    crate::coap::sort_options(&mut opts);
    let internal = |e: crate::coap::CodecError| {
        Refusal::new(
            Code::INTERNAL_SERVER_ERROR,
            format!("cannot build the upstream request: {e}"),
        )
    };
    let mut b = MessageBuilder::new(out, MessageType::Confirmable, request.code, mid, token)
        .map_err(internal)?;
    for (n, v) in &opts {
        b.option(*n, v).map_err(internal)?;
    }
    b.payload(upstream.payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(opts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Confirmable, Code::GET, 7, &[1]).unwrap();
        for (n, v) in opts {
            b.option(*n, v).unwrap();
        }
        b.finish();
        out
    }

    fn route(path: &str, host: Option<&str>, target: &str, strip: bool) -> Route {
        Route {
            match_path: path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            match_host: host.map(String::from),
            target: CoapUri::parse(target).unwrap(),
            strip_prefix: strip,
            passthrough: false,
            require_oscore: false,
            allow: Vec::new(),
        }
    }

    #[test]
    fn proxy_scheme_with_uri_options() {
        let m = msg(&[
            (number::URI_HOST, b"LocalHost"),
            (number::URI_PORT, &[0x16, 0x33]), // 5683: default, dropped
            (number::URI_PATH, b"big10k.txt"),
            (number::URI_QUERY, b"a=1"),
            (number::PROXY_SCHEME, b"coap"),
        ]);
        let t = resolve_target(&MessageView::parse(&m).unwrap(), &[]).unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://localhost/big10k.txt?a=1");
        assert_eq!(t.kind, TargetKind::Forward);

        let m = msg(&[
            (number::URI_HOST, b"localhost"),
            (number::URI_PORT, &[0x5d, 0xc0]),
            (number::PROXY_SCHEME, b"coap"),
        ]);
        let t = resolve_target(&MessageView::parse(&m).unwrap(), &[]).unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://localhost:24000/");
    }

    #[test]
    fn proxy_uri() {
        let m = msg(&[(number::PROXY_URI, b"coap://[::1]:5683/a/b")]);
        let t = resolve_target(&MessageView::parse(&m).unwrap(), &[]).unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://[::1]/a/b");
        let m = msg(&[(number::PROXY_URI, b"http://example.com/")]);
        let r = resolve_target(&MessageView::parse(&m).unwrap(), &[]).unwrap_err();
        assert_eq!(r.code, Code::PROXYING_NOT_SUPPORTED);
        let m = msg(&[(number::URI_PATH, b"x"), (number::PROXY_URI, b"coap://h/")]);
        let r = resolve_target(&MessageView::parse(&m).unwrap(), &[]).unwrap_err();
        assert_eq!(r.code, Code::BAD_OPTION);
    }

    #[test]
    fn reverse_routes() {
        let routes = vec![
            route("/sensors", None, "coap://127.0.0.1:5684/base", true),
            route("/", Some("light"), "coap://10.0.0.2", false),
        ];
        let m = msg(&[(number::URI_PATH, b"sensors"), (number::URI_PATH, b"x")]);
        let t = resolve_target(&MessageView::parse(&m).unwrap(), &routes).unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://127.0.0.1:5684/base/x");
        assert_eq!(t.kind, TargetKind::Route(0));
        let m = msg(&[(number::URI_HOST, b"light"), (number::URI_PATH, b"on")]);
        let t = resolve_target(&MessageView::parse(&m).unwrap(), &routes).unwrap();
        assert_eq!(t.uri.matching_uri(), "coap://10.0.0.2/on");
        let m = msg(&[(number::URI_PATH, b"other")]);
        let r = resolve_target(&MessageView::parse(&m).unwrap(), &routes).unwrap_err();
        assert_eq!(r.code, Code::NOT_FOUND);
    }

    #[test]
    fn hop_limit() {
        let none = msg(&[]);
        assert_eq!(
            forwarded_hop_limit(&MessageView::parse(&none).unwrap(), 16),
            Ok(16)
        );
        let five = msg(&[(number::HOP_LIMIT, &[5])]);
        assert_eq!(
            forwarded_hop_limit(&MessageView::parse(&five).unwrap(), 16),
            Ok(4)
        );
        let one = msg(&[(number::HOP_LIMIT, &[1])]);
        assert_eq!(
            forwarded_hop_limit(&MessageView::parse(&one).unwrap(), 16)
                .unwrap_err()
                .code,
            Code::HOP_LIMIT_REACHED
        );
        let zero = msg(&[(number::HOP_LIMIT, &[0])]);
        assert_eq!(
            forwarded_hop_limit(&MessageView::parse(&zero).unwrap(), 16)
                .unwrap_err()
                .code,
            Code::BAD_REQUEST
        );
    }

    #[test]
    fn upstream_request_keeps_end_to_end_options() {
        let m = msg(&[
            (number::URI_HOST, b"localhost"),
            (number::URI_PORT, &[0x5d, 0xc0]),
            (number::URI_PATH, b"f"),
            (number::HOP_LIMIT, &[9]),
            (number::BLOCK2, &[0x16]),
            (number::PROXY_SCHEME, b"coap"),
        ]);
        let view = MessageView::parse(&m).unwrap();
        let t = resolve_target(&view, &[]).unwrap();
        let mut out = Vec::new();
        build_upstream_request(&view, &t, 8, Some(b"echo"), 99, &[4, 4], &mut out).unwrap();
        let up = MessageView::parse(&out).unwrap();
        assert_eq!(up.message_id, 99);
        assert_eq!(up.token, &[4, 4]);
        let opts: Vec<(u16, Vec<u8>)> =
            up.options().map(|o| (o.number, o.value.to_vec())).collect();
        assert_eq!(
            opts,
            vec![
                (number::URI_HOST, b"localhost".to_vec()),
                (number::URI_PATH, b"f".to_vec()),
                (number::HOP_LIMIT, vec![8]),
                (number::BLOCK2, vec![0x16]),
                (number::ECHO, b"echo".to_vec()),
            ]
        );
    }
}
