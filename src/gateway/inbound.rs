//! Requests that carry an OSCORE option (issue 4; DESIGN.md §1 paths 2 and 3), and the
//! access rules of routes.
//!
//! Decision, in this order:
//! 1. kid (and kid context) of one of our server-side contexts → inbound: verify
//!    (RFC 8613 §8.2, replay window §7.4), route the decrypted request by `[[route]]`
//!    (the outer Uri-Host is kept by `unprotect_request`, the path is the inner one), check
//!    the route's `allow`, forward it in plain to the device, protect the device's response
//!    back (§8.3);
//! 2. no context of ours and a forward target → pass-through (`passthrough`);
//! 3. no context of ours, nowhere to forward → 4.01 "Security context not found".
//!
//! Errors before the request verified are unprotected and follow aiocoap
//! (`OscoreError::server_response`, research note §5.1); after it verified, every answer
//! (4.03, 4.04, 5.0x from the upstream leg) is protected. A replay is answered 4.01
//! "Replay detected" with Max-Age 0 and never forwarded. After a restart without a saved
//! replay window (App. B.1.2) a verified request is answered with a protected 4.01 + Echo
//! (our own Partial IV) and not forwarded; the retry carrying that Echo initialises the
//! window and is forwarded, its response again with our own Partial IV.
//!
//! Logs name the client by its credential label and kid, never key material or payloads.

use crate::client::transport::{random_bytes, TransportError};
use crate::client::{resolve, Plain};
use crate::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use crate::config::Route;
use crate::oscore::params::HexBytes;
use crate::oscore::{
    parse_request_kid, protect_response, unprotect_request, ErrorResponse, OscoreError,
    RequestBinding,
};

use super::passthrough::{context_not_found, passthrough_target};
use super::server_contexts::ServerContext;
use super::target::{
    build_upstream_request, forwarded_hop_limit, resolve_target, Refusal, Target, TargetKind,
};
use super::upstream::UpstreamError;
use super::Gateway;

/// For a plain request resolved to route `index`: 4.01 if the route accepts OSCORE only.
pub fn refuse_plain(route: &Route, index: usize) -> Result<(), Refusal> {
    if route.refuses_plain() {
        tracing::info!("plain request on route[{index}], which requires OSCORE: 4.01");
        return Err(Refusal::new(
            Code::UNAUTHORIZED,
            "OSCORE required: this resource accepts only OSCORE-protected requests",
        ));
    }
    Ok(())
}

/// An unprotected error response (code, optional outer Max-Age 0, UTF-8 diagnostic); the
/// server re-addresses it to the client's exchange.
fn error_datagram(e: ErrorResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + e.diagnostic.len());
    if let Ok(mut b) = MessageBuilder::new(&mut out, MessageType::Acknowledgement, e.code, 0, &[]) {
        if e.max_age_zero {
            let _ = b.option(number::MAX_AGE, &[]);
        }
        b.payload(e.diagnostic.as_bytes());
    }
    out
}

/// A plain response datagram for the gateway's own answer (to be protected).
pub(super) fn refusal_datagram(r: &Refusal) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + r.diagnostic.len());
    if let Ok(b) = MessageBuilder::new(&mut out, MessageType::Acknowledgement, r.code, 0, &[]) {
        b.payload(r.diagnostic.as_bytes());
    }
    out
}

/// The decrypted request without what was meant for the gateway itself: the Echo of
/// App. B.1.2 (answered here) and, unless `keep_observe` (the Observe relay,
/// `inbound_observe`), Observe (this path makes one exchange per request and cannot relay
/// notifications, so it does not register at the device; the client sees a response
/// without Observe, i.e. not registered, RFC 7641 §3.1).
pub(super) fn for_device(
    inner: &MessageView<'_>,
    keep_observe: bool,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let internal = |e: crate::coap::CodecError| {
        Refusal::new(
            Code::INTERNAL_SERVER_ERROR,
            format!("cannot rebuild the request: {e}"),
        )
    };
    let mut b = MessageBuilder::new(out, inner.mtype, inner.code, inner.message_id, inner.token)
        .map_err(internal)?;
    for o in inner.options() {
        if o.number != number::ECHO && (keep_observe || o.number != number::OBSERVE) {
            b.option(o.number, o.value).map_err(internal)?;
        }
    }
    b.payload(inner.payload);
    Ok(())
}

