//! The static parameters of a security context directory: `settings.json` and
//! `secret.json` (aiocoap's `FilesystemSecurityContext._load`), turned into `ContextParams`
//! (RFC 8613 §3.1).
//!
//! Both files are flat JSON objects; either may be missing, not both. They are read in
//! aiocoap's order (`secret.json` first). Any key may carry a suffix: `<name>_hex` is
//! decoded as plain hex (no separators, like `binascii.unhexlify`), `<name>_ascii` is the
//! ASCII bytes of the string. A datum given twice (in both files, or as both `_hex` and
//! `_ascii`) is an error. Unknown keys are ignored, as aiocoap ignores them.
//!
//! Stricter than aiocoap (which fails later, or with a misleading message): byte values
//! without a suffix, `algorithm`/`kdf-hashfun` given as bytes, unknown algorithm names
//! (the error lists the valid ones), and a `window` outside 1..=128 (our bitfield is a
//! `u128`) are refused here, naming the file and the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;
use zeroize::Zeroize;

use super::json::{parse_object, type_name, JsonSyntaxError};
use crate::oscore::params::{DEFAULT_REPLAY_WINDOW, MAX_REPLAY_WINDOW};
use crate::oscore::{AeadAlgorithm, ContextParams, HkdfAlgorithm};

pub const SETTINGS_FILE: &str = "settings.json";
pub const SECRET_FILE: &str = "secret.json";

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("context directory {}: neither secret.json nor settings.json exists", dir.display())]
    NoSettingsFiles { dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Syntax(#[source] JsonSyntaxError),
    #[error(transparent)]
    DuplicateDatum(Box<DuplicateDatum>),
    #[error("{}, key {key:?}: {problem}", path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        problem: ValueProblem,
    },
    #[error(
        "context directory {}: configuration key missing: {datum} (neither secret.json nor settings.json has {datum}_hex or {datum}_ascii)",
        dir.display()
    )]
    Missing { dir: PathBuf, datum: &'static str },
}

/// A datum given twice: in both files, or as both `_hex` and `_ascii`.
#[derive(Debug, Error)]
#[error(
    "context directory {}: datum {datum:?} is present twice: as {first_key:?} in {first_file} and as {second_key:?} in {second_file}",
    dir.display()
)]
pub struct DuplicateDatum {
    pub dir: PathBuf,
    pub datum: String,
    pub first_file: &'static str,
    pub first_key: String,
    pub second_file: &'static str,
    pub second_key: String,
}

/// What is wrong with one value of settings.json / secret.json.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueProblem {
    #[error("a _hex or _ascii value must be a string, not {0}")]
    SuffixNeedsString(&'static str),
    #[error("not valid hex ({0}); write pairs of hex digits without separators")]
    BadHex(String),
    #[error("not ASCII; use the _hex form for other bytes")]
    NotAscii,
    #[error("a byte value needs the suffix _hex or _ascii")]
    BytesWithoutSuffix,
    #[error("must be a plain JSON string naming the algorithm, without _hex/_ascii suffix")]
    NameNotString,
    #[error("unknown AEAD algorithm {name:?}; valid names: {valid}")]
    UnknownAlgorithm { name: String, valid: String },
    #[error("unknown HKDF hash function {name:?}; valid names: {valid}")]
    UnknownHashFunction { name: String, valid: String },
    #[error("replay window must be an integer from 1 to {max}, not {found}")]
    BadWindow { found: String, max: u32 },
    #[error("ID is {len} bytes long; {algorithm} allows at most {max} (nonce length - 6, RFC 8613 §3.3)")]
    IdTooLong {
        len: usize,
        max: usize,
        algorithm: AeadAlgorithm,
    },
}

/// One datum after suffix decoding, remembering where it came from.
struct Datum {
    file: &'static str,
    key: String,
    value: DatumValue,
}

enum DatumValue {
    Bytes(Vec<u8>),
    Json(Value),
}

impl Drop for Datum {
    fn drop(&mut self) {
        match &mut self.value {
            DatumValue::Bytes(b) => b.zeroize(),
            DatumValue::Json(v) => zeroize_value(v),
        }
    }
}

fn zeroize_value(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(zeroize_value),
        Value::Object(o) => o.values_mut().for_each(zeroize_value),
        _ => {}
    }
}

