//! [`SnapshotCache`]: one database's cached snapshot: a file named by its
//! content hash plus a small JSON manifest under `<data_dir>/.snapshots/`,
//! rebuilt only when the database has moved on by the threshold.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crsync_peer::proto::snapshot::SnapshotInfo;
use crsync_peer::{Cursor, SiteId, Store};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Version of the manifest format.
const MANIFEST_FORMAT: u32 = 1;
/// Hex digits of the content hash in a snapshot's file name.
const NAME_HASH_LEN: usize = 16;
/// Read size when hashing a snapshot.
const HASH_CHUNK: usize = 256 * 1024;

/// What is known of a cached snapshot, kept beside it as `<db>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    format: u32,
    /// The snapshot's file name in the snapshot directory.
    file: String,
    pub(crate) sha256: String,
    pub(crate) bytes: u64,
    pub(crate) changes: u64,
    pub(crate) site_id: SiteId,
    pub(crate) version: i64,
    pub(crate) cursor: Cursor,
    pub(crate) built_at_ms: u64,
    /// How long making it took.
    pub(crate) build_ms: u64,
}

/// A cached snapshot file. Superseded files are removed once the last
/// request that resolved them has opened them (dropped its `Arc`).
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) path: PathBuf,
    pub(crate) manifest: Manifest,
    superseded: AtomicBool,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.superseded.load(Ordering::SeqCst) {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {
                    tracing::debug!(file = %self.path.display(), "removed a superseded snapshot")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), "cannot remove a superseded snapshot: {e}")
                }
            }
        }
    }
}

/// A snapshot to serve, and how far the database has moved on since.
#[derive(Debug, Clone)]
pub(crate) struct Current {
    pub(crate) snapshot: Arc<Snapshot>,
    /// Changes the database holds beyond the snapshot.
    pub(crate) behind: u64,
    pub(crate) threshold: u64,
}

impl Current {
    /// The `info` answer.
    pub(crate) fn info(&self) -> SnapshotInfo {
        let m = &self.snapshot.manifest;
        SnapshotInfo {
            sha256: m.sha256.clone(),
            bytes: m.bytes,
            changes: m.changes,
            behind: self.behind,
            site_id: m.site_id,
            version: m.version,
            cursor: m.cursor.clone(),
            threshold: self.threshold,
            built_at_ms: m.built_at_ms,
        }
    }
}

/// Why no snapshot is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The database holds fewer changes than the threshold: replay is cheap.
    Small {
        /// Its changes.
        changes: u64,
        /// The threshold.
        threshold: u64,
    },
    /// Making or reading the snapshot failed (logged).
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    /// The manifest on disk was read (once, on first use).
    loaded: bool,
    current: Option<Arc<Snapshot>>,
}

/// One database's snapshot cache. Requests for it queue on one lock, so one
/// build runs at a time and the requests behind it get what it built.
#[derive(Debug)]
pub(crate) struct SnapshotCache {
    dir: PathBuf,
    name: String,
    threshold: u64,
    state: tokio::sync::Mutex<State>,
}

