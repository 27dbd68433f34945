//! The upstream leg of one request: a fresh token and Message ID toward the origin, the
//! request protected (or plain when the policy allows it), CON with retransmission
//! (`UdpClient`), the response verified, and one retry with the origin's Echo when it has
//! lost its replay window (RFC 8613 App. B.1.2, RFC 9175 §2.4).
//!
//! Errors become the gateway's answer (RFC 7252 §5.9.3): 5.04 when the origin does not
//! answer, 5.02 when the answer is not a valid (verified) response, 5.03 when the security
//! context cannot be used.

use crate::client::request::echo_to_repeat;
use crate::client::transport::{random_bytes, TransportError};
use crate::client::{resolve, ClientError, Protection};
use crate::coap::option::encode_uint;
use crate::coap::{number, BlockValue, Code, MessageView};
use crate::oscore::params::HexBytes;

use super::blockwise::{
    needs_upstream_block1, outer_block1_fragment, outer_block1_szx, outer_block2_request,
    upstream_block, with_block1, BlockwiseError, Limits, OuterBlock2, RequestTags, UPSTREAM_SZX,
};
use super::target::{build_upstream_request_with, Refusal, Target, UpstreamBody};
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

fn blockwise_refusal(e: BlockwiseError, target: &Target) -> Refusal {
    Refusal::new(
        Code::BAD_GATEWAY,
        format!(
            "block-wise exchange with {}: {e}",
            target.uri.matching_uri()
        ),
    )
}

/// Sends `request` (the client's, with its target options) to `target` through
/// `protection` and returns the plain response datagram (origin's header; the caller
/// re-addresses it to the client).
///
/// A body larger than one upstream block that the client did not cut itself goes as inner
/// Block1 of SZX 6 with a fresh Request-Tag (RFC 7959 §2.5, RFC 9175 §3), every block over
/// the same socket; the final response is returned without the origin's Block1 (it
/// answers the gateway's blocks, not the client's).
pub async fn forward<P: Protection>(
    protection: &P,
    request: &MessageView<'_>,
    target: &Target,
    hop_limit: u8,
    upstream: &Upstream,
    limits: &Limits,
    tags: &RequestTags,
) -> Result<Vec<u8>, Refusal> {
    let peer = match target.ip {
        Some(ip) => std::net::SocketAddr::new(ip, target.uri.effective_port()),
        None => resolve(&target.uri.host, target.uri.effective_port())
            .await
            .map_err(|e| refusal(e.into(), target))?,
    };
    let mut leg = Leg {
        upstream,
        peer,
        protection,
        request,
        target,
        hop_limit,
        limits,
    };
    if !needs_upstream_block1(request) {
        let whole = UpstreamBody {
            options: &[],
            payload: request.payload,
        };
        return leg.exchange(whole).await;
    }
    let body = request.payload;
    let tag = tags.next_tag();
    tracing::info!(
        "{}: {} bytes upstream as Block1 SZX {UPSTREAM_SZX} with Request-Tag {}",
        target.uri.matching_uri(),
        body.len(),
        HexBytes(&tag)
    );
    let (mut offset, mut szx) = (0usize, UPSTREAM_SZX);
    loop {
        let (block, range) =
            upstream_block(body.len(), offset, szx).map_err(|e| blockwise_refusal(e, target))?;
        let (mut b1, mut s1) = ([0u8; 8], [0u8; 8]);
        let mut options: Vec<(u16, &[u8])> = vec![
            (number::BLOCK1, block.encode(&mut b1)),
            (number::REQUEST_TAG, &tag),
        ];
        if offset == 0 {
            // RFC 7959 §4: Size1 on the first block tells the origin the whole size.
            options.push((number::SIZE1, encode_uint(body.len() as u64, &mut s1)));
        }
        let response = leg
            .exchange(UpstreamBody {
                options: &options,
                payload: &body[range.clone()],
            })
            .await?;
        let view = MessageView::parse(&response).map_err(|e| {
            Refusal::new(
                Code::BAD_GATEWAY,
                format!("malformed response from {}: {e}", target.uri.matching_uri()),
            )
        })?;
        if !block.more || view.code != Code::CONTINUE {
            // The final response, or the origin ended the transfer early (e.g. 4.13).
            let mut out = Vec::with_capacity(response.len());
            with_block1(&view, None, &mut out).map_err(|e| {
                Refusal::new(
                    Code::BAD_GATEWAY,
                    format!("cannot relay the response of {}: {e}", target.uri),
                )
            })?;
            return Ok(out);
        }
        // §2.5: the origin may ask for smaller blocks; go on after what it acknowledged.
        match view.option(number::BLOCK1).map(BlockValue::decode) {
            Some(Ok(ack)) if ack.szx < szx => {
                offset = (ack.num as usize + 1) * ack.size();
                szx = ack.szx;
            }
            _ => offset = range.end,
        }
    }
}

