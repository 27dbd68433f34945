//! aiocoap's credentials map (`credentials.py`, `CredentialsMap.load_from_dict`): one JSON
//! object whose keys are URI patterns (client side: which credential protects a request)
//! or `:labels` (server side: credentials that are only names), and whose values are a
//! credential object with exactly one key naming its kind, a string reference to a label,
//! or `null`.
//!
//! Differences from aiocoap 0.4.17, all deliberate:
//! - A reference (`"coap://h/*": ":fs"`) is resolved, also for OSCORE. aiocoap returns the
//!   unresolved reference, its OSCORE transport sees no security context and sends the
//!   request in plain text without a warning. References are resolved when the file is
//!   loaded; one to an undefined label, or a cycle, is an error then.
//! - A relative `basedir` is taken relative to the folder of the credentials file, not to
//!   the process's working directory, so a file means the same from wherever it is used.
//! - Duplicate keys in the file are an error (Python silently keeps the last one).
//! - Entries are only parsed here; nothing is opened or locked (aiocoap opens every OSCORE
//!   directory while loading). `credentials::store` opens a directory when asked to.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use super::json::{parse_object, type_name, JsonSyntaxError};
use super::pattern::{PatternIndex, UriPattern};

/// The kinds of credential aiocoap's loader knows (`CredentialsMap._class_map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    Oscore,
    Dtls,
    TlsCert,
    AnyOf,
    AllOf,
    EdhocOscore,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 6] = [
        Self::Oscore,
        Self::Dtls,
        Self::TlsCert,
        Self::AnyOf,
        Self::AllOf,
        Self::EdhocOscore,
    ];

    /// The key that names this kind in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Oscore => "oscore",
            Self::Dtls => "dtls",
            Self::TlsCert => "tlscert",
            Self::AnyOf => "any-of",
            Self::AllOf => "all-of",
            Self::EdhocOscore => "edhoc-oscore",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An `{"oscore": {"basedir": ...}}` entry: a security context directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OscoreCredential {
    /// The directory, made absolute against the credentials file's folder if it was relative.
    pub basedir: PathBuf,
    /// Given under the deprecated name `contextfile` instead of `basedir`.
    pub deprecated_contextfile: bool,
}

/// A credential as loaded. Only OSCORE entries are usable by this gateway; the other kinds
/// are accepted (so that a file written for aiocoap loads) and reported as not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Oscore(OscoreCredential),
    /// Any other kind; never `CredentialKind::Oscore`.
    Other(CredentialKind),
}

impl Credential {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Self::Oscore(_) => CredentialKind::Oscore,
            Self::Other(k) => *k,
        }
    }

    pub fn as_oscore(&self) -> Option<&OscoreCredential> {
        match self {
            Self::Oscore(o) => Some(o),
            Self::Other(_) => None,
        }
    }
}

/// One non-null entry of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key as written: a URI pattern, or a label starting with `:`.
    pub key: String,
    /// The credential, with references resolved.
    pub credential: Credential,
    /// The label the value referred to (`"coap://h/*": ":fs"` gives `Some(":fs")`); for a
    /// chain of references, the first one.
    pub reference: Option<String>,
}

impl Entry {
    /// Server-side entries are labels: keys starting with `:`.
    pub fn is_label(&self) -> bool {
        self.key.starts_with(':')
    }
}

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {}", .0.path.display())]
    Syntax(#[source] JsonSyntaxError),
    #[error("credentials file {}, entry {key:?}: {problem}", path.display())]
    Entry {
        path: PathBuf,
        key: String,
        problem: EntryProblem,
    },
    #[error(
        "credentials file {}, entry {key:?}: a {kind} credential is not usable for OSCORE",
        path.display()
    )]
    NotOscore {
        path: PathBuf,
        key: String,
        kind: CredentialKind,
    },
}

