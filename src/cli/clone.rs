//! `crsync clone`: a new replica from the server's snapshot, and the
//! automatic bootstrap `crsync sync` runs for a new or empty database file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use crsync::Cursor;
use crsync::transports::snapshot::{CloneError, CloneReport, DownloadError, SnapshotClient};
use crsync::transports::tls::RootCertificates;

use super::{Outcome, count, db};

/// Arguments of `crsync clone`.
#[derive(Debug, Args)]
pub(crate) struct CloneArgs {
    /// The database file to create (it must not exist, or be an empty database).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// The database on the server, e.g. http://127.0.0.1:8080/db/notes
    /// (a ws:// URL names the same database).
    #[arg(long, value_name = "URL")]
    url: String,
    /// Bearer token for the server (read access is enough).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CRSYNC_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Also trust the root certificate(s) in this PEM file for https:// and
    /// wss:// (a private CA or a self-signed server certificate).
    #[arg(long, value_name = "FILE", env = "CRSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Download at most this many bytes a second.
    #[arg(long, value_name = "BYTES")]
    limit_rate: Option<u64>,
}

/// Runs `crsync clone`.
pub(crate) async fn run(args: CloneArgs) -> anyhow::Result<Outcome> {
    let roots = super::remote::root_certificates(args.ca_cert.as_deref())?;
    let mut client = snapshot_client(&args.url, args.token.as_deref(), roots.as_ref());
    if let Some(rate) = args.limit_rate {
        client = client.with_max_bytes_per_sec(rate);
    }
    let report = client
        .clone_into(&args.db)
        .await
        .map_err(|e| explain(e, &args.db))?;
    print_report(&args.db, client.base(), &report);
    println!(
        "sync what came after with: crsync sync --db {} --url {}",
        args.db.display(),
        args.url
    );
    Ok(Outcome::Done)
}

/// The snapshot client for a sync URL and token.
pub(crate) fn snapshot_client(
    url: &str,
    token: Option<&str>,
    roots: Option<&RootCertificates>,
) -> SnapshotClient {
    let client = SnapshotClient::new(url);
    let client = match roots {
        Some(roots) => client.with_root_certificates(roots.clone()),
        None => client,
    };
    match token.filter(|t| !t.is_empty()) {
        Some(token) => client.with_token(token),
        None => client,
    }
}

/// The error with what to do about it.
fn explain(e: CloneError, db: &Path) -> anyhow::Error {
    let hint = match &e {
        CloneError::Download(DownloadError::Unavailable { .. }) => format!(
            "; `crsync sync --db {} --url URL` replays the changes instead",
            db.display()
        ),
        CloneError::Download(
            DownloadError::Interrupted { .. } | DownloadError::Truncated { .. },
        ) => "; the part downloaded is kept: run the command again to resume".into(),
        CloneError::Target(_) => "; nothing was downloaded".into(),
        _ => String::new(),
    };
    anyhow::anyhow!("cannot clone {}: {e}{hint}", db.display())
}

fn print_report(db: &Path, base: &str, report: &CloneReport) {
    let install = &report.install;
    println!(
        "cloned {} from {base} in {:.2}s",
        db.display(),
        report.elapsed.as_secs_f64()
    );
    println!("site id:  {} (new)", install.site_id);
    println!("rows:     {}", install.rows);
    match &report.download {
        Some(d) if d.resumed_from > 0 => println!(
            "bytes:    {} (sha256 {}; resumed after {} bytes)",
            d.bytes, d.sha256, d.resumed_from
        ),
        Some(d) => println!("bytes:    {} (sha256 {})", d.bytes, d.sha256),
        None => println!(
            "bytes:    {} (downloaded and verified by an earlier run)",
            install.bytes
        ),
    }
    print_cursor(&install.cursor, install.site_id);
}

fn print_cursor(cursor: &Cursor, own: crsync::SiteId) {
    println!("cursor:   origin site -> highest version held");
    for (site, version) in cursor.iter() {
        let note = if site == own { "  (this database)" } else { "" };
        println!("  {site} {}{note}", version.0);
    }
}

/// Whether `crsync sync` should first try a snapshot: the file does not
/// exist, or it has no CRR rows and an empty cursor (nothing of its own and
/// nothing merged).
pub(crate) async fn wants_bootstrap(path: &Path) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(true);
    }
    let store = db::open(path).await?;
    let empty = async {
        let changes = store.count_changes_after(0).await?;
        let cursor = store.cursor().await?;
        anyhow::Ok(changes == 0 && cursor.iter().all(|(_, v)| v.0 == 0))
    }
    .await;
    db::close(store).await;
    empty
}

/// The automatic bootstrap of `crsync sync`: a snapshot if the server
/// offers one (it does past its `snapshot_threshold`), else nothing (the
/// sync replays). Returns whether it cloned.
pub(crate) async fn bootstrap(
    path: &Path,
    url: &str,
    token: Option<&str>,
    roots: Option<&RootCertificates>,
) -> anyhow::Result<bool> {
    let client = snapshot_client(url, token, roots);
    let started = Instant::now();
    let info = match client.info().await {
        Ok(Some(info)) => info,
        Ok(None) => {
            tracing::info!("the server offers no snapshot; replaying");
            return Ok(false);
        }
        // A missing file cannot sync without a snapshot: say why there is none.
        Err(e) if !path.exists() => {
            return Err(anyhow::anyhow!(
                "database file {} does not exist, and the server could not be asked for a \
                 snapshot to start it from: {e}",
                path.display()
            ));
        }
        // An empty file: the sync reports trouble its own way.
        Err(e) => {
            tracing::info!("no snapshot: {e}");
            return Ok(false);
        }
    };
    println!(
        "bootstrapping {} from the server's snapshot ({}, {}; {} after it come by sync)",
        path.display(),
        count(info.changes, "change", "changes"),
        count(info.bytes, "byte", "bytes"),
        count(info.behind, "change", "changes")
    );
    let report = client
        .clone_into(path)
        .await
        .map_err(|e| explain(e, path))
        .with_context(|| {
            format!(
                "bootstrapping {} took {:.2}s",
                path.display(),
                started.elapsed().as_secs_f64()
            )
        })?;
    println!(
        "cloned {} in {:.2}s: {}, site id {} (new)",
        path.display(),
        report.elapsed.as_secs_f64(),
        count(report.install.rows, "row", "rows"),
        report.install.site_id
    );
    Ok(true)
}
