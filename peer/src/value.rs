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

/// A column's type affinity: how SQLite converts the values stored in it
/// (<https://sqlite.org/datatype3.html>, section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Affinity {
    /// `INTEGER` affinity.
    Integer,
    /// `TEXT` affinity.
    Text,
    /// `BLOB` affinity (no conversion): also a column without a declared type.
    Blob,
    /// `REAL` affinity.
    Real,
    /// `NUMERIC` affinity.
    Numeric,
}

impl Affinity {
    /// The affinity SQLite gives a column declared with type `decl`
    /// (the rules of section 3.1, in their order).
    ///
    /// ```
    /// use crsync_peer::Affinity;
    /// assert_eq!(Affinity::of_declared_type("BIGINT"), Affinity::Integer);
    /// assert_eq!(Affinity::of_declared_type("VARCHAR(10)"), Affinity::Text);
    /// assert_eq!(Affinity::of_declared_type(""), Affinity::Blob);
    /// assert_eq!(Affinity::of_declared_type("double precision"), Affinity::Real);
    /// assert_eq!(Affinity::of_declared_type("DECIMAL(10,5)"), Affinity::Numeric);
    /// // the order matters: "POINT" contains "INT"
    /// assert_eq!(Affinity::of_declared_type("FLOATING POINT"), Affinity::Integer);
    /// ```
    pub fn of_declared_type(decl: &str) -> Affinity {
        let decl = decl.to_ascii_uppercase();
        let has = |s: &str| decl.contains(s);
        if has("INT") {
            Affinity::Integer
        } else if has("CHAR") || has("CLOB") || has("TEXT") {
            Affinity::Text
        } else if has("BLOB") || decl.trim().is_empty() {
            Affinity::Blob
        } else if has("REAL") || has("FLOA") || has("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

/// Two to the 63rd: the first double above `i64::MAX`.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// What a JavaScript sender meant by `value`, given the receiving column's
/// affinity, with a note when that is only an approximation.
///
/// A JavaScript peer holds every number as a double and prints integral ones
/// as integers, so the wire loses INTEGER versus REAL; the column's declared
/// type tells them apart again:
/// - an integer in a REAL column is that real (exact: it was printed from a double);
/// - an integral real in an INTEGER or NUMERIC column is that integer when it
///   fits in `i64`, else it saturates to `i64::MIN`/`i64::MAX`, noted;
/// - everything else is unchanged (TEXT columns convert on their own, and a
///   BLOB column keeps what it is given).
///
/// ```
/// use crsync_peer::{Affinity, SqlValue, normalize_js};
/// assert_eq!(normalize_js(SqlValue::Integer(1), Affinity::Real), (SqlValue::Real(1.0), None));
/// assert_eq!(normalize_js(SqlValue::Real(i64::MIN as f64), Affinity::Integer),
///            (SqlValue::Integer(i64::MIN), None));
/// assert_eq!(normalize_js(SqlValue::Real(1.5), Affinity::Integer), (SqlValue::Real(1.5), None));
/// ```
pub fn normalize_js(value: SqlValue, affinity: Affinity) -> (SqlValue, Option<String>) {
    match (value, affinity) {
        (SqlValue::Integer(i), Affinity::Real) => (SqlValue::Real(i as f64), None),
        (SqlValue::Real(f), Affinity::Integer | Affinity::Numeric)
            if f.is_finite() && f.fract() == 0.0 =>
        {
            // `as` saturates, and is exact inside the range
            let i = f as i64;
            if (-TWO_POW_63..TWO_POW_63).contains(&f) {
                (SqlValue::Integer(i), None)
            } else {
                let note = format!("integral real {f:e} is beyond i64, taken as {i}");
                (SqlValue::Integer(i), Some(note))
            }
        }
        (value, _) => (value, None),
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
    fn affinity_follows_sqlite_rules() {
        use Affinity::*;
        for (decl, affinity) in [
            ("INTEGER", Integer),
            ("int", Integer),
            ("UNSIGNED BIG INT", Integer),
            ("INT8", Integer),
            ("CHARACTER(20)", Text),
            ("NVARCHAR(100)", Text),
            ("text", Text),
            ("CLOB", Text),
            ("BLOB", Blob),
            ("", Blob),
            ("REAL", Real),
            ("DOUBLE", Real),
            ("Float", Real),
            ("NUMERIC", Numeric),
            ("DECIMAL(10,5)", Numeric),
            ("BOOLEAN", Numeric),
            ("DATETIME", Numeric),
            ("STRING", Numeric),
            // rule order: INT before CHAR, CHAR before BLOB, BLOB before REAL
            ("CHARINT", Integer),
            ("BLOBCHAR", Text),
            ("REALBLOB", Blob),
        ] {
            assert_eq!(Affinity::of_declared_type(decl), affinity, "{decl:?}");
        }
    }

    #[test]
    fn normalize_js_by_affinity() {
        use Affinity::*;
        let same = |v: SqlValue, a| assert_eq!(normalize_js(v.clone(), a), (v, None), "{a:?}");
        // what JavaScript could not tell apart
        assert_eq!(
            normalize_js(SqlValue::Integer(3), Real),
            (SqlValue::Real(3.0), None)
        );
        assert_eq!(
            normalize_js(SqlValue::Real(3.0), Integer),
            (SqlValue::Integer(3), None)
        );
        assert_eq!(
            normalize_js(SqlValue::Real(-0.0), Numeric),
            (SqlValue::Integer(0), None)
        );
        // beyond i64: saturated, noted
        for (f, i) in [(1e19, i64::MAX), (TWO_POW_63, i64::MAX), (-1e30, i64::MIN)] {
            let (v, note) = normalize_js(SqlValue::Real(f), Integer);
            assert_eq!(v, SqlValue::Integer(i), "{f}");
            assert!(note.is_some(), "{f}");
        }
        // everything else unchanged
        same(SqlValue::Real(1.5), Integer);
        same(SqlValue::Real(f64::INFINITY), Integer);
        same(SqlValue::Real(3.0), Blob);
        same(SqlValue::Real(3.0), Text);
        same(SqlValue::Integer(3), Integer);
        same(SqlValue::Integer(3), Blob);
        same(SqlValue::Integer(3), Text);
        same(SqlValue::text("3"), Integer);
        same(SqlValue::Blob(vec![1]), Real);
        same(SqlValue::Null, Real);
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
