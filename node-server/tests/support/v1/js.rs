//! Values as a TypeScript v1 peer sees them: `better-sqlite3` reads, `JSON.stringify`
//! writes, `JSON.parse` (plus a Buffer reviver) reads back, `better-sqlite3` binds.
//!
//! - Reading a row (`safeIntegers` off, the default): INTEGER and REAL both become a JS
//!   `number` (a double), so integers beyond ±2^53 are rounded; TEXT is a string; BLOB a
//!   Node `Buffer`; NULL is `null`.
//! - `JSON.stringify`: a number is printed the way JavaScript prints it (`1.0` -> `1`,
//!   `9223372036854775807` -> `9223372036854776000`), NaN and ±Infinity become `null`, a
//!   Buffer becomes `{"type":"Buffer","data":[...]}`.
//! - Receiving: JSON numbers are doubles, strings are text, Buffer JSON is revived as a
//!   blob. Leniently, crsync's `$`-tagged objects (`$blob`, `$int`, `$real`) are decoded too
//!   and counted, so a test can assert crsync never sent them to a peer that did not ask.
//! - Binding (`better-sqlite3`'s `BindValueFromJS`): every JS number is bound with
//!   `sqlite3_bind_double`, so an integral number arrives at SQLite as a REAL (the
//!   column's affinity may turn it back into an INTEGER).

use base64::Engine;
use crsync_peer::rusqlite::types::{ToSql, ToSqlOutput, Value, ValueRef};
use serde_json::Value as Json;

/// One value in a v1 peer's JavaScript world.
#[derive(Debug, Clone, PartialEq)]
pub enum JsValue {
    /// `null`.
    Null,
    /// A JS `number` (always a double).
    Number(f64),
    /// A JS string.
    String(String),
    /// A Node `Buffer`.
    Buffer(Vec<u8>),
    /// A `BigInt`: only from crsync's lenient `{"$int": "..."}` (a real v1 peer never makes one).
    BigInt(i64),
}

impl JsValue {
    /// What `better-sqlite3` returns for a column value (`safeIntegers` off).
    pub fn from_sql(value: ValueRef<'_>) -> Self {
        match value {
            ValueRef::Null => JsValue::Null,
            // Int64::NewProperInteger(v, false): a double, rounded beyond 2^53.
            ValueRef::Integer(i) => JsValue::Number(i as f64),
            ValueRef::Real(f) => JsValue::Number(f),
            ValueRef::Text(t) => JsValue::String(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => JsValue::Buffer(b.to_vec()),
        }
    }

    /// `JSON.stringify(value)`.
    pub fn to_json(&self) -> String {
        match self {
            JsValue::Null => "null".into(),
            JsValue::Number(f) => js_number(*f),
            JsValue::String(s) => json_string(s),
            JsValue::Buffer(bytes) => {
                let data: Vec<String> = bytes.iter().map(u8::to_string).collect();
                format!(r#"{{"type":"Buffer","data":[{}]}}"#, data.join(","))
            }
            // JSON.stringify throws on a BigInt; we never write one.
            JsValue::BigInt(i) => i.to_string(),
        }
    }

    /// `JSON.parse` of one `val`, with the Buffer reviver; `tagged` is set when the value
    /// was one of crsync's `$`-tagged objects (decoded leniently).
    pub fn from_json(value: &Json) -> Result<(Self, bool), String> {
        Ok(match value {
            Json::Null => (JsValue::Null, false),
            // Every JSON number is a double in JavaScript.
            Json::Number(n) => (
                JsValue::Number(n.as_f64().ok_or_else(|| format!("number {n}"))?),
                false,
            ),
            Json::String(s) => (JsValue::String(s.clone()), false),
            Json::Object(map) => {
                if map.get("type").and_then(Json::as_str) == Some("Buffer") {
                    let data = map
                        .get("data")
                        .and_then(Json::as_array)
                        .ok_or("Buffer JSON without data")?;
                    let bytes = data
                        .iter()
                        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                        .collect::<Option<Vec<u8>>>()
                        .ok_or("Buffer JSON with a non-byte")?;
                    (JsValue::Buffer(bytes), false)
                } else if let Some(b64) = map.get("$blob").and_then(Json::as_str) {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| format!("$blob: {e}"))?;
                    (JsValue::Buffer(bytes), true)
                } else if let Some(text) = map.get("$int").and_then(Json::as_str) {
                    let i = text.parse().map_err(|e| format!("$int: {e}"))?;
                    (JsValue::BigInt(i), true)
                } else if let Some(text) = map.get("$real").and_then(Json::as_str) {
                    let f = match text {
                        "NaN" => f64::NAN,
                        "inf" => f64::INFINITY,
                        "-inf" => f64::NEG_INFINITY,
                        other => return Err(format!("$real {other:?}")),
                    };
                    (JsValue::Number(f), true)
                } else {
                    return Err(format!("cannot bind object {value}"));
                }
            }
            // better-sqlite3: "SQLite3 can only bind numbers, strings, bigints, buffers, and null".
            other => return Err(format!("cannot bind {other}")),
        })
    }
}

impl ToSql for JsValue {
    fn to_sql(&self) -> crsync_peer::rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            JsValue::Null => ToSqlOutput::Owned(Value::Null),
            // better-sqlite3 binds every number as a double.
            JsValue::Number(f) => ToSqlOutput::Owned(Value::Real(*f)),
            JsValue::String(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            JsValue::Buffer(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            JsValue::BigInt(i) => ToSqlOutput::Owned(Value::Integer(*i)),
        })
    }
}

/// A JSON string literal (as `JSON.stringify` writes it for the characters we use).
pub fn json_string(s: &str) -> String {
    Json::String(s.to_owned()).to_string()
}

/// `JSON.stringify` of a JS number (ECMAScript `Number::toString`).
pub use crsync_peer::wire::js_number_text as js_number;
