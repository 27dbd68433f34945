//! A CoAP token (RFC 7252 §5.3.1: 0 to 8 bytes) held inline, for use as a map key.
//!
//! The upstream link matches responses to requests by token; with `Vec<u8>` keys every
//! request cost ~4 heap allocations (its key in the table of exchanges, the Message-ID ->
//! token table, the requester table and the response event). A token is at most 8 bytes, so
//! it fits in a `Copy` value of 9 bytes.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The longest token (RFC 7252 §3: TKL 9-15 are reserved).
pub const MAX_TOKEN_LEN: usize = 8;

/// A token of 0-8 bytes. Bytes past `len` are always zero, so the derived equality over
/// the whole array is equality of the token bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Token {
    len: u8,
    bytes: [u8; MAX_TOKEN_LEN],
}

impl Token {
    /// The token `bytes`, or None when longer than 8 bytes (not a valid token).
    pub fn new(bytes: &[u8]) -> Option<Token> {
        if bytes.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut t = Token {
            len: bytes.len() as u8,
            bytes: [0; MAX_TOKEN_LEN],
        };
        t.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(t)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Deref for Token {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Hash for Token {
    /// One word and the length: what a fast hasher (foldhash) takes in one step.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_ne_bytes(self.bytes));
        state.write_u8(self.len);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl PartialEq<[u8]> for Token {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn holds_0_to_8_bytes_and_rejects_longer() {
        for n in 0..=8 {
            let bytes: Vec<u8> = (1..=n as u8).collect();
            let t = Token::new(&bytes).unwrap();
            assert_eq!(t.as_slice(), &bytes[..]);
            assert_eq!(&*t, &bytes[..]);
            assert_eq!(t.len(), n);
        }
        assert_eq!(Token::new(&[0; 9]), None);
    }

    #[test]
    fn equality_and_hash_follow_the_bytes_including_length() {
        // Trailing zero bytes are part of the token: "a" and "a\0" differ.
        let a = Token::new(b"a").unwrap();
        let a0 = Token::new(b"a\0").unwrap();
        let empty = Token::new(b"").unwrap();
        let zero = Token::new(&[0]).unwrap();
        assert_ne!(a, a0);
        assert_ne!(empty, zero);
        assert_eq!(a, Token::new(b"a").unwrap());
        assert!(a == *b"a".as_slice());
        let set: HashSet<Token> = [a, a0, empty, zero, Token::new(b"a").unwrap()]
            .into_iter()
            .collect();
        assert_eq!(set.len(), 4);
        assert!(set.contains(&Token::new(b"a\0").unwrap()));
        assert!(!set.contains(&Token::new(b"b").unwrap()));
    }

    #[test]
    fn debug_shows_hex() {
        assert_eq!(
            format!("{:?}", Token::new(&[0xab, 1]).unwrap()),
            "Token(ab01)"
        );
    }
}
