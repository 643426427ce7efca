//! Binding of SSE sessions: which `POST`s may act in a stream, and which new
//! stream may replace an open one.
//!
//! A stream (`GET stream?peerId=X`) is bound to the [`Principal`] that opened
//! it (its token; anonymous is a principal too). A crsync client (one that
//! opens the stream with the `crsync` query parameter) is also bound to a
//! [`SessionSecret`] the server hands out in the stream's `connect`
//! (`crsync.session`), which the client presents in the
//! [`SESSION_HEADER`](crsync_peer::wire::SESSION_HEADER) of every `POST`. The
//! rules ([`admit_post`], [`may_replace`]):
//! - a `POST` for peer X is delivered into the stream that its own principal
//!   holds for X; that stream's secret, if it has one, must be presented;
//!   anything else is `403 SESSION_MISMATCH` and touches no session;
//! - streams of different principals for the same peer id coexist (peer ids
//!   are public: every change carries its site id), so nobody can lock
//!   another token's client out;
//! - a second stream of the same principal for the same peer id is refused
//!   with `ALREADY_CONNECTED` as in wire v1, unless it presents the open
//!   stream's secret: then it replaces it (the client reconnecting after a
//!   half-open stream that the server still holds).

use crsync_peer::proto::ErrorCode;

use crate::auth::{Principal, constant_time_eq};
use crate::error::ApiError;

/// Random bytes in a session secret.
const SECRET_BYTES: usize = 16;

/// A stream's session secret: 128 random bits (from `rand`'s thread-local
/// generator, a CSPRNG seeded by the operating system), as lowercase hex.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SessionSecret(String);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl SessionSecret {
    /// A fresh secret.
    pub(crate) fn random() -> Self {
        let bytes: [u8; SECRET_BYTES] = rand::random();
        SessionSecret(hex::encode(bytes))
    }

    /// The secret as sent to the client.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret (compared in constant time).
    pub(crate) fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// What the server knows of one open stream, for the binding rules.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding<'a> {
    /// Who opened it.
    pub(crate) principal: Principal,
    /// Its secret (`None`: a v1 stream, bound by its principal only).
    pub(crate) secret: Option<&'a SessionSecret>,
}

/// Whether a `POST` by `principal` presenting `presented` may act in one of
/// `streams` (those open for its peer id), and in which (its index).
/// `None` when no stream is open for the peer id at all (`NOT_CONNECTED`).
pub(crate) fn admit_post<'a>(
    streams: impl IntoIterator<Item = Binding<'a>>,
    principal: Principal,
    presented: Option<&str>,
) -> Option<Result<usize, ApiError>> {
    let mut any = false;
    for (index, stream) in streams.into_iter().enumerate() {
        any = true;
        if stream.principal != principal {
            continue;
        }
        return Some(match (stream.secret, presented) {
            (None, None) => Ok(index),
            (Some(secret), Some(p)) if secret.matches(p) => Ok(index),
            (Some(_), None) => Err(mismatch(
                "this peer's stream is bound to a session secret: send the header \
                 x-crsync-session with the crsync.session of the stream's connect",
            )),
            (Some(_), Some(_)) => Err(mismatch(
                "the session secret is not this peer's stream's (the stream was reopened?)",
            )),
            (None, Some(_)) => Err(mismatch(
                "this peer's stream has no session secret (it was opened without the crsync parameter)",
            )),
        });
    }
    any.then(|| {
        Err(mismatch(
            "this peer's stream was opened with other credentials",
        ))
    })
}

/// Whether a new stream may replace `open`, held by the same principal:
/// only if it presents the open stream's secret.
pub(crate) fn may_replace(open: Binding<'_>, presented: Option<&str>) -> bool {
    match (open.secret, presented) {
        (Some(secret), Some(p)) => secret.matches(p),
        _ => false,
    }
}

fn mismatch(message: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        ErrorCode::SessionMismatch,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(i: usize) -> Principal {
        crate::Auth::new()
            .with_token("t0", ["*"], crate::Access::ReadWrite)
            .with_token("t1", ["*"], crate::Access::ReadOnly)
            .authorize(Some(["t0", "t1"][i]), "db")
            .expect("known token")
            .principal
    }

    #[test]
    fn secrets_are_random_hex_and_compared_exactly() {
        let (a, b) = (SessionSecret::random(), SessionSecret::random());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 2 * SECRET_BYTES);
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(""));
        assert!(!a.matches(&a.as_str()[1..]));
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn posts_need_the_principal_and_the_secret() {
        let secret = SessionSecret::random();
        let crsync = Binding {
            principal: principal(0),
            secret: Some(&secret),
        };
        let v1 = Binding {
            principal: principal(1),
            secret: None,
        };
        let code = |r: Option<Result<usize, ApiError>>| match r {
            None => "NOT_CONNECTED".to_string(),
            Some(Ok(i)) => format!("stream {i}"),
            Some(Err(e)) => e.code().to_string(),
        };
        let post = |who, presented| code(admit_post([crsync, v1], principal(who), presented));
        assert_eq!(post(0, Some(secret.as_str())), "stream 0");
        assert_eq!(post(0, None), "SESSION_MISMATCH");
        assert_eq!(post(0, Some("00")), "SESSION_MISMATCH");
        assert_eq!(post(1, None), "stream 1");
        assert_eq!(post(1, Some(secret.as_str())), "SESSION_MISMATCH");
        // Another principal, with the right secret even: not its stream.
        let only_crsync = admit_post([crsync], principal(1), Some(secret.as_str()));
        assert_eq!(code(only_crsync), "SESSION_MISMATCH");
        assert_eq!(code(admit_post([], principal(0), None)), "NOT_CONNECTED");
        assert_eq!(
            code(admit_post([crsync], Principal::ANONYMOUS, None)),
            "SESSION_MISMATCH"
        );
    }

    #[test]
    fn only_the_secret_replaces_a_stream() {
        let secret = SessionSecret::random();
        let crsync = Binding {
            principal: principal(0),
            secret: Some(&secret),
        };
        assert!(may_replace(crsync, Some(secret.as_str())));
        assert!(!may_replace(crsync, None));
        assert!(!may_replace(crsync, Some("nope")));
        let v1 = Binding {
            principal: principal(0),
            secret: None,
        };
        assert!(!may_replace(v1, Some(secret.as_str())));
        assert!(!may_replace(v1, None));
    }
}
