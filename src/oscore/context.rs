//! Security context derivation (RFC 8613 §3.2) and the derived context itself.
//!
//! The context holds what protection needs and nothing that changes per message except the
//! recipient's replay window (§7.4). Sender Sequence Numbers are *not* owned here: callers
//! reserve a [`SenderSequenceNumber`](super::SenderSequenceNumber) from a
//! [`SenderSequence`](super::SenderSequence) whose high-water mark the I/O layer persists
//! (App. B.1.1), and pass it to `protect_*`.

use std::sync::{Arc, Mutex, MutexGuard};

use hkdf::Hkdf;
use sha2::{Sha256, Sha384, Sha512};
use thiserror::Error;
use zeroize::Zeroizing;

use super::aead::{AeadError, AeadKey};
use super::algorithm::{AeadAlgorithm, HkdfAlgorithm};
use super::cbor;
use super::cose::MAX_KID_CONTEXT_LEN;
use super::params::{ContextParams, HexBytes};
use super::replay::{ReplayWindow, ReplayWindowState};

/// Which ID an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRole {
    SenderId,
    RecipientId,
}

impl std::fmt::Display for IdRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdRole::SenderId => "Sender ID",
            IdRole::RecipientId => "Recipient ID",
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeriveError {
    /// RFC 8613 §3.3: IDs longer than nonce length - 6 bytes cannot be put into the nonce.
    #[error("{role} {id} is {len} bytes long, but {algorithm} allows at most {max} bytes (nonce length - 6, RFC 8613 §3.3)")]
    IdTooLong {
        role: IdRole,
        /// The ID in hex.
        id: String,
        len: usize,
        max: usize,
        algorithm: AeadAlgorithm,
    },
    /// Equal IDs would give both directions the same key and nonces (§3.3: Sender IDs are
    /// unique within a context).
    #[error("Sender ID and Recipient ID are both {id}; they must differ (RFC 8613 §3.3)")]
    IdenticalIds { id: String },
    #[error("ID Context of {len} bytes is too long to be sent as kid context (at most 255 bytes, RFC 8613 §6.1)")]
    IdContextTooLong { len: usize },
    /// Cannot happen: IDs are checked first and no Common IV is longer than 13 bytes.
    #[error("a {len}-byte ID or Common IV does not fit the context's 15 bytes")]
    TooLong { len: usize },
    /// Cannot happen with the supported algorithms (at most 32 bytes are expanded).
    #[error("HKDF-{hkdf} cannot produce {len} bytes")]
    HkdfLength { hkdf: HkdfAlgorithm, len: usize },
    #[error(transparent)]
    Key(#[from] AeadError),
}

/// The `type` field of the HKDF info (§3.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoType {
    Key,
    Iv,
}

impl InfoType {
    fn as_str(self) -> &'static str {
        match self {
            InfoType::Key => "Key",
            InfoType::Iv => "IV",
        }
    }
}

/// The HKDF `info` of §3.2.1: CBOR `[id: bstr, id_context: bstr / nil, alg_aead: int,
/// type: tstr, L: uint]`.
pub fn hkdf_info(
    id: &[u8],
    id_context: Option<&[u8]>,
    algorithm: AeadAlgorithm,
    info_type: InfoType,
    len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + id.len() + id_context.map_or(0, <[u8]>::len));
    cbor::array(&mut out, 5);
    cbor::bytes(&mut out, id);
    match id_context {
        Some(ctx) => cbor::bytes(&mut out, ctx),
        None => cbor::null(&mut out),
    }
    cbor::int(&mut out, i64::from(algorithm.cose_id()));
    cbor::text(&mut out, info_type.as_str());
    cbor::int(&mut out, len as i64);
    out
}

/// HKDF-Extract with the Master Salt, then HKDF-Expand with `info` (§3.2.1).
fn hkdf(
    params: &ContextParams,
    info: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, DeriveError> {
    let mut okm = Zeroizing::new(vec![0u8; len]);
    // §3.1: an absent Master Salt is the empty byte string, which HKDF pads to a zero block
    // exactly as it does for `None`.
    let salt = Some(params.master_salt.as_slice());
    let ikm = params.master_secret.as_slice();
    let result = match params.hkdf {
        HkdfAlgorithm::Sha256 => Hkdf::<Sha256>::new(salt, ikm).expand(info, &mut okm),
        HkdfAlgorithm::Sha384 => Hkdf::<Sha384>::new(salt, ikm).expand(info, &mut okm),
        HkdfAlgorithm::Sha512 => Hkdf::<Sha512>::new(salt, ikm).expand(info, &mut okm),
    };
    result.map_err(|_| DeriveError::HkdfLength {
        hkdf: params.hkdf,
        len,
    })?;
    Ok(okm)
}

/// The derived key material (§3.2.1). Keys are wiped on drop and never printed.
pub struct DerivedKeys {
    pub sender_key: Zeroizing<Vec<u8>>,
    pub recipient_key: Zeroizing<Vec<u8>>,
    pub common_iv: Vec<u8>,
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKeys").finish_non_exhaustive()
    }
}

