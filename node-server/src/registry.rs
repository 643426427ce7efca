//! The [`Registry`] of databases served from one data directory, opened
//! lazily and created on first use when allowed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crsync_peer::{Store, StoreError};
use tokio::sync::OnceCell;

use crate::Peer;
use crate::admin::RecentErrors;
use crate::error::ApiError;
use crate::host::DbHost;
use crate::limits::Limits;
use crate::routes::Opened;
use crate::snapshot::SNAPSHOT_DIR;
use crate::snapshot::cache::SnapshotCache;

/// Messages each server session queues for its connection before it waits:
/// behind it is the connection's byte-bounded queue, so one is enough, and
/// each may be a whole batch.
const SERVER_OUTBOX_CAP: usize = 1;

/// Longest database name.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid database name: `[A-Za-z0-9_-]{1,64}`.
///
/// ```
/// use crsync_node_server::valid_database_name;
/// assert!(valid_database_name("notes_2024-a"));
/// assert!(!valid_database_name("../etc"));
/// assert!(!valid_database_name(""));
/// ```
pub fn valid_database_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How databases are opened and created.
#[derive(Debug, Clone)]
pub(crate) struct RegistryOptions {
    pub(crate) data_dir: PathBuf,
    pub(crate) schema_sql: Option<String>,
    pub(crate) ping_interval: Duration,
    pub(crate) extension_path: Option<PathBuf>,
    pub(crate) limits: Arc<Limits>,
    /// `snapshot_threshold` (0: snapshots are off).
    pub(crate) snapshot_threshold: u64,
    /// Where each database's Peer reports its errors.
    pub(crate) recent: Arc<RecentErrors>,
}

type Cell = Arc<OnceCell<Arc<DbHost>>>;

/// All databases served from one data directory.
pub(crate) struct Registry {
    options: RegistryOptions,
    hosts: Mutex<HashMap<String, Cell>>,
    closing: std::sync::atomic::AtomicBool,
}

