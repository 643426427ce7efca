//! [`PackedPk`]: cr-sqlite's packed primary-key encoding, decoded and checked.
//!
//! cr-sqlite identifies a row in `crsql_changes` by `crsql_pack_columns(pk...)`:
//! one byte with the number of columns, then per column a type byte whose low
//! three bits are the SQLite type and whose high five bits are the width of the
//! big-endian integer that follows (the value for integers, the length for text
//! and blobs), then the bytes. cr-sqlite itself panics on malformed input, so
//! every key from outside is checked here before it reaches SQLite. Text is
//! kept as the bytes SQLite holds, UTF-8 or not (there is no UTF-8 check, as
//! there is none in SQLite), so any key a replica holds can be replicated.

use crate::SqlValue;

const TYPE_INTEGER: u8 = 1;
const TYPE_FLOAT: u8 = 2;
const TYPE_TEXT: u8 = 3;
const TYPE_BLOB: u8 = 4;
const TYPE_NULL: u8 = 5;

/// A packed primary key as stored in `crsql_changes.pk` (lowercase hex on the wire).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct PackedPk(#[serde(with = "hex_bytes")] pub Vec<u8>);

/// Why a packed primary key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PkError {
    /// The key has no bytes at all.
    #[error("empty primary key")]
    Empty,
    /// The key ends before a column it announces.
    #[error("primary key truncated in column {column}")]
    Truncated {
        /// Zero-based column index.
        column: usize,
    },
    /// An unknown type tag.
    #[error("primary key column {column} has unknown type tag {tag}")]
    UnknownType {
        /// Zero-based column index.
        column: usize,
        /// The tag found.
        tag: u8,
    },
    /// An integer or length field wider than allowed.
    #[error("primary key column {column} has an integer width of {width} bytes")]
    BadWidth {
        /// Zero-based column index.
        column: usize,
        /// The width found.
        width: usize,
    },
    /// Bytes left after the last column.
    #[error("{extra} trailing bytes after the primary key")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

impl PackedPk {
    /// Packs values the way `crsql_pack_columns` does.
    ///
    /// ```
    /// use crsync_peer::{PackedPk, SqlValue};
    /// let pk = PackedPk::pack(&[SqlValue::Integer(1)]);
    /// assert_eq!(pk.0, vec![1, 0b0000_1001, 1]);
    /// assert_eq!(pk.unpack().unwrap(), vec![SqlValue::Integer(1)]);
    /// ```
    pub fn pack(values: &[SqlValue]) -> PackedPk {
        let mut out = vec![values.len() as u8];
        for v in values {
            match v {
                SqlValue::Null => out.push(TYPE_NULL),
                SqlValue::Integer(i) => {
                    let width = int_width(*i);
                    out.push((width as u8) << 3 | TYPE_INTEGER);
                    out.extend_from_slice(&i.to_be_bytes()[8 - width..]);
                }
                SqlValue::Real(f) => {
                    out.push(TYPE_FLOAT);
                    out.extend_from_slice(&f.to_be_bytes());
                }
                SqlValue::Text(t) => push_bytes(&mut out, TYPE_TEXT, t),
                SqlValue::Blob(b) => push_bytes(&mut out, TYPE_BLOB, b),
            }
        }
        PackedPk(out)
    }