fn check_params(params: &ContextParams) -> Result<(), DeriveError> {
    let max = params.aead.max_id_len();
    for (role, id) in [
        (IdRole::SenderId, &params.sender_id),
        (IdRole::RecipientId, &params.recipient_id),
    ] {
        if id.len() > max {
            return Err(DeriveError::IdTooLong {
                role,
                id: HexBytes(id).to_string(),
                len: id.len(),
                max,
                algorithm: params.aead,
            });
        }
    }
    if params.sender_id == params.recipient_id {
        return Err(DeriveError::IdenticalIds {
            id: HexBytes(&params.sender_id).to_string(),
        });
    }
    if let Some(ctx) = &params.id_context {
        if ctx.len() > MAX_KID_CONTEXT_LEN {
            return Err(DeriveError::IdContextTooLong { len: ctx.len() });
        }
    }
    Ok(())
}

/// Derives Sender Key, Recipient Key and Common IV (§3.2.1) after checking the IDs (§3.3).
pub fn derive_keys(params: &ContextParams) -> Result<DerivedKeys, DeriveError> {
    check_params(params)?;
    let alg = params.aead;
    let ctx = params.id_context.as_deref();
    let key_len = alg.key_len();
    let sender_key = hkdf(
        params,
        &hkdf_info(&params.sender_id, ctx, alg, InfoType::Key, key_len),
        key_len,
    )?;
    let recipient_key = hkdf(
        params,
        &hkdf_info(&params.recipient_id, ctx, alg, InfoType::Key, key_len),
        key_len,
    )?;
    let iv_len = alg.nonce_len();
    let common_iv = hkdf(
        params,
        &hkdf_info(&[], ctx, alg, InfoType::Iv, iv_len),
        iv_len,
    )?;
    Ok(DerivedKeys {
        sender_key,
        recipient_key,
        common_iv: common_iv.to_vec(),
    })
}

/// A derived OSCORE security context (§3.1): Common Context, Sender Context (without the
/// sequence number, see the module doc) and Recipient Context with its replay window.
#[repr(C)]
pub struct SecurityContext {
    // What every request reads comes first, in at most 82 bytes, so that behind a 16-byte
    // Arc header and the gateway's 16-byte persister handle it stays within 128 bytes:
    // with 10 000 contexts in use each one is cold when its turn comes, and each line it
    // spans is a miss. `repr(C)` keeps this order; `SECURITY_CONTEXT_HOT_END` checks it.
    sender_key: AeadKey,
    recipient_key: AeadKey,
    sender_id: ShortBytes,
    recipient_id: ShortBytes,
    common_iv: ShortBytes,
    algorithm: AeadAlgorithm,
    hkdf: HkdfAlgorithm,
    id_context: Option<InlineBytes>,
    replay_window: Arc<Mutex<ReplayWindow>>,
}

/// Where the fields every request reads end (`SecurityContext` starts with them).
pub const SECURITY_CONTEXT_HOT_END: usize = {
    let end = std::mem::offset_of!(SecurityContext, hkdf) + 1;
    assert!(end <= 82);
    assert!(std::mem::offset_of!(SecurityContext, algorithm) < end);
    end
};

/// An ID context that may be long (it spills to the heap beyond 16 bytes).
type InlineBytes = smallvec::SmallVec<[u8; 16]>;

/// A Sender/Recipient ID or the Common IV, inline in 16 bytes: IDs are at most nonce
/// length - 6 bytes (§3.3, checked by `check_params`), the Common IV is the nonce length,
/// and no nonce is longer than 13 bytes.
#[derive(Clone, Copy)]
struct ShortBytes {
    len: u8,
    bytes: [u8; SHORT_BYTES_MAX],
}
const SHORT_BYTES_MAX: usize = 15;
const _: () = {
    let mut i = 0;
    while i < AeadAlgorithm::ALL.len() {
        assert!(AeadAlgorithm::ALL[i].nonce_len() <= SHORT_BYTES_MAX);
        i += 1;
    }
};

impl ShortBytes {
    fn new(b: &[u8]) -> Option<Self> {
        let mut bytes = [0; SHORT_BYTES_MAX];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self {
            len: u8::try_from(b.len()).ok()?,
            bytes,
        })
    }
}

