//! Bearer-token authorization: each token serves some databases, read-write
//! or read-only.

use serde::Deserialize;

use crate::config::ServerConfig;
use crate::error::ApiError;

/// What a token may do on a database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Receive changes and send its cursor (`GET stream`, `POST sync`), not `data`.
    ReadOnly,
    /// Everything.
    #[default]
    ReadWrite,
}

/// Who made a request: which configured token it presented (by position,
/// so the token itself is never kept or compared again), or none. SSE
/// sessions are bound to the principal that opened them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Principal(Option<usize>);

impl Principal {
    /// A request without a token.
    pub(crate) const ANONYMOUS: Principal = Principal(None);

    /// The token of the `index`th grant.
    #[cfg(test)]
    pub(crate) const fn of_grant(index: usize) -> Principal {
        Principal(Some(index))
    }
}

#[derive(Debug, Clone)]
struct Grant {
    token: String,
    databases: Vec<String>,
    access: Access,
}

impl Grant {
    fn serves(&self, database: &str) -> bool {
        self.databases.iter().any(|d| d == "*" || d == database)
    }
}

/// The set of accepted tokens.
///
/// ```
/// use crsync_node_server::{Access, Auth};
/// let auth = Auth::new()
///     .with_token("reader", ["notes"], Access::ReadOnly)
///     .with_token("admin", ["*"], Access::ReadWrite);
/// assert_eq!(auth.check(Some("reader"), "notes"), Ok(Access::ReadOnly));
/// assert_eq!(auth.check(Some("reader"), "todo").expect_err("must fail").code(), "FORBIDDEN");
/// assert_eq!(auth.check(None, "notes").expect_err("must fail").code(), "UNAUTHORIZED");
/// assert_eq!(auth.check(Some("admin"), "todo"), Ok(Access::ReadWrite));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Auth {
    grants: Vec<Grant>,
    anonymous: bool,
}

/// No token is configured and anonymous access was not allowed explicitly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no tokens are configured (config [[tokens]] or the {env} environment variable); \
     set allow_anonymous = true to serve without authentication"
)]
pub struct NoTokens {
    /// The environment variable that was consulted.
    pub env: String,
}

impl Auth {
    /// No tokens, no anonymous access: refuses everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts every request, without a token, read-write.
    pub fn anonymous() -> Self {
        Auth {
            grants: Vec::new(),
            anonymous: true,
        }
    }

    /// Adds a token serving `databases` (`"*"` for all).
    pub fn with_token<I, S>(
        mut self,
        token: impl Into<String>,
        databases: I,
        access: Access,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.grants.push(Grant {
            token: token.into(),
            databases: databases.into_iter().map(Into::into).collect(),
            access,
        });
        self
    }

