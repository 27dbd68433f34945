//! The CoAP message format (RFC 7252 §3): a borrowed, validated view of a datagram and a
//! builder that writes straight into a caller's buffer.

use std::fmt;

use super::option::encode_uint;
use super::CodecError;

/// RFC 7252 §3: the message type (T).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Confirmable = 0,
    NonConfirmable = 1,
    Acknowledgement = 2,
    Reset = 3,
}

impl MessageType {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => Self::Confirmable,
            1 => Self::NonConfirmable,
            2 => Self::Acknowledgement,
            _ => Self::Reset,
        }
    }
}

/// A request method or response code, `c.dd` (RFC 7252 §3, §12.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u8);

impl Code {
    pub const fn new(class: u8, detail: u8) -> Self {
        Self((class << 5) | (detail & 0x1f))
    }
    pub const EMPTY: Code = Code(0);
    pub const GET: Code = Code(1);
    pub const POST: Code = Code(2);
    pub const PUT: Code = Code(3);
    pub const DELETE: Code = Code(4);
    /// RFC 8132
    pub const FETCH: Code = Code(5);
    pub const PATCH: Code = Code(6);
    pub const IPATCH: Code = Code(7);
    pub const CREATED: Code = Code::new(2, 1);
    pub const DELETED: Code = Code::new(2, 2);
    pub const VALID: Code = Code::new(2, 3);
    pub const CHANGED: Code = Code::new(2, 4);
    pub const CONTENT: Code = Code::new(2, 5);
    /// RFC 7959 §2.9.1
    pub const CONTINUE: Code = Code::new(2, 31);
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    pub const BAD_OPTION: Code = Code::new(4, 2);
    pub const FORBIDDEN: Code = Code::new(4, 3);
    pub const NOT_FOUND: Code = Code::new(4, 4);
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    /// RFC 7959 §2.9.2
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new(4, 8);
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    pub const NOT_IMPLEMENTED: Code = Code::new(5, 1);
    pub const BAD_GATEWAY: Code = Code::new(5, 2);
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);
    pub const GATEWAY_TIMEOUT: Code = Code::new(5, 4);
    pub const PROXYING_NOT_SUPPORTED: Code = Code::new(5, 5);
    /// RFC 8768 §3
    pub const HOP_LIMIT_REACHED: Code = Code::new(5, 8);

    pub const fn class(self) -> u8 {
        self.0 >> 5
    }
    pub const fn detail(self) -> u8 {
        self.0 & 0x1f
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub const fn is_request(self) -> bool {
        self.class() == 0 && self.0 != 0
    }
    pub const fn is_response(self) -> bool {
        self.class() >= 2
    }
    pub const fn is_success(self) -> bool {
        self.class() == 2
    }

    fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::GET => "GET",
            Self::POST => "POST",
            Self::PUT => "PUT",
            Self::DELETE => "DELETE",
            Self::FETCH => "FETCH",
            Self::PATCH => "PATCH",
            Self::IPATCH => "iPATCH",
            Self::CREATED => "Created",
            Self::DELETED => "Deleted",
            Self::VALID => "Valid",
            Self::CHANGED => "Changed",
            Self::CONTENT => "Content",
            Self::CONTINUE => "Continue",
            Self::BAD_REQUEST => "Bad Request",
            Self::UNAUTHORIZED => "Unauthorized",
            Self::BAD_OPTION => "Bad Option",
            Self::FORBIDDEN => "Forbidden",
            Self::NOT_FOUND => "Not Found",
            Self::METHOD_NOT_ALLOWED => "Method Not Allowed",
            Self::REQUEST_ENTITY_INCOMPLETE => "Request Entity Incomplete",
            Self::REQUEST_ENTITY_TOO_LARGE => "Request Entity Too Large",
            Self::INTERNAL_SERVER_ERROR => "Internal Server Error",
            Self::NOT_IMPLEMENTED => "Not Implemented",
            Self::BAD_GATEWAY => "Bad Gateway",
            Self::SERVICE_UNAVAILABLE => "Service Unavailable",
            Self::GATEWAY_TIMEOUT => "Gateway Timeout",
            Self::PROXYING_NOT_SUPPORTED => "Proxying Not Supported",
            Self::HOP_LIMIT_REACHED => "Hop Limit Reached",
            _ => return None,
        })
    }

    /// Parses a method name (`GET`, case-insensitive) or a `c.dd` code.
    pub fn parse(s: &str) -> Option<Code> {
        let upper = s.to_ascii_uppercase();
        for c in 1..=7u8 {
            if Code(c).name().map(str::to_ascii_uppercase).as_deref() == Some(upper.as_str()) {
                return Some(Code(c));
            }
        }
        let (class, detail) = s.split_once('.')?;
        let class: u8 = class.parse().ok()?;
        let detail: u8 = detail.parse().ok()?;
        (class < 8 && detail < 32).then(|| Code::new(class, detail))
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_request() {
            if let Some(n) = self.name() {
                return f.write_str(n);
            }
        }
        write!(f, "{}.{:02}", self.class(), self.detail())?;
        if let (false, Some(n)) = (self.is_request(), self.name()) {
            write!(f, " {n}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One option of a parsed message; the value borrows from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoapOption<'a> {
    pub number: u16,
    pub value: &'a [u8],
}

/// A validated view of a CoAP datagram. Parsing checks the whole message once, so walking
/// the options afterwards cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageView<'a> {
    pub mtype: MessageType,
    pub code: Code,
    pub message_id: u16,
    pub token: &'a [u8],
    pub payload: &'a [u8],
    options: &'a [u8],
}

const PAYLOAD_MARKER: u8 = 0xff;

/// Reads one option header at `bytes[0..]`: returns (delta, length, header length), or
/// `Ok(None)` at the payload marker. RFC 7252 §3.1.
fn read_option_header(bytes: &[u8]) -> Result<Option<(u32, usize, usize)>, CodecError> {
    let first = bytes[0];
    if first == PAYLOAD_MARKER {
        return Ok(None);
    }
    let mut pos = 1;
    let mut ext = |nibble: u8| -> Result<u32, CodecError> {
        match nibble {
            0..=12 => Ok(u32::from(nibble)),
            13 => {
                let b = *bytes.get(pos).ok_or(CodecError::TruncatedOption)?;
                pos += 1;
                Ok(u32::from(b) + 13)
            }
            14 => {
                let b = bytes.get(pos..pos + 2).ok_or(CodecError::TruncatedOption)?;
                pos += 2;
                Ok(u32::from(u16::from_be_bytes([b[0], b[1]])) + 269)
            }
            _ => Err(CodecError::ReservedOptionNibble),
        }
    };
    let delta = ext(first >> 4)?;
    let length = ext(first & 0x0f)?;
    Ok(Some((delta, length as usize, pos)))
}

impl<'a> MessageView<'a> {
    /// Parses and validates a datagram (RFC 7252 §3). Rejects: version other than 1, token
    /// length 9-15, the reserved nibble 15 in an option delta or length, truncated options,
    /// option numbers over 65535, a payload marker with no payload, and an Empty message
    /// (code 0.00) that carries a token or anything after the Message ID (§4.1).
    pub fn parse(datagram: &'a [u8]) -> Result<Self, CodecError> {
        if datagram.len() < 4 {
            return Err(CodecError::TooShort);
        }
        let version = datagram[0] >> 6;
        if version != 1 {
            return Err(CodecError::BadVersion(version));
        }
        let tkl = usize::from(datagram[0] & 0x0f);
        if tkl > 8 {
            return Err(CodecError::BadTokenLength(tkl as u8));
        }
        let code = Code(datagram[1]);
        let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
        let token = datagram.get(4..4 + tkl).ok_or(CodecError::TooShort)?;
        let rest = &datagram[4 + tkl..];
        if code.is_empty() && (tkl != 0 || !rest.is_empty()) {
            return Err(CodecError::NonEmptyEmptyMessage);
        }
        let mut pos = 0;
        let mut number: u32 = 0;
        let mut payload: &[u8] = &[];
        while pos < rest.len() {
            match read_option_header(&rest[pos..])? {
                None => {
                    payload = &rest[pos + 1..];
                    if payload.is_empty() {
                        return Err(CodecError::EmptyPayloadAfterMarker);
                    }
                    break;
                }
                Some((delta, len, hlen)) => {
                    number += delta;
                    if number > u32::from(u16::MAX) {
                        return Err(CodecError::OptionNumberTooLarge);
                    }
                    pos += hlen;
                    if rest.len() - pos < len {
                        return Err(CodecError::TruncatedOption);
                    }
                    pos += len;
                }
            }
        }
        let options_end = if payload.is_empty() {
            rest.len()
        } else {
            rest.len() - payload.len() - 1
        };
        Ok(Self {
            mtype: MessageType::from_bits(datagram[0] >> 4),
            code,
            message_id,
            token,
            payload,
            options: &rest[..options_end],
        })
    }

    /// The options in wire order (ascending number).
    pub fn options(&self) -> OptionIter<'a> {
        OptionIter {
            rest: self.options,
            number: 0,
        }
    }

    /// The first value of option `number`.
    pub fn option(&self, number: u16) -> Option<&'a [u8]> {
        self.options_of(number).next()
    }

    /// Every value of option `number`, in order.
    pub fn options_of(&self, number: u16) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.options()
            .skip_while(move |o| o.number < number)
            .take_while(move |o| o.number == number)
            .map(|o| o.value)
    }

    pub fn has_option(&self, number: u16) -> bool {
        self.option(number).is_some()
    }

    /// The encoded option bytes (between the token and the payload marker).
    pub fn raw_options(&self) -> &'a [u8] {
        self.options
    }
}

