//! `crsync extension`: where the cr-sqlite extension is found, building it
//! with the recipe compiled into the binary, and the error when it is missing.

#[path = "support/process.rs"]
mod support;

use support::{crsync, run};

#[test]
fn path_names_the_file_in_use_and_every_place_looked_at() {
    let mut cmd = crsync();
    cmd.args(["extension", "path"]).env_remove("CRSQLITE_PATH");
    let out = run(cmd);
    out.assert_success();
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains("crsqlite.so") && !first.contains("(missing)"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(".local/share/crsync/crsqlite.so")
            || std::env::var_os("XDG_DATA_HOME").is_some(),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("/usr/lib/crsync/crsqlite.so"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("  found"), "{out:#?}");
}

#[test]
fn a_missing_extension_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = dir.path().join("s.sql");
    std::fs::write(&schema, "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL);").expect("schema");
    let mut cmd = crsync();
    cmd.args(["enable", "--db"])
        .arg(dir.path().join("x.db"))
        .arg("--schema")
        .arg(&schema)
        .arg("t")
        .env("CRSQLITE_PATH", dir.path().join("nowhere/crsqlite.so"));
    run(cmd).assert_failure(1, "crsync extension install");
}

/// Builds cr-sqlite from its npm source (about 30 s on 2 cores; needs npm,
/// cargo and a C compiler, which the set-up installs).
#[test]
fn install_builds_the_extension_into_a_directory_and_it_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("lib");
    let mut cmd = crsync();
    cmd.args(["extension", "install", "--dir"]).arg(&target);
    let out = run(cmd);
    out.assert_success();
    let built = target.join("crsqlite.so");
    assert!(built.is_file(), "{out:#?}");
    // A second install finds it up to date.
    let mut again = crsync();
    again.args(["extension", "install", "--dir"]).arg(&target);
    let out = run(again);
    out.assert_success();
    assert!(out.stderr.contains("up to date"), "{out:#?}");
    // And crsync runs with it.
    let db = dir.path().join("t.db");
    let schema = dir.path().join("s.sql");
    std::fs::write(
        &schema,
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, x TEXT);",
    )
    .expect("schema");
    let mut enable = crsync();
    enable
        .args(["enable", "--db"])
        .arg(&db)
        .arg("--schema")
        .arg(&schema)
        .arg("t")
        .env("CRSQLITE_PATH", &built);
    run(enable).assert_success();
}
