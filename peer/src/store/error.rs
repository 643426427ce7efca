//! Errors of the Store, one enum per operation.

use crate::ExtensionError;
use crate::pk::PkError;
use crate::proto::batch::BatchRejection;

/// Opening a [`Store`](crate::Store) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The cr-sqlite extension could not be loaded.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// SQLite refused to open or prepare the database.
    #[error("cannot open database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: std::path::PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file exists but is not a SQLite database.
    #[error("{} is not a SQLite database (file is not a database)", path.display())]
    NotADatabase {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The writer thread could not be started.
    #[error("cannot start the store's writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl OpenError {
    /// An error opening `path`: [`NotADatabase`](Self::NotADatabase) if the
    /// file exists, is not empty and lacks SQLite's header (cr-sqlite's
    /// init, run inside `sqlite3_open`, then fails with an empty message),
    /// else SQLite's own error.
    pub(crate) fn opening(path: &std::path::Path, source: rusqlite::Error) -> OpenError {
        if is_not_sqlite(path) {
            OpenError::NotADatabase {
                path: path.to_path_buf(),
            }
        } else {
            OpenError::Sqlite {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Whether `path` holds something other than a SQLite database (an empty
/// or missing file is a new database).
fn is_not_sqlite(path: &std::path::Path) -> bool {
    use std::io::Read as _;
    const HEADER: &[u8; 16] = b"SQLite format 3\0";
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = Vec::with_capacity(HEADER.len());
    match file
        .by_ref()
        .take(HEADER.len() as u64)
        .read_to_end(&mut head)
    {
        Ok(0) | Err(_) => false,
        Ok(_) => head.as_slice() != HEADER,
    }
}

/// A Store operation failed for a reason common to all of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The Store was closed (or its writer thread ended).
    #[error("the store is closed")]
    Closed,
    /// SQLite returned an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A worker thread could not be started.
    #[error("cannot start a store thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Turning tables into CRRs failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnableError {
    /// No such table.
    #[error("table {table:?} does not exist")]
    UnknownTable {
        /// The table named.
        table: String,
    },
    /// cr-sqlite replicates rows by primary key; this table has none.
    #[error("table {table:?} has no primary key; cr-sqlite needs one to replicate rows")]
    NoPrimaryKey {
        /// The table named.
        table: String,
    },
    /// cr-sqlite refused the table (for example a unique index besides the primary key).
    #[error("cr-sqlite cannot replicate table {table:?}: {reason}")]
    Rejected {
        /// The table named.
        table: String,
        /// cr-sqlite's reason.
        reason: String,
    },
    /// Any other failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One change of a batch is not valid for this database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidChange {
    /// The table is not a CRR here.
    #[error("unknown table {table:?}")]
    UnknownTable {
        /// The table named.
        table: String,
    },
    /// The column is not part of the table here.
    #[error("unknown column {column:?} in table {table:?}")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column named.
        column: String,
    },
    /// The primary key does not decode.
    #[error("malformed primary key: {0}")]
    MalformedPk(#[source] PkError),
    /// The primary key has the wrong number of columns.
    #[error("primary key has {found} columns, table has {expected}")]
    PkColumnCount {
        /// Columns in the table's key.
        expected: usize,
        /// Columns in the change's key.
        found: usize,
    },
    /// A version, causal length or sequence number below its minimum.
    #[error(
        "negative or zero version (db_version {db_version}, col_version {col_version}, cl {cl}, seq {seq})"
    )]
    NegativeVersion {
        /// Origin db_version (must be > 0).
        db_version: i64,
        /// Column version (must be >= 0).
        col_version: i64,
        /// Causal length (must be >= 0).
        cl: i64,
        /// Sequence (must be >= 0).
        seq: i64,
    },
}

/// Merging a batch failed; the database and cursor are unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The batch does not fit the receiver's cursor (gap, bad range).
    #[error("batch rejected: {0}")]
    Rejected(#[from] BatchRejection),
    /// A change in the batch is invalid.
    #[error("change #{index} of the batch is invalid: {reason}")]
    Invalid {
        /// Position of the change in the batch.
        index: usize,
        /// What is wrong.
        #[source]
        reason: InvalidChange,
    },
    /// The sender's schema (`user_version`) is newer than ours: its changes
    /// may use columns we lack. They wait until our schema catches up.
    #[error("the sender's schema version {theirs} is newer than ours ({ours})")]
    Outdated {
        /// Our `user_version`.
        ours: i64,
        /// The sender's.
        theirs: i64,
    },
    /// Any other failure (the transaction was rolled back).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for MergeError {
    fn from(e: rusqlite::Error) -> Self {
        MergeError::Store(StoreError::Sqlite(e))
    }
}

impl From<rusqlite::Error> for EnableError {
    fn from(e: rusqlite::Error) -> Self {
        EnableError::Store(StoreError::Sqlite(e))
    }
}