/// Iterator over an already validated option sequence.
#[derive(Debug, Clone)]
pub struct OptionIter<'a> {
    rest: &'a [u8],
    number: u16,
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = CoapOption<'a>;

    fn next(&mut self) -> Option<CoapOption<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        // Validated by `MessageView::parse`; stop rather than panic if not.
        let (delta, len, hlen) = read_option_header(self.rest).ok().flatten()?;
        let value = self.rest.get(hlen..hlen + len)?;
        self.number = self.number.checked_add(u16::try_from(delta).ok()?)?;
        self.rest = &self.rest[hlen + len..];
        Some(CoapOption {
            number: self.number,
            value,
        })
    }
}

/// Builds a message into a caller's buffer with no allocation per option. Options must be
/// added in non-decreasing number order (RFC 7252 §3.1 encodes deltas).
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    out: &'b mut Vec<u8>,
    last_number: u16,
}

fn nibble(value: usize) -> (u8, [u8; 2], usize) {
    match value {
        0..=12 => (value as u8, [0, 0], 0),
        13..=268 => (13, [(value - 13) as u8, 0], 1),
        _ => {
            let v = (value - 269) as u16;
            (14, v.to_be_bytes(), 2)
        }
    }
}

/// Largest option value length that the 14-nibble form can carry (RFC 7252 §3.1).
const MAX_OPTION_LENGTH: usize = 269 + 0xffff;