fn link_refusal(e: UpstreamError, target: &Target) -> Refusal {
    let uri = target.uri.matching_uri();
    if e.is_timeout() {
        Refusal::new(
            Code::GATEWAY_TIMEOUT,
            format!("device {uri} did not answer: {e}"),
        )
    } else {
        Refusal::new(Code::BAD_GATEWAY, format!("device {uri}: {e}"))
    }
}

fn upstream_refusal(e: TransportError, target: &Target) -> Refusal {
    let uri = target.uri.matching_uri();
    match e {
        TransportError::Timeout { attempts, .. } => Refusal::new(
            Code::GATEWAY_TIMEOUT,
            format!("device {uri} did not answer ({attempts} transmissions)"),
        ),
        other => Refusal::new(Code::BAD_GATEWAY, format!("device {uri}: {other}")),
    }
}

impl Gateway {
    /// The decision for a request with an OSCORE option; returns the response datagram
    /// (the caller re-addresses it) or a refusal (unprotected, with a diagnostic).
    pub(super) async fn handle_protected(
        &self,
        request: &MessageView<'_>,
    ) -> Result<Vec<u8>, Refusal> {
        let kid = parse_request_kid(request);
        if let Ok(k) = &kid {
            if let Some(sc) = self.server.lookup(k) {
                return Ok(self.inbound(sc, request).await);
            }
        }
        if let Some(target) = passthrough_target(request, &self.config.routes)? {
            let hop_limit = forwarded_hop_limit(request, self.config.policy.hop_limit)?;
            let uri = target.uri.matching_uri();
            tracing::info!(
                "pass-through: OSCORE request (kid {}) for a context we do not hold, forwarded untouched to {uri}",
                kid.as_ref().map_or("(none)".to_string(), |k| HexBytes(k.kid).to_string())
            );
            return self
                .forward_bounded(&Plain, request, &target, hop_limit)
                .await;
        }
        match kid {
            Ok(k) => {
                tracing::info!(
                    "OSCORE request with kid {} and no forward target: no security context: 4.01",
                    HexBytes(k.kid)
                );
                Err(context_not_found())
            }
            Err(e) => {
                tracing::info!("OSCORE request without a usable kid: {e}");
                Err(match e.server_response() {
                    Some(r) => Refusal::new(r.code, r.diagnostic),
                    None => context_not_found(),
                })
            }
        }
    }

    /// Path 1: verify with `sc`, forward in plain, protect the answer.
    async fn inbound(&self, sc: &ServerContext, request: &MessageView<'_>) -> Vec<u8> {
        let (binding, plain) = match self.verify_inbound(sc, request).await {
            Ok(x) => x,
            Err(answer) => return answer,
        };
        let label = sc.label.as_str();
        let response = match MessageView::parse(&plain) {
            Ok(inner) => match self.inbound_forward(sc, &inner).await {
                Ok(r) => r,
                Err(refusal) => {
                    tracing::info!("{label}: {} {}", refusal.code, refusal.diagnostic);
                    refusal_datagram(&refusal)
                }
            },
            // unprotect_request has parsed it already; kept for robustness
            Err(e) => refusal_datagram(&Refusal::new(
                Code::BAD_REQUEST,
                format!("malformed inner request: {e}"),
            )),
        };
        self.protect_back(sc, &binding, &response).await
    }

    /// Verifies `request` with `sc` (RFC 8613 §8.2, replay window §7.4, App. B.1.2 Echo):
    /// the binding and the decrypted request, or the answer for the client (an error or
    /// the protected 4.01 + Echo challenge).
    pub(super) async fn verify_inbound(
        &self,
        sc: &ServerContext,
        request: &MessageView<'_>,
    ) -> Result<(RequestBinding, Vec<u8>), Vec<u8>> {
        let ctx = sc.protection.security_context();
        let label = sc.label.as_str();
        let mut plain = Vec::with_capacity(request.payload.len() + 64);
        let binding = match unprotect_request(ctx, request, &mut plain) {
            Ok(b) => b,
            Err(OscoreError::ReplayWindowUninitialized(u)) => {
                match u.accept_with_echo(ctx, self.server.echo()) {
                    Ok(b) => {
                        tracing::info!(
                            "{label}: freshness proven by Echo (RFC 8613 App. B.1.2); replay window starts at {}",
                            u.sequence_number
                        );
                        b
                    }
                    Err(OscoreError::EchoMismatch) => {
                        tracing::info!(
                            "{label}: replay window unknown (restart, RFC 8613 App. B.1.2): protected 4.01 with Echo; request {} not forwarded",
                            u.sequence_number
                        );
                        let mut challenge = Vec::with_capacity(16);
                        if let Ok(mut b) = MessageBuilder::new(
                            &mut challenge,
                            MessageType::Acknowledgement,
                            Code::UNAUTHORIZED,
                            0,
                            &[],
                        ) {
                            let _ = b.option(number::ECHO, self.server.echo());
                            b.finish();
                        }
                        return Err(self.protect_back(sc, &u.binding, &challenge).await);
                    }
                    Err(e) => return Err(verification_failed(label, &e)),
                }
            }
            Err(e) => return Err(verification_failed(label, &e)),
        };
        Ok((binding, plain))
    }

