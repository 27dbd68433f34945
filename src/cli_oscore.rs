//! The OSCORE leg of `oscore-gateway request`: credentials lookup, the context directory
//! (locked, with its sequence numbers persisted ahead of use) and message protection.

use std::path::Path;

use oscore_gateway::client::{ClientError, Protection};
use oscore_gateway::coap::uri::default_port;
use oscore_gateway::coap::{CoapUri, MessageView};
use oscore_gateway::credentials::{ContextPersister, ContextStore, CredentialsMap};
use oscore_gateway::oscore::{
    protect_request, unprotect_response, RequestBinding, SecurityContext,
};

/// A loaded, locked client context.
pub struct OscoreProtection {
    ctx: SecurityContext,
    persister: ContextPersister,
}

/// Finds the credential for `uri` in `credentials_file` and opens its context directory.
/// No match is an error: with credentials given, nothing is ever sent in plain text.
pub fn protection_for(credentials_file: &Path, uri: &CoapUri) -> Result<OscoreProtection, String> {
    let map = CredentialsMap::load(credentials_file).map_err(|e| error_chain(&e))?;
    // aiocoap matches the URI as written (an explicit default port stays); if that finds
    // nothing, try the normalised form without the default port.
    let as_written = uri.matching_uri();
    let mut found = map.oscore_for(&as_written).map_err(|e| e.to_string())?;
    if found.is_none() && uri.port == Some(default_port(&uri.scheme)) {
        let normalised = CoapUri {
            port: None,
            ..uri.clone()
        }
        .matching_uri();
        found = map.oscore_for(&normalised).map_err(|e| e.to_string())?;
    }
    let Some((entry, cred)) = found else {
        return Err(format!(
            "no credential in {} matches {as_written}; refusing to send it without OSCORE",
            credentials_file.display()
        ));
    };
    let open = ContextStore::global().open(&cred.basedir).map_err(|e| {
        format!(
            "credential {:?} in {}: {}",
            entry.key,
            credentials_file.display(),
            error_chain(&e)
        )
    })?;
    let ctx = SecurityContext::derive_with_shared_window(&open.params, open.replay_window.clone())
        .map_err(|e| format!("context {}: {e}", cred.basedir.display()))?;
    Ok(OscoreProtection {
        ctx,
        persister: open.persister,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl OscoreProtection {
    /// Writes the exact sequence number and replay window back and releases the lock.
    pub fn close(&self) -> Result<(), String> {
        self.persister.close().map_err(|e| e.to_string())
    }
}

impl Protection for OscoreProtection {
    type Binding = RequestBinding;

    async fn protect(
        &self,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RequestBinding, ClientError> {
        let request = MessageView::parse(plain).map_err(|e| ClientError::Build(e.to_string()))?;
        let ssn = self
            .persister
            .next_sequence_number_async()
            .await
            .map_err(|e| ClientError::Context(e.to_string()))?;
        protect_request(&self.ctx, ssn, &request, out)
            .map_err(|e| ClientError::Oscore(e.to_string()))
    }

    fn unprotect(
        &self,
        binding: &RequestBinding,
        wire: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError> {
        let response = MessageView::parse(wire)
            .map_err(|e| ClientError::Oscore(format!("malformed response: {e}")))?;
        unprotect_response(&self.ctx, binding, &response, out).map_err(|e| {
            // A plain error from the server or an intermediary (no OSCORE option): show it.
            if response.code.is_response()
                && !response.has_option(oscore_gateway::coap::number::OSCORE)
            {
                ClientError::Oscore(format!(
                    "unprotected {} response ({e}): {}",
                    response.code,
                    String::from_utf8_lossy(response.payload)
                ))
            } else {
                ClientError::Oscore(e.to_string())
            }
        })?;
        Ok(())
    }

    fn is_oscore(&self) -> bool {
        true
    }
}
