//! OSCORE (RFC 8613), pure and synchronous: bytes and values in, bytes and values out.
//!
//! - [`context`]: derivation of a [`SecurityContext`] from [`ContextParams`] (§3.2).
//! - [`protect`] / [`unprotect`]: message protection (§8) for requests and responses.
//! - [`aead`], [`cose`], [`options`]: the AEAD algorithms, the COSE object in the OSCORE
//!   option with nonce and AAD (§5, §6), and the option classes (§4.1).
//! - [`replay`], [`sequence`]: the replay window (§7.4) and sender sequence numbers (§7.2.1).

pub mod aead;
pub mod algorithm;
mod cbor;
pub mod context;
pub mod cose;
pub mod error;
pub mod options;
pub mod params;
pub mod protect;
pub mod replay;
pub mod sequence;
mod stackbuf;
pub mod unprotect;

pub use aead::{AeadError, AeadKey};
pub use algorithm::{AeadAlgorithm, HkdfAlgorithm};
pub use context::{
    derive_keys, DeriveError, DerivedKeys, SecurityContext, SECURITY_CONTEXT_HOT_END,
};
pub use cose::{CoseError, OscoreOption, PartialIv};
pub use error::{ErrorResponse, OscoreError, UninitializedWindow};
pub use params::ContextParams;
pub use protect::{protect_request, protect_response, RequestBinding, ShortBytes};
pub use replay::{ReplayWindow, ReplayWindowState};
pub use sequence::{SenderSequence, SenderSequenceNumber, SequenceError};
pub use unprotect::{
    parse_request_kid, unprotect_request, unprotect_response, RequestKid, ResponseInfo,
};
