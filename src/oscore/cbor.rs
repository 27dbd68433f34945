//! The few CBOR items OSCORE needs (RFC 8949 §3): the HKDF `info` array (RFC 8613 §3.2.1) and
//! the COSE `Enc_structure` with its external AAD (RFC 8613 §5.4, RFC 9052 §5.3).
//!
//! Hand-written on purpose: these structures are small, fixed and only ever *encoded* (we never
//! parse CBOR from the network), so the whole encoder is the item head below. A general CBOR
//! crate would add a dependency and allocations for five item kinds; the Appendix C vectors
//! check every byte this module produces.

/// Where items are written: a `Vec` or a stack buffer (`StackBuf`), so that the AAD of every
/// message can be built without a heap allocation.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes an item head: major type `major` (0..=7) with argument `value`, in the shortest
/// form (RFC 8949 §4.2.1, preferred serialization).
fn head(out: &mut impl Sink, major: u8, value: u64) {
    let mt = major << 5;
    if let Ok(v) = u8::try_from(value) {
        if v < 24 {
            out.put(&[mt | v]);
        } else {
            out.put(&[mt | 24, v]);
        }
    } else if let Ok(v) = u16::try_from(value) {
        out.put(&[mt | 25]);
        out.put(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        out.put(&[mt | 26]);
        out.put(&v.to_be_bytes());
    } else {
        out.put(&[mt | 27]);
        out.put(&value.to_be_bytes());
    }
}

/// An integer (major type 0 or 1).
pub(crate) fn int(out: &mut impl Sink, value: i64) {
    if value >= 0 {
        head(out, 0, value.unsigned_abs());
    } else {
        // -1 - n is encoded as major type 1 with argument n.
        head(out, 1, (-1 - value).unsigned_abs());
    }
}

/// A byte string (major type 2).
pub(crate) fn bytes(out: &mut impl Sink, value: &[u8]) {
    head(out, 2, value.len() as u64);
    out.put(value);
}

/// A text string (major type 3).
pub(crate) fn text(out: &mut impl Sink, value: &str) {
    head(out, 3, value.len() as u64);
    out.put(value.as_bytes());
}

/// The head of an array of `len` items (major type 4).
pub(crate) fn array(out: &mut impl Sink, len: usize) {
    head(out, 4, len as u64);
}

/// `null` (major type 7, simple value 22).
pub(crate) fn null(out: &mut impl Sink) {
    out.put(&[0xF6]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        hex::encode(v)
    }

    /// Examples from RFC 8949 Appendix A.
    #[test]
    fn matches_rfc8949_appendix_a() {
        assert_eq!(enc(|o| int(o, 0)), "00");
        assert_eq!(enc(|o| int(o, 10)), "0a");
        assert_eq!(enc(|o| int(o, 23)), "17");
        assert_eq!(enc(|o| int(o, 24)), "1818");
        assert_eq!(enc(|o| int(o, 100)), "1864");
        assert_eq!(enc(|o| int(o, 1000)), "1903e8");
        assert_eq!(enc(|o| int(o, 1_000_000)), "1a000f4240");
        assert_eq!(enc(|o| int(o, 1_000_000_000_000)), "1b000000e8d4a51000");
        assert_eq!(enc(|o| int(o, -1)), "20");
        assert_eq!(enc(|o| int(o, -10)), "29");
        assert_eq!(enc(|o| int(o, -100)), "3863");
        assert_eq!(enc(|o| int(o, -1000)), "3903e7");
        assert_eq!(enc(|o| int(o, -65531)), "39fffa");
        assert_eq!(enc(|o| bytes(o, &[])), "40");
        assert_eq!(enc(|o| bytes(o, &[1, 2, 3, 4])), "4401020304");
        assert_eq!(enc(|o| text(o, "IETF")), "6449455446");
        assert_eq!(enc(null), "f6");
        assert_eq!(enc(|o| array(o, 0)), "80");
        assert_eq!(enc(|o| array(o, 25)), "9819");
        let mut long = vec![0x59, 0x01, 0x2c];
        long.extend_from_slice(&[0u8; 300]);
        assert_eq!(enc(|o| bytes(o, &[0u8; 300])), hex::encode(long));
    }
}
