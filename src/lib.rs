//! oscore-gateway: an edge gateway for OSCORE (RFC 8613).
//!
//! Protocol code (`coap`, `oscore`) is sans-IO; files live in `credentials`, sockets in
//! `client` and `gateway::server`; `config` reads proxy.toml; `gateway` decides per request.

pub mod client;
pub mod coap;
pub mod config;
pub mod credentials;
pub mod gateway;
pub mod load;
pub mod oscore;
pub mod prefetch;
