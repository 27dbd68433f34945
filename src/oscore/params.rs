//! The input parameters of a security context (RFC 8613 §3.1, §3.2), as read from aiocoap's
//! `settings.json` / `secret.json` or given by a test vector.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::algorithm::{AeadAlgorithm, HkdfAlgorithm};

/// Default replay window size (RFC 8613 §7.4 leaves it open; aiocoap uses 32).
pub const DEFAULT_REPLAY_WINDOW: u32 = 32;
/// Largest replay window we keep (the bitfield is a `u128`).
pub const MAX_REPLAY_WINDOW: u32 = 128;

/// Master Secret, Master Salt, IDs and algorithms: everything derivation needs.
/// Secret material is zeroized on drop; `Debug` never prints it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ContextParams {
    pub master_secret: Vec<u8>,
    /// Master Salt; empty when absent (RFC 8613 §3.1 default).
    pub master_salt: Vec<u8>,
    pub sender_id: Vec<u8>,
    pub recipient_id: Vec<u8>,
    /// ID Context; `None` encodes as CBOR nil in the HKDF info (§3.2.1).
    pub id_context: Option<Vec<u8>>,
    #[zeroize(skip)]
    pub aead: AeadAlgorithm,
    #[zeroize(skip)]
    pub hkdf: HkdfAlgorithm,
    /// Replay window size in sequence numbers (aiocoap's `window`, default 32).
    pub replay_window: u32,
}

impl std::fmt::Debug for ContextParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextParams")
            .field("sender_id", &HexBytes(&self.sender_id))
            .field("recipient_id", &HexBytes(&self.recipient_id))
            .field("id_context", &self.id_context.as_deref().map(HexBytes))
            .field("aead", &self.aead)
            .field("hkdf", &self.hkdf)
            .field("replay_window", &self.replay_window)
            .finish_non_exhaustive()
    }
}

/// Formats bytes as lowercase hex (IDs in logs and errors; never used for keys).
pub struct HexBytes<'a>(pub &'a [u8]);

impl std::fmt::Debug for HexBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for HexBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(empty)");
        }
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