/// What is wrong with one entry of a credentials file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EntryProblem {
    #[error("a credential object must have exactly one key naming its kind (found {found})")]
    NotOneKey { found: String },
    #[error("unknown credential type {0:?} (known: oscore, dtls, tlscert, any-of, all-of, edhoc-oscore)")]
    UnknownKind(String),
    #[error("the value must be a credential object, a \":label\" reference or null, not {0}")]
    BadValue(&'static str),
    #[error("{kind} goes with {expected}, not {found}")]
    BadShape {
        kind: CredentialKind,
        expected: &'static str,
        found: &'static str,
    },
    #[error("oscore: both \"basedir\" and its deprecated alias \"contextfile\" are given; keep \"basedir\"")]
    BasedirAndContextfile,
    #[error("oscore: missing item \"basedir\"")]
    MissingBasedir,
    #[error("oscore: {key:?} must be a string path, not {found}")]
    BasedirNotString {
        key: &'static str,
        found: &'static str,
    },
    #[error("oscore: unknown item {0:?} (only \"basedir\" or \"contextfile\")")]
    UnknownOscoreItem(String),
    #[error("reference {0:?} must start with a colon (\":label\")")]
    ReferenceWithoutColon(String),
    #[error("reference to undefined label {0:?}")]
    UndefinedLabel(String),
    #[error("references form a cycle through {0:?}")]
    ReferenceCycle(String),
}

/// What a value in the file is before references are resolved.
enum Raw {
    Credential(Credential),
    Reference(String),
}

/// A loaded credentials map.
#[derive(Debug)]
pub struct CredentialsMap {
    path: PathBuf,
    /// Non-null entries in file order.
    entries: Vec<Entry>,
    /// `entries` positions of the URI-pattern (non-label) entries, in index slot order.
    pattern_entries: Vec<usize>,
    index: PatternIndex,
}

impl CredentialsMap {
    /// Reads and parses a credentials file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CredentialsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses `text` as if it had been read from `path` (used for relative basedirs and errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self, CredentialsError> {
        let members = parse_object(text, path).map_err(CredentialsError::Syntax)?;
        let base = path.parent().unwrap_or(Path::new(""));
        let entry_err = |key: &str, problem| CredentialsError::Entry {
            path: path.to_owned(),
            key: key.to_owned(),
            problem,
        };

        let mut raw: Vec<(String, Raw)> = Vec::with_capacity(members.len());
        for (key, value) in members {
            let parsed = match value {
                // aiocoap: null removes an entry loaded earlier (from another file); in a
                // single file it just means "no entry".
                Value::Null => continue,
                Value::String(target) => {
                    if !target.starts_with(':') {
                        return Err(entry_err(&key, EntryProblem::ReferenceWithoutColon(target)));
                    }
                    Raw::Reference(target)
                }
                Value::Object(obj) => {
                    Raw::Credential(parse_credential(obj, base).map_err(|p| entry_err(&key, p))?)
                }
                other => return Err(entry_err(&key, EntryProblem::BadValue(type_name(&other)))),
            };
            raw.push((key, parsed));
        }

        let mut entries = Vec::with_capacity(raw.len());
        for (key, value) in &raw {
            let (credential, reference) = match value {
                Raw::Credential(c) => (c.clone(), None),
                Raw::Reference(target) => (
                    resolve(&raw, target).map_err(|p| entry_err(key, p))?,
                    Some(target.clone()),
                ),
            };
            entries.push(Entry {
                key: key.clone(),
                credential,
                reference,
            });
        }

        let pattern_entries: Vec<usize> = (0..entries.len())
            .filter(|&i| !entries[i].is_label())
            .collect();
        let index = PatternIndex::new(
            pattern_entries
                .iter()
                .map(|&i| UriPattern::new(&entries[i].key))
                .collect(),
        );
        Ok(Self {
            path: path.to_owned(),
            entries,
            pattern_entries,
            index,
        })
    }

    /// The file this map was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Client side: the credential for a request URI, chosen as aiocoap does (longest
    /// matching pattern, ties to the earlier entry). `uri` must be in aiocoap's matching
    /// form `scheme://host[:port]/path[?query]`: host lower-cased, port only when not the
    /// scheme's default, path at least `/`. Labels are never matched.
    pub fn lookup(&self, uri: &str) -> Option<&Credential> {
        self.lookup_entry(uri).map(|e| &e.credential)
    }

    /// Like `lookup`, with the entry (its key is useful in logs and errors).
    pub fn lookup_entry(&self, uri: &str) -> Option<&Entry> {
        let slot = self.index.find(uri)?;
        Some(&self.entries[self.pattern_entries[slot]])
    }

    /// Client side, for OSCORE: `Ok(None)` if no pattern matches (aiocoap would then send in
    /// plain text), an error if the matching entry is of a kind OSCORE cannot use.
    pub fn oscore_for(
        &self,
        uri: &str,
    ) -> Result<Option<(&Entry, &OscoreCredential)>, CredentialsError> {
        let Some(entry) = self.lookup_entry(uri) else {
            return Ok(None);
        };
        match &entry.credential {
            Credential::Oscore(o) => Ok(Some((entry, o))),
            Credential::Other(kind) => Err(CredentialsError::NotOscore {
                path: self.path.clone(),
                key: entry.key.clone(),
                kind: *kind,
            }),
        }
    }

    /// All non-null entries in file order (aiocoap's server searches them all in this order
    /// for a context whose Recipient ID and ID Context fit a request).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Server side: the `:label` entries in file order.
    pub fn server_labels(&self) -> impl Iterator<Item = (&str, &Credential)> + '_ {
        self.entries
            .iter()
            .filter(|e| e.is_label())
            .map(|e| (e.key.as_str(), &e.credential))
    }

    /// The distinct OSCORE context directories named by the map, in file order. A reference
    /// and its label name the same directory; it must be opened (and locked) only once.
    pub fn oscore_dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for e in &self.entries {
            if let Credential::Oscore(o) = &e.credential {
                if !dirs.contains(&o.basedir.as_path()) {
                    dirs.push(&o.basedir);
                }
            }
        }
        dirs
    }
}

