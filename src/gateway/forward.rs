//! The upstream leg of one request: a fresh token and Message ID toward the origin, the
//! request protected (or plain when the policy allows it), CON with retransmission over
//! the origin's shared link (`upstream`), the response verified, and one retry with the origin's Echo when it has
//! lost its replay window (RFC 8613 App. B.1.2, RFC 9175 §2.4).
//!
//! Errors become the gateway's answer (RFC 7252 §5.9.3): 5.04 when the origin does not
//! answer, 5.02 when the answer is not a valid (verified) response, 5.03 when the security
//! context cannot be used.

use crate::client::transport::{random_bytes, TransportError};
use crate::client::{resolve, ClientError, Protection};
use crate::coap::{number, Code, MessageView};

use super::target::{build_upstream_request, Refusal, Target};
use super::upstream::{Upstream, UpstreamError};

/// Maps a failure of the upstream message layer to the gateway's response.
fn link_refusal(e: UpstreamError, target: &Target) -> Refusal {
    let uri = target.uri.matching_uri();
    if e.is_timeout() {
        Refusal::new(
            Code::GATEWAY_TIMEOUT,
            format!("origin {uri} did not answer: {e}"),
        )
    } else {
        Refusal::new(Code::BAD_GATEWAY, format!("origin {uri}: {e}"))
    }
}

/// Maps a failure of the upstream leg to the gateway's response.
fn refusal(e: ClientError, target: &Target) -> Refusal {
    let uri = target.uri.matching_uri();
    match e {
        ClientError::Transport(TransportError::Timeout { attempts, .. }) => Refusal::new(
            Code::GATEWAY_TIMEOUT,
            format!("origin {uri} did not answer ({attempts} transmissions)"),
        ),
        ClientError::Transport(e) => Refusal::new(Code::BAD_GATEWAY, format!("origin {uri}: {e}")),
        ClientError::Context(e) => Refusal::new(
            Code::SERVICE_UNAVAILABLE,
            format!("OSCORE context for {uri} unusable: {e}"),
        ),
        ClientError::Oscore(e) => Refusal::new(
            Code::BAD_GATEWAY,
            format!("response from {uri} failed OSCORE verification: {e}"),
        ),
        other => Refusal::new(Code::BAD_GATEWAY, format!("origin {uri}: {other}")),
    }
}

/// Sends `request` (the client's, with its target options) to `target` through
/// `protection` and returns the plain response datagram (origin's header; the caller
/// re-addresses it to the client).
pub async fn forward<P: Protection>(
    protection: &P,
    request: &MessageView<'_>,
    target: &Target,
    hop_limit: u8,
    upstream: &Upstream,
) -> Result<Vec<u8>, Refusal> {
    let peer = resolve(&target.uri.host, target.uri.effective_port())
        .await
        .map_err(|e| refusal(e.into(), target))?;
    let mut plain = Vec::with_capacity(request.payload.len() + 128);
    let mut wire = Vec::with_capacity(request.payload.len() + 160);
    let mut out = Vec::with_capacity(1200);
    let mut echo: Option<Vec<u8>> = None;
    loop {
        // The link sets this leg's Message ID; the token is fresh per upstream request.
        let mid = 0;
        let token = random_bytes::<8>();
        build_upstream_request(
            request,
            &target.uri,
            hop_limit,
            echo.as_deref(),
            mid,
            &token,
            &mut plain,
        )?;
        let binding = protection
            .protect(&plain, &mut wire)
            .await
            .map_err(|e| refusal(e, target))?;
        let response = upstream
            .exchange(peer, std::mem::take(&mut wire))
            .await
            .map_err(|e| link_refusal(e, target))?;
        protection
            .unprotect(&binding, &response, &mut out)
            .map_err(|e| refusal(e, target))?;
        let view = MessageView::parse(&out).map_err(|e| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("malformed response from {}: {e}", target.uri.matching_uri()),
            )
        })?;
        if !view.code.is_response() {
            return Err(Refusal::new(
                Code::BAD_GATEWAY,
                format!(
                    "origin {} answered with {} instead of a response code",
                    target.uri.matching_uri(),
                    view.code
                ),
            ));
        }
        // App. B.1.2: the origin lost its replay window and asks for freshness. The client
        // did not send that Echo (it cannot see inside OSCORE), so the gateway repeats the
        // request once with it, under a new sequence number.
        if protection.is_oscore()
            && view.code == Code::UNAUTHORIZED
            && echo.is_none()
            && !request.has_option(number::ECHO)
        {
            if let Some(e) = view.option(number::ECHO) {
                echo = Some(e.to_vec());
                continue;
            }
        }
        return Ok(out);
    }
}
