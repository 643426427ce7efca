//! `crsync serve`: the sync server.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use crsync::server::{Server, ServerConfig};

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
        Ok(config)
    }
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
    {
        // Scripts and tests read the address from this first line.
        let mut out = std::io::stdout().lock();
        writeln!(out, "crsync server listening on http://{addr}")?;
        writeln!(
            out,
            "databases in {} at http://{addr}/db/<name> (WebSocket: ws://{addr}/db/<name>/ws)",
            data_dir.display()
        )?;
        if anonymous {
            writeln!(out, "warning: anonymous access is allowed (read-write)")?;
        }
        out.flush()?;
    }
    server
        .serve(signal::interrupted())
        .await
        .context("the server failed")?;
    println!("crsync server stopped");
    Ok(Outcome::Done)
}
