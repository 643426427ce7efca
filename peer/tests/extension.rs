//! The extension loader's errors. One test, because registration is process-wide.

use std::path::PathBuf;

use crsync_peer::{ExtensionError, PathSource, load_extension, resolve_path};

#[test]
fn loader_reports_clear_errors_then_loads() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.so");
    match load_extension(Some(&missing)) {
        Err(
            e @ ExtensionError::NotFound {
                source_of_path: PathSource::Explicit,
                ..
            },
        ) => {
            assert!(
                e.to_string().contains("crsync extension install"),
                "no install hint: {e}"
            );
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    let not_a_library = dir.path().join("garbage.so");
    std::fs::write(&not_a_library, b"definitely not ELF").unwrap();
    assert!(matches!(
        load_extension(Some(&not_a_library)),
        Err(ExtensionError::NotCrSqlite { .. })
    ));

    // a real shared library without cr-sqlite's entry point
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if let Some(libm) = libm {
        match load_extension(Some(&libm)) {
            Err(e @ ExtensionError::NotCrSqlite { .. }) => {
                assert!(e.to_string().contains("sqlite3_crsqlite_init"), "{e}")
            }
            other => panic!("expected NotCrSqlite, got {other:?}"),
        }
    }

    // resolution order: explicit, then CRSQLITE_PATH, then the default locations
    let (path, source) = resolve_path(Some(&missing));
    assert_eq!((path, source), (missing.clone(), PathSource::Explicit));
    if std::env::var_os("CRSQLITE_PATH").is_none() {
        assert_eq!(resolve_path(None).1, PathSource::InstallDir);
    }

    // the real library loads, and a second, different path is refused
    let loaded = load_extension(None).expect("cr-sqlite should load from the default location");
    assert_eq!(load_extension(None).unwrap(), loaded);
    assert!(matches!(
        load_extension(Some(&not_a_library)),
        Err(ExtensionError::AlreadyLoaded { .. })
    ));
}
