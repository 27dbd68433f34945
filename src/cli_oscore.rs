//! The OSCORE leg of `oscore-gateway request`: credentials lookup and the context directory
//! (locked, with its sequence numbers persisted ahead of use). The protection itself is the
//! gateway's (`oscore_gateway::gateway::OscoreProtection`).

use std::path::Path;

use oscore_gateway::coap::CoapUri;
use oscore_gateway::credentials::CredentialsMap;
use oscore_gateway::gateway::contexts::error_chain;
use oscore_gateway::gateway::{find_credential, OscoreProtection};

/// Finds the credential for `uri` in `credentials_file` and opens its context directory.
/// No match is an error: with credentials given, nothing is ever sent in plain text.
pub fn protection_for(credentials_file: &Path, uri: &CoapUri) -> Result<OscoreProtection, String> {
    let map = CredentialsMap::load(credentials_file).map_err(|e| error_chain(&e))?;
    let found = find_credential(&map, uri).map_err(|e| e.to_string())?;
    let Some((entry, cred)) = found else {
        return Err(format!(
            "no credential in {} matches {}; refusing to send it without OSCORE",
            credentials_file.display(),
            uri.matching_uri()
        ));
    };
    OscoreProtection::open(&cred.basedir).map_err(|e| {
        format!(
            "credential {:?} in {}: {}",
            entry.key,
            credentials_file.display(),
            error_chain(&e)
        )
    })
}
