//! `crsync fork`: a new site id for a copied database file.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use crsync::Store;

use super::Outcome;

/// Arguments of `crsync fork`.
#[derive(Debug, Args)]
pub(crate) struct ForkArgs {
    /// The database file: a copy of another replica (`cp`, a restored
    /// backup, a VM image). No other process may have it open.
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
}

/// Runs `crsync fork`.
pub(crate) async fn run(args: ForkArgs) -> anyhow::Result<Outcome> {
    let report = Store::fork(&args.db, None)
        .await
        .with_context(|| format!("cannot fork {}", args.db.display()))?;
    println!(
        "{}: new site id {} (was {}); {} written after the copy now sync under the new id, \
         writes up to version {} keep the old one",
        args.db.display(),
        report.new_site,
        report.old_site,
        super::count(report.reattributed, "cell", "cells"),
        report.kept_upto
    );
    Ok(Outcome::Done)
}
