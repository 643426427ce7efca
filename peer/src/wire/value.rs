//! Values on the wire: how a [`SqlValue`] is written as JSON in each [`Encoding`]
//! and read back (see the [`wire`](super) module docs for the encodings).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value as Json;

use super::Encoding;
use crate::SqlValue;

/// Largest integer a JSON number carries exactly in JavaScript.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

fn tagged(tag: &str, text: String) -> Json {
    let mut map = serde_json::Map::new();
    map.insert(tag.into(), Json::String(text));
    Json::Object(map)
}

/// Encodes a value for the wire.
pub fn encode_value(v: &SqlValue, encoding: Encoding) -> Json {
    let lossless = encoding == Encoding::Lossless;
    match v {
        SqlValue::Null => Json::Null,
        SqlValue::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Json::String(s.to_owned()),
            Err(_) if lossless => tagged("$text", BASE64.encode(t)),
            Err(_) => {
                // A v1 peer holds JavaScript strings, which cannot carry these bytes.
                tracing::warn!(
                    bytes = t.len(),
                    "text that is not UTF-8 sent to a v1 peer as lossy UTF-8"
                );
                Json::String(String::from_utf8_lossy(t).into_owned())
            }
        },
        SqlValue::Integer(i) if lossless && i.unsigned_abs() > MAX_SAFE_INTEGER as u64 => {
            tagged("$int", i.to_string())
        }
        SqlValue::Integer(i) => Json::from(*i),
        SqlValue::Real(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => Json::Number(n),
            None if lossless => tagged(
                "$real",
                if f.is_nan() {
                    "NaN".into()
                } else if *f > 0.0 {
                    "inf".into()
                } else {
                    "-inf".into()
                },
            ),
            None => Json::Null,
        },
        SqlValue::Blob(b) if lossless => tagged("$blob", BASE64.encode(b)),
        // what a v1 peer itself writes for a blob
        SqlValue::Blob(b) => buffer_json(b),
    }
}

/// Who wrote the values of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueDialect {
    /// A crsync peer: values are exactly one of the shapes [`encode_value`]
    /// writes (either encoding); anything else is refused.
    Crsync,
    /// A JavaScript v1 peer (`@app/sync`): `JSON.stringify` of better-sqlite3
    /// values. Decoding never fails; what can only be approximated is noted.
    JavaScript,
}

/// A decoded value, with a note when it could only be approximated.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedValue {
    /// The value to store.
    pub value: SqlValue,
    /// Why `value` is not exactly what the message said, if it is not.
    pub approximated: Option<String>,
}

impl DecodedValue {
    fn exact(value: SqlValue) -> Self {
        DecodedValue {
            value,
            approximated: None,
        }
    }

    fn approximated(value: SqlValue, note: String) -> Self {
        DecodedValue {
            value,
            approximated: Some(note),
        }
    }
}

