//! `crsync serve`: the sync server.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use crsync::server::{Server, ServerConfig, TlsConfig, TokenHandle};

use super::{Outcome, signal};

/// Arguments of `crsync serve`. Flags override the config file.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TOML config file (keys: bind, data_dir, schema, allow_create, allow_anonymous,
    /// tokens, cors, limits, admin, ...; see the node-server README).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Directory holding one replica `<name>.db` per database [default: data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// SQL applied to each new database; every table it creates becomes a CRR.
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// Create a database on first use (otherwise unknown names get 404).
    #[arg(long)]
    allow_create: bool,
    /// Serve requests without a token (read-write). Without it, a token is
    /// required: `[[tokens]]` in the config, or the CRSYNC_TOKEN environment variable.
    #[arg(long)]
    allow_anonymous: bool,
    /// Serve snapshots of databases from this many changes on, made again
    /// once a database moved on by as many; 0 turns them off [default: 100000].
    #[arg(long, value_name = "CHANGES")]
    snapshot_threshold: Option<u64>,
    /// Serve HTTPS and WSS with this certificate chain (PEM; with --tls-key),
    /// like `[tls] cert` in the config.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ServeArgs {
    /// The config file (or the defaults) with the flags applied.
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_toml_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(schema) = &self.schema {
            config.schema = Some(schema.clone());
        }
        config.allow_create |= self.allow_create;
        if let Some(threshold) = self.snapshot_threshold {
            config.snapshot_threshold = threshold;
        }
        config.allow_anonymous |= self.allow_anonymous;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(TlsConfig::new(cert, key));
        }
        Ok(config)
    }
}

/// On every SIGHUP, reads the config's tokens again (and their token files)
/// and uses them; a config that fails keeps the tokens in use.
async fn reload_on_hangup(args: ServeArgs, tokens: TokenHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: tokens will not be reloaded: {e}");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            // Also on stdout, for the operator (and scripts) who sent it.
            let line = match args.config().map(|c| tokens.reload(&c)) {
                Ok(Ok(names)) => {
                    tracing::info!(tokens = ?names, "SIGHUP: tokens reloaded");
                    format!("tokens reloaded: {}", names.join(", "))
                }
                Ok(Err(e)) => {
                    tracing::error!("SIGHUP: tokens not reloaded, the previous ones stay: {e}");
                    format!("tokens not reloaded (the previous ones stay): {e}")
                }
                Err(e) => {
                    tracing::error!("SIGHUP: tokens not reloaded, the previous ones stay: {e:#}");
                    format!("tokens not reloaded (the previous ones stay): {e:#}")
                }
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
    #[cfg(not(unix))]
    drop((args, tokens));
}

/// Runs `crsync serve` until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let config = args.config()?;
    let data_dir = config.data_dir.clone();
    let anonymous = config.allow_anonymous;
    let server = Server::bind(config)
        .await
        .context("cannot start the server")?;
    let addr = server.local_addr();
    let (http, ws) = if server.is_tls() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    {
        // Scripts and tests read the address from this first line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "crsync server listening on {http}://{addr}")?;
        writeln!(
            out,
            "databases in {} at {http}://{addr}/db/<name> (WebSocket: {ws}://{addr}/db/<name>/ws)",
            data_dir.display()
        )?;
        if anonymous {
            writeln!(out, "warning: anonymous access is allowed (read-write)")?;
        }
        out.flush()?;
    }
    let reloader = tokio::spawn(reload_on_hangup(args, server.tokens()));
    let served = server.serve(signal::interrupted()).await;
    reloader.abort();
    served.context("the server failed")?;
    println!("crsync server stopped");
    Ok(Outcome::Done)
}