impl<'b> MessageBuilder<'b> {
    pub fn new(
        out: &'b mut Vec<u8>,
        mtype: MessageType,
        code: Code,
        message_id: u16,
        token: &[u8],
    ) -> Result<Self, CodecError> {
        if token.len() > 8 {
            return Err(CodecError::BadTokenLength(token.len().min(255) as u8));
        }
        out.clear();
        out.push(0x40 | ((mtype as u8) << 4) | token.len() as u8);
        out.push(code.0);
        out.extend_from_slice(&message_id.to_be_bytes());
        out.extend_from_slice(token);
        Ok(Self {
            out,
            last_number: 0,
        })
    }

    /// Continues `out` (left as it is) with options whose first delta is relative to 0 and
    /// an optional payload: e.g. an OSCORE plaintext (code, options, payload; RFC 8613 §5.3)
    /// written right behind the outer message's payload marker.
    pub fn append_options(out: &'b mut Vec<u8>) -> Self {
        Self {
            out,
            last_number: 0,
        }
    }

    pub fn option(&mut self, number: u16, value: &[u8]) -> Result<&mut Self, CodecError> {
        if number < self.last_number {
            return Err(CodecError::OptionOrder {
                previous: self.last_number,
                number,
            });
        }
        if value.len() > MAX_OPTION_LENGTH {
            return Err(CodecError::OptionTooLong(number));
        }
        let (dn, dext, dlen) = nibble(usize::from(number - self.last_number));
        let (ln, lext, llen) = nibble(value.len());
        self.out.push((dn << 4) | ln);
        self.out.extend_from_slice(&dext[..dlen]);
        self.out.extend_from_slice(&lext[..llen]);
        self.out.extend_from_slice(value);
        self.last_number = number;
        Ok(self)
    }

    pub fn uint_option(&mut self, number: u16, value: u64) -> Result<&mut Self, CodecError> {
        let mut buf = [0; 8];
        let v = encode_uint(value, &mut buf);
        self.option(number, v)
    }

    /// Appends already encoded options (e.g. copied from a `MessageView`) whose first delta
    /// is relative to 0; only valid before any other option.
    pub fn raw_options(&mut self, raw: &[u8], last_number: u16) -> Result<&mut Self, CodecError> {
        if self.last_number != 0 {
            return Err(CodecError::OptionOrder {
                previous: self.last_number,
                number: 0,
            });
        }
        self.out.extend_from_slice(raw);
        self.last_number = last_number;
        Ok(self)
    }

    /// Writes the payload marker and payload, if the payload is not empty.
    pub fn payload(self, payload: &[u8]) {
        if !payload.is_empty() {
            self.out.push(PAYLOAD_MARKER);
            self.out.extend_from_slice(payload);
        }
    }

    /// Ends a message without payload.
    pub fn finish(self) {}
}

/// Sorts collected options by number, keeping the order of repeated options.
pub fn sort_options(opts: &mut [(u16, &[u8])]) {
    opts.sort_by_key(|(n, _)| *n);
}

#[cfg(test)]
mod tests {
    use super::super::option::number;
    use super::*;

