//! AEAD encryption and decryption for every algorithm a security context may use
//! (RFC 8613 §3.1 "AEAD Algorithm"; COSE algorithms of RFC 9053 §4.1-§4.3).
//!
//! The work is done by the RustCrypto crates (`ccm`, `aes-gcm`, `chacha20poly1305`, all of the
//! aead 0.6 generation); this module only picks the right instance for an [`AeadAlgorithm`]
//! and checks lengths, so callers never have to touch generic array types.
//!
//! CCM parameters (RFC 9053 §4.2): AES-CCM-16-* use a 13-byte nonce (L = 2, messages up to
//! 2^16 - 1 bytes), AES-CCM-64-* a 7-byte nonce (L = 8); the middle number is the tag length
//! in bits (64 or 128), the last one the key length in bits.
//!
//! Key objects are wiped on drop: the `aes`, `aes-gcm` (GHASH key) and `chacha20poly1305`
//! crates are built with their `zeroize` feature, and `Ccm` only holds an AES key schedule.
//! Tag comparison is constant-time inside the crates.

use std::fmt;

use aes::{Aes128Enc, Aes192Enc, Aes256Enc};
use aes_gcm::AesGcm;
use ccm::aead::{self, AeadCore, AeadInOut, KeyInit};
use ccm::consts::{U12, U13, U16, U7, U8};
use ccm::Ccm;
use chacha20poly1305::ChaCha20Poly1305;
use thiserror::Error;

use super::algorithm::AeadAlgorithm;

/// The longest authentication tag of any supported algorithm.
pub const MAX_TAG_LEN: usize = 16;

/// Longest plaintext AES-CCM-16-* can protect: L = 2 length bytes (RFC 3610 §2).
const CCM_L2_MAX_LEN: usize = 0xFFFF;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum AeadError {
    #[error("{algorithm} needs a {expected}-byte key, got {actual} bytes")]
    KeyLength {
        algorithm: AeadAlgorithm,
        expected: usize,
        actual: usize,
    },
    #[error("{algorithm} needs a {expected}-byte nonce, got {actual} bytes")]
    NonceLength {
        algorithm: AeadAlgorithm,
        expected: usize,
        actual: usize,
    },
    #[error("{algorithm} uses a {expected}-byte tag, got {actual} bytes")]
    TagLength {
        algorithm: AeadAlgorithm,
        expected: usize,
        actual: usize,
    },
    #[error("ciphertext of {actual} bytes is shorter than the {tag_len}-byte tag of {algorithm}")]
    CiphertextTooShort {
        algorithm: AeadAlgorithm,
        tag_len: usize,
        actual: usize,
    },
    #[error("{algorithm} cannot protect {actual} bytes (at most {max})")]
    MessageTooLong {
        algorithm: AeadAlgorithm,
        max: usize,
        actual: usize,
    },
    /// The tag did not verify: wrong key, nonce or AAD, or the data was altered.
    #[error("{algorithm} decryption failed: authentication tag mismatch")]
    Authentication { algorithm: AeadAlgorithm },
}

/// An authentication tag as produced by [`AeadKey::encrypt_detached`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    bytes: [u8; MAX_TAG_LEN],
    len: usize,
}

impl Tag {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsRef<[u8]> for Tag {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", super::params::HexBytes(self.as_slice()))
    }
}

/// One cipher instance per algorithm. Boxed: the AES key schedules differ in size a lot and a
/// context holds two of these.
enum Cipher {
    Ccm16_64_128(Box<Ccm<Aes128Enc, U8, U13>>),
    Ccm16_64_256(Box<Ccm<Aes256Enc, U8, U13>>),
    Ccm64_64_128(Box<Ccm<Aes128Enc, U8, U7>>),
    Ccm64_64_256(Box<Ccm<Aes256Enc, U8, U7>>),
    Ccm16_128_128(Box<Ccm<Aes128Enc, U16, U13>>),
    Ccm16_128_256(Box<Ccm<Aes256Enc, U16, U13>>),
    Ccm64_128_128(Box<Ccm<Aes128Enc, U16, U7>>),
    Ccm64_128_256(Box<Ccm<Aes256Enc, U16, U7>>),
    Gcm128(Box<AesGcm<Aes128Enc, U12>>),
    Gcm192(Box<AesGcm<Aes192Enc, U12>>),
    Gcm256(Box<AesGcm<Aes256Enc, U12>>),
    ChaCha20Poly1305(Box<ChaCha20Poly1305>),
}

