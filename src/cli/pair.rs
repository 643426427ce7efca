//! `crsync pair`: pair this database with another device through Nostr
//! relays (`invite` prints a code and waits; `join CODE` on the other
//! device), list the paired devices, or remove one.
//!
//! The device file (`<db>.nostr.json`, mode 0600) holds the keys and the
//! paired devices; the database itself holds none of it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use crsync::transports::nostr::{self, DeviceFile, Invitation, PairingOutcome};

use super::{Outcome, db};

/// Arguments of `crsync pair`.
#[derive(Debug, Args)]
pub(crate) struct PairArgs {
    /// The database file (must exist).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    #[command(subcommand)]
    command: PairCommand,
}

#[derive(Debug, Subcommand)]
enum PairCommand {
    /// Print a pairing code and wait until a device joins with it.
    Invite {
        /// A relay both devices can reach (ws:// or wss://); repeat for more.
        #[arg(long = "relay", value_name = "URL", required = true)]
        relays: Vec<String>,
        /// This device's name, as the other device lists it.
        #[arg(long, default_value = "device")]
        name: String,
        /// How long the code is valid, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        ttl: u64,
    },
    /// Join the device that printed CODE.
    Join {
        /// The pairing code (`crsync-pair:...`).
        code: String,
        /// This device's name, as the other device lists it.
        #[arg(long, default_value = "device")]
        name: String,
        /// Give up after this many seconds without an answer.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// List the paired devices.
    List,
    /// Unpair a device (by name or public key).
    Remove {
        /// The device's name or public key.
        device: String,
    },
}

/// Runs `crsync pair`.
pub(crate) async fn run(args: PairArgs) -> anyhow::Result<Outcome> {
    let file = DeviceFile::open_for_db(&args.db)?;
    match args.command {
        PairCommand::List => {
            let devices = file.devices();
            if devices.is_empty() {
                println!(
                    "no paired devices (pair with `crsync pair --db FILE invite --relay URL`)"
                );
            }
            for d in devices {
                let site = d.remote_site.as_deref().unwrap_or("?");
                println!(
                    "{}  site {site}  key {}  relays {}",
                    d.name,
                    d.remote_key,
                    d.relays.join(" ")
                );
            }
            Ok(Outcome::Done)
        }
        PairCommand::Remove { device } => {
            let removed = file.remove(&device)?;
            println!("unpaired {} (key {})", removed.name, removed.remote_key);
            Ok(Outcome::Done)
        }
        PairCommand::Invite { relays, name, ttl } => {
            let site = site_id(&args.db).await?;
            let ttl = Duration::from_secs(ttl.max(1));
            let mut invite = Invitation::new(&file, site, &name, relays, ttl)?;
            println!("{}", invite.code());
            println!(
                "waiting for a device to join (valid for {}s)...",
                ttl.as_secs()
            );
            let deadline = tokio::time::Instant::now() + ttl;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match invite.next(left).await? {
                    PairingOutcome::Paired(d) => {
                        println!(
                            "paired with {} (site {})",
                            d.name,
                            d.remote_site.as_deref().unwrap_or("?")
                        );
                        return Ok(Outcome::Done);
                    }
                    PairingOutcome::Refused(why) => eprintln!("refused a request: {why}"),
                    _ => {}
                }
            }
        }
        PairCommand::Join {
            code,
            name,
            timeout,
        } => {
            let site = site_id(&args.db).await?;
            let code: nostr::PairingCode = code.parse()?;
            let d = nostr::join(
                &file,
                &code,
                site,
                &name,
                Duration::from_secs(timeout.max(1)),
            )
            .await?;
            println!(
                "paired with {} (site {})",
                d.name,
                d.remote_site.as_deref().unwrap_or("?")
            );
            Ok(Outcome::Done)
        }
    }
}

async fn site_id(path: &std::path::Path) -> anyhow::Result<crsync::SiteId> {
    let store = db::open_existing(path).await?;
    let site = store.site_id();
    db::close(store).await;
    Ok(site)
}
