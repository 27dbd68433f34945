//! The COSE side of OSCORE: the compressed COSE object in the OSCORE option (RFC 8613 §6.1),
//! Partial IV encoding (§6.1, §7.2.1), the AEAD nonce (§5.2) and the AAD (§5.4).

use thiserror::Error;

use super::algorithm::AeadAlgorithm;
use super::cbor;
use super::params::HexBytes;
use super::sequence::{SenderSequenceNumber, MAX_SENDER_SEQUENCE_NUMBER};

/// Longest Partial IV: 5 bytes (RFC 8613 §6.1, n <= 5).
pub const MAX_PARTIAL_IV_LEN: usize = 5;
/// Longest nonce of any algorithm (AES-CCM-16-*).
pub const MAX_NONCE_LEN: usize = 13;
/// Longest kid context the option can carry (one length byte, §6.1).
pub const MAX_KID_CONTEXT_LEN: usize = 255;

/// Flag bits of the first option byte (RFC 8613 §6.1, Figure 10).
const FLAG_N: u8 = 0b0000_0111;
const FLAG_K: u8 = 0b0000_1000;
const FLAG_H: u8 = 0b0001_0000;
/// Group flag of Group OSCORE (RFC 9203 / draft-ietf-core-oscore-groupcomm); not supported.
const FLAG_GROUP: u8 = 0b0010_0000;
const FLAGS_RESERVED: u8 = 0b1100_0000;

/// Why an OSCORE option value, Partial IV or nonce input is unusable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoseError {
    #[error("OSCORE option uses reserved flag bits ({flags:#04x})")]
    ReservedFlags { flags: u8 },
    #[error("OSCORE option has the Group OSCORE flag set; group contexts are not supported")]
    GroupFlag,
    #[error("OSCORE option announces a {len}-byte Partial IV; at most 5 bytes are allowed (n = 6, 7 are reserved)")]
    PartialIvLength { len: usize },
    #[error("OSCORE option is truncated: {what} announced but not present")]
    Truncated { what: &'static str },
    #[error("OSCORE option has {len} trailing bytes but no kid flag")]
    TrailingBytes { len: usize },
    #[error("OSCORE option flags are all zero but the value is {len} bytes long")]
    NonEmptyWithoutFlags { len: usize },
    #[error("kid context of {len} bytes does not fit the one-byte length of the OSCORE option")]
    KidContextTooLong { len: usize },
    #[error("sender sequence number {0} is above 2^40-1 and cannot be a Partial IV")]
    SequenceNumberTooLarge(u64),
    #[error("Partial IV must be 1 to 5 bytes, got {len}")]
    BadPartialIv { len: usize },
    #[error("ID {id} is {len} bytes long; a {nonce_len}-byte nonce takes at most {max}")]
    IdTooLongForNonce {
        id: String,
        len: usize,
        max: usize,
        nonce_len: usize,
    },
}

/// A Partial IV: the sender sequence number in network byte order with leading zero bytes
/// removed, zero encoded as one `0x00` byte (RFC 8613 §6.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartialIv {
    bytes: [u8; MAX_PARTIAL_IV_LEN],
    len: u8,
}

impl PartialIv {
    pub fn from_sequence_number(n: SenderSequenceNumber) -> Result<Self, CoseError> {
        if n.0 > MAX_SENDER_SEQUENCE_NUMBER {
            return Err(CoseError::SequenceNumberTooLarge(n.0));
        }
        let be = n.0.to_be_bytes();
        let significant = be.iter().position(|&b| b != 0).unwrap_or(be.len() - 1);
        let tail = &be[significant..];
        let mut bytes = [0; MAX_PARTIAL_IV_LEN];
        bytes[..tail.len()].copy_from_slice(tail);
        Ok(Self {
            bytes,
            len: tail.len() as u8,
        })
    }