/// Runs `$body` with `$c` bound to the concrete cipher instance.
macro_rules! with_cipher {
    ($cipher:expr, $c:ident => $body:expr) => {
        match $cipher {
            Cipher::Ccm16_64_128($c) => $body,
            Cipher::Ccm16_64_256($c) => $body,
            Cipher::Ccm64_64_128($c) => $body,
            Cipher::Ccm64_64_256($c) => $body,
            Cipher::Ccm16_128_128($c) => $body,
            Cipher::Ccm16_128_256($c) => $body,
            Cipher::Ccm64_128_128($c) => $body,
            Cipher::Ccm64_128_256($c) => $body,
            Cipher::Gcm128($c) => $body,
            Cipher::Gcm192($c) => $body,
            Cipher::Gcm256($c) => $body,
            Cipher::ChaCha20Poly1305($c) => $body,
        }
    };
}

fn new_cipher<A: KeyInit>(key: &[u8]) -> Option<Box<A>> {
    A::new_from_slice(key).ok().map(Box::new)
}

/// Encrypts `buffer` in place; lengths were checked by the caller.
fn seal<A: AeadInOut>(
    cipher: &A,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut [u8],
) -> Result<Tag, aead::Error> {
    let nonce = aead::Nonce::<A>::try_from(nonce).map_err(|_| aead::Error)?;
    let tag = cipher.encrypt_inout_detached(&nonce, aad, buffer.into())?;
    let mut out = Tag {
        bytes: [0; MAX_TAG_LEN],
        len: tag.len(),
    };
    out.bytes
        .get_mut(..tag.len())
        .ok_or(aead::Error)?
        .copy_from_slice(&tag);
    Ok(out)
}

/// Decrypts `buffer` in place and verifies `tag`; lengths were checked by the caller.
fn open<A: AeadInOut>(
    cipher: &A,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut [u8],
    tag: &[u8],
) -> Result<(), aead::Error> {
    let nonce = aead::Nonce::<A>::try_from(nonce).map_err(|_| aead::Error)?;
    let tag = aead::Tag::<A>::try_from(tag).map_err(|_| aead::Error)?;
    cipher.decrypt_inout_detached(&nonce, aad, buffer.into(), &tag)
}

const _: () = assert!(std::mem::size_of::<AeadKey>() == 16);

// Compile-time check that the crate types carry the parameters RFC 9053 gives.
const _: () = {
    const fn sizes<A: AeadCore>() -> (usize, usize) {
        (
            <A::NonceSize as aead::array::typenum::Unsigned>::USIZE,
            <A::TagSize as aead::array::typenum::Unsigned>::USIZE,
        )
    }
    let (n, t) = sizes::<Ccm<Aes128Enc, U8, U7>>();
    assert!(n == 7 && t == 8);
    let (n, t) = sizes::<Ccm<Aes256Enc, U16, U13>>();
    assert!(n == 13 && t == 16);
};

/// A key bound to its algorithm, ready to encrypt and decrypt. 16 bytes: the algorithm is
/// the cipher's variant (a separate field made it 24, and a security context holds two,
/// next to the fields every request reads).
pub struct AeadKey {
    cipher: Cipher,
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadKey")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

/// The nonce must be the algorithm's nonce length.
fn check_nonce(algorithm: AeadAlgorithm, nonce: &[u8]) -> Result<(), AeadError> {
    if nonce.len() == algorithm.nonce_len() {
        Ok(())
    } else {
        Err(AeadError::NonceLength {
            algorithm,
            expected: algorithm.nonce_len(),
            actual: nonce.len(),
        })
    }
}

/// CCM with a 13-byte nonce has a 2-byte length field (L = 15 - 13, RFC 3610 §2.1), so it
/// cannot encrypt more than 2^16 - 1 bytes.
fn check_message_len(algorithm: AeadAlgorithm, len: usize) -> Result<(), AeadError> {
    let max = match algorithm.nonce_len() {
        13 => CCM_L2_MAX_LEN,
        _ => usize::MAX,
    };
    if len > max {
        return Err(AeadError::MessageTooLong {
            algorithm,
            max,
            actual: len,
        });
    }
    Ok(())
}

impl AeadKey {
    /// Sets up `algorithm` with `key` (which must be `algorithm.key_len()` bytes).
    pub fn new(algorithm: AeadAlgorithm, key: &[u8]) -> Result<Self, AeadError> {
        let bad_len = AeadError::KeyLength {
            algorithm,
            expected: algorithm.key_len(),
            actual: key.len(),
        };
        if key.len() != algorithm.key_len() {
            return Err(bad_len);
        }
        use AeadAlgorithm as A;
        let cipher = match algorithm {
            A::AesCcm16_64_128 => new_cipher(key).map(Cipher::Ccm16_64_128),
            A::AesCcm16_64_256 => new_cipher(key).map(Cipher::Ccm16_64_256),
            A::AesCcm64_64_128 => new_cipher(key).map(Cipher::Ccm64_64_128),
            A::AesCcm64_64_256 => new_cipher(key).map(Cipher::Ccm64_64_256),
            A::AesCcm16_128_128 => new_cipher(key).map(Cipher::Ccm16_128_128),
            A::AesCcm16_128_256 => new_cipher(key).map(Cipher::Ccm16_128_256),
            A::AesCcm64_128_128 => new_cipher(key).map(Cipher::Ccm64_128_128),
            A::AesCcm64_128_256 => new_cipher(key).map(Cipher::Ccm64_128_256),
            A::A128Gcm => new_cipher(key).map(Cipher::Gcm128),
            A::A192Gcm => new_cipher(key).map(Cipher::Gcm192),
            A::A256Gcm => new_cipher(key).map(Cipher::Gcm256),
            A::ChaCha20Poly1305 => new_cipher(key).map(Cipher::ChaCha20Poly1305),
        }
        .ok_or(bad_len)?;
        Ok(Self { cipher })
    }