impl std::ops::Deref for ShortBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl std::fmt::Debug for SecurityContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityContext")
            .field("sender_id", &HexBytes(&self.sender_id))
            .field("recipient_id", &HexBytes(&self.recipient_id))
            .field("id_context", &self.id_context.as_deref().map(HexBytes))
            .field("algorithm", &self.algorithm)
            .field("hkdf", &self.hkdf)
            .finish_non_exhaustive()
    }
}

impl SecurityContext {
    /// Derives the context from `params` (§3.2). `replay_window` is the recipient's window as
    /// restored by the caller (fresh, from `sequence.json`, or uninitialised after a crash);
    /// `params.replay_window` is only the size the caller should have built it with.
    pub fn derive(
        params: &ContextParams,
        replay_window: ReplayWindow,
    ) -> Result<SecurityContext, DeriveError> {
        Self::derive_with_shared_window(params, Arc::new(Mutex::new(replay_window)))
    }

    /// Like [`derive`](Self::derive), with a window the storage layer shares, so that what
    /// it writes back to `sequence.json` at shutdown is the window this context used.
    pub fn derive_with_shared_window(
        params: &ContextParams,
        replay_window: Arc<Mutex<ReplayWindow>>,
    ) -> Result<SecurityContext, DeriveError> {
        let keys = derive_keys(params)?;
        let short = |b: &[u8]| ShortBytes::new(b).ok_or(DeriveError::TooLong { len: b.len() });
        Ok(SecurityContext {
            sender_key: AeadKey::new(params.aead, &keys.sender_key)?,
            recipient_key: AeadKey::new(params.aead, &keys.recipient_key)?,
            sender_id: short(&params.sender_id)?,
            recipient_id: short(&params.recipient_id)?,
            common_iv: short(&keys.common_iv)?,
            algorithm: params.aead,
            hkdf: params.hkdf,
            id_context: params.id_context.as_deref().map(InlineBytes::from_slice),
            replay_window,
        })
    }

    pub fn algorithm(&self) -> AeadAlgorithm {
        self.algorithm
    }

    pub fn hkdf(&self) -> HkdfAlgorithm {
        self.hkdf
    }

    /// Our Sender ID: the `kid` of our requests.
    pub fn sender_id(&self) -> &[u8] {
        &self.sender_id
    }

    /// The peer's Sender ID: the `kid` of requests we accept with this context.
    pub fn recipient_id(&self) -> &[u8] {
        &self.recipient_id
    }

    pub fn id_context(&self) -> Option<&[u8]> {
        self.id_context.as_deref()
    }

    /// The Common IV (§3.2.1; as long as the algorithm's nonce). Not secret: nonces are
    /// derivable from it and public values, but do not log it needlessly.
    pub fn common_iv(&self) -> &[u8] {
        &self.common_iv
    }

    /// Where the Sender Key's and the Recipient Key's schedules lie (address and length of
    /// each), for a caller that keeps them to prefetch later without reading this context
    /// first (`crate::prefetch`).
    pub fn key_schedule_spans(&self) -> [(usize, usize); 2] {
        [
            self.sender_key.schedule_span(),
            self.recipient_key.schedule_span(),
        ]
    }

    pub(crate) fn sender_key(&self) -> &AeadKey {
        &self.sender_key
    }

    pub(crate) fn recipient_key(&self) -> &AeadKey {
        &self.recipient_key
    }

    /// The recipient's replay window (§7.4), for the storage layer and App. B.1.2 recovery.
    pub fn replay_window(&self) -> &Mutex<ReplayWindow> {
        &self.replay_window
    }