    /// Decodes and checks the key; the same rules cr-sqlite reads it with.
    pub fn unpack(&self) -> Result<Vec<SqlValue>, PkError> {
        let mut rest: &[u8] = &self.0;
        let (&count, tail) = rest.split_first().ok_or(PkError::Empty)?;
        rest = tail;
        let mut values = Vec::with_capacity(count as usize);
        for column in 0..count as usize {
            let (&tag, tail) = rest.split_first().ok_or(PkError::Truncated { column })?;
            rest = tail;
            let width = (tag >> 3) as usize;
            let value = match tag & 0x07 {
                TYPE_NULL => SqlValue::Null,
                TYPE_FLOAT => {
                    let bytes = take(&mut rest, 8, column)?;
                    let mut arr = [0u8; 8];
                    arr.copy_from_slice(bytes);
                    SqlValue::Real(f64::from_be_bytes(arr))
                }
                TYPE_INTEGER => {
                    if width > 8 {
                        return Err(PkError::BadWidth { column, width });
                    }
                    SqlValue::Integer(read_int(take(&mut rest, width, column)?))
                }
                t @ (TYPE_TEXT | TYPE_BLOB) => {
                    if width > 4 {
                        return Err(PkError::BadWidth { column, width });
                    }
                    let len = read_int(take(&mut rest, width, column)?);
                    let len = usize::try_from(len).map_err(|_| PkError::Truncated { column })?;
                    let bytes = take(&mut rest, len, column)?;
                    if t == TYPE_TEXT {
                        // as SQLite holds it: text need not be UTF-8
                        SqlValue::Text(bytes.to_vec())
                    } else {
                        SqlValue::Blob(bytes.to_vec())
                    }
                }
                tag => return Err(PkError::UnknownType { column, tag }),
            };
            values.push(value);
        }
        if !rest.is_empty() {
            return Err(PkError::TrailingBytes { extra: rest.len() });
        }
        Ok(values)
    }
}

impl std::fmt::Debug for PackedPk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedPk({})", hex::encode(&self.0))
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize, column: usize) -> Result<&'a [u8], PkError> {
    if rest.len() < n {
        return Err(PkError::Truncated { column });
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// Big-endian and zero-extended from its width, as cr-sqlite 0.16 reads it
/// (negative integers are always written with all 8 bytes).
fn read_int(bytes: &[u8]) -> i64 {
    bytes.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)) as i64
}

/// The width cr-sqlite picks: the number of low bytes that hold any set bit.
fn int_width(i: i64) -> usize {
    let u = i as u64;
    (8 - (u.leading_zeros() / 8) as usize).min(8)
}

fn push_bytes(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    let len = bytes.len() as i64;
    let width = int_width(len);
    out.push((width as u8) << 3 | tag);
    out.extend_from_slice(&len.to_be_bytes()[8 - width..]);
    out.extend_from_slice(bytes);
}

mod hex_bytes {
    pub(crate) fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        hex::decode(s.as_ref()).map_err(serde::de::Error::custom)
    }
    use serde::Deserialize;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_unpack_round_trips(values in proptest::collection::vec(crate::value::arbitrary_value(), 1..4)) {
            let pk = PackedPk::pack(&values);
            prop_assert_eq!(pk.unpack().unwrap(), values);
        }

        #[test]
        fn unpack_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = PackedPk(bytes).unpack();
        }
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(PackedPk(vec![]).unpack(), Err(PkError::Empty));
        assert_eq!(
            PackedPk(vec![1]).unpack(),
            Err(PkError::Truncated { column: 0 })
        );
        assert_eq!(
            PackedPk(vec![1, 0x07]).unpack(),
            Err(PkError::UnknownType { column: 0, tag: 7 })
        );
        assert_eq!(
            PackedPk(vec![1, 9 << 3 | TYPE_INTEGER]).unpack(),
            Err(PkError::BadWidth {
                column: 0,
                width: 9
            })
        );
        assert_eq!(
            PackedPk(vec![1, TYPE_NULL, 0]).unpack(),
            Err(PkError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn text_that_is_not_utf8_keeps_its_bytes() {
        let pk = PackedPk(vec![1, 1 << 3 | TYPE_TEXT, 2, 0xff, 0xfe]);
        let values = pk.unpack().unwrap();
        assert_eq!(values, vec![SqlValue::Text(vec![0xff, 0xfe])]);
        assert_eq!(PackedPk::pack(&values), pk);
    }

    #[test]
    fn negative_and_wide_integers() {
        for i in [0, -1, 255, 256, -129, i64::MIN, i64::MAX] {
            let pk = PackedPk::pack(&[SqlValue::Integer(i)]);
            assert_eq!(pk.unpack().unwrap(), vec![SqlValue::Integer(i)], "{i}");
        }
    }
}