    /// Where this key's schedule (the boxed cipher instance) lies: address and length, for
    /// a prefetch ahead of an operation with it. With thousands of contexts in turn a
    /// schedule is cold when its context's turn comes (three 64-byte lines for AES-128).
    #[inline]
    pub fn schedule_span(&self) -> (usize, usize) {
        with_cipher!(&self.cipher, c => (crate::prefetch::address_of(&**c), std::mem::size_of_val(&**c)))
    }

    /// Prefetches the key schedule (see [`schedule_span`](Self::schedule_span)). A hint
    /// only: results are the same without it.
    #[inline]
    pub fn prefetch(&self) {
        let (start, len) = self.schedule_span();
        crate::prefetch::bytes(start, len);
    }

    pub fn algorithm(&self) -> AeadAlgorithm {
        use AeadAlgorithm as A;
        match self.cipher {
            Cipher::Ccm16_64_128(_) => A::AesCcm16_64_128,
            Cipher::Ccm16_64_256(_) => A::AesCcm16_64_256,
            Cipher::Ccm64_64_128(_) => A::AesCcm64_64_128,
            Cipher::Ccm64_64_256(_) => A::AesCcm64_64_256,
            Cipher::Ccm16_128_128(_) => A::AesCcm16_128_128,
            Cipher::Ccm16_128_256(_) => A::AesCcm16_128_256,
            Cipher::Ccm64_128_128(_) => A::AesCcm64_128_128,
            Cipher::Ccm64_128_256(_) => A::AesCcm64_128_256,
            Cipher::Gcm128(_) => A::A128Gcm,
            Cipher::Gcm192(_) => A::A192Gcm,
            Cipher::Gcm256(_) => A::A256Gcm,
            Cipher::ChaCha20Poly1305(_) => A::ChaCha20Poly1305,
        }
    }