    /// Routes the verified request, applies the route's `allow`, and sends it upstream.
    pub(super) async fn inbound_forward(
        &self,
        sc: &ServerContext,
        inner: &MessageView<'_>,
    ) -> Result<Vec<u8>, Refusal> {
        let (target, hop_limit) = self.inbound_route(sc, inner)?;
        let uri = target.uri.matching_uri();
        let mut request = Vec::with_capacity(inner.payload.len() + 64);
        for_device(inner, false, &mut request)?;
        let request = MessageView::parse(&request).map_err(|e| {
            Refusal::new(
                Code::INTERNAL_SERVER_ERROR,
                format!("cannot rebuild the request: {e}"),
            )
        })?;
        let timeout = self.config.policy.upstream_timeout;
        let timed_out = || {
            Refusal::new(
                Code::GATEWAY_TIMEOUT,
                format!("device {uri} did not answer within {timeout:?}"),
            )
        };
        // A target that has a credential is OSCORE-only: never sent in plain text.
        if let Some(protection) = self.oscore_protection_for(&target).await? {
            return self
                .forward_bounded(&*protection, &request, &target, hop_limit)
                .await;
        }
        // Like `tokio::time::timeout` (the exchange is polled first), without a timer per
        // request (`deadlines`).
        tokio::select! {
            biased;
            r = self.device_exchange(sc, &request, &target, hop_limit) => r,
            _ = self.upstream_deadline.wait() => Err(timed_out()),
        }
    }

    /// The verified request's target and Hop-Limit, after the route's `allow`.
    pub(super) fn inbound_route(
        &self,
        sc: &ServerContext,
        inner: &MessageView<'_>,
    ) -> Result<(Target, u8), Refusal> {
        let label = sc.label.as_str();
        let hop_limit = forwarded_hop_limit(inner, self.config.policy.hop_limit)?;
        let target = resolve_target(inner, &self.config.routes)?;
        let uri = target.uri.matching_uri();
        if let TargetKind::Route(i) = target.kind {
            if let Some(route) = self.config.routes.get(i) {
                if !route.allows_label(label) {
                    tracing::info!("{label}: not in route[{i}].allow ({uri}): 4.03");
                    return Err(Refusal::new(
                        Code::FORBIDDEN,
                        "this client is not allowed to use this resource",
                    ));
                }
            }
        }
        tracing::info!("{label}: inbound {} to {uri}", inner.code);
        Ok((target, hop_limit))
    }

    /// One plain exchange with the device over this client's link to it.
    async fn device_exchange(
        &self,
        sc: &ServerContext,
        request: &MessageView<'_>,
        target: &Target,
        hop_limit: u8,
    ) -> Result<Vec<u8>, Refusal> {
        let peer = resolve(&target.uri.host, target.uri.effective_port())
            .await
            .map_err(|e| upstream_refusal(e, target))?;
        let token = random_bytes::<8>();
        let mut out = Vec::with_capacity(request.payload.len() + 64);
        // Message ID 0: the link sets this leg's own.
        build_upstream_request(request, target, hop_limit, None, 0, &token, &mut out)?;
        let response = sc
            .upstream
            .exchange(peer, out)
            .await
            .map_err(|e| link_refusal(e, target))?;
        let ok = MessageView::parse(&response).is_ok_and(|v| v.code.is_response());
        if !ok {
            return Err(Refusal::new(
                Code::BAD_GATEWAY,
                format!(
                    "device {} sent something that is not a response",
                    target.uri.matching_uri()
                ),
            ));
        }
        Ok(response)
    }