impl SnapshotCache {
    /// The cache of database `name` in `dir`, for a threshold above 0.
    pub(crate) fn new(dir: PathBuf, name: &str, threshold: u64) -> Self {
        SnapshotCache {
            dir,
            name: name.to_owned(),
            threshold: threshold.max(1),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The snapshot to serve for `store`: the cached one if the database
    /// moved on by less than the threshold since, else a new one. Runs as a
    /// task of its own, so a request that goes away never cuts a build short.
    pub(crate) async fn current(self: &Arc<Self>, store: &Store) -> Result<Current, Unavailable> {
        let this = Arc::clone(self);
        let store = store.clone();
        tokio::spawn(async move { this.ensure(&store).await })
            .await
            .unwrap_or_else(|e| {
                Err(Unavailable::Failed(format!(
                    "the snapshot task failed: {e}"
                )))
            })
    }

    async fn ensure(&self, store: &Store) -> Result<Current, Unavailable> {
        let mut state = self.state.lock().await;
        if !state.loaded {
            state.current = self.load(store.site_id()).await;
            state.loaded = true;
        }
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(db = %self.name, "{what}: {e}");
            Unavailable::Failed(format!("{what}: {e}"))
        };
        if let Some(cached) = &state.current {
            let behind = store
                .count_changes_after(cached.manifest.version)
                .await
                .map_err(|e| failed("cannot count the changes since the snapshot", &e))?;
            if behind < self.threshold && cached.manifest.site_id == store.site_id() {
                return Ok(Current {
                    snapshot: Arc::clone(cached),
                    behind,
                    threshold: self.threshold,
                });
            }
        } else {
            let changes = store
                .count_changes_after(0)
                .await
                .map_err(|e| failed("cannot count the database's changes", &e))?;
            if changes < self.threshold {
                return Err(Unavailable::Small {
                    changes,
                    threshold: self.threshold,
                });
            }
        }
        let built = self
            .build(store)
            .await
            .map_err(|e| failed("cannot make a snapshot", &e))?;
        metrics::counter!(crate::telemetry::SNAPSHOTS_BUILT_TOTAL, "database" => self.name.clone())
            .increment(1);
        let snapshot = Arc::new(built);
        if let Some(old) = state.current.replace(Arc::clone(&snapshot)) {
            if old.path != snapshot.path {
                old.superseded.store(true, Ordering::SeqCst);
            }
        }
        let behind = store
            .count_changes_after(snapshot.manifest.version)
            .await
            .map_err(|e| failed("cannot count the changes since the snapshot", &e))?;
        Ok(Current {
            snapshot,
            behind,
            threshold: self.threshold,
        })
    }

    /// Forgets `snapshot` if it is the cached one (its file vanished from
    /// under the cache): the next request makes a new one.
    pub(crate) async fn forget(&self, snapshot: &Arc<Snapshot>) {
        let mut state = self.state.lock().await;
        if state
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, snapshot))
        {
            tracing::warn!(db = %self.name, file = %snapshot.path.display(), "the cached snapshot file vanished; forgetting it");
            state.current = None;
        }
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.name))
    }

    /// Whether `file` is one of this database's snapshot file names
    /// (`<name>-<16 hex>.db`; `notes-2-<hash>.db` is another database's).
    fn is_ours(&self, file: &str) -> bool {
        file.strip_prefix(&self.name)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".db"))
            .is_some_and(|hash| {
                hash.len() == NAME_HASH_LEN && hash.bytes().all(|b| b.is_ascii_hexdigit())
            })
    }

    /// The snapshot the manifest on disk names, if it is intact and of the
    /// database's current site id; other snapshot files of this database
    /// (left by a crash between two renames) are removed.
    async fn load(&self, site: SiteId) -> Option<Arc<Snapshot>> {
        let manifest = match tokio::fs::read(self.manifest_path()).await {
            Ok(bytes) => serde_json::from_slice::<Manifest>(&bytes)
                .map_err(|e| tracing::warn!(db = %self.name, "ignoring an unreadable snapshot manifest: {e}"))
                .ok(),
            Err(_) => None,
        };
        let manifest = manifest.filter(|m| m.format == MANIFEST_FORMAT && self.is_ours(&m.file));
        let intact = match &manifest {
            Some(m) => tokio::fs::metadata(self.dir.join(&m.file))
                .await
                .is_ok_and(|meta| meta.len() == m.bytes),
            None => false,
        };
        let keep = manifest.filter(|m| intact && m.site_id == site);
        self.remove_stray_files(keep.as_ref().map(|m| m.file.as_str()))
            .await;
        keep.map(|manifest| {
            Arc::new(Snapshot {
                path: self.dir.join(&manifest.file),
                manifest,
                superseded: AtomicBool::new(false),
            })
        })
    }

    async fn remove_stray_files(&self, keep: Option<&str>) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return;
        };
        let building = self.building_path();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray = (self.is_ours(name) && Some(name) != keep) || entry.path() == building;
            if stray {
                match tokio::fs::remove_file(entry.path()).await {
                    Ok(()) => {
                        tracing::info!(db = %self.name, file = name, "removed a stale snapshot file")
                    }
                    Err(e) => {
                        tracing::warn!(db = %self.name, file = name, "cannot remove a stale snapshot file: {e}")
                    }
                }
            }
        }
    }

    fn building_path(&self) -> PathBuf {
        self.dir.join(format!(".{}.building.db", self.name))
    }

    /// Makes a snapshot: exported to a temporary file, hashed, renamed to
    /// its content-addressed name, then the manifest is replaced (written
    /// to a temporary file and renamed).
    async fn build(&self, store: &Store) -> Result<Snapshot, BuildError> {
        let started = Instant::now();
        tokio::fs::create_dir_all(&self.dir).await?;
        let building = self.building_path();
        let export = store.export_snapshot(&building).await?;
        let hashed = {
            let path = building.clone();
            tokio::task::spawn_blocking(move || sha256_file(&path))
                .await
                .map_err(std::io::Error::other)??
        };
        let (sha256, bytes) = hashed;
        let file = format!("{}-{}.db", self.name, &sha256[..NAME_HASH_LEN]);
        let path = self.dir.join(&file);
        tokio::fs::rename(&building, &path).await?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            file,
            sha256,
            bytes,
            changes: export.changes,
            site_id: export.site_id,
            version: export.version,
            cursor: export.cursor,
            built_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", self.name));
        tokio::fs::write(&tmp, json).await?;
        tokio::fs::rename(&tmp, self.manifest_path()).await?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || sync_dir(&dir))
            .await
            .map_err(std::io::Error::other)??;
        tracing::info!(
            db = %self.name,
            changes = manifest.changes,
            bytes = manifest.bytes,
            version = manifest.version,
            ms = manifest.build_ms,
            "snapshot made"
        );
        Ok(Snapshot {
            path,
            manifest,
            superseded: AtomicBool::new(false),
        })
    }
}

/// Making a snapshot failed.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error(transparent)]
    Export(#[from] crsync_peer::ExportError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The file's sha256 (lowercase hex) and length, read in chunks.
fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_belong_to_one_database() {
        let cache = SnapshotCache::new(PathBuf::from("/x"), "notes", 10);
        assert!(cache.is_ours("notes-0123456789abcdef.db"));
        assert!(!cache.is_ours("notes-2-0123456789abcdef.db"));
        assert!(!cache.is_ours("notes-0123456789abcde.db"));
        assert!(!cache.is_ours("notes.json"));
        assert!(!cache.is_ours("note-0123456789abcdef.db"));
    }
}
