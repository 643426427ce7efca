//! `GET {base}/snapshot`: streamed to disk, resumed, checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crsync_peer::SiteId;
use crsync_peer::proto::ErrorCode;
use crsync_peer::proto::snapshot::{
    CHANGES_HEADER, SHA256_HEADER, SITE_HEADER, VERSION_HEADER, etag,
};
use futures_util::StreamExt as _;
use reqwest::header::{self, HeaderMap};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use super::{
    ETAG_SUFFIX, PARTIAL_SUFFIX, SNAPSHOT_SUFFIX, SnapshotClient, sync_parent, with_suffix,
};
use crate::http_status::ErrorBody;

/// Read size when hashing the part an earlier attempt left.
const HASH_CHUNK: usize = 256 * 1024;

/// A verified snapshot on disk, ready for
/// [`Store::install_snapshot`](crsync_peer::Store::install_snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Download {
    /// The verified file (`<db>.crsync-snapshot`).
    pub path: PathBuf,
    /// Its sha256, lowercase hex (checked).
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Bytes an earlier, interrupted attempt had already downloaded.
    pub resumed_from: u64,
    /// The server database's site id, as the server said.
    pub site_id: Option<SiteId>,
    /// Its own version at the snapshot.
    pub version: Option<i64>,
    /// Changes in the snapshot.
    pub changes: Option<u64>,
    /// How long this download took.
    pub elapsed: Duration,
}

impl Download {
    /// Bytes that crossed the network in this download.
    pub fn transferred(&self) -> u64 {
        self.bytes - self.resumed_from
    }
}

/// Downloading a snapshot failed. The database file is never touched; what
/// arrived of the snapshot is kept for a resume unless it cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// The server offers no snapshot of this database (`404 NO_SNAPSHOT`:
    /// snapshots are off or the database is below the threshold; or a
    /// server without the route): sync by replay.
    #[error("the server at {url} offers no snapshot: {message}")]
    Unavailable {
        /// The URL asked.
        url: String,
        /// The server's message.
        message: String,
    },
    /// The server could not be reached.
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused (401, 403, an unknown database, 429, 500, ...).
    #[error("the server at {url} answered HTTP {status}{}: {message}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    Refused {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The body's code, if any.
        code: Option<ErrorCode>,
        /// The body's message.
        message: String,
    },
    /// The server's answer lacks what a snapshot download needs.
    #[error("the server at {url} sent a snapshot without {what}")]
    BadResponse {
        /// The URL asked.
        url: String,
        /// What is missing or inconsistent.
        what: String,
    },
    /// The connection broke off mid-download; the part is kept and the next
    /// attempt resumes from it.
    #[error(
        "the download of {url} broke off at {received} of {expected} bytes ({source}); \
         run it again to resume"
    )]
    Interrupted {
        /// The URL.
        url: String,
        /// Bytes on disk.
        received: u64,
        /// The snapshot's size.
        expected: u64,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The body ended short of (or past) its announced length; the part is
    /// kept and the next attempt resumes from it (or starts over).
    #[error(
        "the download of {url} ended at {received} bytes, but the snapshot has {expected}; run it again to resume"
    )]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes on disk.
        received: u64,
        /// The snapshot's size.
        expected: u64,
    },
    /// The file's sha256 is not the one the server announced; it was
    /// deleted (the next attempt downloads it again).
    #[error(
        "the snapshot from {url} is damaged: sha256 {actual}, the server announced {expected}; it was discarded"
    )]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The sha256 announced.
        expected: String,
        /// The sha256 of what arrived.
        actual: String,
    },
    /// Writing the file failed.
    #[error("cannot write the snapshot to {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where one download keeps its files.
struct Files {
    partial: PathBuf,
    tag: PathBuf,
    verified: PathBuf,
}

/// What one request ended with.
enum Step {
    /// The whole file is in `partial`, verified.
    Done {
        sha256: String,
        bytes: u64,
        resumed_from: u64,
        headers: HeaderMap,
    },
    /// The part cannot be resumed: start over.
    Restart,
}