    /// Locks the window. A panic while holding the lock cannot leave the window half
    /// updated (every update is a single assignment), so a poisoned lock is taken over.
    pub(crate) fn lock_replay_window(&self) -> MutexGuard<'_, ReplayWindow> {
        self.replay_window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The window's persistable state; `None` while uninitialised (App. B.1.2).
    pub fn replay_window_state(&self) -> Option<ReplayWindowState> {
        self.lock_replay_window().state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oscore::params::DEFAULT_REPLAY_WINDOW;

    fn params(aead: AeadAlgorithm, sender: &[u8], recipient: &[u8]) -> ContextParams {
        ContextParams {
            master_secret: hex::decode("0102030405060708090a0b0c0d0e0f10").unwrap(),
            master_salt: hex::decode("9e7ca92223786340").unwrap(),
            sender_id: sender.to_vec(),
            recipient_id: recipient.to_vec(),
            id_context: None,
            aead,
            hkdf: HkdfAlgorithm::Sha256,
            replay_window: DEFAULT_REPLAY_WINDOW,
        }
    }

    #[test]
    fn c1_1_client_keys() {
        let k = derive_keys(&params(AeadAlgorithm::AesCcm16_64_128, &[], &[1])).unwrap();
        assert_eq!(
            hex::encode(&*k.sender_key),
            "f0910ed7295e6ad4b54fc793154302ff"
        );
        assert_eq!(
            hex::encode(&*k.recipient_key),
            "ffb14e093c94c9cac9471648b4f98710"
        );
        assert_eq!(hex::encode(&k.common_iv), "4622d4dd6d944168eefb54987c");
    }

    #[test]
    fn id_length_limits_follow_the_nonce() {
        let ok = params(AeadAlgorithm::AesCcm64_64_128, &[1], &[2]);
        assert!(derive_keys(&ok).is_ok());
        let too_long = params(AeadAlgorithm::AesCcm64_64_128, &[1], &[2, 3]);
        let err = derive_keys(&too_long).unwrap_err();
        assert_eq!(
            err,
            DeriveError::IdTooLong {
                role: IdRole::RecipientId,
                id: "0203".into(),
                len: 2,
                max: 1,
                algorithm: AeadAlgorithm::AesCcm64_64_128
            }
        );
        assert!(err
            .to_string()
            .contains("Recipient ID 0203 is 2 bytes long"));
        let gcm = params(AeadAlgorithm::A128Gcm, &[0; 7], &[]);
        assert!(matches!(
            derive_keys(&gcm),
            Err(DeriveError::IdTooLong {
                role: IdRole::SenderId,
                max: 6,
                ..
            })
        ));
        assert!(derive_keys(&params(AeadAlgorithm::AesCcm16_64_128, &[0; 7], &[])).is_ok());
        assert!(derive_keys(&params(AeadAlgorithm::AesCcm16_64_128, &[0; 8], &[])).is_err());
    }

    #[test]
    fn identical_ids_and_long_id_context_are_refused() {
        let same = params(AeadAlgorithm::AesCcm16_64_128, &[5], &[5]);
        assert!(matches!(
            derive_keys(&same),
            Err(DeriveError::IdenticalIds { .. })
        ));
        let mut p = params(AeadAlgorithm::AesCcm16_64_128, &[1], &[]);
        p.id_context = Some(vec![0; 256]);
        assert_eq!(
            derive_keys(&p).unwrap_err(),
            DeriveError::IdContextTooLong { len: 256 }
        );
    }

    #[test]
    fn every_algorithm_and_hash_gives_the_right_lengths_and_distinct_keys() {
        for aead in AeadAlgorithm::ALL {
            let mut seen = Vec::new();
            for hkdf in HkdfAlgorithm::ALL {
                let mut p = params(aead, &[1], &[]);
                p.hkdf = hkdf;
                let k = derive_keys(&p).unwrap();
                assert_eq!(k.sender_key.len(), aead.key_len());
                assert_eq!(k.recipient_key.len(), aead.key_len());
                assert_eq!(k.common_iv.len(), aead.nonce_len());
                assert_ne!(*k.sender_key, *k.recipient_key);
                seen.push(k.sender_key.to_vec());
            }
            seen.dedup();
            assert_eq!(seen.len(), 3, "each hash must give its own key");
        }
    }

    #[test]
    fn debug_never_shows_keys() {
        let ctx = SecurityContext::derive(
            &params(AeadAlgorithm::AesCcm16_64_128, &[], &[1]),
            ReplayWindow::new_empty(32),
        )
        .unwrap();
        let s = format!("{ctx:?}");
        assert!(!s.contains("f0910ed7"), "{s}");
        assert!(!s.contains("4622d4dd"), "{s}");
        assert!(s.contains("recipient_id: 01"), "{s}");
        let keys = derive_keys(&params(AeadAlgorithm::AesCcm16_64_128, &[], &[1])).unwrap();
        assert!(!format!("{keys:?}").contains("f0"));
    }

    #[test]
    fn replay_window_accessors() {
        let ctx = SecurityContext::derive(
            &params(AeadAlgorithm::AesCcm16_64_128, &[], &[1]),
            ReplayWindow::uninitialized(32),
        )
        .unwrap();
        assert_eq!(ctx.replay_window_state(), None);
        ctx.replay_window().lock().unwrap().initialize_from_fresh(7);
        assert_eq!(
            ctx.replay_window_state(),
            Some(ReplayWindowState {
                index: 7,
                bitfield: 1
            })
        );
    }
}
