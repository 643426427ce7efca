//! Loading the cr-sqlite extension at run time.
//!
//! `crsqlite.so` is opened with `libloading`, its entry point
//! `sqlite3_crsqlite_init` is registered with `sqlite3_auto_extension`, and from
//! then on every connection this process opens has cr-sqlite. SQL's
//! `load_extension()` stays disabled. Registration is process-wide and happens
//! once; later calls return the library already loaded.
//!
//! cr-sqlite initialises inside `sqlite3_open`, before the caller can set a
//! busy timeout, so a file another process is writing could fail to open
//! (`automatic extension loading failed`). What is registered is therefore a
//! small wrapper that first gives the connection a busy timeout of
//! 5 s (the same 5 s rusqlite sets right after `open`) and
//! then runs cr-sqlite's entry point.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::auto_extension::RawAutoExtension;
use rusqlite::ffi;

/// Busy timeout every connection gets before cr-sqlite initialises on it.
pub(crate) const INIT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable naming the extension file.
pub const CRSQLITE_PATH_ENV: &str = "CRSQLITE_PATH";

/// The extension's file name in every default location.
pub const EXTENSION_FILE: &str = "crsqlite.so";

/// Where the development build of this source tree finds the extension that
/// `scripts/setup.sh` builds (debug builds only: an installed `crsync` never
/// looks into the machine it was built on).
#[cfg(debug_assertions)]
const SOURCE_TREE_EXTENSION: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../.crsqlite/crsqlite.so");

const HOW_TO_INSTALL: &str = "run `crsync extension install` (builds it into the user's data \
     directory), or point CRSQLITE_PATH at a cr-sqlite 0.16 loadable extension";

/// The user's data directory for crsync: `$XDG_DATA_HOME/crsync`, else
/// `~/.local/share/crsync` (where `crsync extension install` puts the extension).
pub fn user_data_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty());
    let base = match xdg {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".local/share")
        }
    };
    Some(base.join("crsync"))
}

/// Where the extension is looked for when neither a path nor
/// `CRSQLITE_PATH` is given, in order: next to the running program
/// (`crsqlite.so`, `../lib/crsync/crsqlite.so`), the user's data directory
/// ([`user_data_dir`]), `/usr/local/lib/crsync` and `/usr/lib/crsync`; and for
/// a debug build, the source tree's `.crsqlite/` last.
pub fn default_locations() -> Vec<PathBuf> {
    let mut places = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        places.push(dir.join(EXTENSION_FILE));
        places.push(dir.join("../lib/crsync").join(EXTENSION_FILE));
    }
    if let Some(dir) = user_data_dir() {
        places.push(dir.join(EXTENSION_FILE));
    }
    places.push(Path::new("/usr/local/lib/crsync").join(EXTENSION_FILE));
    places.push(Path::new("/usr/lib/crsync").join(EXTENSION_FILE));
    #[cfg(debug_assertions)]
    places.push(PathBuf::from(SOURCE_TREE_EXTENSION));
    places
}

/// Why the extension could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtensionError {
    /// No file at the resolved path.
    #[error("cr-sqlite extension not found at {path} (from {source_of_path}); {HOW_TO_INSTALL}", path = path.display())]
    NotFound {
        /// The path looked at.
        path: PathBuf,
        /// Where the path came from.
        source_of_path: PathSource,
    },
    /// The file is not a loadable library, or lacks cr-sqlite's entry point.
    #[error("{path} is not a cr-sqlite extension: {reason}; {HOW_TO_INSTALL}", path = path.display())]
    NotCrSqlite {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The entry point ran but a connection could not use cr-sqlite.
    #[error("cr-sqlite from {path} failed to initialise: {reason}; {HOW_TO_INSTALL}", path = path.display())]
    InitFailed {
        /// The file.
        path: PathBuf,
        /// SQLite's message.
        reason: String,
    },
    /// A different extension file is already registered in this process.
    #[error("cr-sqlite is already loaded from {loaded}; cannot also load {requested}", loaded = loaded.display(), requested = requested.display())]
    AlreadyLoaded {
        /// The file in use.
        loaded: PathBuf,
        /// The file asked for.
        requested: PathBuf,
    },
}

/// Where an extension path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathSource {
    /// Given in code.
    Explicit,
    /// The `CRSQLITE_PATH` environment variable.
    Environment,
    /// The first of the [default locations](default_locations) that has the
    /// file (or, when none has, the user's data directory).
    InstallDir,
}

impl std::fmt::Display for PathSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathSource::Explicit => "the configured path",
            PathSource::Environment => "CRSQLITE_PATH",
            PathSource::InstallDir => "the default locations",
        })
    }
}

/// The library, kept loaded for the life of the process.
static LOADED: OnceLock<(PathBuf, libloading::Library)> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());
/// cr-sqlite's entry point, called by [`init_with_busy_timeout`].
static CRSQLITE_INIT: Mutex<Option<RawAutoExtension>> = Mutex::new(None);

