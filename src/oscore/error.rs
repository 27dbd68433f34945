//! Errors of message protection and verification, split the way aiocoap splits them
//! (`NotAProtectedMessage`, `DecodeError`, `ProtectionInvalid`, `ReplayError`,
//! `ReplayErrorWithEcho`), so that a server answers like aiocoap does.

use thiserror::Error;

use super::aead::AeadError;
use super::cose::CoseError;
use super::protect::RequestBinding;
use crate::coap::{Code, CodecError};

/// A request that decrypted correctly while the replay window was uninitialised
/// (RFC 8613 App. B.1.2). The decrypted request is in the caller's `out` buffer, but it must
/// not be acted on unless its freshness is proven: call [`UninitializedWindow::accept_with_echo`]
/// with the Echo value this server handed out; if that fails, answer with a protected 4.01
/// carrying Echo, using the binding and a fresh own Partial IV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UninitializedWindow {
    /// Binding for the response; `can_reuse_nonce` is false (App. B.1.2: the response
    /// carries the server's own Partial IV).
    pub binding: RequestBinding,
    /// The request's sequence number (its Partial IV).
    pub sequence_number: u64,
    /// The inner Echo option of the request, if it had one.
    pub echo: Option<Vec<u8>>,
}

/// Why a message could not be protected or unprotected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OscoreError {
    // ---- input that is not (or already is) an OSCORE message
    #[error("message has no OSCORE option: not an OSCORE-protected message")]
    NotProtected,
    #[error("message already carries an OSCORE option; it will not be protected twice")]
    AlreadyProtected,
    #[error("code {0} is not a request method")]
    NotARequest(Code),
    #[error("code {0} is not a response code")]
    NotAResponse(Code),
    /// RFC 8613 §8.2 / aiocoap: protected requests come as POST or FETCH.
    #[error("outer code {0} is not valid for an OSCORE request (expected POST or FETCH)")]
    UnexpectedOuterCode(Code),
    #[error("malformed CoAP message: {0}")]
    Codec(CodecError),
    #[error("outer option {number} has an invalid value")]
    BadOption { number: u16 },

    // ---- aiocoap DecodeError
    #[error("failed to decode COSE: {0}")]
    Decode(CoseError),
    #[error("failed to decode COSE: the OSCORE option appears more than once")]
    RepeatedOscoreOption,
    #[error("decrypted plaintext is not a valid inner CoAP message: {0}")]
    InnerDecode(CodecError),

    // ---- aiocoap ProtectionInvalid ("Decryption failed")
    #[error("request has no kid: no security context can be chosen")]
    NoKid,
    /// RFC 8613 §8.2: a request must carry a Partial IV.
    #[error("no sequence number (Partial IV) provided in request")]
    NoPartialIv,
    #[error("kid {got} does not match the recipient ID {expected}")]
    KidMismatch { expected: String, got: String },
    #[error("kid context {got} does not match the ID context {expected}")]
    KidContextMismatch { expected: String, got: String },
    #[error(
        "ciphertext of {len} bytes is too short: needs the {tag_len}-byte tag and a code byte"
    )]
    CiphertextTooShort { len: usize, tag_len: usize },
    #[error("Decryption failed: the authentication tag does not verify")]
    DecryptionFailed,
    #[error("inner code {code} is not a {expected}")]
    InnerCode { code: Code, expected: &'static str },
    /// RFC 8613 §4.1.3.4.2: outer Block options fragment the OSCORE message on one hop;
    /// the fragments must be reassembled before verification.
    #[error("outer Block option present: the OSCORE message must be reassembled before it is unprotected")]
    OuterBlockwise,

    // ---- replay (§7.4, App. B.1.2)
    #[error(
        "Replay detected: sequence number {0} was already received or is below the replay window"
    )]
    Replay(u64),
    #[error("replay window is uninitialised (RFC 8613 App. B.1.2): freshness of sequence number {} must be proven with Echo", .0.sequence_number)]
    ReplayWindowUninitialized(Box<UninitializedWindow>),
    #[error(
        "the request's Echo value is missing or not the one this server sent (RFC 8613 App. B.1.2)"
    )]
    EchoMismatch,

    // ---- protecting
    #[error(
        "sender sequence number {0} is above 2^40-1; the context is exhausted (RFC 8613 §7.2.1)"
    )]
    SequenceNumberTooLarge(u64),
    /// App. B.1.2: a response to a request of unproven freshness carries its own Partial IV.
    #[error("this response must carry its own Partial IV: the request's nonce may not be reused")]
    NonceReuseForbidden,
    #[error("Proxy-Uri {uri:?} cannot be decomposed (RFC 8613 §4.1.3.3): {reason}")]
    ProxyUri { uri: String, reason: String },
    #[error("Proxy-Uri must not be combined with Uri-Host, Uri-Port, Uri-Path or Uri-Query (RFC 7252 §5.10.2)")]
    ProxyUriWithUriOptions,
    #[error("COSE encoding failed: {0}")]
    Encode(CoseError),
    #[error(transparent)]
    Aead(AeadError),
}