/// Loads `secret.json` and `settings.json` from `dir` into context parameters.
pub fn load_context_params(dir: &Path) -> Result<ContextParams, SettingsError> {
    let mut data: HashMap<String, Datum> = HashMap::new();
    let mut any_file = false;
    for file in [SECRET_FILE, SETTINGS_FILE] {
        let path = dir.join(file);
        let mut text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SettingsError::Read { path, source }),
        };
        any_file = true;
        let parsed = parse_object(&text, &path);
        text.zeroize();
        for (key, value) in parsed.map_err(SettingsError::Syntax)? {
            let (datum, decoded) =
                decode_suffix(&key, value).map_err(|problem| bad_value(&path, &key, problem))?;
            let new = Datum {
                file,
                key,
                value: decoded,
            };
            if let Some(old) = data.get(&datum) {
                return Err(SettingsError::DuplicateDatum(Box::new(DuplicateDatum {
                    dir: dir.to_owned(),
                    datum,
                    first_file: old.file,
                    first_key: old.key.clone(),
                    second_file: new.file,
                    second_key: new.key.clone(),
                })));
            }
            data.insert(datum, new);
        }
    }
    if !any_file {
        return Err(SettingsError::NoSettingsFiles {
            dir: dir.to_owned(),
        });
    }

    let reader = Reader { dir, data: &data };
    let aead = match reader.name("algorithm")? {
        None => AeadAlgorithm::default(),
        Some((name, at)) => AeadAlgorithm::from_name(name).ok_or_else(|| {
            let valid = AeadAlgorithm::ALL.map(|a| a.name()).join(", ");
            reader.error(
                at,
                ValueProblem::UnknownAlgorithm {
                    name: name.to_owned(),
                    valid,
                },
            )
        })?,
    };
    let hkdf = match reader.name("kdf-hashfun")? {
        None => HkdfAlgorithm::default(),
        Some((name, at)) => HkdfAlgorithm::from_name(name).ok_or_else(|| {
            let valid = HkdfAlgorithm::ALL.map(|a| a.name()).join(", ");
            reader.error(
                at,
                ValueProblem::UnknownHashFunction {
                    name: name.to_owned(),
                    valid,
                },
            )
        })?,
    };
    let replay_window = reader.window()?;

    let sender_id = reader.required_bytes("sender-id")?;
    let recipient_id = reader.required_bytes("recipient-id")?;
    for (datum, id) in [("sender-id", &sender_id), ("recipient-id", &recipient_id)] {
        if id.len() > aead.max_id_len() {
            let at = &data[datum];
            return Err(reader.error(
                at,
                ValueProblem::IdTooLong {
                    len: id.len(),
                    max: aead.max_id_len(),
                    algorithm: aead,
                },
            ));
        }
    }

    Ok(ContextParams {
        master_secret: reader.required_bytes("secret")?,
        master_salt: reader.bytes("salt")?.unwrap_or_default(),
        sender_id,
        recipient_id,
        id_context: reader.bytes("id-context")?,
        aead,
        hkdf,
        replay_window,
    })
}

fn bad_value(path: &Path, key: &str, problem: ValueProblem) -> SettingsError {
    SettingsError::BadValue {
        path: path.to_owned(),
        key: key.to_owned(),
        problem,
    }
}

/// Splits off `_hex` / `_ascii` and decodes; other keys keep their JSON value.
fn decode_suffix(key: &str, value: Value) -> Result<(String, DatumValue), ValueProblem> {
    if let Some(datum) = key.strip_suffix("_hex") {
        let Value::String(mut s) = value else {
            return Err(ValueProblem::SuffixNeedsString(type_name(&value)));
        };
        let decoded = hex::decode(&s).map_err(|e| ValueProblem::BadHex(e.to_string()));
        s.zeroize();
        Ok((datum.to_owned(), DatumValue::Bytes(decoded?)))
    } else if let Some(datum) = key.strip_suffix("_ascii") {
        let Value::String(s) = value else {
            return Err(ValueProblem::SuffixNeedsString(type_name(&value)));
        };
        if !s.is_ascii() {
            return Err(ValueProblem::NotAscii);
        }
        Ok((datum.to_owned(), DatumValue::Bytes(s.into_bytes())))
    } else {
        Ok((key.to_owned(), DatumValue::Json(value)))
    }
}

struct Reader<'a> {
    dir: &'a Path,
    data: &'a HashMap<String, Datum>,
}

impl Reader<'_> {
    fn error(&self, at: &Datum, problem: ValueProblem) -> SettingsError {
        bad_value(&self.dir.join(at.file), &at.key, problem)
    }

    fn bytes(&self, datum: &str) -> Result<Option<Vec<u8>>, SettingsError> {
        match self.data.get(datum) {
            None => Ok(None),
            Some(d) => match &d.value {
                DatumValue::Bytes(b) => Ok(Some(b.clone())),
                DatumValue::Json(_) => Err(self.error(d, ValueProblem::BytesWithoutSuffix)),
            },
        }
    }

    fn required_bytes(&self, datum: &'static str) -> Result<Vec<u8>, SettingsError> {
        self.bytes(datum)?.ok_or_else(|| SettingsError::Missing {
            dir: self.dir.to_owned(),
            datum,
        })
    }

    /// A name given as a plain JSON string (`algorithm`, `kdf-hashfun`).
    fn name(&self, datum: &str) -> Result<Option<(&str, &Datum)>, SettingsError> {
        match self.data.get(datum) {
            None => Ok(None),
            Some(d) => match &d.value {
                DatumValue::Json(Value::String(s)) => Ok(Some((s.as_str(), d))),
                _ => Err(self.error(d, ValueProblem::NameNotString)),
            },
        }
    }

    fn window(&self) -> Result<u32, SettingsError> {
        let Some(d) = self.data.get("window") else {
            return Ok(DEFAULT_REPLAY_WINDOW);
        };
        let found = match &d.value {
            DatumValue::Json(Value::Number(n)) => {
                match n.as_u64().and_then(|w| u32::try_from(w).ok()) {
                    Some(w) if (1..=MAX_REPLAY_WINDOW).contains(&w) => return Ok(w),
                    _ => n.to_string(),
                }
            }
            DatumValue::Json(v) => type_name(v).to_owned(),
            DatumValue::Bytes(_) => "bytes".to_owned(),
        };
        Err(self.error(
            d,
            ValueProblem::BadWindow {
                found,
                max: MAX_REPLAY_WINDOW,
            },
        ))
    }
}