    /// Protects `response` (a plain datagram) for the request of `binding`: the request's
    /// nonce when allowed, else our own Partial IV (App. B.1.2).
    pub(super) async fn protect_back(
        &self,
        sc: &ServerContext,
        binding: &RequestBinding,
        response: &[u8],
    ) -> Vec<u8> {
        protect_for_client(sc, binding, response, false).await
    }
}

/// Protects a device's Observe notification (a plain datagram with an Observe option) for
/// the client whose registration `binding` came from: always with our own Partial IV
/// (RFC 8613 §4.1.3.5.2, §7.4.1: notifications are ordered by it; aiocoap does the same).
/// For the Observe relay: the binding is the one `unprotect_request` returned for the
/// registration. Failures become an unprotected 5.0x datagram.
pub async fn protect_notification(
    sc: &ServerContext,
    binding: &RequestBinding,
    notification: &[u8],
) -> Vec<u8> {
    protect_for_client(sc, binding, notification, true).await
}

async fn protect_for_client(
    sc: &ServerContext,
    binding: &RequestBinding,
    response: &[u8],
    own_piv_always: bool,
) -> Vec<u8> {
    let label = sc.label.as_str();
    let own_piv = if binding.can_reuse_nonce && !own_piv_always {
        None
    } else {
        match sc.protection.persister().next_sequence_number_async().await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("{label}: no sequence number for the response: {e}");
                return error_datagram(ErrorResponse {
                    code: Code::SERVICE_UNAVAILABLE,
                    diagnostic: "security context unusable",
                    max_age_zero: false,
                });
            }
        }
    };
    let mut out = Vec::with_capacity(response.len() + 32);
    let protected = MessageView::parse(response)
        .map_err(OscoreError::from)
        .and_then(|view| {
            protect_response(
                sc.protection.security_context(),
                binding,
                own_piv,
                &view,
                &mut out,
            )
        });
    match protected {
        Ok(()) => out,
        Err(e) => {
            tracing::warn!("{label}: cannot protect the response: {e}");
            error_datagram(ErrorResponse {
                code: Code::INTERNAL_SERVER_ERROR,
                diagnostic: "Internal Server Error",
                max_age_zero: false,
            })
        }
    }
}

