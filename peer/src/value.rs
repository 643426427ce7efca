//! [`SqlValue`]: a SQLite value that keeps every bit (blobs, full i64, f64, text, NULL).

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// One SQLite value, kept exactly: integers are full `i64`, blobs stay bytes,
/// and text keeps its bytes even when they are not valid UTF-8 (SQLite stores
/// whatever it is given, e.g. `CAST(x'ff00' AS TEXT)`).
///
/// ```
/// use crsync_peer::SqlValue;
/// let v = SqlValue::Integer(i64::MAX);
/// assert_eq!(v, SqlValue::Integer(9_223_372_036_854_775_807));
/// assert_eq!(SqlValue::text("hé").as_str(), Some("hé"));
/// let odd = SqlValue::Text(vec![0xff, 0x00]);
/// assert_eq!(odd.as_text(), Some(&[0xff, 0x00][..]));
/// assert_eq!(odd.as_str(), None);
/// ```
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// Text, as the exact bytes SQLite holds: usually UTF-8, but not always.
    /// (Serde writes it as a string when it is UTF-8, else as bytes.)
    Text(#[serde(with = "text_serde")] Vec<u8>),
    /// Raw bytes.
    Blob(Vec<u8>),
}

impl SqlValue {
    /// A text value.
    pub fn text(s: impl Into<String>) -> SqlValue {
        SqlValue::Text(s.into().into_bytes())
    }

    /// The bytes of a text value (whether or not they are UTF-8).
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            SqlValue::Text(t) => Some(t),
            _ => None,
        }
    }

    /// A text value that is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_text()?).ok()
    }
}

impl std::fmt::Debug for SqlValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SqlValue::Null => f.write_str("Null"),
            SqlValue::Integer(i) => f.debug_tuple("Integer").field(i).finish(),
            SqlValue::Real(r) => f.debug_tuple("Real").field(r).finish(),
            SqlValue::Text(t) => match std::str::from_utf8(t) {
                Ok(s) => f.debug_tuple("Text").field(&s).finish(),
                // as SQL would write it: CAST(x'..' AS TEXT)
                Err(_) => write!(f, "Text(x'{}')", hex::encode(t)),
            },
            SqlValue::Blob(b) => write!(f, "Blob(x'{}')", hex::encode(b)),
        }
    }
}

impl ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            SqlValue::Null => ValueRef::Null,
            SqlValue::Integer(i) => ValueRef::Integer(*i),
            SqlValue::Real(f) => ValueRef::Real(*f),
            SqlValue::Text(t) => ValueRef::Text(t),
            SqlValue::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl FromSql for SqlValue {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(match value {
            ValueRef::Null => SqlValue::Null,
            ValueRef::Integer(i) => SqlValue::Integer(i),
            ValueRef::Real(f) => SqlValue::Real(f),
            ValueRef::Text(t) => SqlValue::Text(t.to_vec()),
            ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
        })
    }
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Integer(v)
    }
}

impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.as_bytes().to_vec())
    }
}

impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v.into_bytes())
    }
}

impl From<Vec<u8>> for SqlValue {
    fn from(v: Vec<u8>) -> Self {
        SqlValue::Blob(v)
    }
}

impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        SqlValue::Real(v)
    }
}

/// Text as a serde string when it is UTF-8 (as `String` was), else as bytes.
mod text_serde {
    use serde::de::{self, Visitor};

    pub(super) fn serialize<S: serde::Serializer>(t: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(t) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(t),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(TextVisitor)
    }

    struct TextVisitor;

    impl<'de> Visitor<'de> for TextVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<u8>, E> {
            Ok(v.into_bytes())
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Any value (NaN aside, which is not equal to itself), for property tests.
#[cfg(test)]
pub(crate) fn arbitrary_value() -> impl proptest::strategy::Strategy<Value = SqlValue> {
    use proptest::prelude::*;
    prop_oneof![
        Just(SqlValue::Null),
        any::<i64>().prop_map(SqlValue::Integer),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(SqlValue::Real),
        ".{0,40}".prop_map(SqlValue::text),
        // text that is not (always) UTF-8
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(SqlValue::Text),
        // past 255 bytes, so lengths take two bytes
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(SqlValue::Blob),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keeps_bytes_that_are_not_utf8() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let (v, hex): (SqlValue, String) = conn
            .query_row(
                "SELECT CAST(x'ff00fe' AS TEXT), hex(CAST(x'ff00fe' AS TEXT))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(hex, "FF00FE");
        assert_eq!(v, SqlValue::Text(vec![0xff, 0x00, 0xfe]));
        assert_eq!(v.as_text(), Some(&[0xff, 0x00, 0xfe][..]));
        assert_eq!(v.as_str(), None);
        assert_eq!(format!("{v:?}"), "Text(x'ff00fe')");
        // and binds back as the same TEXT
        let (kind, back): (String, String) = conn
            .query_row("SELECT typeof(?1), hex(?1)", [&v], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((kind.as_str(), back.as_str()), ("text", "FF00FE"));
        assert_eq!(SqlValue::text("hi").as_str(), Some("hi"));
        assert_eq!(SqlValue::from(String::from("hi")), SqlValue::from("hi"));
        assert_eq!(SqlValue::Integer(1).as_text(), None);
    }

    #[test]
    fn serde_keeps_text_strings_and_odd_bytes() {
        let json = serde_json::to_string(&SqlValue::text("x")).unwrap();
        assert_eq!(json, r#"{"Text":"x"}"#);
        let odd = SqlValue::Text(vec![0xff, 0x00]);
        let json = serde_json::to_string(&odd).unwrap();
        assert_eq!(json, r#"{"Text":[255,0]}"#);
        assert_eq!(serde_json::from_str::<SqlValue>(&json).unwrap(), odd);
        assert_eq!(
            serde_json::from_str::<SqlValue>(r#"{"Text":"x"}"#).unwrap(),
            SqlValue::text("x")
        );
    }
}
