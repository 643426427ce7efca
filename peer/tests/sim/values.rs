//! The simulated schema, the values written into it, the last-writer-wins
//! order both peer models merge by, and JavaScript's view of values (what a
//! v1 peer writes and reads).

use std::cmp::Ordering;

use crsync_peer::{Affinity, PackedPk, SiteId, SqlValue};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::Value as Json;

/// The CRR tables (each with an INTEGER primary key).
pub const TABLES: [&str; 2] = ["t", "u"];
/// The non-pk columns of every table, with their declared affinity.
pub const COLUMNS: [(&str, Affinity); 4] = [
    ("a", Affinity::Integer),
    ("r", Affinity::Real),
    ("s", Affinity::Text),
    ("b", Affinity::Blob),
];

/// One cell: `(table, pk, column)`, as indexes into [`TABLES`] and [`COLUMNS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    pub table: u8,
    pub pk: i64,
    pub col: u8,
}

impl CellKey {
    pub fn table_name(&self) -> &'static str {
        TABLES[self.table as usize]
    }

    pub fn cid(&self) -> &'static str {
        COLUMNS[self.col as usize].0
    }

    pub fn affinity(&self) -> Affinity {
        COLUMNS[self.col as usize].1
    }

    pub fn packed_pk(&self) -> PackedPk {
        PackedPk::pack(&[SqlValue::Integer(self.pk)])
    }

    /// The key of a change as on the wire; `None` if it names nothing we have.
    pub fn parse(table: &str, pk: &PackedPk, cid: &str) -> Option<CellKey> {
        let table = TABLES.iter().position(|t| *t == table)? as u8;
        let col = COLUMNS.iter().position(|(c, _)| *c == cid)? as u8;
        match pk.unpack().ok()?.as_slice() {
            [SqlValue::Integer(pk)] => Some(CellKey {
                table,
                pk: *pk,
                col,
            }),
            _ => None,
        }
    }
}

/// A version of a cell: what LWW compares (cl is always 1: no deletes).
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub col_version: i64,
    pub val: SqlValue,
    pub site: SiteId,
}

/// cr-sqlite's type order (`sqlite3_value_type`: INTEGER, FLOAT, TEXT, BLOB, NULL).
fn type_rank(v: &SqlValue) -> u8 {
    match v {
        SqlValue::Integer(_) => 1,
        SqlValue::Real(_) => 2,
        SqlValue::Text(_) => 3,
        SqlValue::Blob(_) => 4,
        SqlValue::Null => 5,
    }
}