/// The unprotected answer to a request that did not verify (aiocoap's codes).
fn verification_failed(label: &str, e: &OscoreError) -> Vec<u8> {
    tracing::info!("{label}: request refused: {e}");
    error_datagram(e.server_response().unwrap_or(ErrorResponse {
        code: Code::INTERNAL_SERVER_ERROR,
        diagnostic: "",
        max_age_zero: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_answer_is_unprotected_401_with_max_age_0() {
        let d = error_datagram(OscoreError::Replay(5).server_response().unwrap());
        let v = MessageView::parse(&d).unwrap();
        assert_eq!(v.code, Code::UNAUTHORIZED);
        assert_eq!(v.option(number::MAX_AGE), Some(&[][..]));
        assert!(!v.has_option(number::OSCORE));
        assert_eq!(v.payload, b"Replay detected");
    }

    #[test]
    fn echo_and_observe_do_not_reach_the_device() {
        let mut m = Vec::new();
        let mut b =
            MessageBuilder::new(&mut m, MessageType::Confirmable, Code::GET, 3, &[7]).unwrap();
        b.option(number::OBSERVE, &[]).unwrap();
        b.option(number::URI_PATH, b"x").unwrap();
        b.option(number::BLOCK2, &[0x06]).unwrap();
        b.option(number::ECHO, &[1; 8]).unwrap();
        b.finish();
        let mut out = Vec::new();
        for_device(&MessageView::parse(&m).unwrap(), false, &mut out).unwrap();
        let v = MessageView::parse(&out).unwrap();
        let numbers: Vec<u16> = v.options().map(|o| o.number).collect();
        assert_eq!(numbers, vec![number::URI_PATH, number::BLOCK2]);
        // the Observe relay keeps Observe (still without Echo)
        for_device(&MessageView::parse(&m).unwrap(), true, &mut out).unwrap();
        let v = MessageView::parse(&out).unwrap();
        let numbers: Vec<u16> = v.options().map(|o| o.number).collect();
        assert_eq!(
            numbers,
            vec![number::OBSERVE, number::URI_PATH, number::BLOCK2]
        );
    }

    #[test]
    fn notifications_carry_their_own_partial_iv() {
        use crate::credentials::CredentialsMap;
        use crate::gateway::{ContextCache, ServerContexts};
        use crate::oscore::{
            protect_request, unprotect_response, ContextParams, ReplayWindow, SecurityContext,
            SenderSequenceNumber,
        };

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("from-client1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("settings.json"),
            r#"{"sender-id_ascii": "gw", "recipient-id_hex": "01", "secret_ascii": "Correct Horse Battery Staple"}"#,
        )
        .unwrap();
        let json = format!(r#"{{":client1": {{"oscore": {{"basedir": {dir:?}}}}}}}"#);
        let map = CredentialsMap::from_json(&json, &tmp.path().join("c.json")).unwrap();
        let cache = ContextCache::new();
        let server = ServerContexts::load(&map, &cache).unwrap();
        let server_params = crate::credentials::load_context_params(&dir).unwrap();
        let client_params = ContextParams {
            sender_id: server_params.recipient_id.clone(),
            recipient_id: server_params.sender_id.clone(),
            master_secret: server_params.master_secret.clone(),
            master_salt: server_params.master_salt.clone(),
            id_context: None,
            aead: server_params.aead,
            hkdf: server_params.hkdf,
            replay_window: server_params.replay_window,
        };
        let client = SecurityContext::derive(&client_params, ReplayWindow::new_empty(32)).unwrap();

        // an Observe registration from the client, verified by the gateway
        let mut req = Vec::new();
        let mut b =
            MessageBuilder::new(&mut req, MessageType::Confirmable, Code::GET, 1, &[5]).unwrap();
        b.option(number::OBSERVE, &[]).unwrap();
        b.option(number::URI_PATH, b"temp").unwrap();
        b.finish();
        let mut wire = Vec::new();
        let client_binding = protect_request(
            &client,
            SenderSequenceNumber(3),
            &MessageView::parse(&req).unwrap(),
            &mut wire,
        )
        .unwrap();
        let kid = parse_request_kid(&MessageView::parse(&wire).unwrap()).unwrap();
        let sc = server.lookup(&kid).unwrap();
        let mut plain = Vec::new();
        let binding = unprotect_request(
            sc.protection.security_context(),
            &MessageView::parse(&wire).unwrap(),
            &mut plain,
        )
        .unwrap();

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut pivs = Vec::new();
        for (seq, text) in [(7u8, "21.0"), (8, "21.5"), (9, "22.0")] {
            let mut n = Vec::new();
            let mut b =
                MessageBuilder::new(&mut n, MessageType::NonConfirmable, Code::CONTENT, 9, &[5])
                    .unwrap();
            b.option(number::OBSERVE, &[seq]).unwrap();
            b.payload(text.as_bytes());
            let protected = rt.block_on(protect_notification(sc, &binding, &n));
            let view = MessageView::parse(&protected).unwrap();
            assert!(view.has_option(number::OBSERVE));
            let mut inner = Vec::new();
            let info = unprotect_response(&client, &client_binding, &view, &mut inner).unwrap();
            assert_eq!(MessageView::parse(&inner).unwrap().payload, text.as_bytes());
            pivs.push(info.partial_iv.expect("own Partial IV"));
        }
        assert!(pivs.windows(2).all(|w| w[0] < w[1]), "{pivs:?}");
        assert!(rt.block_on(cache.close_all()).is_empty());
    }

    #[test]
    fn plain_refused_only_on_protected_routes() {
        let mut r = Route {
            match_path: Vec::new(),
            match_host: None,
            target: crate::coap::CoapUri::parse("coap://127.0.0.1:1").unwrap(),
            strip_prefix: false,
            passthrough: false,
            require_oscore: false,
            allow: Vec::new(),
        };
        assert!(refuse_plain(&r, 0).is_ok());
        r.require_oscore = true;
        assert_eq!(refuse_plain(&r, 0).unwrap_err().code, Code::UNAUTHORIZED);
        r.require_oscore = false;
        r.allow = vec![":client1".into()];
        assert_eq!(refuse_plain(&r, 0).unwrap_err().code, Code::UNAUTHORIZED);
    }
}
