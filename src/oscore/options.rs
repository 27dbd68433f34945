//! Which CoAP options are protected and which travel in the clear (RFC 8613 §4.1).
//!
//! - Class E (encrypted, inner): everything not listed below, including unknown options
//!   (§4.1: "unknown options ... SHALL be processed as Class E").
//! - Class U (unprotected, outer only): Uri-Host, Uri-Port, Proxy-Scheme, Proxy-Uri (§4.1.3.3;
//!   a Proxy-Uri is decomposed before protection and never sent as such), OSCORE itself
//!   (§2), and Hop-Limit (RFC 8768 §3: "Class U").
//! - Both E and U: Observe (§4.1.3.5), Max-Age (§4.1.3.1) and No-Response (§4.1.3.6) exist as
//!   inner and outer options; Block1/Block2/Size1/Size2 (§4.1.3.4) too, but a message's own
//!   block-wise options are end-to-end and therefore inner: outer ones only exist when an
//!   OSCORE message is fragmented on one hop, which happens below protection.
//!
//! What protection does with an option of a plain message is [`placement`]'s answer.

use crate::coap::number;

/// The class of an option (RFC 8613 §4.1). There is no Class I option in RFC 8613.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionClass {
    /// Encrypted and integrity protected: only in the plaintext.
    E,
    /// Unprotected: only in the outer message.
    U,
    /// Defined as both an inner and an outer option, with separate meanings.
    EAndU,
}

/// RFC 8613 §4.1's class of option `number`.
pub fn class(number: u16) -> OptionClass {
    match number {
        number::URI_HOST
        | number::URI_PORT
        | number::PROXY_SCHEME
        | number::PROXY_URI
        | number::OSCORE
        | number::HOP_LIMIT => OptionClass::U,
        number::OBSERVE
        | number::MAX_AGE
        | number::NO_RESPONSE
        | number::BLOCK1
        | number::BLOCK2
        | number::SIZE1
        | number::SIZE2 => OptionClass::EAndU,
        _ => OptionClass::E,
    }
}

/// Where protection puts an option of the plain (unprotected) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Into the plaintext only.
    Inner,
    /// Into the outer message only.
    Outer,
    /// Into both (Observe on requests, §4.1.3.5.1).
    InnerAndOuter,
    /// Proxy-Uri: split into outer Proxy-Scheme/Uri-Host/Uri-Port and inner Uri-Path/
    /// Uri-Query (§4.1.3.3).
    Decompose,
    /// The OSCORE option of an already protected message: protecting again is an error.
    Refuse,
}

/// Where option `number` of a plain request or response goes when protected.
///
/// Observe: in requests both, with the same value (§4.1.3.5.1); in responses the value goes
/// outer and the inner one is empty (§4.1.3.5.2), which `protect_response` does. The other
/// E-and-U options (Max-Age, No-Response, Block*, Size*) of a plain message are the
/// endpoint's own and go inner, like aiocoap does; outer copies are a hop's business.
pub fn placement(number: u16) -> Placement {
    match number {
        number::OSCORE => Placement::Refuse,
        number::PROXY_URI => Placement::Decompose,
        number::OBSERVE => Placement::InnerAndOuter,
        _ => match class(number) {
            OptionClass::U => Placement::Outer,
            OptionClass::E | OptionClass::EAndU => Placement::Inner,
        },
    }
}

/// Whether an outer option of a received OSCORE message is kept in the unprotected result.
/// Class U options of requests (Uri-Host, Uri-Port, Proxy-Scheme, Hop-Limit) are kept so the
/// layer above can route and loop-protect; Observe is handled by §4.1.3.5 separately; the
/// OSCORE option and outer copies of E-and-U options (Max-Age, Block*, ...) are dropped.
pub fn keep_outer_on_unprotect(number: u16, is_request: bool) -> bool {
    is_request && number != number::OSCORE && class(number) == OptionClass::U
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_rfc8613_section_4_1() {
        for n in [
            number::URI_HOST,
            number::URI_PORT,
            number::PROXY_SCHEME,
            number::PROXY_URI,
            number::OSCORE,
            number::HOP_LIMIT,
        ] {
            assert_eq!(class(n), OptionClass::U, "{n}");
        }
        for n in [
            number::OBSERVE,
            number::MAX_AGE,
            number::NO_RESPONSE,
            number::BLOCK1,
            number::BLOCK2,
            number::SIZE1,
            number::SIZE2,
        ] {
            assert_eq!(class(n), OptionClass::EAndU, "{n}");
        }
        for n in [
            number::IF_MATCH,
            number::ETAG,
            number::IF_NONE_MATCH,
            number::LOCATION_PATH,
            number::URI_PATH,
            number::CONTENT_FORMAT,
            number::URI_QUERY,
            number::ACCEPT,
            number::LOCATION_QUERY,
            number::ECHO,
            number::REQUEST_TAG,
            // unknown options, critical or not
            2,
            65000,
            65001,
        ] {
            assert_eq!(class(n), OptionClass::E, "{n}");
        }
    }

    #[test]
    fn placement_of_plain_options() {
        assert_eq!(placement(number::URI_PATH), Placement::Inner);
        assert_eq!(placement(number::URI_HOST), Placement::Outer);
        assert_eq!(placement(number::HOP_LIMIT), Placement::Outer);
        assert_eq!(placement(number::PROXY_URI), Placement::Decompose);
        assert_eq!(placement(number::OSCORE), Placement::Refuse);
        assert_eq!(placement(number::OBSERVE), Placement::InnerAndOuter);
        assert_eq!(placement(number::BLOCK2), Placement::Inner);
        assert_eq!(placement(number::BLOCK1), Placement::Inner);
        assert_eq!(placement(number::SIZE2), Placement::Inner);
        assert_eq!(placement(number::MAX_AGE), Placement::Inner);
        assert_eq!(placement(number::NO_RESPONSE), Placement::Inner);
        assert_eq!(placement(4711), Placement::Inner);
    }

    #[test]
    fn outer_options_kept_on_unprotect() {
        assert!(keep_outer_on_unprotect(number::URI_HOST, true));
        assert!(keep_outer_on_unprotect(number::HOP_LIMIT, true));
        assert!(!keep_outer_on_unprotect(number::OSCORE, true));
        assert!(!keep_outer_on_unprotect(number::MAX_AGE, true));
        assert!(!keep_outer_on_unprotect(number::BLOCK2, false));
        assert!(!keep_outer_on_unprotect(number::URI_HOST, false));
    }
}
