//! CoAP option numbers (RFC 7252 §5.10, §12.2 and later RFCs), their properties (§5.4.6) and
//! the value formats the gateway interprets (uint, Block of RFC 7959 §2.2).

use super::CodecError;

/// Registered option numbers the gateway knows by name.
pub mod number {
    pub const IF_MATCH: u16 = 1;
    pub const URI_HOST: u16 = 3;
    pub const ETAG: u16 = 4;
    pub const IF_NONE_MATCH: u16 = 5;
    /// RFC 7641
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const LOCATION_PATH: u16 = 8;
    /// RFC 8613 §2
    pub const OSCORE: u16 = 9;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    /// RFC 8768
    pub const HOP_LIMIT: u16 = 16;
    pub const ACCEPT: u16 = 17;
    pub const LOCATION_QUERY: u16 = 20;
    /// RFC 7959
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;
    /// RFC 9175
    pub const ECHO: u16 = 252;
    /// RFC 7967
    pub const NO_RESPONSE: u16 = 258;
    /// RFC 9175
    pub const REQUEST_TAG: u16 = 292;
}

/// Critical options have an odd number (RFC 7252 §5.4.6).
pub fn is_critical(n: u16) -> bool {
    n & 1 == 1
}

/// Unsafe-to-forward options have bit 1 set (RFC 7252 §5.4.6).
pub fn is_unsafe(n: u16) -> bool {
    n & 2 == 2
}

/// NoCacheKey options have bits 2..4 all set (RFC 7252 §5.4.6).
pub fn is_no_cache_key(n: u16) -> bool {
    n & 0x1e == 0x1c
}

/// Encodes a uint option value in the minimal number of bytes (RFC 7252 §3.2); 0 is empty.
pub fn encode_uint(value: u64, buf: &mut [u8; 8]) -> &[u8] {
    *buf = value.to_be_bytes();
    let skip = (value.leading_zeros() / 8) as usize;
    &buf[skip..]
}

/// Decodes a uint option value; leading zero bytes are tolerated, more than 8 bytes are not.
pub fn decode_uint(bytes: &[u8]) -> Option<u64> {
    if bytes.len() > 8 {
        return None;
    }
    Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// A Block1/Block2 option value (RFC 7959 §2.2): NUM (up to 2^20-1), M, SZX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockValue {
    pub num: u32,
    pub more: bool,
    /// Block size is 2^(szx+4); 7 is reserved (BERT in RFC 8323, invalid over UDP).
    pub szx: u8,
}

impl BlockValue {
    pub const MAX_NUM: u32 = (1 << 20) - 1;

    pub fn new(num: u32, more: bool, szx: u8) -> Result<Self, CodecError> {
        if num > Self::MAX_NUM || szx > 6 {
            return Err(CodecError::BadBlock);
        }
        Ok(Self { num, more, szx })
    }

    /// Decodes 0-3 bytes; SZX 7 is rejected (RFC 7959 §2.2: reserved).
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() > 3 {
            return Err(CodecError::BadBlock);
        }
        let v = decode_uint(bytes).ok_or(CodecError::BadBlock)? as u32;
        let szx = (v & 7) as u8;
        if szx == 7 {
            return Err(CodecError::BadBlock);
        }
        Ok(Self {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }

    /// Encodes in 0-3 bytes.
    pub fn encode<'b>(&self, buf: &'b mut [u8; 8]) -> &'b [u8] {
        let v = (u64::from(self.num) << 4) | (u64::from(self.more) << 3) | u64::from(self.szx);
        encode_uint(v, buf)
    }

    /// Block size in bytes: 16..=1024.
    pub fn size(&self) -> usize {
        1 << (self.szx + 4)
    }

    /// Byte offset of this block in the body.
    pub fn offset(&self) -> usize {
        self.num as usize * self.size()
    }

    /// SZX for a block size (a power of two between 16 and 1024).
    pub fn szx_for_size(size: usize) -> Option<u8> {
        (0..=6u8).find(|szx| 1usize << (szx + 4) == size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint_minimal_encoding() {
        let mut b = [0; 8];
        assert_eq!(encode_uint(0, &mut b), &[] as &[u8]);
        assert_eq!(encode_uint(1, &mut b), &[1]);
        assert_eq!(encode_uint(0x1234, &mut b), &[0x12, 0x34]);
        assert_eq!(decode_uint(&[0, 0, 5]), Some(5));
        assert_eq!(decode_uint(&[1; 9]), None);
    }

    #[test]
    fn block_values_of_one_two_and_three_bytes() {
        let mut b = [0; 8];
        let small = BlockValue::new(2, true, 6).unwrap();
        assert_eq!(small.encode(&mut b), &[0x2e]);
        let mid = BlockValue::new(4095, false, 2).unwrap();
        assert_eq!(mid.encode(&mut b).len(), 2);
        let max = BlockValue::new(BlockValue::MAX_NUM, true, 6).unwrap();
        let enc = max.encode(&mut b).to_vec();
        assert_eq!(enc.len(), 3);
        assert_eq!(BlockValue::decode(&enc).unwrap(), max);
        assert_eq!(
            BlockValue::decode(&[]).unwrap(),
            BlockValue::new(0, false, 0).unwrap()
        );
        assert!(BlockValue::decode(&[0x07]).is_err());
        assert!(BlockValue::decode(&[0, 0, 0, 1]).is_err());
        assert!(BlockValue::new(BlockValue::MAX_NUM + 1, false, 0).is_err());
        assert_eq!(max.size(), 1024);
        assert_eq!(BlockValue::szx_for_size(64), Some(2));
    }

    #[test]
    fn option_properties() {
        assert!(is_critical(number::IF_MATCH) && !is_unsafe(number::IF_MATCH));
        assert!(is_unsafe(number::URI_PATH) && !is_critical(number::ETAG));
        assert!(is_unsafe(number::PROXY_URI) && is_critical(number::PROXY_URI));
        assert!(is_no_cache_key(number::SIZE1));
        assert!(!is_unsafe(number::OSCORE) && is_critical(number::OSCORE));
    }
}
