//! Responses toward the client (pure): the origin's plain response re-addressed to the
//! client's exchange (its token; piggybacked on the ACK of a CON, RFC 7252 §5.2.1, or a NON
//! for a NON), and the gateway's own error responses with a diagnostic payload (§5.5.2).

use super::target::Refusal;
use crate::coap::{Code, CodecError, MessageBuilder, MessageType, MessageView};

/// How the response travels back to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo<'a> {
    pub mtype: MessageType,
    pub message_id: u16,
    pub token: &'a [u8],
}

impl<'a> ReplyTo<'a> {
    /// For a request: piggybacked ACK with its Message ID for a CON; a NON with
    /// `fresh_mid` for a NON (RFC 7252 §5.2.3).
    pub fn for_request(request: &MessageView<'a>, fresh_mid: u16) -> Self {
        match request.mtype {
            MessageType::NonConfirmable => Self {
                mtype: MessageType::NonConfirmable,
                message_id: fresh_mid,
                token: request.token,
            },
            _ => Self {
                mtype: MessageType::Acknowledgement,
                message_id: request.message_id,
                token: request.token,
            },
        }
    }
}

/// Writes `response` (a plain response datagram from the origin) with the client's header.
pub fn relay_response(
    response: &MessageView<'_>,
    to: ReplyTo<'_>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let last = response.options().last().map_or(0, |o| o.number);
    let mut b = MessageBuilder::new(out, to.mtype, response.code, to.message_id, to.token)?;
    b.raw_options(response.raw_options(), last)?;
    b.payload(response.payload);
    Ok(())
}

/// Writes the gateway's own response with the refusal's code and diagnostic payload.
pub fn refusal_response(refusal: &Refusal, to: ReplyTo<'_>, out: &mut Vec<u8>) {
    // A token longer than 8 bytes cannot come from a parsed message; nothing else fails.
    if let Ok(b) = MessageBuilder::new(out, to.mtype, refusal.code, to.message_id, to.token) {
        b.payload(refusal.diagnostic.as_bytes());
    }
}

/// The Reset for a message we cannot process (RFC 7252 §4.2, §4.3: e.g. a CON ping).
pub fn reset(message_id: u16, out: &mut Vec<u8>) {
    if let Ok(b) = MessageBuilder::new(out, MessageType::Reset, Code::EMPTY, message_id, &[]) {
        b.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::number;

    #[test]
    fn relay_keeps_code_options_payload_and_takes_clients_header() {
        let mut origin = Vec::new();
        let mut b = MessageBuilder::new(
            &mut origin,
            MessageType::Acknowledgement,
            Code::CONTENT,
            1,
            &[9; 8],
        )
        .unwrap();
        b.option(number::CONTENT_FORMAT, &[]).unwrap();
        b.option(number::BLOCK2, &[0x1e]).unwrap();
        b.payload(b"data");
        let origin_view = MessageView::parse(&origin).unwrap();

        let mut req = Vec::new();
        MessageBuilder::new(
            &mut req,
            MessageType::Confirmable,
            Code::GET,
            0x4242,
            &[1, 2],
        )
        .unwrap()
        .finish();
        let req = MessageView::parse(&req).unwrap();
        let mut out = Vec::new();
        relay_response(&origin_view, ReplyTo::for_request(&req, 7), &mut out).unwrap();
        let r = MessageView::parse(&out).unwrap();
        assert_eq!(r.mtype, MessageType::Acknowledgement);
        assert_eq!(r.message_id, 0x4242);
        assert_eq!(r.token, &[1, 2]);
        assert_eq!(r.code, Code::CONTENT);
        assert_eq!(r.option(number::BLOCK2), Some(&[0x1e][..]));
        assert_eq!(r.payload, b"data");

        let mut out = Vec::new();
        refusal_response(
            &Refusal::new(Code::GATEWAY_TIMEOUT, "origin silent"),
            ReplyTo::for_request(&req, 7),
            &mut out,
        );
        let r = MessageView::parse(&out).unwrap();
        assert_eq!(r.code, Code::GATEWAY_TIMEOUT);
        assert_eq!(r.payload, b"origin silent");
    }
}