    /// Takes a received Partial IV as is (1 to 5 bytes; leading zeros are kept because the
    /// AAD uses the bytes exactly as sent).
    pub fn from_bytes(piv: &[u8]) -> Result<Self, CoseError> {
        if piv.is_empty() || piv.len() > MAX_PARTIAL_IV_LEN {
            return Err(CoseError::BadPartialIv { len: piv.len() });
        }
        let mut bytes = [0; MAX_PARTIAL_IV_LEN];
        bytes[..piv.len()].copy_from_slice(piv);
        Ok(Self {
            bytes,
            len: piv.len() as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The sequence number this Partial IV stands for.
    pub fn value(&self) -> u64 {
        self.as_bytes()
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

impl std::fmt::Debug for PartialIv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartialIv({})", HexBytes(self.as_bytes()))
    }
}

/// The decoded OSCORE option value (RFC 8613 §6.1): the fields of the compressed COSE
/// object's unprotected bucket. An absent field is `None`; `kid: Some(&[])` is a present,
/// empty kid (the `k` flag with no bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OscoreOption<'a> {
    pub partial_iv: Option<&'a [u8]>,
    pub kid_context: Option<&'a [u8]>,
    pub kid: Option<&'a [u8]>,
}

impl<'a> OscoreOption<'a> {
    /// Decodes an OSCORE option value. Never panics on arbitrary bytes.
    pub fn decode(value: &'a [u8]) -> Result<Self, CoseError> {
        let Some((&flags, mut rest)) = value.split_first() else {
            return Ok(Self::default());
        };
        if flags & FLAGS_RESERVED != 0 {
            return Err(CoseError::ReservedFlags { flags });
        }
        if flags & FLAG_GROUP != 0 {
            return Err(CoseError::GroupFlag);
        }
        if flags == 0 {
            // §6.1: with all flags zero the option SHALL be empty; a lone 0x00 carries the
            // same (no) information and is accepted like aiocoap does, anything more is not.
            return if rest.is_empty() {
                Ok(Self::default())
            } else {
                Err(CoseError::NonEmptyWithoutFlags { len: value.len() })
            };
        }
        let mut out = Self::default();
        let n = usize::from(flags & FLAG_N);
        if n > MAX_PARTIAL_IV_LEN {
            return Err(CoseError::PartialIvLength { len: n });
        }
        if n > 0 {
            if rest.len() < n {
                return Err(CoseError::Truncated { what: "Partial IV" });
            }
            let (piv, tail) = rest.split_at(n);
            out.partial_iv = Some(piv);
            rest = tail;
        }
        if flags & FLAG_H != 0 {
            let Some((&s, tail)) = rest.split_first() else {
                return Err(CoseError::Truncated {
                    what: "kid context length",
                });
            };
            let s = usize::from(s);
            if tail.len() < s {
                return Err(CoseError::Truncated {
                    what: "kid context",
                });
            }
            let (ctx, tail) = tail.split_at(s);
            out.kid_context = Some(ctx);
            rest = tail;
        }
        if flags & FLAG_K != 0 {
            out.kid = Some(rest);
        } else if !rest.is_empty() {
            return Err(CoseError::TrailingBytes { len: rest.len() });
        }
        Ok(out)
    }

    /// Appends the encoded option value to `out` (empty when no field is present, §6.1).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CoseError> {
        self.encode_into(out)
    }

    /// [`Self::encode`] into a `Vec` or a stack buffer.
    pub(crate) fn encode_into(&self, out: &mut impl cbor::Sink) -> Result<(), CoseError> {
        let piv = self.partial_iv.unwrap_or_default();
        if piv.len() > MAX_PARTIAL_IV_LEN {
            return Err(CoseError::PartialIvLength { len: piv.len() });
        }
        let mut flags = piv.len() as u8;
        if let Some(ctx) = self.kid_context {
            if ctx.len() > MAX_KID_CONTEXT_LEN {
                return Err(CoseError::KidContextTooLong { len: ctx.len() });
            }
            flags |= FLAG_H;
        }
        if self.kid.is_some() {
            flags |= FLAG_K;
        }
        if flags == 0 {
            return Ok(());
        }
        out.put(&[flags]);
        out.put(piv);
        if let Some(ctx) = self.kid_context {
            out.put(&[ctx.len() as u8]);
            out.put(ctx);
        }
        if let Some(kid) = self.kid {
            out.put(kid);
        }
        Ok(())
    }
}

/// An AEAD nonce (RFC 8613 §5.2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce {
    bytes: [u8; MAX_NONCE_LEN],
    len: u8,
}