/// The auto extension: a busy timeout first, then cr-sqlite's own init.
///
/// # Safety
/// Called by SQLite with the connection being opened, as for any auto extension.
unsafe extern "C" fn init_with_busy_timeout(
    db: *mut ffi::sqlite3,
    err: *mut *mut c_char,
    api: *const ffi::sqlite3_api_routines,
) -> c_int {
    let init = *CRSQLITE_INIT.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(init) = init else {
        return ffi::SQLITE_ERROR;
    };
    let ms = c_int::try_from(INIT_BUSY_TIMEOUT.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: `db` is the open connection SQLite hands every auto extension.
    unsafe {
        ffi::sqlite3_busy_timeout(db, ms);
        init(db, err, api)
    }
}

/// Resolves the extension path: `explicit`, then `CRSQLITE_PATH`, then the
/// first [default location](default_locations) that has the file.
pub fn resolve_path(explicit: Option<&Path>) -> (PathBuf, PathSource) {
    if let Some(p) = explicit {
        return (p.to_path_buf(), PathSource::Explicit);
    }
    if let Some(p) = std::env::var_os(CRSQLITE_PATH_ENV).filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), PathSource::Environment);
    }
    let places = default_locations();
    let found = places.iter().find(|p| p.is_file()).cloned();
    let fallback = user_data_dir()
        .map(|d| d.join(EXTENSION_FILE))
        .or_else(|| places.first().cloned())
        .unwrap_or_else(|| PathBuf::from(EXTENSION_FILE));
    (found.unwrap_or(fallback), PathSource::InstallDir)
}

/// Loads cr-sqlite (once per process) and returns the file it came from.
///
/// ```no_run
/// let path = crsync_peer::load_extension(None)?;
/// println!("cr-sqlite loaded from {}", path.display());
/// # Ok::<(), crsync_peer::ExtensionError>(())
/// ```
pub fn load_extension(explicit: Option<&Path>) -> Result<PathBuf, ExtensionError> {
    let _guard = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((loaded, _)) = LOADED.get() {
        if let Some(requested) = explicit {
            let same = std::fs::canonicalize(requested).ok() == std::fs::canonicalize(loaded).ok();
            if !same {
                return Err(ExtensionError::AlreadyLoaded {
                    loaded: loaded.clone(),
                    requested: requested.to_path_buf(),
                });
            }
        }
        return Ok(loaded.clone());
    }
    let (path, source_of_path) = resolve_path(explicit);
    if !path.is_file() {
        return Err(ExtensionError::NotFound {
            path,
            source_of_path,
        });
    }
    let not_cr = |e: libloading::Error| ExtensionError::NotCrSqlite {
        path: path.clone(),
        reason: e.to_string(),
    };
    // SAFETY: loading a shared library runs its initialisers; we only load the
    // file the user or install script named as cr-sqlite.
    let library = unsafe { libloading::Library::new(&path) }.map_err(not_cr)?;
    // SAFETY: the symbol has the SQLite extension entry-point signature.
    let init: RawAutoExtension = *unsafe {
        library.get::<RawAutoExtension>(b"sqlite3_crsqlite_init\0")
    }
    .map_err(|e| ExtensionError::NotCrSqlite {
        path: path.clone(),
        reason: format!("it has no sqlite3_crsqlite_init entry point ({e})"),
    })?;
    // `init` stays valid: the library is stored in `LOADED` for the life of
    // the process (and the wrapper is unregistered if that does not happen).
    *CRSQLITE_INIT.lock().unwrap_or_else(PoisonError::into_inner) = Some(init);
    // SAFETY: the wrapper only calls `init`, with the arguments SQLite gives it.
    unsafe { rusqlite::auto_extension::register_auto_extension(init_with_busy_timeout) }.map_err(
        |e| ExtensionError::InitFailed {
            path: path.clone(),
            reason: e.to_string(),
        },
    )?;
    if let Err(reason) = check_connection() {
        rusqlite::auto_extension::reset_auto_extension();
        *CRSQLITE_INIT.lock().unwrap_or_else(PoisonError::into_inner) = None;
        return Err(ExtensionError::InitFailed { path, reason });
    }
    tracing::debug!(path = %path.display(), "cr-sqlite extension loaded");
    let _ = LOADED.set((path.clone(), library));
    Ok(path)
}

/// Opens a scratch connection and checks cr-sqlite answers.
fn check_connection() -> Result<(), String> {
    let conn = rusqlite::Connection::open_in_memory().map_err(|e| e.to_string())?;
    let site: Vec<u8> = conn
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if site.len() != crate::ids::SITE_ID_LEN {
        return Err(format!("crsql_site_id() returned {} bytes", site.len()));
    }
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .map_err(|e| e.to_string())?;
    Ok(())
}
