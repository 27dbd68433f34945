//! CoAP URIs and their option form (RFC 7252 §6.4 decomposition, §6.5 composition).

use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UriError {
    #[error("URI {0:?} has no scheme (expected e.g. coap://host/path)")]
    NoScheme(String),
    #[error("URI {0:?} has a fragment, which CoAP URIs must not have (RFC 7252 §6.4 step 7)")]
    Fragment(String),
    #[error("URI {0:?} has no host")]
    NoHost(String),
    #[error("URI {0:?} has an invalid port")]
    BadPort(String),
    #[error("URI {0:?} has a bad percent-encoding")]
    BadPercentEncoding(String),
}

/// A parsed absolute CoAP URI. `port` is the port as written (None when absent), so that
/// credential matching sees the URI the way aiocoap does (an explicit `:5683` stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapUri {
    pub scheme: String,
    /// Lower-cased; IPv6 literals without brackets.
    pub host: String,
    pub port: Option<u16>,
    /// Percent-decoded Uri-Path segments.
    pub path: Vec<String>,
    /// Percent-decoded Uri-Query arguments.
    pub query: Vec<String>,
}

/// The port a scheme implies when the URI has none.
pub fn default_port(scheme: &str) -> u16 {
    match scheme {
        "coaps" | "coaps+tcp" | "coaps+ws" => 5684,
        "http" | "coap+ws" => 80,
        "https" => 443,
        _ => 5683,
    }
}

impl CoapUri {
    /// Parses `scheme://host[:port][/path][?query]` (RFC 7252 §6.4).
    pub fn parse(uri: &str) -> Result<CoapUri, UriError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::NoScheme(uri.to_string()))?;
        if scheme.is_empty() {
            return Err(UriError::NoScheme(uri.to_string()));
        }
        if rest.contains('#') {
            return Err(UriError::Fragment(uri.to_string()));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(authority_end);
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UriError::NoHost(uri.to_string()))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').unwrap_or("x")),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UriError::NoHost(uri.to_string()));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| UriError::BadPort(uri.to_string()))?,
            ),
        };
        let (path_part, query_part) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let bad = |_| UriError::BadPercentEncoding(uri.to_string());
        let mut path = Vec::new();
        // RFC 7252 §6.4 step 8: a path of "" or "/" gives no Uri-Path options.
        if !path_part.is_empty() && path_part != "/" {
            for seg in path_part[1..].split('/') {
                path.push(percent_decode(seg).map_err(bad)?);
            }
        }
        let mut query = Vec::new();
        if let Some(q) = query_part {
            for arg in q.split('&') {
                query.push(percent_decode(arg).map_err(bad)?);
            }
        }
        Ok(CoapUri {
            scheme: scheme.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            port,
            path,
            query,
        })
    }

    /// The port to send to.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or_else(|| default_port(&self.scheme))
    }

    /// Whether the host is an IP literal (then no Uri-Host is sent, RFC 7252 §6.4 step 5).
    pub fn host_is_ip_literal(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }

    /// `scheme://host[:port]` with the port only if written.
    fn write_authority(&self, f: &mut impl fmt::Write) -> fmt::Result {
        f.write_str(&self.scheme)?;
        f.write_str("://")?;
        if self.host.contains(':') {
            f.write_char('[')?;
            f.write_str(&self.host)?;
            f.write_char(']')?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            f.write_char(':')?;
            write_decimal(p, f)?;
        }
        Ok(())
    }

    /// The whole URI (the `Display` form), written with `write_str`/`write_char` only: into
    /// a `String` that is a few `push_str`s, where `write!` went through `core::fmt`'s
    /// machinery per piece (~900 instructions per request in `matching_uri`).
    fn write_uri(&self, f: &mut impl fmt::Write) -> fmt::Result {
        self.write_authority(f)?;
        if self.path.is_empty() {
            f.write_char('/')?;
        }
        for seg in &self.path {
            f.write_char('/')?;
            percent_encode(seg, f, false)?;
        }
        for (i, arg) in self.query.iter().enumerate() {
            f.write_char(if i == 0 { '?' } else { '&' })?;
            percent_encode(arg, f, true)?;
        }
        Ok(())
    }

    /// The form aiocoap matches credential patterns against:
    /// `scheme://host[:port]/path[?query]`, always with a `/` after the authority.
    pub fn matching_uri(&self) -> String {
        // Sized up front: formatting into an empty String grew it ~6 times per request.
        let mut s = String::with_capacity(
            16 + self.host.len()
                + self.path.iter().map(|p| p.len() + 1).sum::<usize>()
                + self.query.iter().map(|q| q.len() + 1).sum::<usize>(),
        );
        let _ = self.write_uri(&mut s);
        s
    }
}

impl fmt::Display for CoapUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_uri(f)
    }
}

/// `n` in decimal, without `core::fmt`'s integer formatting.
fn write_decimal(n: u16, f: &mut impl fmt::Write) -> fmt::Result {
    let mut buf = [0u8; 5];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8.
    f.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
}

/// Whether `b` stays literal in a path segment (`query`: in a query argument) — RFC 3986
/// unreserved and sub-delims plus ':' and '@' (and '/' and '?' in a query).
fn is_literal(b: u8, query: bool) -> bool {
    b.is_ascii_alphanumeric()
        || b"-._~!$'()*+,;=:@".contains(&b)
        || (query && (b == b'/' || b == b'?'))
}

