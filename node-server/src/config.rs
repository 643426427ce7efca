//! [`ServerConfig`]: everything `crsync serve` reads from its TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Access, TokenError};
use crate::limits::LimitsConfig;

/// Default listen address: loopback only.
pub const DEFAULT_BIND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
/// Default limit on request bodies (16 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default interval between `ping`s on a stream.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default time graceful shutdown waits for open connections.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default environment variable holding a token for all databases.
pub const DEFAULT_TOKEN_ENV: &str = "CRSYNC_TOKEN";
/// Default `snapshot_threshold`: a database serves snapshots from this many
/// changes on, and a cached snapshot is rebuilt once the database moved on
/// by as many.
pub const DEFAULT_SNAPSHOT_THRESHOLD: u64 = 100_000;

/// Server configuration. Every field has a default; see the crate README for
/// the file format.
///
/// ```
/// use crsync_node_server::ServerConfig;
/// let config = ServerConfig::from_toml_str(r#"
///     data_dir = "/var/lib/crsync"
///     allow_create = true
///     [[tokens]]
///     token = "s3cret"
///     databases = ["notes"]
///     access = "read-only"
/// "#).expect("must succeed");
/// assert_eq!(config.bind.to_string(), "127.0.0.1:8080");
/// assert_eq!(config.tokens.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:8080`).
    pub bind: SocketAddr,
    /// Directory holding one replica file `<name>.db` per database.
    pub data_dir: PathBuf,
    /// SQL applied to a database when it is created; every table it creates
    /// becomes a CRR.
    pub schema: Option<PathBuf>,
    /// Let the `token_env` token and anonymous clients create a database on
    /// first use (default `false`). Tokens of `[[tokens]]` create only with
    /// their own `create = true`.
    pub allow_create: bool,
    /// Serve requests without a token, read-write (default `false`). Required
    /// when no token is configured at all.
    pub allow_anonymous: bool,
    /// Largest accepted request body in bytes (default 16 MiB).
    pub max_body_bytes: usize,
    /// Interval between pings on a stream (`ping_interval_secs`, default 30).
    #[serde(rename = "ping_interval_secs", deserialize_with = "secs")]
    pub ping_interval: Duration,
    /// How long graceful shutdown waits for open connections
    /// (`shutdown_timeout_secs`, default 10).
    #[serde(rename = "shutdown_timeout_secs", deserialize_with = "secs")]
    pub shutdown_timeout: Duration,
    /// Environment variable whose value is a read-write token for every
    /// database (default `CRSYNC_TOKEN`; empty to disable).
    pub token_env: String,
    /// The cr-sqlite library (default: `CRSQLITE_PATH`, then the install dir).
    pub extension_path: Option<PathBuf>,
    /// Cross-origin requests.
    pub cors: CorsConfig,
    /// Bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Serve HTTPS and WSS with this certificate (default: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// Connection caps, rate limits, outbound queues, stalled streams.
    pub limits: LimitsConfig,
    /// Snapshots for new replicas (`GET {base}/snapshot`): a database serves
    /// one once it holds this many changes, and the cached snapshot
    /// (`<data_dir>/.snapshots/`) is rebuilt once the database has moved on
    /// by this many changes since it was made. `0` disables snapshots
    /// (default [`DEFAULT_SNAPSHOT_THRESHOLD`]).
    pub snapshot_threshold: u64,
    /// Who may read `/metrics`, `/status` and `/status.json`, and where.
    pub admin: AdminConfig,
}

/// `[admin]`: the metrics and status routes.
///
/// Without a `token` (and without `allow_anonymous = true`) they answer
/// `401 UNAUTHORIZED`: the status page names databases, tables and client
/// addresses, so it is never open by accident. The database tokens
/// (`[[tokens]]`) do not open it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminConfig {
    /// The admin token (`Authorization: Bearer <token>` or `?token=`).
    pub token: Option<String>,
    /// Serve the admin routes without a token.
    pub allow_anonymous: bool,
    /// A second listener for the admin routes only (e.g. `127.0.0.1:9090`);
    /// then the main listener does not serve them.
    pub bind: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: DEFAULT_BIND,
            data_dir: PathBuf::from("data"),
            schema: None,
            allow_create: false,
            allow_anonymous: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            ping_interval: DEFAULT_PING_INTERVAL,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            token_env: DEFAULT_TOKEN_ENV.into(),
            extension_path: None,
            cors: CorsConfig::default(),
            tokens: Vec::new(),
            tls: None,
            limits: LimitsConfig::default(),
            snapshot_threshold: DEFAULT_SNAPSHOT_THRESHOLD,
            admin: AdminConfig::default(),
        }
    }
}

/// Which browser origins may call the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorsConfig {
    /// Allowed origins (`["*"]` for any). Empty: no CORS headers.
    pub allowed_origins: Vec<String>,
}

