//! crsync against real-world wire-v1 peers (the TypeScript `@app/sync`), modelled in
//! `support/v1.rs` with plain HTTP, SSE and SQL: version holes, LIMIT/OFFSET paging that
//! splits transactions, fire-and-forget POSTs, JavaScript values.
//!
//! Each scenario states what must hold; where today's crsync falls short the test fails
//! with the reason (timeouts are [`v1::LIMIT`], and every wait polls with a deadline).

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use support::v1::{self, Check, V1Config, V1Db, js};

/// A v1 database in `dir`.
fn v1_db(dir: &tempfile::TempDir, name: &str) -> Result<Arc<V1Db>> {
    Ok(Arc::new(V1Db::open(
        &dir.path().join(format!("{name}.db")),
        v1::SCHEMA,
        v1::TABLES,
    )?))
}

fn own_versions(db: &V1Db) -> Result<Vec<i64>> {
    db.with(|c| {
        let mut stmt = c.prepare(
            "SELECT DISTINCT db_version FROM crsql_changes WHERE site_id = crsql_site_id() ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    })
}

#[test]
fn model_prints_numbers_like_javascript() {
    let cases: [(f64, &str); 14] = [
        (1.0, "1"),
        (-1.0, "-1"),
        (1.5, "1.5"),
        (0.1, "0.1"),
        (-0.0, "0"),
        (i64::MAX as f64, "9223372036854776000"),
        (-(i64::MAX as f64), "-9223372036854776000"),
        (9007199254740993_i64 as f64, "9007199254740992"),
        (1e21, "1e+21"),
        (123456789012345680000.0, "123456789012345680000"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-10, "1.5e-10"),
        (f64::NAN, "null"),
    ];
    for (f, want) in cases {
        assert_eq!(js::js_number(f), want, "{f:?}");
    }
    assert_eq!(js::js_number(f64::INFINITY), "null");
    // The exact token a TypeScript peer sends for i64::MAX in an INTEGER column.
    let val = js::JsValue::from_sql(crsync_peer::rusqlite::types::ValueRef::Integer(i64::MAX));
    assert_eq!(val.to_json(), "9223372036854776000");
    let blob = js::JsValue::from_sql(crsync_peer::rusqlite::types::ValueRef::Blob(&[0, 255, 16]));
    assert_eq!(blob.to_json(), r#"{"type":"Buffer","data":[0,255,16]}"#);
}

/// The model's own versions have holes: write -> 1, merge -> 2 used up, write -> 3.
#[test]
fn model_merges_leave_holes_in_own_versions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = v1_db(&dir, "a")?;
    let b = v1_db(&dir, "b")?;
    a.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (1, 'a1')", []))?;
    b.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (100, 'b')", []))?;
    let pages = b.pages_lacking(&Default::default(), 100)?;
    a.merge(&pages.concat())?;
    a.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (2, 'a2')", []))?;
    assert_eq!(own_versions(&a)?, vec![1, 3]);
    let cursor = a.cursor()?;
    assert_eq!(cursor.get(a.site_id()), Some(&3), "{cursor:?}");
    assert!(cursor.contains_key(b.site_id()), "{cursor:?}");
    assert_eq!(a.rows()?.len(), 3);
    Ok(())
}