fn percent_encode(s: &str, f: &mut impl fmt::Write, query: bool) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if is_literal(b, query) {
            continue;
        }
        // A non-empty run before `i` is ASCII, so its ends are char boundaries (`get`
        // cannot fail); an empty one may sit inside a multi-byte character.
        if i > start {
            f.write_str(s.get(start..i).ok_or(fmt::Error)?)?;
        }
        f.write_char('%')?;
        f.write_char(char::from(HEX[usize::from(b >> 4)]))?;
        f.write_char(char::from(HEX[usize::from(b & 0x0f)]))?;
        start = i + 1;
    }
    if start < bytes.len() {
        f.write_str(s.get(start..).ok_or(fmt::Error)?)?;
    }
    Ok(())
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let u = CoapUri::parse("coap://LocalHost:5690/a/b%20c?x=1&y").unwrap();
        assert_eq!(u.host, "localhost");
        assert_eq!(u.port, Some(5690));
        assert_eq!(u.path, vec!["a", "b c"]);
        assert_eq!(u.query, vec!["x=1", "y"]);
        assert_eq!(u.to_string(), "coap://localhost:5690/a/b%20c?x=1&y");
        let v6 = CoapUri::parse("coap://[::1]/x").unwrap();
        assert_eq!(v6.host, "::1");
        assert!(v6.host_is_ip_literal());
        assert_eq!(v6.effective_port(), 5683);
        assert_eq!(v6.to_string(), "coap://[::1]/x");
        assert_eq!(
            CoapUri::parse("coap://localhost").unwrap().matching_uri(),
            "coap://localhost/"
        );
        assert_eq!(
            CoapUri::parse("coap://localhost:5683/x")
                .unwrap()
                .matching_uri(),
            "coap://localhost:5683/x"
        );
        assert_eq!(CoapUri::parse("coaps://h/").unwrap().effective_port(), 5684);
        // trailing slash is an empty segment (RFC 7252 §6.4 step 8)
        assert_eq!(CoapUri::parse("coap://h/a/").unwrap().path, vec!["a", ""]);
    }

    /// The hand-written formatting against `core::fmt` (what it was before): every byte
    /// value in path and query, ports 0-65535 edges, IPv6 hosts, empty path.
    #[test]
    fn formatting_matches_the_fmt_formatting() {
        fn reference(u: &CoapUri) -> String {
            use std::fmt::Write;
            let mut s = String::new();
            write!(s, "{}://", u.scheme).unwrap();
            if u.host.contains(':') {
                write!(s, "[{}]", u.host).unwrap();
            } else {
                s.push_str(&u.host);
            }
            if let Some(p) = u.port {
                write!(s, ":{p}").unwrap();
            }
            if u.path.is_empty() {
                s.push('/');
            }
            let enc = |t: &str, s: &mut String, query: bool| {
                for b in t.bytes() {
                    let literal = b.is_ascii_alphanumeric()
                        || b"-._~!$'()*+,;=:@".contains(&b)
                        || (query && (b == b'/' || b == b'?'));
                    if literal {
                        s.push(b as char);
                    } else {
                        write!(s, "%{b:02X}").unwrap();
                    }
                }
            };
            for seg in &u.path {
                s.push('/');
                enc(seg, &mut s, false);
            }
            for (i, arg) in u.query.iter().enumerate() {
                s.push(if i == 0 { '?' } else { '&' });
                enc(arg, &mut s, true);
            }
            s
        }
        let all: String = (0u32..0x250).filter_map(char::from_u32).collect();
        let uris = [
            CoapUri {
                scheme: "coap".into(),
                host: "h".into(),
                port: None,
                path: vec![],
                query: vec![],
            },
            CoapUri {
                scheme: "coap".into(),
                host: "::1".into(),
                port: Some(0),
                path: vec!["".into(), all.clone()],
                query: vec![all.clone(), "a/b?c".into()],
            },
            CoapUri {
                scheme: "coap".into(),
                host: "127.0.0.1".into(),
                port: Some(65535),
                path: vec!["x".into(), "%é ü/".into()],
                query: vec![],
            },
            CoapUri {
                scheme: "coap".into(),
                host: "example.com".into(),
                port: Some(5683),
                path: vec!["a".into()],
                query: vec!["".into()],
            },
        ];
        for u in &uris {
            assert_eq!(u.matching_uri(), reference(u));
            assert_eq!(u.to_string(), reference(u));
        }
        for p in [1u16, 9, 10, 99, 100, 5683, 9999, 10000, 48104] {
            let u = CoapUri {
                port: Some(p),
                ..uris[0].clone()
            };
            assert_eq!(u.matching_uri(), format!("coap://h:{p}/"));
        }
    }

    #[test]
    fn rejects_bad() {
        assert!(CoapUri::parse("localhost/x").is_err());
        assert!(CoapUri::parse("coap://h/x#frag").is_err());
        assert!(CoapUri::parse("coap://h:99999/").is_err());
        assert!(CoapUri::parse("coap://:5683/").is_err());
        assert!(CoapUri::parse("coap://h/%zz").is_err());
    }
}