/// One upstream leg: the origin's shared link (all blocks of a transfer leave from the
/// same socket, which aiocoap's Block1Spool keys on, together with the Request-Tag) and
/// what every exchange on it needs.
struct Leg<'a, P> {
    upstream: &'a Upstream,
    peer: std::net::SocketAddr,
    protection: &'a P,
    request: &'a MessageView<'a>,
    target: &'a Target,
    hop_limit: u8,
    limits: &'a Limits,
}

impl<P: Protection> Leg<'_, P> {
    /// One request/response exchange, repeated once with the origin's Echo.
    async fn exchange(&mut self, body: UpstreamBody<'_>) -> Result<Vec<u8>, Refusal> {
        let (protection, request, target) = (self.protection, self.request, self.target);
        let mut plain = Vec::with_capacity(body.payload.len() + 128);
        let mut wire = Vec::with_capacity(body.payload.len() + 160);
        // Grows for large responses; a small start keeps the common case out of glibc's
        // large-request path (see server::client_response).
        let mut out = Vec::with_capacity(256);
        let mut echo: Option<Vec<u8>> = None;
        loop {
            let mid = 0 /* the link sets this leg's Message ID */;
            let token = random_bytes::<8>();
            build_upstream_request_with(
                request,
                target,
                self.hop_limit,
                echo.as_deref(),
                body,
                mid,
                &token,
                &mut plain,
            )?;
            let binding = protection
                .protect(&plain, &mut wire)
                .await
                .map_err(|e| refusal(e, target))?;
            let response = if protection.is_oscore() {
                self.send_protected(&wire).await?
            } else {
                self.upstream
                    .exchange(self.peer, wire.to_vec())
                    .await
                    .map_err(|e| link_refusal(e, target))?
            };
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
            // App. B.1.2: the origin lost its replay window and asks for freshness. The
            // client did not send that Echo (it cannot see inside OSCORE), so the gateway
            // repeats the request once with it, under a new sequence number.
            if protection.is_oscore() {
                let sent_echo = echo.is_some() || request.has_option(number::ECHO);
                if let Some(e) = echo_to_repeat(view.code, view.option(number::ECHO), sent_echo) {
                    echo = Some(e.to_vec());
                    continue;
                }
            }
            return Ok(out);
        }
    }

    /// Sends a protected request, as outer Block1 fragments when it exceeds
    /// `max_message_size`, and reassembles an outer Block2 response before it is verified
    /// (RFC 8613 §4.1.3.4.2).
    async fn send_protected(&mut self, wire: &[u8]) -> Result<Vec<u8>, Refusal> {
        let target = self.target;
        let bw = |e| blockwise_refusal(e, target);
        let link = |e: UpstreamError| link_refusal(e, target);
        let protected = MessageView::parse(wire).map_err(|e| bw(e.into()))?;
        let response = match outer_block1_szx(&protected, wire.len(), self.limits.max_message_size)
            .map_err(bw)?
        {
            None => self
                .upstream
                .exchange(self.peer, wire.to_vec())
                .await
                .map_err(link)?,
            Some(szx) => {
                let mut fragment = Vec::with_capacity(self.limits.max_message_size);
                let mut num = 0;
                loop {
                    let (m, t) = (
                        0, /* the link sets this leg's Message ID */
                        random_bytes::<8>(),
                    );
                    let block = outer_block1_fragment(&protected, num, szx, m, &t, &mut fragment)
                        .map_err(bw)?;
                    let r = self
                        .upstream
                        .exchange(self.peer, fragment.clone())
                        .await
                        .map_err(link)?;
                    let code = MessageView::parse(&r).map(|v| v.code);
                    if !block.more || code != Ok(Code::CONTINUE) {
                        break r;
                    }
                    num += 1;
                }
            }
        };
        let Some(mut assembly) =
            OuterBlock2::start(&response, self.limits.max_body_size).map_err(bw)?
        else {
            return Ok(response);
        };
        let mut again = Vec::with_capacity(wire.len());
        while let Some(block) = assembly.next_block() {
            let (m, t) = (
                0, /* the link sets this leg's Message ID */
                random_bytes::<8>(),
            );
            outer_block2_request(&protected, block, m, &t, &mut again).map_err(bw)?;
            let r = self
                .upstream
                .exchange(self.peer, again.clone())
                .await
                .map_err(link)?;
            assembly.feed(&r).map_err(bw)?;
        }
        assembly.finish().map_err(bw)
    }
}
