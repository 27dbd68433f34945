//! CoAP over UDP (RFC 7252 §3): a strict codec with a borrowed view and an allocation-free
//! builder, option numbers and Block values, and URIs.
//!
//! The wire codec is ours rather than coap-lite's (DESIGN.md §3: coap-lite wraps block
//! numbers of 4096 and more, rejects 3-byte Block values, accepts an empty payload after the
//! marker, and allocates per option); coap-lite is kept as a test oracle.

pub mod message;
pub mod option;
pub mod token;
pub mod uri;

pub use message::{sort_options, CoapOption, Code, MessageBuilder, MessageType, MessageView};
pub use option::{number, BlockValue};
pub use token::Token;
pub use uri::CoapUri;

use thiserror::Error;

/// Why a datagram is not a valid CoAP message, or a message cannot be built.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    #[error("message shorter than its 4-byte header and token")]
    TooShort,
    #[error("unsupported CoAP version {0} (RFC 7252 §3: must be 1)")]
    BadVersion(u8),
    #[error("token length {0} is reserved (RFC 7252 §3: 9-15 are a message format error)")]
    BadTokenLength(u8),
    #[error("option delta or length uses the reserved value 15 (RFC 7252 §3.1)")]
    ReservedOptionNibble,
    #[error("option runs past the end of the datagram")]
    TruncatedOption,
    #[error("option number exceeds 65535")]
    OptionNumberTooLarge,
    #[error("payload marker followed by an empty payload (RFC 7252 §3)")]
    EmptyPayloadAfterMarker,
    #[error("Empty message (0.00) with a token, options or payload (RFC 7252 §4.1)")]
    NonEmptyEmptyMessage,
    #[error("option {number} added after option {previous}: options must be added in order")]
    OptionOrder { previous: u16, number: u16 },
    #[error("option {0} value too long to encode")]
    OptionTooLong(u16),
    #[error("invalid Block option value (RFC 7959 §2.2: at most 3 bytes, NUM < 2^20, SZX < 7)")]
    BadBlock,
}
