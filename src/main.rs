//! `crsync`: the command line tool of crsync.
//!
//! - `crsync serve`: runs the sync server (many databases from one directory).
//! - `crsync enable`: turns tables of a database file into CRRs.
//! - `crsync status`: site id, schema version, CRR tables, cursor, bookkeeping.
//! - `crsync sync`: replicates a database file with a server, once or live.
//! - `crsync fork`: gives a copied database file a new site id.
//! - `crsync clone`: a new replica from the server's snapshot.
//! - `crsync conflicts`: the conflict history of a database file.
//! - `crsync admin status`: a running server's databases, peers and recent errors.
//!
//! Exit codes: 0 success, 1 failure (the message says why), 2 bad usage,
//! 130 interrupted (Ctrl-C or SIGTERM) before `sync --once` finished.
//! Logs go to stderr and follow `RUST_LOG` (default: `info` for `serve`,
//! `warn` otherwise), as text (coloured only on a terminal) or, with
//! `--log-format json`, one JSON object per line; results go to stdout.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli {
    //! The subcommands, one module each, and what they share.
    pub(crate) mod admin;
    pub(crate) mod clone;
    pub(crate) mod conflicts;
    pub(crate) mod db;
    pub(crate) mod enable;
    pub(crate) mod extension;
    pub(crate) mod fork;
    pub(crate) mod pair;
    pub(crate) mod progress;
    pub(crate) mod relay_sync;
    pub(crate) mod remote;
    pub(crate) mod serve;
    pub(crate) mod signal;
    pub(crate) mod status;
    pub(crate) mod sync;

    /// `n` and the noun, singular for 1: "1 row", "2 rows".
    pub(crate) fn count(n: impl Into<u64>, singular: &str, plural: &str) -> String {
        let n = n.into();
        format!("{n} {}", if n == 1 { singular } else { plural })
    }

    /// How a command that did not fail ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Outcome {
        /// It did its job.
        Done,
        /// Ctrl-C or SIGTERM stopped it before it finished.
        Interrupted,
    }
}

/// Exit code of a command interrupted by Ctrl-C or SIGTERM before it finished.
const EXIT_INTERRUPTED: u8 = 130;

/// CRDT replication of SQLite databases with cr-sqlite.
///
/// Every replica is an ordinary SQLite file; tables turned into CRRs
/// (`crsync enable`) merge concurrent edits without conflicts. `crsync serve`
/// runs a server that hosts databases, `crsync sync` replicates a file with it.
#[derive(Debug, Parser)]
#[command(name = "crsync", version, propagate_version = true)]
#[command(after_help = "Example:\n  \
    crsync serve --data-dir data --schema schema.sql --allow-create   # token in CRSYNC_TOKEN\n  \
    crsync enable --db notes.db --schema schema.sql notes\n  \
    crsync sync --db notes.db --url http://127.0.0.1:8080/db/notes --once\n  \
    crsync status --db notes.db")]
struct Cli {
    /// Log format on stderr: text (coloured only on a terminal) or json (one
    /// object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sync server: one replica per database under a data directory.
    Serve(cli::serve::ServeArgs),
    /// Turn tables of a database file into CRRs (conflict-free replicated relations).
    Enable(cli::enable::EnableArgs),
    /// Show a database's site id, schema version, CRR tables and cursor.
    Status(cli::status::StatusArgs),
    /// Replicate a database file with a server, once (--once) or live (--watch).
    Sync(cli::sync::SyncArgs),
    /// Pair with another device through Nostr relays (invite / join / list / remove).
    Pair(cli::pair::PairArgs),
    /// Give a copied database file (cp, a restored backup, a VM image) a new
    /// site id, so that it and the original both sync without losing writes.
    Fork(cli::fork::ForkArgs),
    /// Make a new replica from the server's snapshot of a database (no
    /// replay of every change), then exit; `crsync sync` syncs what came after.
    Clone(cli::clone::CloneArgs),
    /// Where the cr-sqlite extension is found (`path`), or build it there (`install`).
    Extension(cli::extension::ExtensionArgs),
    /// Show the conflict history: values merges replaced or refused.
    Conflicts(cli::conflicts::ConflictsArgs),
    /// Ask a running server: `crsync admin status --url URL [--token T] [--json]`.
    Admin(cli::admin::AdminArgs),
}

impl Command {
    /// The log filter used when `RUST_LOG` is not set.
    fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

fn init_logging(default_filter: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only for a person at a terminal, never into files or pipes.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.command.default_log_filter(), cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => cli::serve::run(args).await,
        Command::Enable(args) => cli::enable::run(args).await,
        Command::Status(args) => cli::status::run(args).await,
        Command::Sync(args) => cli::sync::run(args).await,
        Command::Pair(args) => cli::pair::run(args).await,
        Command::Fork(args) => cli::fork::run(args).await,
        Command::Clone(args) => cli::clone::run(args).await,
        Command::Extension(args) => cli::extension::run(args),
        Command::Conflicts(args) => cli::conflicts::run(args).await,
        Command::Admin(args) => cli::admin::run(args).await,
    };
    match result {
        Ok(cli::Outcome::Done) => ExitCode::SUCCESS,
        Ok(cli::Outcome::Interrupted) => {
            eprintln!("interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `a: b: c`. Our errors (and many
/// others) already show their source in their own message; a cause the line
/// already ends with is left out, and a cause that repeats the line before
/// it and adds to it replaces it, so nothing is said twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        match parts.last_mut() {
            Some(last) if last.ends_with(&text) => {}
            Some(last) if text.starts_with(last.as_str()) => *last = text,
            _ => parts.push(text),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::error_text;

    /// An error that shows its source in its own message, as thiserror's `{0}` + `#[source]`.
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot read config file x.toml: {}", self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_are_said_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::from(Wrapping(io()));
        assert_eq!(
            error_text(&e),
            format!("cannot read config file x.toml: {}", io())
        );
        let e = e.context("cannot start the server");
        assert_eq!(
            error_text(&e),
            format!(
                "cannot start the server: cannot read config file x.toml: {}",
                io()
            )
        );
        // a cause that repeats its context and adds to it
        let e = anyhow::Error::from(Wrapping(io())).context("cannot read config file x.toml");
        assert_eq!(
            error_text(&e),
            format!("cannot read config file x.toml: {}", io())
        );
        // plain anyhow contexts: every layer
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&e), "outer: inner");
    }
}
