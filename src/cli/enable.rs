//! `crsync enable`: turn tables into CRRs.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use crsync::{EnableError, Store};

use super::{Outcome, db};

/// Arguments of `crsync enable`.
#[derive(Debug, Args)]
pub(crate) struct EnableArgs {
    /// The database file (created if it does not exist).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// SQL to run first, in one transaction (for example `CREATE TABLE IF NOT EXISTS ...`).
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// The tables to replicate. Each needs a primary key; all or none are enabled.
    #[arg(value_name = "TABLE", required = true)]
    tables: Vec<String>,
}

/// Runs `crsync enable`.
pub(crate) async fn run(args: EnableArgs) -> anyhow::Result<Outcome> {
    // Read the schema before creating anything, so a wrong path changes nothing.
    let schema = match &args.schema {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read schema file {}", path.display()))?,
        ),
        None => None,
    };
    let store = db::open(&args.db).await?;
    let result = enable(&store, &args, schema).await;
    db::close(store).await;
    result?;
    println!(
        "{}: replicating {}",
        args.db.display(),
        args.tables.join(", ")
    );
    Ok(Outcome::Done)
}

async fn enable(store: &Store, args: &EnableArgs, schema: Option<String>) -> anyhow::Result<()> {
    if let Some(sql) = schema {
        let path = args.schema.clone().unwrap_or_default();
        store
            .write(move |tx| tx.execute_batch(&sql))
            .await
            .with_context(|| format!("applying {} failed", path.display()))?;
    }
    let names: Vec<&str> = args.tables.iter().map(String::as_str).collect();
    match store.enable_crr(&names).await {
        Ok(()) => Ok(()),
        Err(e @ EnableError::UnknownTable { .. }) => {
            let known = db::user_tables(store).await.unwrap_or_default();
            let hint = if known.is_empty() {
                format!(
                    "{} has no tables yet; create them first (or pass --schema FILE)",
                    args.db.display()
                )
            } else {
                format!("tables in {}: {}", args.db.display(), known.join(", "))
            };
            Err(anyhow::anyhow!("{e} ({hint}); no table was enabled"))
        }
        Err(e @ (EnableError::NoPrimaryKey { .. } | EnableError::Rejected { .. })) => {
            Err(anyhow::anyhow!("{e}; no table was enabled"))
        }
        Err(e) => Err(e).context("enabling replication failed"),
    }
}