/// Decodes a value from the wire, as written by `dialect`.
///
/// Both dialects read what [`encode_value`] writes in either encoding,
/// including Node Buffer JSON (`{"type":"Buffer","data":[..]}`) as a blob.
///
/// - [`ValueDialect::Crsync`] refuses anything else, and integers beyond `i64`.
/// - [`ValueDialect::JavaScript`] never fails. A JavaScript sender's numbers
///   are doubles, so an integer beyond `i64` (`i64::MAX` arrives as
///   `9223372036854776000`) becomes the nearest `i64`, noted. Other numbers are
///   read as they are, and the receiving column's affinity sorts them out
///   ([`normalize_js`](crate::normalize_js)): a REAL `1.0` arrives as `1`
///   and is read as an integer. An integer literal beyond ±(2^53 − 1) is
///   read as the double JavaScript held (2^60 arrives as
///   `1152921504606847000` and is read as 2^60); `i64::MIN` arrives as
///   `-9223372036854776000` and is read as −2^63 exactly. NaN and infinities arrive as `null`. Any
///   other array or object becomes the text of its JSON, noted. (A REAL in
///   `[2^63, 2^64)` is printed by JavaScript as an integer beyond `i64`, so it
///   is read as `i64::MAX`, noted, even when it is meant for a REAL column.)
///
/// ```
/// use crsync_peer::SqlValue;
/// use crsync_peer::wire::{ValueDialect, decode_value};
/// use serde_json::json;
/// let js = ValueDialect::JavaScript;
/// let blob = decode_value(&json!({"type": "Buffer", "data": [0, 255, 16]}), js).unwrap();
/// assert_eq!(blob.value, SqlValue::Blob(vec![0, 255, 16]));
/// assert_eq!(blob.approximated, None);
/// let max = decode_value(&serde_json::from_str("9223372036854776000").unwrap(), js).unwrap();
/// assert_eq!(max.value, SqlValue::Integer(i64::MAX));
/// assert!(max.approximated.is_some());
/// let two_60 = decode_value(&serde_json::from_str("1152921504606847000").unwrap(), js).unwrap();
/// assert_eq!(two_60.value, SqlValue::Integer(1 << 60));
/// assert!(decode_value(&json!([1]), ValueDialect::Crsync).is_err());
/// ```
pub fn decode_value(v: &Json, dialect: ValueDialect) -> Result<DecodedValue, String> {
    if let (Json::Number(n), ValueDialect::JavaScript) = (v, dialect) {
        if let Some(decoded) = js_big_integer(n) {
            return Ok(decoded);
        }
    }
    match (decode_exact(v), dialect) {
        (Ok(value), _) => Ok(DecodedValue::exact(value)),
        (Err(reason), ValueDialect::Crsync) => Err(reason),
        (Err(reason), ValueDialect::JavaScript) => Ok(approximate_js(v, reason)),
    }
}

/// An integer literal beyond ±(2^53 − 1) from JavaScript names a double: JavaScript
/// prints the shortest digits that round back to it (2^60 is printed as
/// `1152921504606847000`), so the value the sender holds is that double,
/// not the literal. Read as the integer the double is exactly; past `i64`
/// (2^63, which `i64::MAX` became) it saturates, noted. `None` for literals
/// JavaScript prints exactly.
fn js_big_integer(n: &serde_json::Number) -> Option<DecodedValue> {
    let double = match (n.as_i64(), n.as_u64()) {
        (Some(i), _) if i.unsigned_abs() <= MAX_SAFE_INTEGER as u64 => return None,
        (Some(i), _) => i as f64,
        (None, Some(u)) => u as f64,
        (None, None) => return None, // a real, or beyond u64: read as a REAL
    };
    // 2^63 as a double: the first value past i64::MAX
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    Some(if double >= I64_END {
        DecodedValue::approximated(
            SqlValue::Integer(i64::MAX),
            format!("integer {n} is beyond i64, taken as {}", i64::MAX),
        )
    } else {
        // exact: a double of this size is an integer, and -2^63 <= it < 2^63
        DecodedValue::exact(SqlValue::Integer(double as i64))
    })
}

/// What a JavaScript sender meant by a value no exact shape matches.
fn approximate_js(v: &Json, reason: String) -> DecodedValue {
    if let Json::Number(n) = v {
        if n.is_u64() {
            // beyond i64::MAX: saturate
            return DecodedValue::approximated(
                SqlValue::Integer(i64::MAX),
                format!("integer {n} is beyond i64, taken as {}", i64::MAX),
            );
        }
    }
    // Serializing a serde_json value cannot fail.
    let text = serde_json::to_string(v).unwrap_or_default();
    DecodedValue::approximated(
        SqlValue::text(text),
        format!("{reason}; kept as the text of its JSON"),
    )
}

