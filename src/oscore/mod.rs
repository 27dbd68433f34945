//! OSCORE (RFC 8613), pure and synchronous: bytes and values in, bytes and values out.

pub mod algorithm;
pub mod params;
pub mod replay;
pub mod sequence;

pub use algorithm::{AeadAlgorithm, HkdfAlgorithm};
pub use params::ContextParams;
pub use replay::{ReplayWindow, ReplayWindowState};
pub use sequence::{SenderSequence, SenderSequenceNumber, SequenceError};