impl From<CodecError> for OscoreError {
    fn from(e: CodecError) -> Self {
        OscoreError::Codec(e)
    }
}

/// The unprotected error response a server sends for a failed request (aiocoap's
/// `OscoreSiteWrapper`, research note §5.1). All payloads are UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorResponse {
    pub code: Code,
    pub diagnostic: &'static str,
    /// Add an outer `Max-Age: 0` (aiocoap does for replays).
    pub max_age_zero: bool,
}

impl OscoreError {
    /// How a server answers a request that failed with this error, as aiocoap does, or
    /// `None` where it answers otherwise: not an OSCORE request (process it as plain), the
    /// uninitialised window and Echo mismatch (a *protected* 4.01 with Echo), and errors
    /// that only occur while protecting.
    pub fn server_response(&self) -> Option<ErrorResponse> {
        let r = |code, diagnostic, max_age_zero| {
            Some(ErrorResponse {
                code,
                diagnostic,
                max_age_zero,
            })
        };
        match self {
            OscoreError::UnexpectedOuterCode(_) => r(Code::METHOD_NOT_ALLOWED, "", false),
            OscoreError::Codec(_) => r(Code::BAD_REQUEST, "Malformed message", false),
            OscoreError::Decode(_)
            | OscoreError::BadOption { .. }
            | OscoreError::RepeatedOscoreOption
            | OscoreError::InnerDecode(_) => r(Code::BAD_OPTION, "Failed to decode COSE", false),
            OscoreError::NoKid => r(Code::UNAUTHORIZED, "Security context not found", false),
            OscoreError::NoPartialIv
            | OscoreError::KidMismatch { .. }
            | OscoreError::KidContextMismatch { .. }
            | OscoreError::CiphertextTooShort { .. }
            | OscoreError::DecryptionFailed
            | OscoreError::InnerCode { .. } => r(Code::BAD_REQUEST, "Decryption failed", false),
            OscoreError::OuterBlockwise => r(
                Code::BAD_REQUEST,
                "Outer block-wise transfer was not reassembled",
                false,
            ),
            OscoreError::Replay(_) => r(Code::UNAUTHORIZED, "Replay detected", true),
            OscoreError::NotProtected
            | OscoreError::ReplayWindowUninitialized(_)
            | OscoreError::EchoMismatch
            | OscoreError::AlreadyProtected
            | OscoreError::NotARequest(_)
            | OscoreError::NotAResponse(_)
            | OscoreError::SequenceNumberTooLarge(_)
            | OscoreError::NonceReuseForbidden
            | OscoreError::ProxyUri { .. }
            | OscoreError::ProxyUriWithUriOptions
            | OscoreError::Encode(_)
            | OscoreError::Aead(_) => None,
        }
    }
}
