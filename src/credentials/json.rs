//! Reading the small JSON objects of aiocoap's file formats: keys in file order (aiocoap's
//! precedence ties and server-side search follow the order of the file), duplicate keys
//! refused, and syntax errors that name the file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::Value;
use thiserror::Error;

/// A JSON file that could not be parsed; `line`/`column` are 1-based as serde_json gives them.
#[derive(Debug, Error)]
#[error("{}:{line}:{column}: {message}", path.display())]
pub struct JsonSyntaxError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl JsonSyntaxError {
    pub(crate) fn new(path: &Path, err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        let full = err.to_string();
        // serde_json appends " at line L column C"; the position is kept in its own fields.
        let suffix = format!(" at line {line} column {column}");
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        Self {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    }
}

/// A JSON object with its members in file order.
///
/// Python's `json.load` keeps the last of two equal keys silently. In a file that holds
/// secrets or decides which peer gets which key, a duplicate is a mistake, so we refuse it
/// (a documented difference from aiocoap).
pub(crate) struct OrderedObject(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut members: Vec<(String, Value)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err(A::Error::custom(format_args!(
                            "duplicate key {key:?} (aiocoap would silently use the last one)"
                        )));
                    }
                    let value: Value = map.next_value()?;
                    members.push((key, value));
                }
                Ok(OrderedObject(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Parses `text` (the contents of `path`) as one JSON object.
pub(crate) fn parse_object(
    text: &str,
    path: &Path,
) -> Result<Vec<(String, Value)>, JsonSyntaxError> {
    serde_json::from_str::<OrderedObject>(text)
        .map(|o| o.0)
        .map_err(|e| JsonSyntaxError::new(path, &e))
}

/// The JSON type of a value, for error messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_file_order_and_refuses_duplicates() {
        let p = Path::new("x.json");
        let o = parse_object(r#"{"b": 1, "a": 2, "c": null}"#, p).unwrap();
        let keys: Vec<_> = o.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "c"]);

        let e = parse_object("{\"a\": 1,\n \"a\": 2}", p).unwrap_err();
        assert!(e.message.contains("duplicate key \"a\""), "{e}");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn syntax_error_names_file_line_column() {
        let e =
            parse_object("{\n  \"a\": 1,\n  \"b\" 2\n}", Path::new("/x/creds.json")).unwrap_err();
        assert_eq!((e.line, e.column), (3, 7));
        assert_eq!(e.to_string(), "/x/creds.json:3:7: expected `:`");
        let e = parse_object("[1]", Path::new("a.json")).unwrap_err();
        assert!(e.message.contains("expected a JSON object"), "{e}");
    }
}
