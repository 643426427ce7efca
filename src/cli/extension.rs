//! `crsync extension`: where the cr-sqlite extension is found, and building
//! it there. The build recipe (scripts/crsqlite/build-crsqlite.sh and its
//! patches) is compiled into the binary, so an installed `crsync` needs no
//! source tree: only cargo, a C compiler and npm.

use std::path::PathBuf;
use std::process::Command;

use clap::{Args, Subcommand};
use crsync::advanced::{
    CRSQLITE_PATH_ENV, EXTENSION_FILE, PathSource, default_locations, resolve_path, user_data_dir,
};

use super::Outcome;

const BUILD_SCRIPT: &str = include_str!("../../scripts/crsqlite/build-crsqlite.sh");
const PATCHES: [(&str, &str); 4] = [
    (
        "0001-nul-terminate-default-schema-name.patch",
        include_str!("../../scripts/crsqlite/patches/0001-nul-terminate-default-schema-name.patch"),
    ),
    (
        "0002-build-on-stable-rust.patch",
        include_str!("../../scripts/crsqlite/patches/0002-build-on-stable-rust.patch"),
    ),
    (
        "0003-pregenerated-sqlite3-bindings.patch",
        include_str!("../../scripts/crsqlite/patches/0003-pregenerated-sqlite3-bindings.patch"),
    ),
    (
        "0004-fix-config-set-uaf-and-unfinalized-stmt.patch",
        include_str!(
            "../../scripts/crsqlite/patches/0004-fix-config-set-uaf-and-unfinalized-stmt.patch"
        ),
    ),
];

/// Arguments of `crsync extension`.
#[derive(Debug, Args)]
pub(crate) struct ExtensionArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Print the extension file crsync uses, and every place it looks.
    Path,
    /// Build cr-sqlite 0.16.3 from its npm source (checked, patched) into the
    /// user's data directory (or --dir). Needs cargo, a C compiler and npm;
    /// does nothing when an up-to-date build is there.
    Install {
        /// Where to put crsqlite.so (default: the user's data directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs `crsync extension`.
pub(crate) fn run(args: ExtensionArgs) -> anyhow::Result<Outcome> {
    match args.action {
        Action::Path => {
            let (path, source) = resolve_path(None);
            let state = if path.is_file() { "" } else { " (missing)" };
            println!("{}{state}  (from {source})", path.display());
            if source == PathSource::InstallDir {
                println!("looked in, in order ({CRSQLITE_PATH_ENV} overrides all):");
                for place in default_locations() {
                    let mark = if place.is_file() { "  found" } else { "" };
                    println!("  {}{mark}", place.display());
                }
            }
            Ok(Outcome::Done)
        }
        Action::Install { dir } => {
            let dir = dir.or_else(user_data_dir).ok_or_else(|| {
                anyhow::anyhow!("no user data directory (HOME is not set): pass --dir DIR")
            })?;
            install(&dir)?;
            println!(
                "cr-sqlite installed at {}",
                dir.join(EXTENSION_FILE).display()
            );
            Ok(Outcome::Done)
        }
    }
}

/// Writes the recipe to a temporary directory and runs it for `dir`.
fn install(dir: &std::path::Path) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let script = work.path().join("build-crsqlite.sh");
    std::fs::write(&script, BUILD_SCRIPT)?;
    let patches = work.path().join("patches");
    std::fs::create_dir(&patches)?;
    for (name, text) in PATCHES {
        std::fs::write(patches.join(name), text)?;
    }
    let status = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .env("CRSQLITE_PATCH_DIR", &patches)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run bash for the build: {e}"))?;
    if !status.success() {
        anyhow::bail!(
            "building cr-sqlite failed ({status}); it needs cargo, a C compiler (cc) and npm \
             (Debian: apt-get install gcc libc6-dev patch nodejs npm)"
        );
    }
    Ok(())
}
