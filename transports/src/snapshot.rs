//! Snapshot bootstrap, the client side: a new replica of a large database
//! downloads the server's snapshot instead of replaying every change.
//!
//! For a database at `{base}` (the HTTP+SSE base URL, such as
//! `http://127.0.0.1:8080/db/notes`; a WebSocket URL `ws://.../db/notes/ws`
//! names the same database, see [`snapshot_base`]):
//!
//! - [`SnapshotClient::info`]: `GET {base}/snapshot/info`, what the server
//!   offers (`None` when it offers nothing: snapshots are off, or the
//!   database is below the server's `snapshot_threshold`; then sync by
//!   replay).
//! - [`SnapshotClient::download`] ([`download_snapshot`]): `GET
//!   {base}/snapshot` streamed to `<db>.crsync-download` (the ETag beside it
//!   in `<db>.crsync-download.etag`), resumed with `Range` + `If-Range` when
//!   an earlier attempt left a part of the same snapshot, checked against
//!   the sha256 the server announced, then renamed to `<db>.crsync-snapshot`.
//!   The database file itself is never written.
//! - [`SnapshotClient::clone_into`] ([`clone_database`]): checks that the
//!   database file is absent or empty, downloads (or takes a download an
//!   interrupted run verified), and installs it with
//!   [`Store::install_snapshot`](crsync_peer::Store::install_snapshot): a new
//!   site id, the server's rows and cursor. Interrupted at any point (even
//!   `kill -9`), the database file is either absent (or still the empty
//!   database it was) or the complete replica; running it again resumes.
//!
//! The [`Peer`](crsync_peer::Peer) never swaps files under an open
//! [`Store`](crsync_peer::Store): an app calls [`clone_database`] **before**
//! it opens the Store, then opens it and syncs as usual (only what came after
//! the snapshot travels).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use crsync_transports::snapshot::SnapshotClient;
//! let client = SnapshotClient::new("http://127.0.0.1:8080/db/notes").with_token("s3cret");
//! if client.info().await?.is_some() && !std::path::Path::new("notes.db").exists() {
//!     let report = client.clone_into("notes.db").await?;
//!     println!("{} rows, site id {}", report.install.rows, report.install.site_id);
//! }
//! let store = crsync_peer::Store::open("notes.db").await?; // then sync
//! # drop(store); Ok(()) }
//! ```

mod clone;
mod download;
mod info;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use clone::{CloneError, CloneReport};
pub use download::{Download, DownloadError};
pub use info::InfoError;

/// Suffix of a download in progress (`notes.db.crsync-download`).
pub const PARTIAL_SUFFIX: &str = ".crsync-download";
/// Suffix of the ETag of a download in progress (`notes.db.crsync-download.etag`).
pub const ETAG_SUFFIX: &str = ".crsync-download.etag";
/// Suffix of a verified download not installed yet (`notes.db.crsync-snapshot`).
pub const SNAPSHOT_SUFFIX: &str = ".crsync-snapshot";
/// Default limit on connecting to the server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on a pause in the download (no byte for this long).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP base of the database a sync URL names: an `http(s)://` URL as
/// given (without a trailing `/`), a `ws(s)://{base}/ws` URL as
/// `http(s)://{base}`.
///
/// ```
/// use crsync_transports::snapshot::snapshot_base;
/// assert_eq!(snapshot_base("http://h:1/db/notes/"), "http://h:1/db/notes");
/// assert_eq!(snapshot_base("ws://h:1/db/notes/ws"), "http://h:1/db/notes");
/// assert_eq!(snapshot_base("wss://h/db/notes/ws"), "https://h/db/notes");
/// ```
pub fn snapshot_base(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (scheme, rest) = match scheme.to_ascii_lowercase().as_str() {
        "ws" => ("http", rest.strip_suffix("/ws").unwrap_or(rest)),
        "wss" => ("https", rest.strip_suffix("/ws").unwrap_or(rest)),
        _ => (scheme, rest),
    };
    format!("{scheme}://{rest}")
}

/// Talks to one database's snapshot routes; see the [module docs](self).
#[derive(Clone)]
pub struct SnapshotClient {
    base: String,
    token: Option<String>,
    connect_timeout: Duration,
    read_timeout: Duration,
    max_bytes_per_sec: Option<u64>,
    extension_path: Option<PathBuf>,
    #[cfg(feature = "tls")]
    roots: Option<crate::tls::RootCertificates>,
}

impl std::fmt::Debug for SnapshotClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_bytes_per_sec", &self.max_bytes_per_sec)
            .finish_non_exhaustive()
    }
}

impl SnapshotClient {
    /// A client for the database at `url` (see [`snapshot_base`]).
    pub fn new(url: &str) -> Self {
        SnapshotClient {
            base: snapshot_base(url),
            token: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_bytes_per_sec: None,
            extension_path: None,
            #[cfg(feature = "tls")]
            roots: None,
        }
    }

    /// Trusts these root certificates for `https://`, besides the webpki roots.
    #[cfg(feature = "tls")]
    pub fn with_root_certificates(mut self, roots: crate::tls::RootCertificates) -> Self {
        self.roots = Some(roots);
        self
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Limit on connecting (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limit on a pause in the download (default [`DEFAULT_READ_TIMEOUT`]).
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Downloads at most this many bytes a second (default: as fast as it comes).
    pub fn with_max_bytes_per_sec(mut self, rate: u64) -> Self {
        self.max_bytes_per_sec = Some(rate.max(1));
        self
    }

    /// The cr-sqlite library used to install (default: `CRSQLITE_PATH`, then the install dir).
    pub fn with_extension_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.extension_path = Some(path.into());
        self
    }

    /// The database's HTTP base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, route: &str) -> String {
        format!("{}/{route}", self.base)
    }

    fn http(&self) -> Result<reqwest::Client, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout);
        #[cfg(feature = "tls")]
        let builder = crate::tls::RootCertificates::trusted(builder, self.roots.as_ref());
        builder.build()
    }

    fn get(&self, http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let request = http.get(url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// [`SnapshotClient::download`] with a token: the snapshot for the database
/// file `dest` (which it never writes), verified, at `<dest>.crsync-snapshot`.
pub async fn download_snapshot(
    url: &str,
    token: Option<&str>,
    dest: impl AsRef<Path>,
) -> Result<Download, DownloadError> {
    client(url, token).download(dest).await
}

/// [`SnapshotClient::clone_into`] with a token: the database file `db` as a
/// new replica of the server's database at `url`.
pub async fn clone_database(
    url: &str,
    token: Option<&str>,
    db: impl AsRef<Path>,
) -> Result<CloneReport, CloneError> {
    client(url, token).clone_into(db).await
}

fn client(url: &str, token: Option<&str>) -> SnapshotClient {
    let client = SnapshotClient::new(url);
    match token {
        Some(token) => client.with_token(token),
        None => client,
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Durably records renames in the directory of `path`.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}