    /// Also serve requests without a token, read-write.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.anonymous = allow;
        self
    }

    /// Builds the token set from the config's tokens plus the value of the
    /// environment variable named by its `token_env` (read-write on every
    /// database). Refuses an empty set unless `allow_anonymous`.
    pub fn from_config_and_env(config: &ServerConfig) -> Result<Self, NoTokens> {
        let env = (!config.token_env.is_empty())
            .then(|| std::env::var(&config.token_env).ok())
            .flatten();
        Self::from_config(config, env)
    }

    /// As [`from_config_and_env`](Self::from_config_and_env), with the
    /// environment token given explicitly.
    pub fn from_config(config: &ServerConfig, env_token: Option<String>) -> Result<Self, NoTokens> {
        let mut auth = Auth::new().allow_anonymous(config.allow_anonymous);
        for t in &config.tokens {
            auth = auth.with_token(t.token.clone(), t.databases.clone(), t.access);
        }
        if let Some(token) = env_token.filter(|t| !t.is_empty()) {
            auth = auth.with_token(token, ["*"], Access::ReadWrite);
        }
        auth.grants.retain(|g| !g.token.is_empty());
        if auth.grants.is_empty() && !auth.anonymous {
            return Err(NoTokens {
                env: config.token_env.clone(),
            });
        }
        Ok(auth)
    }

    /// Whether requests without a token are served.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Whether any token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.grants.is_empty()
    }

    /// What `token` may do on `database`: 401 `UNAUTHORIZED` for a missing or
    /// unknown token, 403 `FORBIDDEN` for a token of other databases.
    pub fn check(&self, token: Option<&str>, database: &str) -> Result<Access, ApiError> {
        self.authorize(token, database).map(|(access, _)| access)
    }

    /// As [`check`](Self::check), also saying who the caller is.
    pub(crate) fn authorize(
        &self,
        token: Option<&str>,
        database: &str,
    ) -> Result<(Access, Principal), ApiError> {
        let Some(token) = token else {
            return if self.anonymous {
                Ok((Access::ReadWrite, Principal::ANONYMOUS))
            } else {
                Err(ApiError::unauthorized(
                    "a bearer token is required (Authorization header or token query parameter)",
                ))
            };
        };
        // Compare against every token in constant time per token, so timing
        // does not reveal how much of a guess was right.
        let mut best: Option<Access> = None;
        // The first grant of this token names it (one token may have several).
        let mut known: Option<usize> = None;
        for (index, grant) in self.grants.iter().enumerate() {
            if constant_time_eq(grant.token.as_bytes(), token.as_bytes()) {
                known = known.or(Some(index));
                if grant.serves(database) {
                    best = best.max(Some(grant.access));
                }
            }
        }
        match (known, best) {
            (Some(index), Some(access)) => Ok((access, Principal(Some(index)))),
            (Some(_), None) => Err(ApiError::forbidden(format!(
                "this token does not serve database {database:?}"
            ))),
            (None, _) => Err(ApiError::unauthorized("unknown token")),
        }
    }
}

/// Whether `a == b`, in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix() {
        let mut config = ServerConfig::default();
        config.tokens.push(crate::TokenConfig {
            token: "ro".into(),
            databases: vec!["a".into(), "b".into()],
            access: Access::ReadOnly,
        });
        let auth = Auth::from_config(&config, Some("env".into())).expect("must succeed");
        assert_eq!(auth.check(Some("ro"), "a"), Ok(Access::ReadOnly));
        assert_eq!(
            auth.check(Some("ro"), "c").expect_err("must fail").code(),
            "FORBIDDEN"
        );
        assert_eq!(auth.check(Some("env"), "zzz"), Ok(Access::ReadWrite));
        assert_eq!(
            auth.check(Some("nope"), "a").expect_err("must fail").code(),
            "UNAUTHORIZED"
        );
        assert_eq!(
            auth.check(Some(""), "a").expect_err("must fail").code(),
            "UNAUTHORIZED"
        );
        assert_eq!(
            auth.check(None, "a").expect_err("must fail").code(),
            "UNAUTHORIZED"
        );
    }

    #[test]
    fn principals_tell_tokens_apart() {
        let auth = Auth::new()
            .allow_anonymous(true)
            .with_token("a", ["x"], Access::ReadOnly)
            .with_token("b", ["x"], Access::ReadWrite)
            .with_token("a", ["y"], Access::ReadWrite);
        let who = |token| auth.authorize(token, "x").expect("must succeed").1;
        assert_eq!(who(Some("a")), who(Some("a")));
        assert_ne!(who(Some("a")), who(Some("b")));
        assert_ne!(who(Some("a")), who(None));
        assert_eq!(who(None), Principal::ANONYMOUS);
        // One token with grants on two databases is one principal.
        assert_eq!(
            auth.authorize(Some("a"), "y").expect("must succeed").1,
            who(Some("a"))
        );
    }

    #[test]
    fn empty_set_needs_explicit_anonymous() {
        let mut config = ServerConfig::default();
        assert!(Auth::from_config(&config, None).is_err());
        assert!(Auth::from_config(&config, Some(String::new())).is_err());
        config.allow_anonymous = true;
        let anon = Auth::from_config(&config, None).expect("must succeed");
        assert_eq!(anon.check(None, "x"), Ok(Access::ReadWrite));
        assert_eq!(
            anon.check(Some("bad"), "x").expect_err("must fail").code(),
            "UNAUTHORIZED"
        );
    }
}