/// Follows a chain of references to a credential.
fn resolve(raw: &[(String, Raw)], first: &str) -> Result<Credential, EntryProblem> {
    let mut target = first;
    // A chain longer than the map revisits some label: that is a cycle.
    for _ in 0..=raw.len() {
        match raw.iter().find(|(k, _)| k == target) {
            None => return Err(EntryProblem::UndefinedLabel(target.to_owned())),
            Some((_, Raw::Credential(c))) => return Ok(c.clone()),
            Some((_, Raw::Reference(next))) => target = next,
        }
    }
    Err(EntryProblem::ReferenceCycle(first.to_owned()))
}

fn parse_credential(
    obj: serde_json::Map<String, Value>,
    base: &Path,
) -> Result<Credential, EntryProblem> {
    if obj.len() != 1 {
        let found = if obj.is_empty() {
            "none".to_owned()
        } else {
            obj.keys().cloned().collect::<Vec<_>>().join(", ")
        };
        return Err(EntryProblem::NotOneKey { found });
    }
    let Some((name, value)) = obj.into_iter().next() else {
        return Err(EntryProblem::NotOneKey {
            found: "none".into(),
        });
    };
    let kind = CredentialKind::from_name(&name).ok_or(EntryProblem::UnknownKind(name))?;
    let shape_err = |expected, v: &Value| EntryProblem::BadShape {
        kind,
        expected,
        found: type_name(v),
    };
    match kind {
        CredentialKind::Oscore => match value {
            Value::Object(items) => parse_oscore(items, base).map(Credential::Oscore),
            v => Err(shape_err("an object", &v)),
        },
        // Shapes as aiocoap checks them ("%s goes with an object/a list"); the contents are
        // not needed by this gateway and are not checked further.
        CredentialKind::AnyOf | CredentialKind::AllOf => match value {
            Value::Array(_) => Ok(Credential::Other(kind)),
            v => Err(shape_err("a list", &v)),
        },
        CredentialKind::Dtls | CredentialKind::TlsCert | CredentialKind::EdhocOscore => match value
        {
            Value::Object(_) => Ok(Credential::Other(kind)),
            v => Err(shape_err("an object", &v)),
        },
    }
}

