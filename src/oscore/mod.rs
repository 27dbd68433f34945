//! OSCORE (RFC 8613), pure and synchronous: bytes and values in, bytes and values out.

pub mod aead;
pub mod algorithm;
mod cbor;
pub mod context;
pub mod cose;
pub mod params;
pub mod replay;
pub mod sequence;

pub use aead::{AeadError, AeadKey};
pub use algorithm::{AeadAlgorithm, HkdfAlgorithm};
pub use context::{derive_keys, DeriveError, DerivedKeys, SecurityContext};
pub use cose::{CoseError, OscoreOption, PartialIv};
pub use params::ContextParams;
pub use replay::{ReplayWindow, ReplayWindowState};
pub use sequence::{SenderSequence, SenderSequenceNumber, SequenceError};
