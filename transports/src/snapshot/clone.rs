//! A new replica from the server's snapshot: check, download, install.

use std::path::Path;
use std::time::{Duration, Instant};

use crsync_peer::{InstallError, InstallReport, Store};

use super::download::{Download, DownloadError};
use super::{SNAPSHOT_SUFFIX, SnapshotClient, with_suffix};

/// What [`SnapshotClient::clone_into`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloneReport {
    /// The download (`None`: an interrupted run had verified it already).
    pub download: Option<Download>,
    /// The installed replica: its new site id, cursor, rows.
    pub install: InstallReport,
    /// How long it all took.
    pub elapsed: Duration,
}

/// Cloning failed; the database file is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloneError {
    /// The database file cannot take a snapshot (it holds data, another
    /// process has it open, it is not a database): nothing was downloaded.
    #[error(transparent)]
    Target(InstallError),
    /// The download failed (an interrupted one resumes when run again).
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The downloaded snapshot could not be installed.
    #[error(transparent)]
    Install(InstallError),
}

impl SnapshotClient {
    /// Makes the database file `db` a new replica of the server's database
    /// from its snapshot: checks that `db` is absent or an empty database
    /// (refusing before any download otherwise), downloads the snapshot
    /// ([`download`](Self::download), resumed if an earlier run was
    /// interrupted; or takes the verified `<db>.crsync-snapshot` such a run
    /// left), and installs it
    /// ([`Store::install_snapshot`](crsync_peer::Store::install_snapshot)).
    /// No Store may have `db` open; open it afterwards and sync, and only
    /// what came after the snapshot travels.
    pub async fn clone_into(&self, db: impl AsRef<Path>) -> Result<CloneReport, CloneError> {
        let db = db.as_ref();
        let started = Instant::now();
        let extension = self.extension_path.as_deref();
        let pending = with_suffix(db, SNAPSHOT_SUFFIX);
        if same_file(&pending, db) {
            // Installed, stopped before the snapshot's old name was removed.
            let _ = tokio::fs::remove_file(&pending).await;
        }
        Store::check_snapshot_target(db, extension)
            .await
            .map_err(CloneError::Target)?;
        let mut download = None;
        if !pending.is_file() {
            download = Some(self.download(db).await?);
        }
        let install = match Store::install_snapshot(&pending, db, extension).await {
            Ok(report) => report,
            // A verified download from an earlier run that does not install
            // (it should not happen): fetch it again, once.
            Err(InstallError::Corrupt { .. } | InstallError::NotASnapshot { .. })
                if download.is_none() =>
            {
                tracing::warn!(file = %pending.display(), "discarding an earlier download that does not install");
                let _ = tokio::fs::remove_file(&pending).await;
                download = Some(self.download(db).await?);
                Store::install_snapshot(&pending, db, extension)
                    .await
                    .map_err(CloneError::Install)?
            }
            Err(e) => return Err(CloneError::Install(e)),
        };
        Ok(CloneReport {
            download,
            install,
            elapsed: started.elapsed(),
        })
    }
}

/// Whether both paths name one file (a hard link).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        false
    }
}
