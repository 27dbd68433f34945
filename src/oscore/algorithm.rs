//! AEAD and HKDF algorithms a security context may use (RFC 8613 §3.1, COSE ids from
//! RFC 9053), named exactly as aiocoap's `settings.json` names them.

use std::fmt;

/// An AEAD algorithm of the security context (RFC 8613 §3.1 "AEAD Algorithm").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AeadAlgorithm {
    /// COSE 10, the algorithm every OSCORE implementation must support (RFC 8613 §3.2.1).
    #[default]
    AesCcm16_64_128,
    AesCcm16_64_256,
    AesCcm64_64_128,
    AesCcm64_64_256,
    AesCcm16_128_128,
    AesCcm16_128_256,
    AesCcm64_128_128,
    AesCcm64_128_256,
    A128Gcm,
    A192Gcm,
    A256Gcm,
    ChaCha20Poly1305,
}

impl AeadAlgorithm {
    pub const ALL: [AeadAlgorithm; 12] = [
        Self::AesCcm16_64_128,
        Self::AesCcm16_64_256,
        Self::AesCcm64_64_128,
        Self::AesCcm64_64_256,
        Self::AesCcm16_128_128,
        Self::AesCcm16_128_256,
        Self::AesCcm64_128_128,
        Self::AesCcm64_128_256,
        Self::A128Gcm,
        Self::A192Gcm,
        Self::A256Gcm,
        Self::ChaCha20Poly1305,
    ];

    /// The name aiocoap uses in `settings.json` (`"algorithm"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::AesCcm16_64_128 => "AES-CCM-16-64-128",
            Self::AesCcm16_64_256 => "AES-CCM-16-64-256",
            Self::AesCcm64_64_128 => "AES-CCM-64-64-128",
            Self::AesCcm64_64_256 => "AES-CCM-64-64-256",
            Self::AesCcm16_128_128 => "AES-CCM-16-128-128",
            Self::AesCcm16_128_256 => "AES-CCM-16-128-256",
            Self::AesCcm64_128_128 => "AES-CCM-64-128-128",
            Self::AesCcm64_128_256 => "AES-CCM-64-128-256",
            Self::A128Gcm => "A128GCM",
            Self::A192Gcm => "A192GCM",
            Self::A256Gcm => "A256GCM",
            Self::ChaCha20Poly1305 => "ChaCha20/Poly1305",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// COSE algorithm identifier (RFC 9053 §4), used in the HKDF info and the external AAD.
    pub fn cose_id(self) -> i32 {
        match self {
            Self::AesCcm16_64_128 => 10,
            Self::AesCcm16_64_256 => 11,
            Self::AesCcm64_64_128 => 12,
            Self::AesCcm64_64_256 => 13,
            Self::AesCcm16_128_128 => 30,
            Self::AesCcm16_128_256 => 31,
            Self::AesCcm64_128_128 => 32,
            Self::AesCcm64_128_256 => 33,
            Self::A128Gcm => 1,
            Self::A192Gcm => 2,
            Self::A256Gcm => 3,
            Self::ChaCha20Poly1305 => 24,
        }
    }

    pub fn from_cose_id(id: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.cose_id() == id)
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::AesCcm16_64_128
            | Self::AesCcm64_64_128
            | Self::AesCcm16_128_128
            | Self::AesCcm64_128_128
            | Self::A128Gcm => 16,
            Self::A192Gcm => 24,
            _ => 32,
        }
    }

    /// Authentication tag length in bytes.
    pub fn tag_len(self) -> usize {
        match self {
            Self::AesCcm16_64_128
            | Self::AesCcm16_64_256
            | Self::AesCcm64_64_128
            | Self::AesCcm64_64_256 => 8,
            _ => 16,
        }
    }

    /// Nonce length in bytes; also the length of the Common IV (RFC 8613 §3.2.1).
    pub const fn nonce_len(self) -> usize {
        match self {
            Self::AesCcm16_64_128
            | Self::AesCcm16_64_256
            | Self::AesCcm16_128_128
            | Self::AesCcm16_128_256 => 13,
            Self::AesCcm64_64_128
            | Self::AesCcm64_64_256
            | Self::AesCcm64_128_128
            | Self::AesCcm64_128_256 => 7,
            Self::A128Gcm | Self::A192Gcm | Self::A256Gcm | Self::ChaCha20Poly1305 => 12,
        }
    }

    /// Longest Sender/Recipient ID this algorithm allows: nonce length - 6 (RFC 8613 §3.3).
    pub fn max_id_len(self) -> usize {
        self.nonce_len() - 6
    }
}

impl fmt::Display for AeadAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The HKDF hash function (RFC 8613 §3.1 "HKDF Algorithm"); aiocoap's `kdf-hashfun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HkdfAlgorithm {
    #[default]
    Sha256,
    Sha384,
    Sha512,
}

impl HkdfAlgorithm {
    pub const ALL: [HkdfAlgorithm; 3] = [Self::Sha256, Self::Sha384, Self::Sha512];

    /// The name aiocoap uses in `settings.json` (`"kdf-hashfun"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for HkdfAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for a in AeadAlgorithm::ALL {
            assert_eq!(AeadAlgorithm::from_name(a.name()), Some(a));
            assert_eq!(AeadAlgorithm::from_cose_id(a.cose_id()), Some(a));
        }
        assert_eq!(AeadAlgorithm::AesCcm64_64_128.max_id_len(), 1);
        assert_eq!(AeadAlgorithm::A128Gcm.max_id_len(), 6);
        assert_eq!(AeadAlgorithm::default().max_id_len(), 7);
        assert_eq!(AeadAlgorithm::from_name("A128CBC"), None);
    }
}
