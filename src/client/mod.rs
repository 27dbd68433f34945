//! The OSCORE-capable CoAP client behind `oscore-gateway request` (an I/O edge).

pub mod request;
pub mod transport;

pub use request::{run_request, ClientError, ClientResponse, Plain, Protection, RequestSpec};
pub use transport::{resolve, TransmissionParams, UdpClient};
