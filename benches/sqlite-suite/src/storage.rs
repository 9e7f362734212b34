//! The `storage` mode: SQLite work whose time goes to the disk.
//!
//! Rollback journal (DELETE), synchronous=FULL, and a 2 MiB page cache, so
//! that SQLite's cache hides little. Two parts:
//!
//! 1. `commit_per_insert`: small rows in true autocommit, every INSERT its
//!    own transaction, so every row pays a full commit (journal write and
//!    fsync, database write and fsync, journal delete).
//! 2. A speedtest1-style mix over `t1(id INTEGER PRIMARY KEY, k INTEGER,
//!    payload)`, each test in its own transaction: bulk insert of rows whose
//!    payload is 100..=1024 bytes (text for even ids, random bytes for odd
//!    ones, so compression in the storage stack gains little on half of
//!    it) until the file, index included, is about `--db-mib` MiB; CREATE
//!    INDEX on `k`; point lookups of random rows through that index (random
//!    pages: disk reads with `--cold`, or when the file exceeds the kernel's
//!    page cache); a full scan; UPDATE of a random 10%; DELETE of a contiguous
//!    10%; VACUUM; `PRAGMA integrity_check`, which must answer `ok`.
//!
//! `k` is a bijective mix of `id`, so a lookup can derive the key of any
//! row and check the row it gets back.
//!
//! `fsync_heavy`: true for the operations whose timed part ends in a commit
//! that writes much (or, for `commit_per_insert`, commits per row): their
//! time is write-back and fsync rather than CPU. False for lookups, the scan
//! and the integrity check, which only read.
//!
//! VACUUM builds its copy in a temporary file in SQLite's temporary
//! directory (`SQLITE_TMPDIR`, `TMPDIR`, `/var/tmp`, `/usr/tmp`, `/tmp`, then
//! `.`), which may be a different disk than `--dir`.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection};

use crate::data::{mix64, SplitMix64};
use crate::modes::StorageSizes;
use crate::report::Operation;
use crate::Db;

/// Payload sizes: uniform in `MIN_PAYLOAD..=MAX_PAYLOAD` bytes.
pub(crate) const MIN_PAYLOAD: u64 = 100;
const MAX_PAYLOAD: u64 = 1024;

/// The indexed key of row `id`.
fn key_of(id: i64) -> i64 {
    mix64(id as u64) as i64
}

/// A count as an SQLite integer (counts here are far below 2^63).
pub(crate) fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Runs the storage operations in order, appending to `out`.
pub(crate) fn run(db: &Db, sizes: &StorageSizes, out: &mut Vec<Operation>) -> Result<()> {
    let conn = db.open()?;
    // Untimed, each in autocommit (two write transactions).
    conn.execute_batch(
        "CREATE TABLE kv (id INTEGER PRIMARY KEY, name TEXT NOT NULL, value REAL, data TEXT)",
    )
    .and_then(|()| {
        conn.execute_batch("CREATE TABLE t1 (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, payload)")
    })
    .with_context(|| context("create_tables", db))?;

    let rows = sizes.bulk_rows;
    let remaining = rows - sizes.delete_rows;
    let steps: [(&'static str, bool, Step); 9] = [
        ("commit_per_insert", true, &|c, s| {
            commit_per_insert(c, s.commit_rows)
        }),
        ("bulk_insert", true, &|c, s| bulk_insert(c, s.bulk_rows)),
        ("create_index", true, &|c, s| create_index(c, s.bulk_rows)),
        ("point_lookups", false, &point_lookups),
        ("full_scan", false, &|c, s| full_scan(c, s.bulk_rows)),
        ("update_random", true, &update_random),
        ("delete_range", true, &delete_range),
        ("vacuum", true, &|c, _| vacuum(c, remaining)),
        ("integrity_check", false, &|c, _| {
            integrity_check(c, remaining)
        }),
    ];
    time_steps(db, conn, sizes, &steps, out)
}

/// One timed test: runs on the connection and returns its row count.
pub(crate) type Step<'a> = &'a dyn Fn(&Connection, &StorageSizes) -> Result<u64>;

/// Runs `(name, fsync_heavy, step)` in order, each timed from cold caches
/// with `--cold` (a fresh connection), appending to `out`.
pub(crate) fn time_steps(
    db: &Db,
    mut conn: Connection,
    sizes: &StorageSizes,
    steps: &[(&'static str, bool, Step)],
    out: &mut Vec<Operation>,
) -> Result<()> {
    for &(name, fsync_heavy, step) in steps {
        conn = db.chill(conn)?;
        let start = Instant::now();
        let rows = step(&conn, sizes).with_context(|| context(name, db))?;
        out.push(Operation {
            name,
            seconds: start.elapsed().as_secs_f64(),
            rows,
            fsync_heavy,
        });
    }
    Ok(())
}

fn context(name: &str, db: &Db) -> String {
    format!("operation {name} on {}", db.path.display())
}

/// Rows shaped like the Python benchmark's (a name, a REAL, 50 characters),
/// each INSERT in autocommit: one commit per row.
fn commit_per_insert(conn: &Connection, n: u64) -> Result<u64> {
    let mut rng = SplitMix64::new(1);
    let mut data = Vec::new();
    let mut stmt = conn.prepare("INSERT INTO kv (name, value, data) VALUES (?, ?, ?)")?;
    for i in 0..n {
        let value = rng.unit() * 1000.0;
        rng.fill(&mut data, 50, true);
        stmt.execute(params![format!("kv_{i}"), value, text(&data)])?;
    }
    ensure!(conn.is_autocommit(), "a transaction was left open");
    Ok(n)
}

/// A payload as a borrowed SQL value: text for even ids, a blob for odd.
fn payload(id: i64, bytes: &[u8]) -> ToSqlOutput<'_> {
    if id % 2 == 0 {
        text(bytes)
    } else {
        ToSqlOutput::Borrowed(ValueRef::Blob(bytes))
    }
}

/// Alphanumeric bytes as SQL text.
fn text(bytes: &[u8]) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(bytes))
}