    /// Encrypts `buffer` in place and returns the tag (detached form).
    pub fn encrypt_detached(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Result<Tag, AeadError> {
        // Read once: it is a match on the cipher's variant.
        let algorithm = self.algorithm();
        check_nonce(algorithm, nonce)?;
        check_message_len(algorithm, buffer.len())?;
        // The only failure left inside the crates is an over-long message.
        with_cipher!(&self.cipher, c => seal(&**c, nonce, aad, buffer)).map_err(|_| {
            AeadError::MessageTooLong {
                algorithm,
                max: CCM_L2_MAX_LEN,
                actual: buffer.len(),
            }
        })
    }

    /// Decrypts `buffer` in place after verifying `tag` (detached form). On failure the
    /// buffer content is unspecified (the crates wipe it) and must not be used.
    pub fn decrypt_detached(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> Result<(), AeadError> {
        let algorithm = self.algorithm();
        check_nonce(algorithm, nonce)?;
        if tag.len() != algorithm.tag_len() {
            return Err(AeadError::TagLength {
                algorithm,
                expected: algorithm.tag_len(),
                actual: tag.len(),
            });
        }
        check_message_len(algorithm, buffer.len())?;
        with_cipher!(&self.cipher, c => open(&**c, nonce, aad, buffer, tag))
            .map_err(|_| AeadError::Authentication { algorithm })
    }

    /// Encrypts the bytes of `buffer` from `start` on and appends the tag (attached form,
    /// COSE's ciphertext = encrypted plaintext || tag). Bytes before `start` are untouched,
    /// so a message header can already sit in the buffer.
    pub fn encrypt_in_place(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), AeadError> {
        let plaintext = buffer.get_mut(start..).unwrap_or_default();
        let tag = self.encrypt_detached(nonce, aad, plaintext)?;
        buffer.extend_from_slice(tag.as_slice());
        Ok(())
    }

    /// Verifies and decrypts the ciphertext-with-tag held in `buffer[start..]`, leaving the
    /// plaintext there (the buffer is truncated by the tag length).
    pub fn decrypt_in_place(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buffer: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), AeadError> {
        let algorithm = self.algorithm();
        let tag_len = algorithm.tag_len();
        let total = buffer.len().saturating_sub(start);
        let Some(text_len) = total.checked_sub(tag_len) else {
            return Err(AeadError::CiphertextTooShort {
                algorithm,
                tag_len,
                actual: total,
            });
        };
        let split = start + text_len;
        let (head, tag) = buffer.split_at_mut(split);
        let result = self.decrypt_detached(nonce, aad, &mut head[start..], tag);
        buffer.truncate(split);
        if result.is_err() {
            buffer.truncate(start);
        }
        result
    }

    /// Convenience: returns ciphertext || tag for `plaintext`.
    pub fn encrypt(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let mut buffer = Vec::with_capacity(plaintext.len() + self.algorithm().tag_len());
        buffer.extend_from_slice(plaintext);
        self.encrypt_in_place(nonce, aad, &mut buffer, 0)?;
        Ok(buffer)
    }

    /// Convenience: verifies and decrypts ciphertext || tag.
    pub fn decrypt(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let mut buffer = ciphertext.to_vec();
        self.decrypt_in_place(nonce, aad, &mut buffer, 0)?;
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_for(alg: AeadAlgorithm) -> AeadKey {
        let key: Vec<u8> = (0..alg.key_len()).map(|i| i as u8).collect();
        AeadKey::new(alg, &key).unwrap()
    }

    /// The algorithm is read back from the cipher's variant: each one names its own.
    #[test]
    fn every_key_knows_its_algorithm() {
        for alg in AeadAlgorithm::ALL {
            assert_eq!(key_for(alg).algorithm(), alg);
        }
    }

    /// RFC 8613 C.4: AES-CCM-16-64-128 with the vector's key, nonce and AAD.
    #[test]
    fn ccm_16_64_128_matches_rfc8613_c4() {
        let key = hex::decode("f0910ed7295e6ad4b54fc793154302ff").unwrap();
        let nonce = hex::decode("4622d4dd6d944168eefb549868").unwrap();
        let aad = hex::decode("8368456e63727970743040488501810a40411440").unwrap();
        let k = AeadKey::new(AeadAlgorithm::AesCcm16_64_128, &key).unwrap();
        let ct = k
            .encrypt(&nonce, &aad, &hex::decode("01b3747631").unwrap())
            .unwrap();
        assert_eq!(hex::encode(&ct), "612f1092f1776f1c1668b3825e");
        assert_eq!(
            hex::encode(k.decrypt(&nonce, &aad, &ct).unwrap()),
            "01b3747631"
        );
    }

    /// RFC 3610 packet vector #1 (CCM, M = 8, L = 2) exercises the crate through our wrapper
    /// with a non-OSCORE key.
    #[test]
    fn ccm_matches_rfc3610_packet_1() {
        let key = hex::decode("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf").unwrap();
        let nonce = hex::decode("00000003020100a0a1a2a3a4a5").unwrap();
        let aad = hex::decode("0001020304050607").unwrap();
        let pt = hex::decode("08090a0b0c0d0e0f101112131415161718191a1b1c1d1e").unwrap();
        let k = AeadKey::new(AeadAlgorithm::AesCcm16_64_128, &key).unwrap();
        let ct = k.encrypt(&nonce, &aad, &pt).unwrap();
        assert_eq!(
            hex::encode(ct),
            "588c979a61c663d2f066d0c2c0f989806d5f6b61dac38417e8d12cfdf926e0"
        );
    }

    /// RFC 8439 §2.8.2 (ChaCha20-Poly1305 AEAD).
    #[test]
    fn chacha20poly1305_matches_rfc8439() {
        let key = hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .unwrap();
        let nonce = hex::decode("070000004041424344454647").unwrap();
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let k = AeadKey::new(AeadAlgorithm::ChaCha20Poly1305, &key).unwrap();
        let mut buf = pt.to_vec();
        let tag = k.encrypt_detached(&nonce, &aad, &mut buf).unwrap();
        assert_eq!(hex::encode(tag), "1ae10b594f09e26a7e902ecbd0600691");
        assert_eq!(hex::encode(&buf[..16]), "d31a8d34648e60db7b86afbc53ef7ec2");
    }

    /// NIST GCM test case 3 (AES-128, 96-bit IV, no AAD).
    #[test]
    fn gcm_128_matches_nist_case_3() {
        let key = hex::decode("feffe9928665731c6d6a8f9467308308").unwrap();
        let nonce = hex::decode("cafebabefacedbaddecaf888").unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
        )
        .unwrap();
        let k = AeadKey::new(AeadAlgorithm::A128Gcm, &key).unwrap();
        let ct = k.encrypt(&nonce, &[], &pt).unwrap();
        assert_eq!(
            hex::encode(&ct[pt.len()..]),
            "4d5c2af327cd64a62cf35abd2ba6fab4"
        );
    }

    #[test]
    fn every_algorithm_round_trips_and_has_its_tag_length() {
        for alg in AeadAlgorithm::ALL {
            let k = key_for(alg);
            let nonce = vec![7u8; alg.nonce_len()];
            for len in [0usize, 1, 15, 16, 17, 1024] {
                let pt: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
                let ct = k.encrypt(&nonce, b"aad", &pt).unwrap();
                assert_eq!(ct.len(), len + alg.tag_len(), "{alg}");
                assert_eq!(k.decrypt(&nonce, b"aad", &ct).unwrap(), pt, "{alg}");
                // detached == attached
                let mut buf = pt.clone();
                let tag = k.encrypt_detached(&nonce, b"aad", &mut buf).unwrap();
                assert_eq!(&ct[..len], &buf[..], "{alg}");
                assert_eq!(&ct[len..], tag.as_slice(), "{alg}");
                k.decrypt_detached(&nonce, b"aad", &mut buf, tag.as_slice())
                    .unwrap();
                assert_eq!(buf, pt);
            }
        }
    }

    #[test]
    fn tampering_is_detected_for_every_algorithm() {
        for alg in AeadAlgorithm::ALL {
            let k = key_for(alg);
            let nonce = vec![1u8; alg.nonce_len()];
            let ct = k.encrypt(&nonce, b"aad", b"hello").unwrap();
            for i in 0..ct.len() {
                let mut bad = ct.clone();
                bad[i] ^= 0x01;
                assert_eq!(
                    k.decrypt(&nonce, b"aad", &bad),
                    Err(AeadError::Authentication { algorithm: alg })
                );
            }
            assert!(k.decrypt(&nonce, b"aaD", &ct).is_err());
            let mut other_nonce = nonce.clone();
            other_nonce[0] ^= 1;
            assert!(k.decrypt(&other_nonce, b"aad", &ct).is_err());
        }
    }

    #[test]
    fn wrong_lengths_are_typed_errors() {
        let alg = AeadAlgorithm::AesCcm64_64_128;
        assert!(matches!(
            AeadKey::new(alg, &[0; 32]),
            Err(AeadError::KeyLength {
                expected: 16,
                actual: 32,
                ..
            })
        ));
        let k = key_for(alg);
        assert!(matches!(
            k.encrypt(&[0; 13], b"", b"x"),
            Err(AeadError::NonceLength {
                expected: 7,
                actual: 13,
                ..
            })
        ));
        assert!(matches!(
            k.decrypt(&[0; 7], b"", &[0; 7]),
            Err(AeadError::CiphertextTooShort {
                tag_len: 8,
                actual: 7,
                ..
            })
        ));
        let mut buf = [0u8; 4];
        assert!(matches!(
            k.decrypt_detached(&[0; 7], b"", &mut buf, &[0; 16]),
            Err(AeadError::TagLength {
                expected: 8,
                actual: 16,
                ..
            })
        ));
        let k16 = key_for(AeadAlgorithm::AesCcm16_64_128);
        let big = vec![0u8; CCM_L2_MAX_LEN + 1];
        assert!(matches!(
            k16.encrypt(&[0; 13], b"", &big),
            Err(AeadError::MessageTooLong { .. })
        ));
    }

    #[test]
    fn debug_shows_no_key() {
        let k = AeadKey::new(AeadAlgorithm::A128Gcm, &[0xAB; 16]).unwrap();
        let s = format!("{k:?}");
        assert!(s.contains("A128Gcm") && !s.contains("ab") && !s.contains("171"));
    }
}
