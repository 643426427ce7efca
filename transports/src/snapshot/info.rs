//! `GET {base}/snapshot/info`.

use crsync_peer::proto::ErrorCode;
use crsync_peer::proto::snapshot::SnapshotInfo;

use super::SnapshotClient;
use crate::http_status::ErrorBody;

/// Asking the server about its snapshot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// The server could not be reached (or the answer did not arrive).
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused (401, 403, an unknown database, 429, ...).
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
    /// The answer is not a snapshot description.
    #[error("the server at {url} sent an answer that is not snapshot info: {reason}")]
    Decode {
        /// The URL asked.
        url: String,
        /// Why.
        reason: String,
    },
}

impl SnapshotClient {
    /// What snapshot the server offers: `Ok(None)` when it offers none
    /// (`404 NO_SNAPSHOT`: snapshots are off, or the database holds fewer
    /// changes than the server's threshold; or a 404 of a server without the
    /// route; sync by replay). `404 UNKNOWN_DATABASE` is an error. The server
    /// makes the snapshot now if it is due, so this may take as long as a
    /// `VACUUM INTO` of the database.
    pub async fn info(&self) -> Result<Option<SnapshotInfo>, InfoError> {
        let url = self.url("snapshot/info");
        let unreachable = |source| InfoError::Unreachable {
            url: url.clone(),
            source,
        };
        let http = self.http().map_err(unreachable)?;
        let response = self.get(&http, &url).send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(unreachable)?;
        if status == 200 {
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| InfoError::Decode {
                    url: url.clone(),
                    reason: e.to_string(),
                });
        }
        let body = ErrorBody::parse(&text);
        let code = body.code.as_deref().map(ErrorCode::parse);
        // NO_SNAPSHOT, or a server without the route (an older crsync, a
        // v1 server): no snapshot. An unknown database stays an error.
        if status == 404 && code != Some(ErrorCode::UnknownDatabase) {
            return Ok(None);
        }
        Err(InfoError::Refused {
            url,
            status,
            code,
            message: body.message,
        })
    }
}
