//! [`ErrorCode`]: the stable codes of refusals, and what each means for the sender.

use std::fmt;

/// What the sender of a refused message should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderAction {
    /// Send again from the receiver's cursor (nothing was applied).
    Resend,
    /// Stop sending until the receiver asks again (it cannot apply what we send).
    Pause,
    /// Try again later with backoff (a transient failure of the receiver).
    Retry,
    /// Do not retry: a fix on the sender's side is needed (credentials, URL, message).
    GiveUp,
    /// Nothing to do: the message was dropped and the session goes on.
    Ignore,
}

/// A stable, machine-readable refusal code, as carried in `error.code` (and in
/// the `code` of an HTTP error body).
///
/// Codes this build does not know (from a newer peer) parse as
/// [`ErrorCode::Other`], so matching never falls back to string comparison.
///
/// ```
/// use crsync_peer::proto::{ErrorCode, SenderAction};
/// let code: ErrorCode = "GAP".parse().unwrap();
/// assert_eq!(code, ErrorCode::Gap);
/// assert_eq!(code.sender_action(), SenderAction::Resend);
/// assert_eq!(code.to_string(), "GAP");
/// assert_eq!("SOMETHING_NEW".parse::<ErrorCode>().unwrap(), ErrorCode::Other("SOMETHING_NEW".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The JSON does not parse or lacks fields.
    Malformed,
    /// A change is invalid for this database (unknown table or column, bad key).
    InvalidChange,
    /// The batch starts past what the receiver holds; resend from its cursor.
    Gap,
    /// The sender's schema is newer; its changes wait for an upgrade.
    SchemaOutdated,
    /// A stream for this peer id is already open.
    AlreadyConnected,
    /// No stream is open for this peer id.
    NotConnected,
    /// Missing or unknown token.
    Unauthorized,
    /// The token does not allow this.
    Forbidden,
    /// The body exceeds the receiver's limit.
    PayloadTooLarge,
    /// No such database (and creating it is not allowed).
    UnknownDatabase,
    /// The message's peerId is not the connection's.
    PeerMismatch,
    /// The receiver failed.
    Internal,
    /// The receiver is shutting down.
    ShuttingDown,
    /// No route for the request (HTTP 404).
    NotFound,
    /// The method is not allowed on the route (HTTP 405).
    MethodNotAllowed,
    /// Another replica uses this site id (a copied or restored database file):
    /// syncing it would lose one side's writes. Fix: `crsync fork --db FILE`.
    SiteIdConflict,
    /// The message's peerId belongs to a session opened with other credentials
    /// (or another session secret).
    SessionMismatch,
    /// Too many connections for this token, or for the server.
    TooManyConnections,
    /// Too many requests; retry after the `Retry-After` the receiver gave.
    RateLimited,
    /// A message exceeds a size limit other than the body size (sites in a
    /// cursor or in ranges, for example).
    LimitExceeded,
    /// The server offers no snapshot of this database (snapshots are off, or
    /// the database is smaller than the snapshot threshold): sync by replay.
    NoSnapshot,
    /// A code this build does not know.
    Other(String),
}

/// The codes with a fixed spelling, for parsing.
const KNOWN: &[(ErrorCode, &str)] = &[
    (ErrorCode::Malformed, "MALFORMED"),
    (ErrorCode::InvalidChange, "INVALID_CHANGE"),
    (ErrorCode::Gap, "GAP"),
    (ErrorCode::SchemaOutdated, "SCHEMA_OUTDATED"),
    (ErrorCode::AlreadyConnected, "ALREADY_CONNECTED"),
    (ErrorCode::NotConnected, "NOT_CONNECTED"),
    (ErrorCode::Unauthorized, "UNAUTHORIZED"),
    (ErrorCode::Forbidden, "FORBIDDEN"),
    (ErrorCode::PayloadTooLarge, "PAYLOAD_TOO_LARGE"),
    (ErrorCode::UnknownDatabase, "UNKNOWN_DATABASE"),
    (ErrorCode::PeerMismatch, "PEER_MISMATCH"),
    (ErrorCode::Internal, "INTERNAL"),
    (ErrorCode::ShuttingDown, "SHUTTING_DOWN"),
    (ErrorCode::NotFound, "NOT_FOUND"),
    (ErrorCode::MethodNotAllowed, "METHOD_NOT_ALLOWED"),
    (ErrorCode::SiteIdConflict, "SITE_ID_CONFLICT"),
    (ErrorCode::SessionMismatch, "SESSION_MISMATCH"),
    (ErrorCode::TooManyConnections, "TOO_MANY_CONNECTIONS"),
    (ErrorCode::RateLimited, "RATE_LIMITED"),
    (ErrorCode::LimitExceeded, "LIMIT_EXCEEDED"),
    (ErrorCode::NoSnapshot, "NO_SNAPSHOT"),
];

impl ErrorCode {
    /// The code as on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(c, _)| c == known)
                .map(|(_, s)| *s)
                .unwrap_or("INTERNAL"),
        }
    }

    /// Parses a code; never fails (unknown codes become [`ErrorCode::Other`]).
    pub fn parse(text: &str) -> ErrorCode {
        KNOWN
            .iter()
            .find(|(_, s)| *s == text)
            .map(|(c, _)| c.clone())
            .unwrap_or_else(|| ErrorCode::Other(text.to_owned()))
    }

    /// The code of a v1 error, which carries only text (for example a bare
    /// `{"type":"error","error":"ALREADY_CONNECTED"}`): an all-caps text is
    /// its code; any other text is `Other("ERROR")`.
    pub fn from_v1_text(text: &str) -> ErrorCode {
        let code_like = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if code_like {
            ErrorCode::parse(text)
        } else {
            ErrorCode::Other("ERROR".into())
        }
    }

    /// What the sender of the refused message should do.
    pub fn sender_action(&self) -> SenderAction {
        match self {
            ErrorCode::Gap => SenderAction::Resend,
            ErrorCode::SchemaOutdated | ErrorCode::InvalidChange => SenderAction::Pause,
            ErrorCode::Internal
            | ErrorCode::ShuttingDown
            | ErrorCode::NotConnected
            | ErrorCode::SessionMismatch
            | ErrorCode::TooManyConnections
            | ErrorCode::RateLimited => SenderAction::Retry,
            ErrorCode::Malformed | ErrorCode::PeerMismatch => SenderAction::Ignore,
            ErrorCode::AlreadyConnected
            | ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UnknownDatabase
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::SiteIdConflict
            | ErrorCode::LimitExceeded
            | ErrorCode::NoSnapshot
            | ErrorCode::Other(_) => SenderAction::GiveUp,
        }
    }

    /// Whether the fault is the sender's (HTTP 4xx) rather than the receiver's (5xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ErrorCode::Internal | ErrorCode::ShuttingDown | ErrorCode::Other(_)
        )
    }

    /// The HTTP status a server answers with this code.
    pub fn http_status(&self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::SessionMismatch => 403,
            ErrorCode::UnknownDatabase | ErrorCode::NotFound | ErrorCode::NoSnapshot => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::SiteIdConflict => 409,
            ErrorCode::PayloadTooLarge | ErrorCode::LimitExceeded => 413,
            ErrorCode::TooManyConnections | ErrorCode::RateLimited => 429,
            ErrorCode::ShuttingDown => 503,
            ErrorCode::Internal | ErrorCode::Other(_) => 500,
            _ => 400,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::parse(s))
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips() {
        for (code, text) in KNOWN {
            assert_eq!(code.as_str(), *text);
            assert_eq!(ErrorCode::parse(text), *code);
        }
    }
}
