//! Opening security contexts for the load tool from an aiocoap credentials file: the client
//! context whose pattern matches the target URI, or every `:label` server context.

use std::path::Path;

use crate::coap::CoapUri;
use crate::credentials::{ContextPersister, ContextStore, CredentialsMap, NextSequenceError};
use crate::gateway::contexts::error_chain;
use crate::gateway::find_credential;
use crate::oscore::{SecurityContext, SenderSequenceNumber};

/// An open, locked context directory with derived keys.
pub struct OpenedContext {
    pub ctx: SecurityContext,
    pub persister: ContextPersister,
}

impl OpenedContext {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let open = ContextStore::global()
            .open(dir)
            .map_err(|e| format!("context {}: {}", dir.display(), error_chain(&e)))?;
        let ctx =
            SecurityContext::derive_with_shared_window(&open.params, open.replay_window.clone())
                .map_err(|e| format!("context {}: {e}", dir.display()))?;
        Ok(Self {
            ctx,
            persister: open.persister,
        })
    }

    /// The next Sender Sequence Number: without waiting when it is already persisted
    /// (the common case), else blocking this thread until the persister raised the mark.
    pub fn next_ssn(&self) -> Result<SenderSequenceNumber, NextSequenceError> {
        match self.persister.try_next_sequence_number() {
            Err(NextSequenceError::WouldBlock { .. }) => self.persister.next_sequence_number(),
            other => other,
        }
    }

    pub fn close(&self) {
        if let Err(e) = self.persister.close() {
            eprintln!("warning: {}", error_chain(&e));
        }
    }
}

/// The client context for `uri` (as aiocoap picks it). No match is an error.
pub fn client_context(credentials: &Path, uri: &CoapUri) -> Result<OpenedContext, String> {
    let map = CredentialsMap::load(credentials).map_err(|e| error_chain(&e))?;
    let found = find_credential(&map, uri).map_err(|e| e.to_string())?;
    let Some((entry, cred)) = found else {
        return Err(format!(
            "no credential in {} matches {}; refusing to send without OSCORE",
            credentials.display(),
            uri.matching_uri()
        ));
    };
    OpenedContext::open(&cred.basedir).map_err(|e| format!("credential {:?}: {e}", entry.key))
}

/// Every OSCORE `:label` context of the file (server side).
pub fn server_contexts(credentials: &Path) -> Result<Vec<OpenedContext>, String> {
    let map = CredentialsMap::load(credentials).map_err(|e| error_chain(&e))?;
    let mut dirs: Vec<&Path> = Vec::new();
    for (_, cred) in map.server_labels() {
        if let Some(o) = cred.as_oscore() {
            if !dirs.contains(&o.basedir.as_path()) {
                dirs.push(&o.basedir);
            }
        }
    }
    if dirs.is_empty() {
        return Err(format!(
            "{} has no \":label\" OSCORE entries for a server",
            credentials.display()
        ));
    }
    let mut opened = Vec::with_capacity(dirs.len());
    for dir in dirs {
        match OpenedContext::open(dir) {
            Ok(c) => opened.push(c),
            Err(e) => {
                for c in &opened {
                    c.close();
                }
                return Err(e);
            }
        }
    }
    Ok(opened)
}