/// A total order on the values the simulator generates (NaN is never generated;
/// `-0.0` equals `0.0`, as in SQLite).
pub fn cmp_values(a: &SqlValue, b: &SqlValue) -> Ordering {
    match (a, b) {
        (SqlValue::Integer(x), SqlValue::Integer(y)) => x.cmp(y),
        (SqlValue::Real(x), SqlValue::Real(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        (SqlValue::Text(x), SqlValue::Text(y)) | (SqlValue::Blob(x), SqlValue::Blob(y)) => x.cmp(y),
        (SqlValue::Null, SqlValue::Null) => Ordering::Equal,
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

/// The LWW order of cr-sqlite with `merge-equal-values`: column version, then
/// value, then site id.
pub fn cmp_versions(a: &Version, b: &Version) -> Ordering {
    a.col_version
        .cmp(&b.col_version)
        .then_with(|| cmp_values(&a.val, &b.val))
        .then_with(|| a.site.cmp(&b.site))
}

/// Whether a write of `val` over `current` changes the cell (SQLite's `IS NOT`).
pub fn changes(current: Option<&SqlValue>, val: &SqlValue) -> bool {
    match current {
        None => true,
        Some(c) => cmp_values(c, val) != Ordering::Equal,
    }
}

/// A value for a column. `lossy`: include values a v1 (JavaScript) peer cannot
/// carry exactly (integers beyond 2^53 that no double holds, non-finite
/// reals, reals in `[2^63, 2^64)`, text that is not UTF-8); only scenarios
/// without v1 peers use them. Integers beyond 2^53 that a double holds
/// exactly (2^60, printed by JavaScript as `1152921504606847000`) are always in.
pub fn gen_value(rng: &mut StdRng, col: u8, lossy: bool) -> SqlValue {
    if rng.random_bool(0.08) {
        return SqlValue::Null;
    }
    let lossy = lossy && rng.random_bool(0.3);
    match COLUMNS[col as usize].1 {
        Affinity::Integer => {
            if lossy {
                let big = [
                    i64::MAX,
                    i64::MIN,
                    i64::MAX - 1,
                    (1 << 53) + 1,
                    -(1 << 53) - 1,
                ];
                SqlValue::Integer(big[rng.random_range(0..big.len())])
            } else if rng.random_bool(0.7) {
                SqlValue::Integer(rng.random_range(-3..=3))
            } else if rng.random_bool(0.8) {
                SqlValue::Integer(rng.random_range(-100_000..100_000))
            } else {
                // Beyond 2^53 only what a double holds exactly survives
                // JavaScript: JSON.stringify(-(2**63)) is -9223372036854776000,
                // which an INTEGER column reads back as i64::MIN.
                let edges = [
                    (1i64 << 53) - 1,
                    -((1i64 << 53) - 1),
                    1 << 53,
                    i64::MIN,
                    1 << 60,
                    -(1 << 62),
                ];
                SqlValue::Integer(edges[rng.random_range(0..edges.len())])
            }
        }
        Affinity::Real => {
            let reals: &[f64] = if lossy {
                &[
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    1e19,
                    9_223_372_036_854_775_808.0,
                ]
            } else {
                &[
                    0.5,
                    -2.25,
                    3.0,
                    0.0,
                    -0.0,
                    1e300,
                    1e20,
                    0.1 + 0.2,
                    123.456,
                    -1.5e-7,
                ]
            };
            SqlValue::Real(reals[rng.random_range(0..reals.len())])
        }
        Affinity::Text => {
            if lossy {
                SqlValue::Text(vec![0xff, 0x00, 0xfe])
            } else {
                let texts = ["", "x", "y", "hé", "a longer text, with \"quotes\""];
                SqlValue::text(texts[rng.random_range(0..texts.len())])
            }
        }
        _ => {
            let blobs: [&[u8]; 4] = [&[], &[0], &[1, 2, 255], &[7; 9]];
            SqlValue::Blob(blobs[rng.random_range(0..blobs.len())].to_vec())
        }
    }
}

// ---- JavaScript

/// JSON as JavaScript's `JSON.stringify` writes a number.
pub use crsync_peer::wire::js_number_text as js_number;

/// A JavaScript number as it arrives in JSON (parsed from its text, so
/// `9223372036854776000` is a u64 and `1` an integer).
fn js_number_json(d: f64) -> Json {
    serde_json::from_str(&js_number(d)).unwrap_or(Json::Null)
}

/// Node Buffer JSON.
fn buffer_json(bytes: &[u8]) -> Json {
    serde_json::json!({"type": "Buffer", "data": bytes})
}

/// A stored value as a v1 peer sends it: `JSON.stringify` of what
/// better-sqlite3 reads (numbers are doubles, blobs Buffers).
pub fn js_json(v: &SqlValue) -> Json {
    match v {
        SqlValue::Null => Json::Null,
        SqlValue::Integer(i) => js_number_json(*i as f64),
        SqlValue::Real(f) => js_number_json(*f),
        SqlValue::Text(t) => Json::String(String::from_utf8_lossy(t).into_owned()),
        SqlValue::Blob(b) => buffer_json(b),
    }
}

/// What SQLite stores when a JavaScript number (a double) is bound into a
/// column of this affinity.
fn store_number(f: f64, affinity: Affinity) -> SqlValue {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    match affinity {
        Affinity::Integer | Affinity::Numeric
            if f.is_finite() && f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f) =>
        {
            SqlValue::Integer(f as i64)
        }
        _ => SqlValue::Real(f),
    }
}

/// A value crsync sent, as a v1 peer reads it (`JSON.parse`, leniently) and
/// stores it in a column of this affinity.
pub fn js_read(v: &Json, affinity: Affinity) -> SqlValue {
    use base64::Engine;
    match v {
        Json::Null => SqlValue::Null,
        Json::Bool(b) => store_number(if *b { 1.0 } else { 0.0 }, affinity),
        Json::Number(n) => store_number(n.as_f64().unwrap_or(f64::NAN), affinity),
        Json::String(s) => SqlValue::text(s.as_str()),
        Json::Object(map) => {
            if map.get("type").and_then(Json::as_str) == Some("Buffer") {
                let bytes = map
                    .get("data")
                    .and_then(Json::as_array)
                    .map(|a| a.iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect())
                    .unwrap_or_default();
                return SqlValue::Blob(bytes);
            }
            if let Some(b64) = map.get("$blob").and_then(Json::as_str) {
                let engine = base64::engine::general_purpose::STANDARD;
                return SqlValue::Blob(engine.decode(b64).unwrap_or_default());
            }
            if let Some(int) = map.get("$int").and_then(Json::as_str) {
                return store_number(int.parse::<f64>().unwrap_or(f64::NAN), affinity);
            }
            SqlValue::text(v.to_string())
        }
        Json::Array(_) => SqlValue::text(v.to_string()),
    }
}
