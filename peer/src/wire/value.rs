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
                    bytes = %hex::encode(t),
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
        SqlValue::Blob(b) => Json::String(hex::encode(b)),
    }
}

/// Decodes a value from the wire (either encoding).
pub fn decode_value(v: &Json) -> Result<SqlValue, String> {
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
        other => return Err(format!("unsupported JSON value {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lossless_round_trip_through_json_text(v in crate::value::arbitrary_value()) {
            let text = serde_json::to_string(&encode_value(&v, Encoding::Lossless)).unwrap();
            let back = decode_value(&serde_json::from_str(&text).unwrap()).unwrap();
            prop_assert_eq!(back, v);
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
        assert_eq!(
            encode_value(&SqlValue::Blob(vec![1, 2]), Encoding::V1),
            serde_json::json!("0102")
        );
        assert_eq!(
            encode_value(&SqlValue::Integer(i64::MAX), Encoding::Lossless),
            serde_json::json!({"$int": "9223372036854775807"})
        );
        assert_eq!(
            decode_value(&serde_json::json!(1.5)).unwrap(),
            SqlValue::Real(1.5)
        );
        assert!(decode_value(&serde_json::json!([1])).is_err());
        assert!(decode_value(&serde_json::json!({"$int": "x"})).is_err());
    }

    #[test]
    fn text_that_is_not_utf8() {
        let odd = SqlValue::Text(vec![0xff, 0x00, 0xfe]);
        let tagged = serde_json::json!({"$text": "/wD+"});
        assert_eq!(encode_value(&odd, Encoding::Lossless), tagged);
        assert_eq!(decode_value(&tagged).unwrap(), odd);
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
        assert!(decode_value(&serde_json::json!({"$text": "!"})).is_err());
    }
}
