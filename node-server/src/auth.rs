//! Bearer-token authorization: each token serves some databases, read-write
//! or read-only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

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

/// Who made a request: which configured token it presented, or none. SSE
/// sessions, connection caps and rate limits are bound to it.
///
/// A principal stands for a token's name together with its secret (the
/// secret is never kept here): a reload that keeps both keeps the principal,
/// so open sessions go on; a rotated secret is a new principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Principal(Option<u32>);

impl Principal {
    /// A request without a token.
    pub(crate) const ANONYMOUS: Principal = Principal(None);

    /// A token's principal, by its id.
    #[cfg(test)]
    pub(crate) const fn of_grant(index: u32) -> Principal {
        Principal(Some(index))
    }
}

/// What an authorized request may do, and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Read-only or read-write on the database.
    pub(crate) access: Access,
    /// Who it is, for sessions and limits.
    pub(crate) principal: Principal,
    /// The token's name for logs and metrics (`anonymous` without one).
    pub(crate) name: Arc<str>,
    /// Whether it may create the database on first use.
    pub(crate) create: bool,
}

/// Principal ids by (name, secret), shared by an [`Auth`] and the token sets
/// reloaded from it, so a token that stays the same keeps its principal.
#[derive(Debug, Clone, Default)]
struct Ids(Arc<Mutex<IdMap>>);

/// (name, secret) -> principal id.
type IdMap = HashMap<(Arc<str>, String), u32>;

impl Ids {
    fn of(&self, name: &Arc<str>, token: &str) -> u32 {
        let mut ids = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let next = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        *ids.entry((Arc::clone(name), token.to_owned()))
            .or_insert(next)
    }
}

#[derive(Debug, Clone)]
struct Grant {
    name: Arc<str>,
    id: u32,
    token: String,
    databases: Vec<String>,
    access: Access,
    create: bool,
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
    /// Anonymous clients may create databases (`allow_create`).
    anonymous_create: bool,
    ids: Ids,
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

/// The configured tokens cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No token at all, and anonymous access is not allowed.
    #[error(transparent)]
    NoTokens(#[from] NoTokens),
    /// A token's `token_file` cannot be read.
    #[error("token {name:?}: cannot read token_file {path}: {source}")]
    File {
        /// The token's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A token's secret is empty (an empty `token`, or an empty `token_file`).
    #[error("token {name:?}: {what} is empty")]
    Empty {
        /// The token's name.
        name: String,
        /// `token` or `token_file <path>`.
        what: String,
    },
    /// A token has both or neither of `token` and `token_file`.
    #[error("token {name:?}: give exactly one of token and token_file")]
    Secret {
        /// The token's name.
        name: String,
    },
    /// Two tokens with different secrets share a name.
    #[error("two tokens are named {name:?}: names must be unique")]
    DuplicateName {
        /// The name.
        name: String,
    },
}

impl Auth {
    /// No tokens, no anonymous access: refuses everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts every request, without a token, read-write.
    pub fn anonymous() -> Self {
        Auth::new().allow_anonymous(true)
    }

    /// Adds a token serving `databases` (`"*"` for all), named `token-N`
    /// (its position), that may not create databases.
    pub fn with_token<I, S>(self, token: impl Into<String>, databases: I, access: Access) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let name = format!("token-{}", self.grants.len() + 1);
        self.with_grant(name, token.into(), databases, access, false)
    }

    /// Adds a read-write token serving `databases` that may also create
    /// them on first use (`create = true`), named `token-N`.
    pub fn with_creating_token<I, S>(self, token: impl Into<String>, databases: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let name = format!("token-{}", self.grants.len() + 1);
        self.with_grant(name, token.into(), databases, Access::ReadWrite, true)
    }

    fn with_grant<I, S>(
        mut self,
        name: impl Into<Arc<str>>,
        token: String,
        databases: I,
        access: Access,
        create: bool,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let name = name.into();
        self.grants.push(Grant {
            id: self.ids.of(&name, &token),
            name,
            token,
            databases: databases.into_iter().map(Into::into).collect(),
            access,
            create,
        });
        self
    }

    /// Also serve requests without a token, read-write.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.anonymous = allow;
        self
    }

    /// Let anonymous clients (when allowed) create databases on first use.
    pub fn allow_anonymous_create(mut self, allow: bool) -> Self {
        self.anonymous_create = allow;
        self
    }

    /// Builds the token set from the config's tokens (secrets from `token`
    /// or `token_file`) plus the value of the environment variable named by
    /// its `token_env` (read-write on every database, named after the
    /// variable, may create databases when `allow_create`). Refuses an empty
    /// set unless `allow_anonymous`.
    pub fn from_config_and_env(config: &ServerConfig) -> Result<Self, TokenError> {
        Self::from_config(config, env_token(config))
    }

    /// As [`from_config_and_env`](Self::from_config_and_env), with the
    /// environment token given explicitly.
    pub fn from_config(
        config: &ServerConfig,
        env_token: Option<String>,
    ) -> Result<Self, TokenError> {
        Self::build(config, env_token, Ids::default())
    }