/// `{"basedir": "..."}` or the deprecated `{"contextfile": "..."}` (aiocoap's
/// `FilesystemSecurityContext.from_item`; `null` counts as absent as with its `Optional`).
fn parse_oscore(
    items: serde_json::Map<String, Value>,
    base: &Path,
) -> Result<OscoreCredential, EntryProblem> {
    let mut basedir = None;
    let mut contextfile = None;
    for (k, v) in items {
        // aiocoap maps dashes in keys to underscores before binding the arguments.
        let slot = match k.replace('-', "_").as_str() {
            "basedir" => &mut basedir,
            "contextfile" => &mut contextfile,
            _ => return Err(EntryProblem::UnknownOscoreItem(k)),
        };
        match v {
            Value::Null => {}
            Value::String(s) => *slot = Some(s),
            other => {
                let key = if k.starts_with('b') {
                    "basedir"
                } else {
                    "contextfile"
                };
                return Err(EntryProblem::BasedirNotString {
                    key,
                    found: type_name(&other),
                });
            }
        }
    }
    let (dir, deprecated_contextfile) = match (basedir, contextfile) {
        (Some(_), Some(_)) => return Err(EntryProblem::BasedirAndContextfile),
        (None, None) => return Err(EntryProblem::MissingBasedir),
        (Some(d), None) => (d, false),
        (None, Some(d)) => (d, true),
    };
    // Relative to the credentials file (aiocoap: relative to the working directory).
    Ok(OscoreCredential {
        basedir: base.join(dir),
        deprecated_contextfile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<CredentialsMap, CredentialsError> {
        CredentialsMap::from_json(text, Path::new("/etc/gw/creds.json"))
    }

    fn problem(text: &str) -> EntryProblem {
        match load(text).unwrap_err() {
            CredentialsError::Entry { problem, .. } => problem,
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn basedir_contextfile_rules() {
        let m = load(r#"{":a": {"oscore": {"contextfile": "x"}}}"#).unwrap();
        let o = m.entries()[0].credential.as_oscore().unwrap();
        assert!(o.deprecated_contextfile);
        assert_eq!(o.basedir, Path::new("/etc/gw/x"));
        assert_eq!(
            problem(r#"{":a": {"oscore": {"basedir": "x", "contextfile": "y"}}}"#),
            EntryProblem::BasedirAndContextfile
        );
        assert_eq!(
            problem(r#"{":a": {"oscore": {}}}"#),
            EntryProblem::MissingBasedir
        );
        assert_eq!(
            problem(r#"{":a": {"oscore": {"basedir": null, "contextfile": null}}}"#),
            EntryProblem::MissingBasedir
        );
        assert!(matches!(
            problem(r#"{":a": {"oscore": {"basedir": 3}}}"#),
            EntryProblem::BasedirNotString { key: "basedir", .. }
        ));
        assert!(matches!(
            problem(r#"{":a": {"oscore": {"basedir": "x", "window": 3}}}"#),
            EntryProblem::UnknownOscoreItem(_)
        ));
    }

    #[test]
    fn kinds_and_shapes() {
        assert!(matches!(
            problem(r#"{"*": {}}"#),
            EntryProblem::NotOneKey { .. }
        ));
        assert!(matches!(
            problem(r#"{"*": {"oscore": {"basedir": "a"}, "dtls": {}}}"#),
            EntryProblem::NotOneKey { .. }
        ));
        assert_eq!(
            problem(r#"{"*": {"unprotected": true}}"#),
            EntryProblem::UnknownKind("unprotected".into())
        );
        assert!(matches!(
            problem(r#"{"*": {"any-of": {}}}"#),
            EntryProblem::BadShape { .. }
        ));
        assert!(matches!(
            problem(r#"{"*": 5}"#),
            EntryProblem::BadValue("a number")
        ));
        let m = load(
            r#"{"coaps://h/*": {"dtls": {"psk": {"ascii": "x"}, "client-identity": {"hex": "01"}}},
                "coaps+tcp://*": {"tlscert": {"certfile": "ca.pem"}},
                "coap://a/*": {"any-of": [":x"]}, "coap://b/*": {"all-of": []},
                "coap://c/*": {"edhoc-oscore": {"suite": 2}}}"#,
        )
        .unwrap();
        let kinds: Vec<_> = m.entries().iter().map(|e| e.credential.kind()).collect();
        use CredentialKind::*;
        assert_eq!(kinds, [Dtls, TlsCert, AnyOf, AllOf, EdhocOscore]);
    }

    #[test]
    fn reference_problems() {
        assert_eq!(
            problem(r#"{"*": "fs"}"#),
            EntryProblem::ReferenceWithoutColon("fs".into())
        );
        assert_eq!(
            problem(r#"{"*": ":fs"}"#),
            EntryProblem::UndefinedLabel(":fs".into())
        );
        assert_eq!(
            problem(r#"{"*": ":fs", ":fs": null}"#),
            EntryProblem::UndefinedLabel(":fs".into())
        );
        assert!(matches!(
            problem(r#"{":a": ":b", ":b": ":a"}"#),
            EntryProblem::ReferenceCycle(_)
        ));
    }
}
