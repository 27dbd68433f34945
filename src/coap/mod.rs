//! CoAP over UDP (RFC 7252 §3): a strict codec with a borrowed view and an allocation-free builder.