fn payload_len(rng: &mut SplitMix64) -> usize {
    (MIN_PAYLOAD + rng.below(MAX_PAYLOAD - MIN_PAYLOAD + 1)) as usize
}

/// One transaction: `rows` rows in id order, payloads generated as they go.
pub(crate) fn bulk_insert(conn: &Connection, rows: u64) -> Result<u64> {
    let mut rng = SplitMix64::new(2);
    let mut buf = Vec::with_capacity(MAX_PAYLOAD as usize);
    conn.execute_batch("BEGIN")?;
    let mut stmt = conn.prepare("INSERT INTO t1 (id, k, payload) VALUES (?, ?, ?)")?;
    for id in 1..=sql_int(rows) {
        let len = payload_len(&mut rng);
        rng.fill(&mut buf, len, id % 2 == 0);
        stmt.execute(params![id, key_of(id), payload(id, &buf)])?;
    }
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(rows)
}

/// One autocommit statement: read the table, sort, write the index.
pub(crate) fn create_index(conn: &Connection, rows: u64) -> Result<u64> {
    conn.execute_batch("CREATE INDEX t1_k ON t1(k)")?;
    Ok(rows)
}

/// One read transaction of lookups by `k` at random ids; each must return
/// its row.
pub(crate) fn point_lookups(conn: &Connection, sizes: &StorageSizes) -> Result<u64> {
    let mut rng = SplitMix64::new(3);
    conn.execute_batch("BEGIN")?;
    let mut stmt = conn.prepare("SELECT id, length(payload) FROM t1 WHERE k = ?")?;
    for _ in 0..sizes.lookups {
        let id = 1 + sql_int(rng.below(sizes.bulk_rows));
        let (found, len): (i64, i64) = stmt
            .query_row([key_of(id)], |row| Ok((row.get(0)?, row.get(1)?)))
            .with_context(|| format!("looking up row {id}"))?;
        ensure!(
            found == id && (MIN_PAYLOAD as i64..=MAX_PAYLOAD as i64).contains(&len),
            "lookup of row {id} returned row {found} with a {len}-byte payload"
        );
    }
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(sizes.lookups)
}

/// Every row of the table (the payload's length forces reading the table,
/// not the smaller index).
pub(crate) fn full_scan(conn: &Connection, rows: u64) -> Result<u64> {
    let (count, bytes): (i64, i64) =
        conn.query_row("SELECT count(*), sum(length(payload)) FROM t1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    ensure!(
        count == sql_int(rows),
        "scan counted {count} rows, expected {rows}"
    );
    ensure!(
        bytes >= sql_int(rows * MIN_PAYLOAD),
        "scan summed only {bytes} payload bytes"
    );
    Ok(rows)
}

/// One transaction: new payloads for a random 10% of the rows (a shuffle,
/// so no row twice), scattered over the whole file.
fn update_random(conn: &Connection, sizes: &StorageSizes) -> Result<u64> {
    let mut rng = SplitMix64::new(4);
    let mut ids: Vec<i64> = (1..=sql_int(sizes.bulk_rows)).collect();
    for i in (1..ids.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        ids.swap(i, j);
    }
    let mut buf = Vec::with_capacity(MAX_PAYLOAD as usize);
    conn.execute_batch("BEGIN")?;
    let mut stmt = conn.prepare("UPDATE t1 SET payload = ? WHERE id = ?")?;
    for &id in &ids[..sizes.update_rows as usize] {
        let len = payload_len(&mut rng);
        rng.fill(&mut buf, len, id % 2 == 0);
        let changed = stmt.execute(params![payload(id, &buf), id])?;
        ensure!(changed == 1, "update of row {id} changed {changed} rows");
    }
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(sizes.update_rows)
}

/// One autocommit statement deleting a contiguous 10% of the ids.
fn delete_range(conn: &Connection, sizes: &StorageSizes) -> Result<u64> {
    let first = sql_int(sizes.delete_first_id);
    let last = first + sql_int(sizes.delete_rows) - 1;
    let deleted = conn.execute(
        "DELETE FROM t1 WHERE id BETWEEN ? AND ?",
        params![first, last],
    )?;
    ensure!(
        deleted as u64 == sizes.delete_rows,
        "deleted {deleted} rows, expected {}",
        sizes.delete_rows
    );
    Ok(sizes.delete_rows)
}

/// Rebuilds the file without the deleted rows' pages.
fn vacuum(conn: &Connection, remaining: u64) -> Result<u64> {
    conn.execute_batch("VACUUM")?;
    Ok(remaining)
}

/// `PRAGMA integrity_check` reads every page; anything but `ok` is an error.
fn integrity_check(conn: &Connection, remaining: u64) -> Result<u64> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let answers = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if answers != ["ok"] {
        let shown: Vec<_> = answers.iter().take(10).map(String::as_str).collect();
        bail!("integrity_check found problems: {}", shown.join("; "));
    }
    Ok(remaining)
}