    /// The token set of `config` (read again, token files too), keeping the
    /// principals of tokens that did not change: what a reload uses.
    pub fn reloaded(&self, config: &ServerConfig) -> Result<Self, TokenError> {
        Self::build(config, env_token(config), self.ids.clone())
    }

    fn build(
        config: &ServerConfig,
        env_token: Option<String>,
        ids: Ids,
    ) -> Result<Self, TokenError> {
        let mut auth = Auth { ids, ..Auth::new() }
            .allow_anonymous(config.allow_anonymous)
            .allow_anonymous_create(config.allow_create);
        let mut names: HashMap<String, String> = HashMap::new();
        for (index, t) in config.tokens.iter().enumerate() {
            let name = t
                .name
                .clone()
                .unwrap_or_else(|| format!("token-{}", index + 1));
            let secret = t.secret(&name)?;
            if names
                .insert(name.clone(), secret.clone())
                .is_some_and(|other| other != secret)
            {
                return Err(TokenError::DuplicateName { name });
            }
            auth = auth.with_grant(name, secret, t.databases.clone(), t.access, t.create);
        }
        if let Some(token) = env_token.filter(|t| !t.is_empty()) {
            let name = config.token_env.clone();
            auth = auth.with_grant(name, token, ["*"], Access::ReadWrite, config.allow_create);
        }
        if !auth.has_tokens() && !auth.anonymous {
            return Err(NoTokens {
                env: config.token_env.clone(),
            }
            .into());
        }
        Ok(auth)
    }

    /// Whether requests without a token are served.
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Whether any token is configured.
    pub fn has_tokens(&self) -> bool {
        self.grants.iter().any(|g| !g.token.is_empty())
    }

    /// Whether any token (or anonymous client) may create databases.
    pub fn may_create_any(&self) -> bool {
        (self.anonymous && self.anonymous_create) || self.grants.iter().any(|g| g.create)
    }

    /// The names of the tokens, in order (a token with several grants once).
    pub fn token_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for g in &self.grants {
            if !names.iter().any(|n| **n == *g.name) {
                names.push(g.name.to_string());
            }
        }
        names
    }

    /// What `token` may do on `database`: 401 `UNAUTHORIZED` for a missing or
    /// unknown token, 403 `FORBIDDEN` for a token of other databases.
    pub fn check(&self, token: Option<&str>, database: &str) -> Result<Access, ApiError> {
        self.authorize(token, database).map(|caller| caller.access)
    }

    /// As [`check`](Self::check), also saying who the caller is.
    pub(crate) fn authorize(
        &self,
        token: Option<&str>,
        database: &str,
    ) -> Result<Caller, ApiError> {
        let Some(token) = token else {
            return if self.anonymous {
                Ok(Caller {
                    access: Access::ReadWrite,
                    principal: Principal::ANONYMOUS,
                    name: Arc::from("anonymous"),
                    create: self.anonymous_create,
                })
            } else {
                Err(ApiError::unauthorized(
                    "a bearer token is required (Authorization header or token query parameter)",
                ))
            };
        };
        // Compare against every token in constant time per token, so timing
        // does not reveal how much of a guess was right.
        let mut best: Option<Access> = None;
        let mut create = false;
        // The first grant of this token names it (one token may have several).
        let mut known: Option<&Grant> = None;
        for grant in &self.grants {
            if !grant.token.is_empty() && constant_time_eq(grant.token.as_bytes(), token.as_bytes())
            {
                known = known.or(Some(grant));
                if grant.serves(database) {
                    best = best.max(Some(grant.access));
                    create |= grant.create;
                }
            }
        }
        match (known, best) {
            (Some(grant), Some(access)) => Ok(Caller {
                access,
                principal: Principal(Some(grant.id)),
                name: Arc::clone(&grant.name),
                create,
            }),
            (Some(_), None) => Err(ApiError::forbidden(format!(
                "this token does not serve database {database:?}"
            ))),
            (None, _) => Err(ApiError::unauthorized("unknown token")),
        }
    }

    /// Whether `principal` still has `access` (or more) on `database`: after
    /// a reload, connections of tokens that lost it are closed.
    pub(crate) fn still_serves(
        &self,
        principal: Principal,
        database: &str,
        access: Access,
    ) -> bool {
        match principal.0 {
            None => self.anonymous,
            Some(id) => self
                .grants
                .iter()
                .any(|g| g.id == id && g.serves(database) && g.access >= access),
        }
    }
}

/// The environment token `config.token_env` names, if set.
fn env_token(config: &ServerConfig) -> Option<String> {
    (!config.token_env.is_empty())
        .then(|| std::env::var(&config.token_env).ok())
        .flatten()
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
        let mut ro = crate::TokenConfig::new("ro", ["a", "b"]);
        ro.access = Access::ReadOnly;
        config.tokens.push(ro);
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
        let who = |token| auth.authorize(token, "x").expect("must succeed").principal;
        assert_eq!(who(Some("a")), who(Some("a")));
        assert_ne!(who(Some("a")), who(Some("b")));
        assert_ne!(who(Some("a")), who(None));
        assert_eq!(who(None), Principal::ANONYMOUS);
        // One token with grants on two databases is one principal.
        assert_eq!(
            auth.authorize(Some("a"), "y")
                .expect("must succeed")
                .principal,
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