impl SnapshotClient {
    /// Downloads the snapshot for the database file `dest` (never written):
    /// streamed to `<dest>.crsync-download`, resumed from what an earlier
    /// attempt left there if the server still serves the same snapshot
    /// (`Range` + `If-Range` with its ETag, kept in
    /// `<dest>.crsync-download.etag`), checked against the sha256 the server
    /// announced, and renamed to `<dest>.crsync-snapshot` (replacing an
    /// older one).
    pub async fn download(&self, dest: impl AsRef<Path>) -> Result<Download, DownloadError> {
        let dest = dest.as_ref();
        let files = Files {
            partial: with_suffix(dest, PARTIAL_SUFFIX),
            tag: with_suffix(dest, ETAG_SUFFIX),
            verified: with_suffix(dest, SNAPSHOT_SUFFIX),
        };
        let url = self.url("snapshot");
        let started = Instant::now();
        let mut resume = self.left_over(&files).await;
        // At most one fresh start after a part that could not be resumed.
        for _ in 0..2 {
            match self.fetch(&url, &files, resume.take()).await? {
                Step::Done {
                    sha256,
                    bytes,
                    resumed_from,
                    headers,
                } => {
                    let io = |path: &Path| {
                        let path = path.to_path_buf();
                        move |source| DownloadError::Io { path, source }
                    };
                    tokio::fs::rename(&files.partial, &files.verified)
                        .await
                        .map_err(io(&files.verified))?;
                    let _ = tokio::fs::remove_file(&files.tag).await;
                    let verified = files.verified.clone();
                    tokio::task::spawn_blocking(move || sync_parent(&verified))
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r)
                        .map_err(io(&files.verified))?;
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    return Ok(Download {
                        path: files.verified,
                        sha256,
                        bytes,
                        resumed_from,
                        site_id: header(SITE_HEADER).and_then(|s| s.parse().ok()),
                        version: header(VERSION_HEADER).and_then(|s| s.parse().ok()),
                        changes: header(CHANGES_HEADER).and_then(|s| s.parse().ok()),
                        elapsed: started.elapsed(),
                    });
                }
                Step::Restart => {
                    tracing::info!(url, "the partial download cannot be resumed; starting over");
                    discard(&files).await;
                }
            }
        }
        Err(DownloadError::BadResponse {
            url,
            what: "a download that can be resumed or started over".into(),
        })
    }

    /// The part an earlier attempt left, and its ETag.
    async fn left_over(&self, files: &Files) -> Option<(u64, String)> {
        let len = tokio::fs::metadata(&files.partial).await.ok()?.len();
        let tag = tokio::fs::read_to_string(&files.tag).await.ok()?;
        let tag = tag.trim();
        (len > 0 && !tag.is_empty()).then(|| (len, tag.to_owned()))
    }

    /// One request: the whole file, or the rest of `resume`'s part.
    async fn fetch(
        &self,
        url: &str,
        files: &Files,
        resume: Option<(u64, String)>,
    ) -> Result<Step, DownloadError> {
        let unreachable = |source| DownloadError::Unreachable {
            url: url.to_owned(),
            source,
        };
        let bad = |what: &str| DownloadError::BadResponse {
            url: url.to_owned(),
            what: what.to_owned(),
        };
        let http = self.http().map_err(unreachable)?;
        let mut request = self.get(&http, url);
        if let Some((offset, tag)) = &resume {
            request = request
                .header(header::RANGE, format!("bytes={offset}-"))
                .header(header::IF_RANGE, tag.as_str());
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        match (status, &resume) {
            (200 | 206, _) => {}
            (416, Some((offset, tag))) => {
                // Our part is as long as the file (or longer): complete if
                // its hash is the one of the tag.
                let total = text(header::CONTENT_RANGE).and_then(|r| {
                    r.strip_prefix("bytes */")
                        .and_then(|t| t.parse::<u64>().ok())
                });
                if total == Some(*offset) {
                    let (sha256, _) = hash_prefix(&files.partial, *offset).await?;
                    if etag(&sha256) == *tag {
                        return Ok(Step::Done {
                            sha256,
                            bytes: *offset,
                            resumed_from: *offset,
                            headers,
                        });
                    }
                }
                return Ok(Step::Restart);
            }
            _ => {
                let body = ErrorBody::parse(&response.text().await.unwrap_or_default());
                let code = body.code.as_deref().map(ErrorCode::parse);
                if status == 404 && code != Some(ErrorCode::UnknownDatabase) {
                    return Err(DownloadError::Unavailable {
                        url: url.to_owned(),
                        message: body.message,
                    });
                }
                return Err(DownloadError::Refused {
                    url: url.to_owned(),
                    status,
                    code,
                    message: body.message,
                });
            }
        }
        let sha256 = text(header::HeaderName::from_static(SHA256_HEADER))
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad("its sha256 (x-crsync-snapshot-sha256)"))?
            .to_ascii_lowercase();
        let tag = text(header::ETAG).ok_or_else(|| bad("an ETag"))?;
        if tag != etag(&sha256) {
            return Err(bad("an ETag that matches its sha256"));
        }
        let (start, total) = if status == 206 {
            let Some((offset, resumed_tag)) = &resume else {
                return Err(bad("a whole body (206 to a request without Range)"));
            };
            let range = text(header::CONTENT_RANGE).ok_or_else(|| bad("a Content-Range"))?;
            let (start, total) =
                parse_content_range(&range).ok_or_else(|| bad("a valid Content-Range"))?;
            if start != *offset || tag != *resumed_tag {
                return Ok(Step::Restart);
            }
            (start, total)
        } else {
            let length = response
                .content_length()
                .ok_or_else(|| bad("a Content-Length"))?;
            (0, length)
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DownloadError::Io { path, source }
        };
        let (mut hasher, mut file) = if start == 0 {
            // The tag first: a part on disk always has its tag beside it.
            let tmp = with_suffix(&files.tag, ".tmp");
            tokio::fs::write(&tmp, &tag).await.map_err(io(&tmp))?;
            tokio::fs::rename(&tmp, &files.tag)
                .await
                .map_err(io(&files.tag))?;
            let file = tokio::fs::File::create(&files.partial)
                .await
                .map_err(io(&files.partial))?;
            (sha2::Sha256::new(), file)
        } else {
            let (_, hasher) = hash_prefix(&files.partial, start).await?;
            let file = tokio::fs::OpenOptions::new()
                .append(true)
                .open(&files.partial)
                .await
                .map_err(io(&files.partial))?;
            (hasher, file)
        };
        let mut body = response.bytes_stream();
        let began = Instant::now();
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) => {
                    file.flush().await.map_err(io(&files.partial))?;
                    return Err(DownloadError::Interrupted {
                        url: url.to_owned(),
                        received: start + got,
                        expected: total,
                        source,
                    });
                }
            };
            file.write_all(&chunk).await.map_err(io(&files.partial))?;
            hasher.update(&chunk);
            got += chunk.len() as u64;
            if let Some(rate) = self.max_bytes_per_sec {
                let due = Duration::from_secs_f64(got as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(began.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        file.flush().await.map_err(io(&files.partial))?;
        file.sync_all().await.map_err(io(&files.partial))?;
        drop(file);
        if start + got != total {
            return Err(DownloadError::Truncated {
                url: url.to_owned(),
                received: start + got,
                expected: total,
            });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            discard(files).await;
            return Err(DownloadError::ChecksumMismatch {
                url: url.to_owned(),
                expected: sha256,
                actual,
            });
        }
        Ok(Step::Done {
            sha256,
            bytes: total,
            resumed_from: start,
            headers,
        })
    }
}

/// Removes the part and its tag.
async fn discard(files: &Files) {
    for path in [&files.partial, &files.tag] {
        match tokio::fs::remove_file(path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), "cannot remove: {e}"),
        }
    }
}

/// The sha256 state after the first `len` bytes of `path` (and its hex).
async fn hash_prefix(path: &Path, len: u64) -> Result<(String, sha2::Sha256), DownloadError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut file = std::fs::File::open(&owned)?.take(len);
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hex = hex::encode(hasher.clone().finalize());
        Ok::<_, std::io::Error>((hex, hasher))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    hashed.map_err(|source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `bytes <start>-<end>/<total>` -> `(start, total)`.
fn parse_content_range(range: &str) -> Option<(u64, u64)> {
    let rest = range.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let (start, end, total) = (
        start.parse::<u64>().ok()?,
        end.parse::<u64>().ok()?,
        total.parse::<u64>().ok()?,
    );
    (start <= end && end < total).then_some((start, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 200)));
        assert_eq!(parse_content_range("bytes 0-0/1"), Some((0, 1)));
        assert_eq!(parse_content_range("bytes 100-99/200"), None);
        assert_eq!(parse_content_range("bytes 100-200/200"), None);
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
