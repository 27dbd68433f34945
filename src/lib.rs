//! oscore-gateway: an edge gateway for OSCORE (RFC 8613).
//!
//! Protocol code (`coap`, `oscore`) is sans-IO; files live in `credentials`, sockets in
//! `client` (and later `transport`).

pub mod client;
pub mod coap;
pub mod credentials;
pub mod oscore;
