//! The `image` mode: an application reading a database that shipped in its
//! disk image, the case where a lazily served disk fetches on demand.
//!
//! `--prepare` builds the database (on the host, into the root filesystem
//! the fixture makes): the storage mode's `t1` table of about `--db-mib`
//! MiB, bulk-inserted in id order, and its index on `k`. A run then reads
//! it, with the kernel's and SQLite's caches dropped before each operation
//! (`--cold` is implied): point lookups of random rows through the index
//! (random pages), a range scan of a contiguous tenth of the ids by primary
//! key (sequential pages) and a full scan of the table. A run writes
//! nothing, so it leaves the database as it found it.

use anyhow::{Context, Result};

use crate::modes::StorageSizes;
use crate::report::Operation;
use crate::storage::{
    bulk_insert, create_index, full_scan, point_lookups, sql_int, time_steps, Step, MIN_PAYLOAD,
};
use crate::Db;

/// Builds the database; its steps are reported like operations.
pub(crate) fn prepare(db: &Db, sizes: &StorageSizes, out: &mut Vec<Operation>) -> Result<()> {
    let conn = db.open()?;
    conn.execute_batch("CREATE TABLE t1 (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, payload)")
        .with_context(|| format!("creating t1 in {}", db.path.display()))?;
    let steps: [(&'static str, bool, Step); 2] = [
        ("bulk_insert", true, &|c, s| bulk_insert(c, s.bulk_rows)),
        ("create_index", true, &|c, s| create_index(c, s.bulk_rows)),
    ];
    time_steps(db, conn, sizes, &steps, out)
}

/// Reads the database `prepare` built.
pub(crate) fn run(db: &Db, scale: f64, out: &mut Vec<Operation>) -> Result<()> {
    let conn = db.open()?;
    let rows: Option<i64> = conn
        .query_row("SELECT max(id) FROM t1", [], |row| row.get(0))
        .with_context(|| {
            format!(
                "{} holds no t1 table: build it with `sqlite-suite --mode image --prepare`",
                db.path.display()
            )
        })?;
    let rows = rows
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .with_context(|| format!("t1 in {} is empty", db.path.display()))?;
    let sizes = StorageSizes::of_rows(rows, scale);
    let steps: [(&'static str, bool, Step); 3] = [
        ("point_lookups", false, &point_lookups),
        ("range_scan", false, &range_scan),
        ("full_scan", false, &|c, s| full_scan(c, s.bulk_rows)),
    ];
    time_steps(db, conn, &sizes, &steps, out)
}

/// The rows of a contiguous tenth of the ids, read in primary-key order.
fn range_scan(conn: &rusqlite::Connection, sizes: &StorageSizes) -> Result<u64> {
    let first = sql_int(sizes.delete_first_id);
    let last = first + sql_int(sizes.delete_rows) - 1;
    let (count, bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), sum(length(payload)) FROM t1 WHERE id BETWEEN ? AND ?",
        [first, last],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    anyhow::ensure!(
        count == sql_int(sizes.delete_rows) && bytes >= count * MIN_PAYLOAD as i64,
        "range scan of ids {first}..={last} found {count} rows and {bytes} payload bytes"
    );
    Ok(sizes.delete_rows)
}
