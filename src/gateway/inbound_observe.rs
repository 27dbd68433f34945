//! Observe from an OSCORE client to a plain device (issue 4, Build item 2; RFC 7641,
//! RFC 8613 §4.1.3.5, §7.4.1), on the relay machinery of `observe`.
//!
//! A verified request whose inner Observe is 0 (a GET/FETCH without Block1) on a route to a
//! plain device (no credential for the target) becomes a plain observation at the device:
//! `observe::Observations::register` with a plain upstream leg (`protection: None`, the
//! relation's own socket and token) and an OSCORE downstream (`Downstream::Oscore`): each
//! device notification is protected under the registration's binding with the gateway's
//! own Partial IV (`inbound::protect_notification`) and sent to the client with its token.
//! The device's final response ends the relation. Cancellation as for the outbound relay:
//! the client's RST to a notification, its new OSCORE request with Observe: 1 on the same
//! token (answered with the device's response, protected under that request), or gateway
//! shutdown; all bounded by `observe.max_relations`.
//!
//! Anything else (another Observe value, a target with an OSCORE credential, a pass-through
//! or unknown kid) goes the ordinary way (`handle_protected`), i.e. one response, not
//! registered.

use std::sync::Arc;

use crate::coap::{number, Code, MessageView};
use crate::oscore::parse_request_kid;

use super::contexts::find_credential;
use super::inbound::{for_device, refusal_datagram};
use super::observe::{request_observe, ClientLink, Downstream, Registration};
use super::server_contexts::ServerContext;
use super::target::Refusal;
use super::Gateway;

impl Gateway {
    /// A request with an OSCORE option and an outer Observe option.
    pub(super) async fn handle_protected_observe(
        &self,
        request: &MessageView<'_>,
        client: ClientLink,
    ) -> Result<Vec<u8>, Refusal> {
        if let Ok(kid) = parse_request_kid(request) {
            if let Some(sc) = self.server.lookup(&kid) {
                let sc = Arc::clone(sc);
                return Ok(self.inbound_observe(sc, request, client).await);
            }
        }
        self.handle_request_from(client.peer, request).await
    }

    /// Verifies the request, then registers, deregisters or forwards it; the (protected)
    /// answer for the client.
    async fn inbound_observe(
        &self,
        sc: Arc<ServerContext>,
        request: &MessageView<'_>,
        client: ClientLink,
    ) -> Vec<u8> {
        let (binding, plain) = match self.verify_inbound(&sc, request).await {
            Ok(x) => x,
            Err(answer) => return answer,
        };
        let label = sc.label.as_str();
        let inner = match MessageView::parse(&plain) {
            Ok(v) => v,
            Err(e) => {
                let r = Refusal::new(Code::BAD_REQUEST, format!("malformed inner request: {e}"));
                return self
                    .protect_back(&sc, &binding, &refusal_datagram(&r))
                    .await;
            }
        };
        let relayable =
            matches!(inner.code, Code::GET | Code::FETCH) && !inner.has_option(number::BLOCK1);
        // Registration: inner Observe 0 (kept by `unprotect_request` only under an outer
        // Observe 0); deregistration: outer Observe 1 (its inner Observe is dropped, as
        // aiocoap does, RFC 8613 §4.1.3.5.1).
        let observe = match (request_observe(request), request_observe(&inner)) {
            (Some(1), _) => Some(1),
            (_, Some(0)) => Some(0),
            _ => None,
        }
        .filter(|_| relayable);
        let peer = client.peer;
        // The request for the device: without the gateway's Echo, with Observe.
        let mut device_request = Vec::with_capacity(plain.len());
        let answer = match for_device(&inner, true, &mut device_request) {
            Err(r) => Err(r),
            Ok(()) => match (observe, MessageView::parse(&device_request)) {
                (Some(0), Ok(dev)) => {
                    let binding = binding.clone();
                    match self
                        .register_inbound(&sc, &dev, &device_request, binding, client)
                        .await
                    {
                        // already protected for the client
                        Some(Ok(protected)) => return protected,
                        Some(Err(r)) => Err(r),
                        None => self.inbound_forward(&sc, &inner).await,
                    }
                }
                (Some(1), Ok(dev)) => {
                    match self
                        .observations
                        .deregister(peer, &dev, &device_request, true)
                        .await
                    {
                        Some(r) => {
                            tracing::info!("{label}: deregistered its observation");
                            r
                        }
                        None => {
                            tracing::info!(
                                "{label}: Observe: 1 from {peer} on token {} matches no observation",
                                crate::oscore::params::HexBytes(dev.token)
                            );
                            self.inbound_forward(&sc, &inner).await
                        }
                    }
                }
                _ => self.inbound_forward(&sc, &inner).await,
            },
        };
        let response = answer.unwrap_or_else(|refusal| {
            tracing::info!("{label}: {} {}", refusal.code, refusal.diagnostic);
            refusal_datagram(&refusal)
        });
        self.protect_back(&sc, &binding, &response).await
    }

    /// `None`: the target is not a plain device (it has an OSCORE credential); the
    /// request is then forwarded once, without registering.
    async fn register_inbound(
        &self,
        sc: &Arc<ServerContext>,
        request: &MessageView<'_>,
        datagram: &[u8],
        binding: crate::oscore::RequestBinding,
        client: ClientLink,
    ) -> Option<Result<Vec<u8>, Refusal>> {
        let (target, hop_limit) = match self.inbound_route(sc, request) {
            Ok(x) => x,
            Err(r) => return Some(Err(r)),
        };
        if let Some(map) = &self.credentials {
            // find_credential's error also means "not a plain device"
            if !matches!(find_credential(map, &target.uri), Ok(None)) {
                return None;
            }
        }
        tracing::info!(
            "{}: observing {} for the OSCORE client",
            sc.label,
            target.uri.matching_uri()
        );
        let reg = Registration {
            request,
            datagram,
            target: &target,
            hop_limit,
            protection: None,
            downstream: Downstream::Oscore {
                sc: Arc::clone(sc),
                binding,
            },
            ack_timeout: self.config.upstream.ack_timeout,
            timeout: self.config.policy.upstream_timeout,
        };
        Some(self.observations.register(reg, client).await)
    }
}