impl Nonce {
    /// §5.2: the ID of the Partial IV's generator, left-padded to nonce length - 6 bytes and
    /// prefixed by its length, followed by the Partial IV left-padded to 5 bytes, XORed with
    /// the Common IV (whose length is the nonce length).
    pub fn new(common_iv: &[u8], id_piv: &[u8], partial_iv: &[u8]) -> Result<Self, CoseError> {
        let nonce_len = common_iv.len();
        if !(7..=MAX_NONCE_LEN).contains(&nonce_len) {
            // Only reachable with a hand-made Common IV; derivation always fits.
            return Err(CoseError::IdTooLongForNonce {
                id: HexBytes(id_piv).to_string(),
                len: id_piv.len(),
                max: nonce_len.saturating_sub(6),
                nonce_len,
            });
        }
        let id_room = nonce_len - 6;
        if id_piv.len() > id_room {
            return Err(CoseError::IdTooLongForNonce {
                id: HexBytes(id_piv).to_string(),
                len: id_piv.len(),
                max: id_room,
                nonce_len,
            });
        }
        if partial_iv.len() > MAX_PARTIAL_IV_LEN {
            return Err(CoseError::PartialIvLength {
                len: partial_iv.len(),
            });
        }
        let mut bytes = [0u8; MAX_NONCE_LEN];
        bytes[0] = id_piv.len() as u8;
        bytes[1 + id_room - id_piv.len()..1 + id_room].copy_from_slice(id_piv);
        bytes[nonce_len - partial_iv.len()..nonce_len].copy_from_slice(partial_iv);
        for (b, iv) in bytes.iter_mut().zip(common_iv) {
            *b ^= iv;
        }
        Ok(Self {
            bytes,
            len: nonce_len as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", HexBytes(self.as_bytes()))
    }
}

/// Appends the external AAD (RFC 8613 §5.4): the CBOR array
/// `[oscore_version: 1, algorithms: [alg_aead], request_kid: bstr, request_piv: bstr,
/// options: bstr]`, with no Class I options (`h''`).
pub fn external_aad(
    algorithm: AeadAlgorithm,
    request_kid: &[u8],
    request_piv: &[u8],
    out: &mut Vec<u8>,
) {
    external_aad_into(algorithm, request_kid, request_piv, out);
}

fn external_aad_into(
    algorithm: AeadAlgorithm,
    request_kid: &[u8],
    request_piv: &[u8],
    out: &mut impl cbor::Sink,
) {
    cbor::array(out, 5);
    cbor::int(out, 1);
    cbor::array(out, 1);
    cbor::int(out, i64::from(algorithm.cose_id()));
    cbor::bytes(out, request_kid);
    cbor::bytes(out, request_piv);
    cbor::bytes(out, &[]);
}

/// Appends the AEAD additional data (RFC 8613 §5.4, RFC 9052 §5.3): the `Enc_structure`
/// `["Encrypt0", protected: h'', external_aad: bstr]`.
pub fn aad(algorithm: AeadAlgorithm, request_kid: &[u8], request_piv: &[u8], out: &mut Vec<u8>) {
    aad_into(algorithm, request_kid, request_piv, out);
}

/// Room for the AAD whenever kid and Partial IV are shorter than 24 bytes (at most 67 bytes;
/// a kid that fits the nonce has at most 7); anything longer spills to the heap.
pub(crate) type AadBuf = super::stackbuf::StackBuf<72>;

/// [`aad`] into a stack buffer, with no allocation and no per-item calls: the common case
/// (kid and Partial IV shorter than 24 bytes, algorithm id 0..=255, i.e. every one-byte CBOR
/// length) is written out directly; anything else goes through [`cbor`]. Equal to [`aad`]
/// (tested against it).
pub(crate) fn aad_buf(algorithm: AeadAlgorithm, request_kid: &[u8], request_piv: &[u8]) -> AadBuf {
    let mut out = AadBuf::new();
    let alg = algorithm.cose_id();
    let (kid_len, piv_len) = (request_kid.len(), request_piv.len());
    let Ok(alg) = u8::try_from(alg) else {
        aad_into(algorithm, request_kid, request_piv, &mut out);
        return out;
    };
    if kid_len >= 24 || piv_len >= 24 {
        aad_into(algorithm, request_kid, request_piv, &mut out);
        return out;
    }
    let mut ext = [0u8; 56];
    // [1, [alg], h'kid', h'piv', h''] (§5.4)
    ext[..3].copy_from_slice(&[0x85, 0x01, 0x81]);
    let mut n = 3;
    if alg < 24 {
        ext[n] = alg;
        n += 1;
    } else {
        ext[n..n + 2].copy_from_slice(&[0x18, alg]);
        n += 2;
    }
    ext[n] = 0x40 | kid_len as u8;
    ext[n + 1..n + 1 + kid_len].copy_from_slice(request_kid);
    n += 1 + kid_len;
    ext[n] = 0x40 | piv_len as u8;
    ext[n + 1..n + 1 + piv_len].copy_from_slice(request_piv);
    n += 1 + piv_len;
    ext[n] = 0x40;
    n += 1;
    // ["Encrypt0", h'', h'ext'] (RFC 9052 §5.3)
    let mut aad = [0u8; 72];
    aad[..11].copy_from_slice(b"\x83\x68Encrypt0\x40");
    let mut m = 11;
    if n < 24 {
        aad[m] = 0x40 | n as u8;
        m += 1;
    } else {
        aad[m..m + 2].copy_from_slice(&[0x58, n as u8]);
        m += 2;
    }
    aad[m..m + n].copy_from_slice(&ext[..n]);
    out.put(&aad[..m + n]);
    out
}

fn aad_into(
    algorithm: AeadAlgorithm,
    request_kid: &[u8],
    request_piv: &[u8],
    out: &mut impl cbor::Sink,
) {
    let mut ext = Vec::with_capacity(16 + request_kid.len() + request_piv.len());
    external_aad_into(algorithm, request_kid, request_piv, &mut ext);
    cbor::array(out, 3);
    cbor::text(out, "Encrypt0");
    cbor::bytes(out, &[]);
    cbor::bytes(out, &ext);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct AAD writer equals the `cbor` one for every algorithm and for kid and
    /// Partial IV lengths on both sides of the one-byte CBOR length limit.
    #[test]
    fn aad_buf_equals_aad() {
        for alg in AeadAlgorithm::ALL {
            for kid_len in [0usize, 1, 7, 8, 23, 24, 40, 300] {
                for piv_len in [0usize, 1, 5, 23, 24] {
                    let kid: Vec<u8> = (0..kid_len).map(|i| i as u8).collect();
                    let piv: Vec<u8> = (0..piv_len).map(|i| 0xa0 ^ i as u8).collect();
                    let mut expected = Vec::new();
                    aad(alg, &kid, &piv, &mut expected);
                    assert_eq!(
                        aad_buf(alg, &kid, &piv).as_slice(),
                        expected,
                        "{alg} kid {kid_len} piv {piv_len}"
                    );
                }
            }
        }
    }

    #[test]
    fn partial_iv_strips_leading_zeros() {
        let piv = |n| PartialIv::from_sequence_number(SenderSequenceNumber(n)).unwrap();
        assert_eq!(piv(0).as_bytes(), &[0]);
        assert_eq!(piv(20).as_bytes(), &[0x14]);
        assert_eq!(piv(255).as_bytes(), &[0xff]);
        assert_eq!(piv(256).as_bytes(), &[1, 0]);
        assert_eq!(
            piv(MAX_SENDER_SEQUENCE_NUMBER).as_bytes(),
            &[0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(piv(0x0102_0304).value(), 0x0102_0304);
        assert_eq!(
            PartialIv::from_sequence_number(SenderSequenceNumber(1 << 40)),
            Err(CoseError::SequenceNumberTooLarge(1 << 40))
        );
        assert_eq!(PartialIv::from_bytes(&[0, 5]).unwrap().value(), 5);
        assert!(PartialIv::from_bytes(&[]).is_err());
        assert!(PartialIv::from_bytes(&[0; 6]).is_err());
    }

    #[test]
    fn option_vectors_decode() {
        // C.4, C.5, C.6, C.7, C.8
        let v = hex::decode("0914").unwrap();
        let o = OscoreOption::decode(&v).unwrap();
        assert_eq!(o.partial_iv, Some(&[0x14][..]));
        assert_eq!(o.kid, Some(&[][..]));
        assert_eq!(o.kid_context, None);
        let v = hex::decode("091400").unwrap();
        let o = OscoreOption::decode(&v).unwrap();
        assert_eq!(o.kid, Some(&[0][..]));
        let v = hex::decode("19140837cbf3210017a2d3").unwrap();
        let o = OscoreOption::decode(&v).unwrap();
        assert_eq!(o.partial_iv, Some(&[0x14][..]));
        assert_eq!(
            o.kid_context,
            Some(&hex::decode("37cbf3210017a2d3").unwrap()[..])
        );
        assert_eq!(o.kid, Some(&[][..]));
        assert_eq!(OscoreOption::decode(&[]).unwrap(), OscoreOption::default());
        let o = OscoreOption::decode(&[0x01, 0x00]).unwrap();
        assert_eq!(o.partial_iv, Some(&[0][..]));
        assert_eq!(o.kid, None);
    }

    #[test]
    fn option_round_trips() {
        for v in [
            "0914",
            "091400",
            "19140837cbf3210017a2d3",
            "0100",
            "",
            "08",
            "1000",
        ] {
            let bytes = hex::decode(v).unwrap();
            let o = OscoreOption::decode(&bytes).unwrap();
            let mut out = Vec::new();
            o.encode(&mut out).unwrap();
            assert_eq!(hex::encode(out), v);
        }
    }

    #[test]
    fn malformed_options_are_errors() {
        let dec = |h: &str| {
            let v = hex::decode(h).unwrap();
            OscoreOption::decode(&v).map(|_| ())
        };
        assert_eq!(dec("4914"), Err(CoseError::ReservedFlags { flags: 0x49 }));
        assert_eq!(dec("8914"), Err(CoseError::ReservedFlags { flags: 0x89 }));
        assert_eq!(dec("2914"), Err(CoseError::GroupFlag));
        assert_eq!(
            dec("0e010203040506"),
            Err(CoseError::PartialIvLength { len: 6 })
        );
        assert_eq!(dec("0f"), Err(CoseError::PartialIvLength { len: 7 }));
        assert_eq!(
            dec("0a14"),
            Err(CoseError::Truncated { what: "Partial IV" })
        );
        assert_eq!(
            dec("10"),
            Err(CoseError::Truncated {
                what: "kid context length"
            })
        );
        assert_eq!(
            dec("1003aabb"),
            Err(CoseError::Truncated {
                what: "kid context"
            })
        );
        assert_eq!(dec("0114ff"), Err(CoseError::TrailingBytes { len: 1 }));
        assert_eq!(dec("0001"), Err(CoseError::NonEmptyWithoutFlags { len: 2 }));
        assert_eq!(dec("00"), Ok(()));
    }

    #[test]
    fn decode_never_panics_on_short_inputs() {
        for a in 0..=255u8 {
            for b in [0u8, 1, 5, 255] {
                let _ = OscoreOption::decode(&[a]);
                let _ = OscoreOption::decode(&[a, b]);
                let _ = OscoreOption::decode(&[a, b, b]);
            }
        }
    }

    #[test]
    fn encode_rejects_oversized_fields() {
        let piv = [0u8; 6];
        let o = OscoreOption {
            partial_iv: Some(&piv),
            ..Default::default()
        };
        assert!(o.encode(&mut Vec::new()).is_err());
        let ctx = [0u8; 256];
        let o = OscoreOption {
            kid_context: Some(&ctx),
            ..Default::default()
        };
        assert_eq!(
            o.encode(&mut Vec::new()),
            Err(CoseError::KidContextTooLong { len: 256 })
        );
    }

    #[test]
    fn nonce_matches_c4_and_c8() {
        let iv = hex::decode("4622d4dd6d944168eefb54987c").unwrap();
        assert_eq!(
            hex::encode(Nonce::new(&iv, &[], &[0x14]).unwrap().as_bytes()),
            "4622d4dd6d944168eefb549868"
        );
        assert_eq!(
            hex::encode(Nonce::new(&iv, &[1], &[0]).unwrap().as_bytes()),
            "4722d4dd6d944169eefb54987c"
        );
        // 7-byte nonce (AES-CCM-64-*): one byte of ID room.
        let iv7 = [0u8; 7];
        assert_eq!(
            Nonce::new(&iv7, &[0xaa], &[1, 2, 3, 4, 5])
                .unwrap()
                .as_bytes(),
            &[1, 0xaa, 1, 2, 3, 4, 5]
        );
        assert!(matches!(
            Nonce::new(&iv7, &[1, 2], &[0]),
            Err(CoseError::IdTooLongForNonce { max: 1, .. })
        ));
        assert!(Nonce::new(&iv, &[0; 8], &[0]).is_err());
        assert!(Nonce::new(&iv, &[0; 7], &[0; 6]).is_err());
    }

    #[test]
    fn aad_matches_c4_and_c5() {
        let alg = AeadAlgorithm::AesCcm16_64_128;
        let mut ext = Vec::new();
        external_aad(alg, &[], &[0x14], &mut ext);
        assert_eq!(hex::encode(&ext), "8501810a40411440");
        let mut a = Vec::new();
        aad(alg, &[], &[0x14], &mut a);
        assert_eq!(hex::encode(&a), "8368456e63727970743040488501810a40411440");
        let mut a = Vec::new();
        aad(alg, &[0], &[0x14], &mut a);
        assert_eq!(
            hex::encode(&a),
            "8368456e63727970743040498501810a4100411440"
        );
    }
}