/// The exact decoding: every shape [`encode_value`] writes, nothing else.
fn decode_exact(v: &Json) -> Result<SqlValue, String> {
    Ok(match v {
        Json::Null => SqlValue::Null,
        Json::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Json::String(s) => SqlValue::text(s.as_str()),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                SqlValue::Integer(i)
            } else if n.is_u64() {
                return Err(format!("integer {n} does not fit in 64 bits"));
            } else {
                SqlValue::Real(
                    n.as_f64()
                        .ok_or_else(|| format!("number {n} is not representable"))?,
                )
            }
        }
        Json::Object(map) if map.len() == 1 => {
            let (tag, body) = map.iter().next().ok_or("empty object")?;
            let text = body
                .as_str()
                .ok_or_else(|| format!("{tag} must be a string"))?;
            match tag.as_str() {
                "$int" => {
                    SqlValue::Integer(text.parse().map_err(|_| format!("bad $int {text:?}"))?)
                }
                "$blob" => SqlValue::Blob(
                    BASE64
                        .decode(text)
                        .map_err(|_| format!("bad $blob {text:?}"))?,
                ),
                "$text" => SqlValue::Text(
                    BASE64
                        .decode(text)
                        .map_err(|_| format!("bad $text {text:?}"))?,
                ),
                "$real" => SqlValue::Real(match text {
                    "NaN" => f64::NAN,
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    other => return Err(format!("bad $real {other:?}")),
                }),
                other => return Err(format!("unknown tag {other:?}")),
            }
        }
        Json::Object(map) if map.get("type").and_then(Json::as_str) == Some("Buffer") => {
            SqlValue::Blob(decode_buffer(map).ok_or("malformed Buffer JSON")?)
        }
        other => return Err(format!("unsupported JSON value {other}")),
    })
}

/// Node Buffer JSON, as `Buffer.prototype.toJSON` writes it.
fn buffer_json(bytes: &[u8]) -> Json {
    let mut map = serde_json::Map::new();
    map.insert("type".into(), Json::String("Buffer".into()));
    map.insert(
        "data".into(),
        Json::Array(bytes.iter().map(|b| Json::from(*b)).collect()),
    );
    Json::Object(map)
}

/// The bytes of `{"type":"Buffer","data":[..]}`; `None` for any other shape.
fn decode_buffer(map: &serde_json::Map<String, Json>) -> Option<Vec<u8>> {
    if map.len() != 2 {
        return None;
    }
    map.get("data")?
        .as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect()
}