/// One bearer token and what it may do.
///
/// ```
/// use crsync_node_server::TokenConfig;
/// let mut phone = TokenConfig::new("a-long-random-secret", ["notes"]);
/// phone.name = Some("phone".into());
/// phone.create = true;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenConfig {
    /// Its name in logs and metrics (never the secret); default `token-N`,
    /// its position among the `[[tokens]]`. Names are unique.
    #[serde(default)]
    pub name: Option<String>,
    /// The secret, as sent in `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the secret instead (one trailing newline is trimmed;
    /// relative to the config file). Read at start and at each reload.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Database names it serves, or `["*"]` for all.
    pub databases: Vec<String>,
    /// `read-write` (default) or `read-only`.
    #[serde(default)]
    pub access: Access,
    /// May create a database it serves on first use (default `false`: a
    /// name that does not exist is `404 UNKNOWN_DATABASE`).
    #[serde(default)]
    pub create: bool,
}

impl TokenConfig {
    /// A read-write token with this secret serving `databases`, unnamed,
    /// without `create`.
    pub fn new<I, S>(token: impl Into<String>, databases: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TokenConfig {
            name: None,
            token: Some(token.into()),
            token_file: None,
            databases: databases.into_iter().map(Into::into).collect(),
            access: Access::default(),
            create: false,
        }
    }

    /// The secret: `token`, or the contents of `token_file` without its
    /// trailing newline.
    pub(crate) fn secret(&self, name: &str) -> Result<String, TokenError> {
        let secret = match (&self.token, &self.token_file) {
            (Some(token), None) => {
                if token.is_empty() {
                    return Err(TokenError::Empty {
                        name: name.into(),
                        what: "token".into(),
                    });
                }
                return Ok(token.clone());
            }
            (None, Some(path)) => {
                std::fs::read_to_string(path).map_err(|source| TokenError::File {
                    name: name.into(),
                    path: path.clone(),
                    source,
                })?
            }
            _ => return Err(TokenError::Secret { name: name.into() }),
        };
        let trimmed = secret
            .strip_suffix('\n')
            .map(|s| s.strip_suffix('\r').unwrap_or(s))
            .unwrap_or(&secret);
        if trimmed.trim().is_empty() {
            return Err(TokenError::Empty {
                name: name.into(),
                what: format!(
                    "token_file {}",
                    self.token_file
                        .as_ref()
                        .map_or_else(String::new, |p| p.display().to_string())
                ),
            });
        }
        Ok(trimmed.to_owned())
    }
}

/// Serving HTTPS and WSS itself (`[tls]`): a certificate chain and its key,
/// both PEM files (relative to the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    /// TLS from these PEM files.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
        }
    }
}

/// The configuration file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown fields.
    #[error("invalid config{}: {source}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, if read from one.
        path: Option<PathBuf>,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
}

impl ServerConfig {
    /// Parses TOML text. Relative paths stay relative to the working directory.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: None, source })
    }

    /// Reads a TOML file. Relative `data_dir`, `schema` and `extension_path`
    /// are taken relative to the file's directory.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: ServerConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: Some(path.to_path_buf()),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.data_dir);
        if let Some(schema) = config.schema.as_mut() {
            rebase(schema);
        }
        if let Some(ext) = config.extension_path.as_mut() {
            rebase(ext);
        }
        for token in &mut config.tokens {
            if let Some(file) = token.token_file.as_mut() {
                rebase(file);
            }
        }
        if let Some(tls) = config.tls.as_mut() {
            rebase(&mut tls.cert);
            rebase(&mut tls.key);
        }
        Ok(config)
    }
}

pub(crate) fn secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = ServerConfig::from_toml_str("").expect("must succeed");
        assert_eq!(c, ServerConfig::default());
        let c = ServerConfig::from_toml_str(
            r#"
            bind = "0.0.0.0:9000"
            ping_interval_secs = 2.5
            max_body_bytes = 1024
            snapshot_threshold = 0
            [admin]
            token = "adm"
            bind = "127.0.0.1:9090"
            [cors]
            allowed_origins = ["*"]
            [[tokens]]
            token = "a"
            databases = ["*"]
            "#,
        )
        .expect("must succeed");
        assert_eq!(c.bind.port(), 9000);
        assert_eq!(c.ping_interval, Duration::from_millis(2500));
        assert_eq!(c.max_body_bytes, 1024);
        assert_eq!(c.snapshot_threshold, 0);
        assert_eq!(c.admin.token.as_deref(), Some("adm"));
        assert_eq!(c.admin.bind.map(|b| b.port()), Some(9090));
        assert!(!c.admin.allow_anonymous);
        assert_eq!(c.tokens[0].access, Access::ReadWrite);
        assert_eq!(c.cors.allowed_origins, vec!["*".to_string()]);
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(ServerConfig::from_toml_str("allow_creat = true").is_err());
        assert!(ServerConfig::from_toml_str("ping_interval_secs = -1").is_err());
    }

    #[test]
    fn file_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().expect("must succeed");
        let file = dir.path().join("crsync.toml");
        std::fs::write(&file, "data_dir = \"dbs\"\nschema = \"/abs/schema.sql\"\n")
            .expect("must succeed");
        let c = ServerConfig::from_toml_file(&file).expect("must succeed");
        assert_eq!(c.data_dir, dir.path().join("dbs"));
        assert_eq!(c.schema, Some(PathBuf::from("/abs/schema.sql")));
    }
}
