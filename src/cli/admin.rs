//! `crsync admin status`: a running server's status (`GET /status.json`),
//! printed readably.

use std::fmt::Write as _;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use crsync::server::{StatusReport, ago};

use super::Outcome;

/// Arguments of `crsync admin`.
#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Print a server's databases, connected peers and recent errors.
    Status(StatusArgs),
}

/// Arguments of `crsync admin status`.
#[derive(Debug, Args)]
struct StatusArgs {
    /// The server's (or its `[admin] bind` listener's) base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    url: String,
    /// The admin token (`[admin] token` of the server's config).
    #[arg(
        long,
        value_name = "T",
        env = "CRSYNC_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the JSON as the server sent it (for scripts).
    #[arg(long)]
    json: bool,
}

/// Runs `crsync admin ...`.
pub(crate) async fn run(args: AdminArgs) -> anyhow::Result<Outcome> {
    match args.command {
        AdminCommand::Status(args) => status(args).await,
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<Outcome> {
    let url = format!("{}/status.json", args.url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", body.trim());
    }
    let report: StatusReport =
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer a status"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", to_text(&report));
    }
    Ok(Outcome::Done)
}

/// The report as text: a line per database, per peer, per error.
fn to_text(report: &StatusReport) -> String {
    let now = report.generated_at;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "crsync server {} (up {})",
        report.version,
        ago(0, report.uptime_secs)
    );
    let _ = writeln!(out, "databases: {}", report.databases.len());
    for db in &report.databases {
        if !db.open {
            let _ = writeln!(out, "  {}  {} bytes  (not open)", db.name, db.size_bytes);
            continue;
        }
        let tables: Vec<String> = db
            .tables
            .iter()
            .map(|t| format!("{} {}", t.name, t.rows))
            .collect();
        let _ = writeln!(
            out,
            "  {}  {} bytes  db version {}  rows: {}",
            db.name,
            db.size_bytes,
            db.db_version.unwrap_or_default(),
            if tables.is_empty() {
                "-".to_owned()
            } else {
                tables.join(", ")
            },
        );
        for p in &db.peers {
            let since = p.connected_since.map_or_else(
                || "not connected".to_owned(),
                |at| format!("for {}", ago(at, now)),
            );
            let _ = writeln!(
                out,
                "    peer {}  {} {}  {}  lag {}  {}{}",
                p.peer.as_deref().unwrap_or("(unknown)"),
                p.transport,
                p.address.as_deref().unwrap_or("-"),
                p.phase,
                p.lag,
                since,
                p.last_error
                    .as_ref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(out, "recent errors: {}", report.errors.len());
    for e in &report.errors {
        let _ = writeln!(
            out,
            "  {} ago  {}  {}{}  {}",
            ago(e.at, now),
            e.database,
            e.kind,
            e.code.as_ref().map(|c| format!(" {c}")).unwrap_or_default(),
            e.message
        );
    }
    if let Some(conflicts) = &report.conflicts {
        let _ = writeln!(out, "recent conflicts: {}", conflicts.len());
        for c in conflicts {
            let _ = writeln!(out, "  {c}");
        }
    }
    out
}