/// A number as a JavaScript (v1) peer writes it: `JSON.stringify`, that is
/// ECMAScript's `Number::toString` (the shortest digits that read back, plain
/// notation below 1e21 and above 1e-7, an exponent otherwise), `null` for NaN
/// and infinities, `0` for −0. What [`ValueDialect::JavaScript`] reads; for
/// tests and simulators that play a v1 peer.
///
/// ```
/// use crsync_peer::wire::js_number_text;
/// assert_eq!(js_number_text(1.0), "1");
/// assert_eq!(js_number_text(i64::MAX as f64), "9223372036854776000");
/// assert_eq!(js_number_text(2f64.powi(60)), "1152921504606847000");
/// assert_eq!(js_number_text(1e21), "1e+21");
/// assert_eq!(js_number_text(1.5e-7), "1.5e-7");
/// assert_eq!(js_number_text(f64::NAN), "null");
/// ```
pub fn js_number_text(d: f64) -> String {
    if !d.is_finite() {
        return "null".into();
    }
    if d == 0.0 {
        return "0".into();
    }
    // Rust's `{:e}` prints the shortest digits that round-trip, as ECMAScript requires.
    let sci = format!("{:e}", d.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    // the decimal point sits after `n` digits
    let n = exp.parse::<i32>().unwrap_or(0) + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let sign = if e < 0 { '-' } else { '+' };
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        format!("{first}{rest}e{sign}{}", e.abs())
    };
    if d < 0.0 { format!("-{body}") } else { body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{Affinity, normalize_js};
    use proptest::prelude::*;

    fn crsync(v: &Json) -> Result<SqlValue, String> {
        decode_value(v, ValueDialect::Crsync).map(|d| d.value)
    }

    fn js(v: &Json) -> DecodedValue {
        decode_value(v, ValueDialect::JavaScript).expect("JavaScript decoding never fails")
    }

    /// Any JSON value, nested a little.
    fn arbitrary_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_map(Json::from), // non-finite becomes null
            ".{0,20}".prop_map(Json::String),
            Just(serde_json::json!({"type": "Buffer", "data": [0, 255]})),
            Just(serde_json::json!({"type": "Buffer", "data": [256]})),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                proptest::collection::btree_map("[$a-z]{0,6}", inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn lossless_round_trip_through_json_text(v in crate::value::arbitrary_value()) {
            let text = serde_json::to_string(&encode_value(&v, Encoding::Lossless)).unwrap();
            let back = decode_value(&serde_json::from_str(&text).unwrap(), ValueDialect::Crsync)
                .unwrap();
            prop_assert_eq!(back, DecodedValue::exact(v));
        }

        #[test]
        fn javascript_decoding_never_fails(v in arbitrary_json()) {
            let decoded = decode_value(&v, ValueDialect::JavaScript);
            prop_assert!(decoded.is_ok(), "{v} -> {decoded:?}");
            // and where the strict decoding succeeds, both agree exactly, but
            // for integer literals beyond 2^53: JavaScript held the double
            let big = v.as_i64().is_some_and(|i| i.unsigned_abs() > MAX_SAFE_INTEGER as u64);
            if let (Ok(exact), false) = (crsync(&v), big) {
                prop_assert_eq!(decoded.unwrap(), DecodedValue::exact(exact));
            }
        }

        #[test]
        fn a_big_javascript_integer_is_the_double_it_names(i in any::<i64>().prop_filter(
            "beyond 2^53", |i| i.unsigned_abs() > MAX_SAFE_INTEGER as u64,
        )) {
            // JavaScript held `i as f64` and printed its shortest digits
            let double = i as f64;
            let json = serde_json::from_str(&js_number_text(double)).unwrap();
            let want = if double >= 9_223_372_036_854_775_808.0 { i64::MAX } else { double as i64 };
            prop_assert_eq!(js(&json).value, SqlValue::Integer(want), "{}", json);
        }

        #[test]
        fn a_javascript_integer_comes_back_in_an_integer_column(i in prop_oneof![
            -MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER,
            Just(i64::MAX),
            Just(i64::MIN),
            Just(MAX_SAFE_INTEGER + 1),
        ]) {
            // every i64 a JavaScript number holds exactly, and the two ends,
            // which JavaScript prints beyond i64
            let json = serde_json::from_str(&js_number_text(i as f64)).unwrap();
            for affinity in [Affinity::Integer, Affinity::Numeric] {
                let (back, _) = normalize_js(js(&json).value, affinity);
                prop_assert_eq!(&back, &SqlValue::Integer(i), "{}", json);
            }
        }

        #[test]
        fn a_javascript_real_comes_back_in_a_real_column(f in any::<f64>().prop_filter(
            // NaN and infinities are sent as null, and a REAL in [2^63, 2^64)
            // is printed as an integer beyond i64 (see `decode_value`)
            "not representable",
            |f| f.is_finite() && !(9_223_372_036_854_775_808.0..18_446_744_073_709_551_616.0).contains(f),
        )) {
            let json = serde_json::from_str(&js_number_text(f)).unwrap();
            let (back, note) = normalize_js(js(&json).value, Affinity::Real);
            // -0.0 is printed as 0, which compares equal
            prop_assert_eq!(back, SqlValue::Real(f), "{}", json);
            prop_assert_eq!(note, None);
        }
    }

    #[test]
    fn js_number_prints_as_javascript_does() {
        for (d, text) in [
            (i64::MAX as f64, "9223372036854776000"),
            (i64::MIN as f64, "-9223372036854776000"),
            (1.0, "1"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e21, "1e+21"),
            (1.5e-7, "1.5e-7"),
            (0.000001, "0.000001"),
            (123.456, "123.456"),
            (f64::NAN, "null"),
        ] {
            assert_eq!(js_number_text(d), text);
        }
    }

    #[test]
    fn v1_values_are_plain_json() {
        assert_eq!(
            encode_value(&SqlValue::Integer(5), Encoding::V1),
            serde_json::json!(5)
        );
        assert_eq!(
            encode_value(&SqlValue::Integer(5), Encoding::Lossless),
            serde_json::json!(5)
        );
        // blobs as a v1 (Node) peer writes them itself
        let buffer = serde_json::json!({"type": "Buffer", "data": [1, 2, 255]});
        assert_eq!(
            encode_value(&SqlValue::Blob(vec![1, 2, 255]), Encoding::V1),
            buffer
        );
        assert_eq!(crsync(&buffer).unwrap(), SqlValue::Blob(vec![1, 2, 255]));
        assert_eq!(
            encode_value(&SqlValue::Integer(i64::MAX), Encoding::Lossless),
            serde_json::json!({"$int": "9223372036854775807"})
        );
        assert_eq!(
            crsync(&serde_json::json!(1.5)).unwrap(),
            SqlValue::Real(1.5)
        );
        assert!(crsync(&serde_json::json!([1])).is_err());
        assert!(crsync(&serde_json::json!({"$int": "x"})).is_err());
        assert!(crsync(&serde_json::json!({"type": "Buffer", "data": [256]})).is_err());
        assert!(crsync(&serde_json::json!({"type": "Buffer", "data": "0102"})).is_err());
        assert!(crsync(&serde_json::from_str("9223372036854776000").unwrap()).is_err());
    }

    #[test]
    fn values_as_a_javascript_peer_sends_them() {
        let parse = |text: &str| js(&serde_json::from_str(text).unwrap());
        // exact
        let exact = |value| DecodedValue::exact(value);
        assert_eq!(
            parse(r#"{"type":"Buffer","data":[0,255,16]}"#),
            exact(SqlValue::Blob(vec![0, 255, 16]))
        );
        assert_eq!(
            parse(r#"{"data":[],"type":"Buffer"}"#),
            exact(SqlValue::Blob(vec![]))
        );
        assert_eq!(parse("1"), exact(SqlValue::Integer(1)));
        assert_eq!(parse("1.5"), exact(SqlValue::Real(1.5)));
        assert_eq!(parse("null"), exact(SqlValue::Null));
        assert_eq!(parse("true"), exact(SqlValue::Integer(1)));
        assert_eq!(parse("false"), exact(SqlValue::Integer(0)));
        assert_eq!(parse(r#""hi""#), exact(SqlValue::text("hi")));
        // i64::MIN is a double, -2^63, read as a REAL (an INTEGER column undoes it)
        assert_eq!(
            parse("-9223372036854776000"),
            exact(SqlValue::Real(-9_223_372_036_854_775_808.0))
        );
        // approximated
        let max = parse("9223372036854776000");
        assert_eq!(max.value, SqlValue::Integer(i64::MAX));
        assert!(max.approximated.unwrap().contains("9223372036854776000"));
        for text in [
            "[1,2]",
            r#"{"$x":"1"}"#,
            r#"{"$int":"x"}"#,
            r#"{"type":"Buffer","data":[256]}"#,
            r#"{"type":"Buffer","data":[1],"x":1}"#,
        ] {
            let d = parse(text);
            let kept: Json = serde_json::from_slice(d.value.as_text().unwrap()).unwrap();
            assert_eq!(kept, serde_json::from_str::<Json>(text).unwrap(), "{text}");
            assert!(d.approximated.is_some(), "{text}");
        }
    }

    #[test]
    fn text_that_is_not_utf8() {
        let odd = SqlValue::Text(vec![0xff, 0x00, 0xfe]);
        let tagged = serde_json::json!({"$text": "/wD+"});
        assert_eq!(encode_value(&odd, Encoding::Lossless), tagged);
        assert_eq!(crsync(&tagged).unwrap(), odd);
        // valid UTF-8 stays a plain string in both encodings
        assert_eq!(
            encode_value(&SqlValue::text("é"), Encoding::Lossless),
            serde_json::json!("é")
        );
        // a v1 peer gets what a JavaScript string can hold
        assert_eq!(
            encode_value(&odd, Encoding::V1),
            serde_json::json!("\u{fffd}\u{0}\u{fffd}")
        );
        assert!(crsync(&serde_json::json!({"$text": "!"})).is_err());
    }
}