impl Registry {
    pub(crate) fn new(options: RegistryOptions) -> Self {
        Registry {
            options,
            hosts: Mutex::new(HashMap::new()),
            closing: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cell>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The host of database `name`, opening it on first use, or creating it
    /// when `create` (the caller's token may create databases).
    pub(crate) async fn get(&self, name: &str, create: bool) -> Result<Opened, ApiError> {
        if !valid_database_name(name) {
            return Err(ApiError::malformed(format!(
                "invalid database name {name:?}: expected [A-Za-z0-9_-]{{1,{MAX_NAME_LEN}}}"
            )));
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        let cell = Arc::clone(self.lock().entry(name.to_string()).or_default());
        let mut created = false;
        let opened = cell
            .get_or_try_init(|| async {
                let (host, made) = self.open(name, create).await?;
                created = made;
                Ok::<_, ApiError>(host)
            })
            .await;
        match opened {
            Ok(host) if self.closing.load(std::sync::atomic::Ordering::SeqCst) => {
                // Opened while shutdown drained the registry: close it here.
                host.shutdown().await;
                Err(ApiError::shutting_down())
            }
            Ok(host) => Ok(Opened {
                host: Arc::clone(host),
                created,
            }),
            Err(e) => {
                // Forget names that failed to open, so unknown names cannot grow the map.
                let mut hosts = self.lock();
                if hosts
                    .get(name)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
                {
                    hosts.remove(name);
                }
                Err(e)
            }
        }
    }

    /// Opens (or, when `create`, creates) database `name`; whether it was created.
    async fn open(&self, name: &str, create: bool) -> Result<(Arc<DbHost>, bool), ApiError> {
        let path = self.options.data_dir.join(format!("{name}.db"));
        let exists = tokio::fs::try_exists(&path)
            .await
            .map_err(|e| ApiError::internal(format!("cannot look for database {name:?}: {e}")))?;
        if !exists {
            if !create {
                return Err(ApiError::unknown_database(name));
            }
            self.create(name, &path).await.map_err(|e| {
                tracing::error!(db = name, "cannot create database: {e}");
                ApiError::internal(format!("cannot create database {name:?}: {e}"))
            })?;
        }
        let cannot_open = |e: &dyn std::fmt::Display| {
            ApiError::internal(format!("cannot open database {name:?}: {e}"))
        };
        let mut store = self
            .store_builder(&path)
            .open()
            .await
            .map_err(|e| cannot_open(&e))?;
        if let Some(copy) = store.copied().cloned() {
            // A moved data directory or a cloned server: a replica the server
            // owns alone, so forking it is always right (nothing is lost).
            tracing::warn!(db = name, %copy, "database file is a copy; forking it");
            store.close().await.map_err(|e| cannot_open(&e))?;
            let ext = self.options.extension_path.as_deref();
            let report = Store::fork(&path, ext).await.map_err(|e| cannot_open(&e))?;
            tracing::warn!(db = name, old = %report.old_site, new = %report.new_site, "database forked");
            store = self
                .store_builder(&path)
                .open()
                .await
                .map_err(|e| cannot_open(&e))?;
        }
        tracing::info!(db = name, site = %store.site_id(), "database opened");
        let peer = Peer::builder(store)
            .ping_interval(self.options.ping_interval)
            .outbox(SERVER_OUTBOX_CAP)
            .max_claim_sites(self.options.limits.config().max_claim_sites)
            .build();
        let snapshots = (self.options.snapshot_threshold > 0).then(|| {
            SnapshotCache::new(
                self.options.data_dir.join(SNAPSHOT_DIR),
                name,
                self.options.snapshot_threshold,
            )
        });
        let host = DbHost::new(name, peer, Arc::clone(&self.options.limits), snapshots);
        let recent = Arc::clone(&self.options.recent);
        let (events, closed) = (host.peer().events(), host.closed());
        let database = name.to_owned();
        // Ends when the database closes.
        drop(tokio::spawn(async move {
            recent.watch(database, events, closed).await;
        }));
        Ok((host, !exists))
    }

    /// The databases open now.
    pub(crate) fn open_hosts(&self) -> Vec<Arc<DbHost>> {
        let cells: Vec<Cell> = self.lock().values().cloned().collect();
        cells.iter().filter_map(|c| c.get().cloned()).collect()
    }

    /// Every database file in the data directory (`<name>.db`), by name.
    pub(crate) async fn database_files(&self) -> Vec<(String, PathBuf)> {
        let mut files = Vec::new();
        let Ok(mut dir) = tokio::fs::read_dir(&self.options.data_dir).await else {
            return files;
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".db"));
            if let Some(name) = name.filter(|n| valid_database_name(n)) {
                files.push((name.to_owned(), path.clone()));
            }
        }
        files.sort();
        files
    }

    fn store_builder(&self, path: &Path) -> crsync_peer::StoreBuilder {
        let limits = self.options.limits.config();
        let builder = Store::builder(path)
            .max_batch_bytes(limits.batch_bytes)
            .max_readers(limits.max_readers)
            .live_tail(limits.live_tail);
        match &self.options.extension_path {
            Some(ext) => builder.extension_path(ext),
            None => builder,
        }
    }

    /// Creates the replica under a temporary name, applies the schema, makes
    /// its tables CRRs, then moves it into place: a failure leaves nothing.
    async fn create(&self, name: &str, path: &Path) -> Result<(), CreateError> {
        tokio::fs::create_dir_all(&self.options.data_dir).await?;
        let tmp = self.options.data_dir.join(format!(".{name}.db.creating"));
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = tokio::fs::remove_file(format!("{}{suffix}", tmp.display())).await;
        }
        let store = self.store_builder(&tmp).open().await?;
        let result = apply_schema(&store, self.options.schema_sql.clone()).await;
        store.close().await?;
        result?;
        tokio::fs::rename(&tmp, path).await?;
        tracing::info!(db = name, "database created");
        Ok(())
    }

    /// Shuts every open database down.
    pub(crate) async fn shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let cells: Vec<Cell> = self.lock().drain().map(|(_, c)| c).collect();
        let hosts = cells.iter().filter_map(|c| c.get().cloned());
        futures_util::future::join_all(hosts.map(|h| async move { h.shutdown().await })).await;
    }
}

/// Creating a database failed.
#[derive(Debug, thiserror::Error)]
enum CreateError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Open(#[from] crsync_peer::OpenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enable(#[from] crsync_peer::EnableError),
}

/// Runs `sql` and turns every table it created into a CRR.
async fn apply_schema(store: &Store, sql: Option<String>) -> Result<(), CreateError> {
    let Some(sql) = sql else { return Ok(()) };
    let before = user_tables(store).await?;
    store.write(move |tx| tx.execute_batch(&sql)).await?;
    let created: Vec<String> = user_tables(store)
        .await?
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    if !created.is_empty() {
        let names: Vec<&str> = created.iter().map(String::as_str).collect();
        store.enable_crr(&names).await?;
    }
    Ok(())
}

/// Rows per user table (not our bookkeeping's `crsync_*` tables).
pub(crate) async fn row_counts(store: &Store) -> Result<Vec<(String, u64)>, StoreError> {
    let mut tables = user_tables(store).await?;
    tables.retain(|t| !t.starts_with("crsync_"));
    store
        .read(move |conn| {
            tables
                .into_iter()
                .map(|t| {
                    let sql = format!("SELECT count(*) FROM \"{}\"", t.replace('"', "\"\""));
                    let rows: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
                    Ok((t, rows.max(0) as u64))
                })
                .collect()
        })
        .await
}

async fn user_tables(store: &Store) -> Result<Vec<String>, StoreError> {
    store
        .read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '%crsql%' ORDER BY name",
            )?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            rows.collect()
        })
        .await
}