    fn build(opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::Confirmable,
            Code::GET,
            0x1234,
            &[1, 2],
        )
        .unwrap();
        for (n, v) in opts {
            b.option(*n, v).unwrap();
        }
        b.payload(payload);
        out
    }

    #[test]
    fn round_trip_with_extended_deltas_and_lengths() {
        let long = vec![7u8; 300];
        let opts: Vec<(u16, &[u8])> = vec![
            (number::URI_HOST, b"localhost"),
            (number::URI_PATH, b"a"),
            (number::URI_PATH, b""),
            (number::BLOCK2, &[0x16]),
            (number::PROXY_URI, &long),
            (number::REQUEST_TAG, &[9]),
            (65000, &[1]),
        ];
        let bytes = build(&opts, b"hi");
        let m = MessageView::parse(&bytes).unwrap();
        assert_eq!(m.code, Code::GET);
        assert_eq!(m.message_id, 0x1234);
        assert_eq!(m.token, &[1, 2]);
        assert_eq!(m.payload, b"hi");
        let got: Vec<(u16, &[u8])> = m.options().map(|o| (o.number, o.value)).collect();
        assert_eq!(got, opts);
        assert_eq!(m.options_of(number::URI_PATH).count(), 2);
        assert_eq!(m.option(number::REQUEST_TAG), Some(&[9u8][..]));
        assert_eq!(m.option(number::OSCORE), None);
    }

    #[test]
    fn rfc8613_c4_request_parses() {
        let bytes = hex_decode("44015d1f00003974396c6f63616c686f737483747631");
        let m = MessageView::parse(&bytes).unwrap();
        assert_eq!(m.code, Code::GET);
        assert_eq!(m.option(number::URI_HOST), Some(&b"localhost"[..]));
        assert_eq!(m.option(number::URI_PATH), Some(&b"tv1"[..]));
    }

    fn hex_decode(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(MessageView::parse(&[0x40, 1, 0]), Err(CodecError::TooShort));
        assert_eq!(
            MessageView::parse(&[0x80, 1, 0, 0]),
            Err(CodecError::BadVersion(2))
        );
        assert_eq!(
            MessageView::parse(&[0x49, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(CodecError::BadTokenLength(9))
        );
        assert_eq!(
            MessageView::parse(&[0x4f, 1, 0, 0]),
            Err(CodecError::BadTokenLength(15))
        );
        // token announced but missing
        assert_eq!(
            MessageView::parse(&[0x42, 1, 0, 0, 1]),
            Err(CodecError::TooShort)
        );
        // reserved delta nibble 15 with a length other than 15
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0xf1, 0]),
            Err(CodecError::ReservedOptionNibble)
        );
        // reserved length nibble
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0x1f]),
            Err(CodecError::ReservedOptionNibble)
        );
        // payload marker with empty payload
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0xff]),
            Err(CodecError::EmptyPayloadAfterMarker)
        );
        // option value longer than the datagram
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0x13, b'a']),
            Err(CodecError::TruncatedOption)
        );
        // extended delta byte missing
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0xd0]),
            Err(CodecError::TruncatedOption)
        );
        // option number overflow: 14-delta of 65535+269
        assert_eq!(
            MessageView::parse(&[0x40, 1, 0, 0, 0xe0, 0xff, 0xff, 0xe0, 0xff, 0xff]),
            Err(CodecError::OptionNumberTooLarge)
        );
        // Empty message with a token
        assert_eq!(
            MessageView::parse(&[0x41, 0, 0, 0, 1]),
            Err(CodecError::NonEmptyEmptyMessage)
        );
        assert!(MessageView::parse(&[0x60, 0, 0, 0]).is_ok());
    }

    #[test]
    fn builder_enforces_order_and_token() {
        let mut out = Vec::new();
        let mut b =
            MessageBuilder::new(&mut out, MessageType::Confirmable, Code::GET, 1, &[]).unwrap();
        b.option(11, b"x").unwrap();
        assert!(b.option(3, b"y").is_err());
        assert!(
            MessageBuilder::new(&mut out, MessageType::Reset, Code::EMPTY, 1, &[0; 9]).is_err()
        );
    }

    #[test]
    fn codes_display_and_parse() {
        assert_eq!(Code::CONTENT.to_string(), "2.05 Content");
        assert_eq!(Code::GET.to_string(), "GET");
        assert_eq!(Code::new(2, 7).to_string(), "2.07");
        assert_eq!(Code::parse("put"), Some(Code::PUT));
        assert_eq!(Code::parse("iPATCH"), Some(Code::IPATCH));
        assert_eq!(Code::parse("4.01"), Some(Code::UNAUTHORIZED));
        assert_eq!(Code::parse("9.01"), None);
    }
}
