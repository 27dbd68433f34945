//! Credentials and security context storage in aiocoap 0.4.17's on-disk formats.
//!
//! - `map`: the credentials JSON (URI patterns and `:labels` -> credentials), with
//!   aiocoap's pattern precedence (`pattern`).
//! - `settings`: `settings.json` + `secret.json` of a context directory -> `ContextParams`.
//! - `sequence_file`: `sequence.json` (sender sequence mark and replay window), read and
//!   written byte for byte as aiocoap does, replaced atomically and durably.
//! - `lock`: the `lock` file's flock, shared with aiocoap so the two never use one context.
//! - `store` / `persist`: opening a context for use and keeping the persisted sequence
//!   number mark ahead of need (RFC 8613 App. B.1.1) from one background thread.
//!
//! Where we differ from aiocoap on purpose, the module says so (references resolved,
//! relative basedirs against the credentials file, stricter validation).

pub mod fd_limit;
mod json;
pub mod lock;
pub mod map;
pub mod pattern;
pub mod persist;
pub mod sequence_file;
pub mod settings;
pub mod store;

pub use json::JsonSyntaxError;
pub use lock::{ContextLock, LockError};
pub use map::{
    Credential, CredentialKind, CredentialsError, CredentialsMap, Entry, EntryProblem,
    OscoreCredential,
};
pub use pattern::UriPattern;
pub use sequence_file::{Received, SequenceFileError, SequenceState};
pub use settings::{load_context_params, DuplicateDatum, SettingsError, ValueProblem};
pub use store::{ContextPersister, ContextStore, NextSequenceError, OpenContext, StoreError};
