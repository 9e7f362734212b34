//! The Python benchmark's eleven operations, statement for statement.
//!
//! Transactions. CPython's `sqlite3` module, in its legacy transaction
//! control (the default `isolation_level=""`), runs `BEGIN` before an
//! INSERT, UPDATE, DELETE or REPLACE when no transaction is open, never
//! before a SELECT, PRAGMA or DDL statement, and `Connection.commit()` runs
//! `COMMIT` only when a transaction is open. rusqlite leaves every statement
//! in SQLite's autocommit mode, so [`implicit_begin`] (called before each
//! DML statement, as CPython checks before each) and [`python_commit`] put
//! the BEGINs and COMMITs where a Python run has them. Its "autocommit"
//! sequential inserts are therefore one transaction, and a whole run makes
//! 11 commits (counted in `lib.rs`'s tests).
//!
//! Timed regions are the script's: each starts where it calls
//! `time.perf_counter()`, so data generation is timed for the inserts but
//! not for the join's setup, and the concurrent reads are wall time
//! including opening the connections.
//!
//! Rows the script fetches with `fetchall()` are materialised here too
//! (each column copied into an owned value), to keep the per-row work.
//!
//! `fsync_heavy` is true only in the fsync mode, and there only for the
//! operations that commit inside their timed region (sequential, batch and
//! transaction inserts, updates, deletes): with a rollback journal and
//! synchronous=FULL each commit syncs the journal and the database, which
//! outweighs the few milliseconds of statement work. In the WAL modes
//! (synchronous=NORMAL) a commit appends to the WAL without fsync; only the
//! occasional auto-checkpoint syncs, so CPU dominates. The join commits in
//! its untimed setup; the concurrent reads in the fsync mode include one
//! small commit (the switch to WAL) next to 2 000 queries.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, Params, Statement};

use crate::data::PyRandom;
use crate::modes::{Mode, PortSizes};
use crate::report::Operation;
use crate::Db;

const INSERT_BENCH: &str = "INSERT INTO bench (name, value, data) VALUES (?, ?, ?)";
const RANGE_QUERY: &str = "SELECT * FROM bench WHERE value BETWEEN ? AND ? LIMIT 100";

/// The script's `random.seed(42)`, at the start of `run_single`.
const SEED: u32 = 42;

/// What a timed operation measured.
struct Measured {
    seconds: f64,
    rows: u64,
}

/// Runs the eleven operations in the script's order, appending to `out`.
pub(crate) fn run(db: &Db, mode: Mode, sizes: &PortSizes, out: &mut Vec<Operation>) -> Result<()> {
    let heavy = mode == Mode::Fsync;
    let mut rng = PyRandom::seed(SEED);
    let mut conn = db.open()?;
    create_tables(&conn).with_context(|| context("create_tables", db))?;

    let mut step =
        |name: &'static str, fsync_heavy: bool, result: Result<Measured>| -> Result<Measured> {
            let measured = result.with_context(|| context(name, db))?;
            out.push(Operation {
                name,
                seconds: measured.seconds,
                rows: measured.rows,
                fsync_heavy,
            });
            Ok(measured)
        };

    conn = db.chill(conn)?;
    let r = sequential_inserts(&conn, &mut rng, sizes.seq_inserts);
    step("sequential_inserts", heavy, r)?;

    conn = db.chill(conn)?;
    let r = batch_inserts(&conn, &mut rng, sizes.batch_inserts);
    step("batch_inserts", heavy, r)?;

    conn = db.chill(conn)?;
    let count = step("select_count", false, select_count(&conn))?.rows;

    conn = db.chill(conn)?;
    let r = range_queries(&conn, &mut rng, sizes.range_queries);
    step("range_queries", false, r)?;

    conn = db.chill(conn)?;
    let r = like_queries(&conn, sizes.like_queries);
    step("like_queries", false, r)?;

    conn = db.chill(conn)?;
    let r = updates(&conn, &mut rng, sizes.updates);
    step("updates", heavy, r)?;

    conn = db.chill(conn)?;
    let deleted = step("deletes", heavy, deletes(&conn, sizes.deletes))?.rows;

    conn = db.chill(conn)?;
    let r = transaction_inserts(&conn, &mut rng, sizes.tx_inserts);
    step("transaction_inserts", heavy, r)?;

    conn = db.chill(conn)?;
    let table_rows = count - deleted + sizes.tx_inserts;
    step("aggregates", false, aggregates(&conn, table_rows))?;

    join_setup(&conn, &mut rng, sizes).with_context(|| context("join_query setup", db))?;
    conn = db.chill(conn)?;
    step("join_query", false, join_query(&conn))?;

    // The script closes its connection here; the readers open their own.
    conn.close()
        .map_err(|(_, e)| e)
        .with_context(|| context("closing before concurrent_reads", db))?;
    db.chill_closed()?;
    let r = concurrent_reads(db, sizes);
    step("concurrent_reads", false, r)?;
    Ok(())
}

fn context(name: &str, db: &Db) -> String {
    format!("operation {name} on {}", db.path.display())
}

/// Before a DML statement: CPython's implicit `BEGIN` when no transaction
/// is open.
fn implicit_begin(conn: &Connection) -> rusqlite::Result<()> {
    if conn.is_autocommit() {
        conn.execute_batch("BEGIN")?;
    }
    Ok(())
}

/// `Connection.commit()`: `COMMIT` if a transaction is open, else nothing.
fn python_commit(conn: &Connection) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        conn.execute_batch("COMMIT")?;
    }
    Ok(())
}

/// `cursor.execute(sql, params)` then `fetchall()`: every row, every
/// column, copied out. Returns the number of rows.
fn fetch_all(stmt: &mut Statement<'_>, params: impl Params) -> rusqlite::Result<u64> {
    let columns = stmt.column_count();
    let mut rows = stmt.query(params)?;
    let mut fetched = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(row.get::<_, Value>(i)?);
        }
        fetched.push(values);
    }
    Ok(std::hint::black_box(fetched).len() as u64)
}

fn elapsed(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// `bench_create_table` (untimed). Each DDL statement runs in autocommit,
/// one write transaction each for CREATE TABLE and the two CREATE INDEX;
/// dropping tables that do not exist writes nothing, and the script's
/// `conn.commit()` finds no open transaction.
fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP TABLE IF EXISTS bench")?;
    conn.execute_batch("DROP TABLE IF EXISTS bench2")?;
    conn.execute_batch(
        "CREATE TABLE bench (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            value REAL,
            data TEXT,
            created_at TEXT DEFAULT CURRENT_TIMESTAMP
        )",
    )?;
    conn.execute_batch("CREATE INDEX idx_name ON bench(name)")?;
    conn.execute_batch("CREATE INDEX idx_value ON bench(value)")?;
    // `conn.commit()` with no transaction open: nothing.
    python_commit(conn)
}

/// Rows `item_{i}`, one INSERT each. Python: BEGIN before the first INSERT,
/// none after (the transaction stays open), COMMIT at `conn.commit()`: one
/// transaction, timed.
fn sequential_inserts(conn: &Connection, rng: &mut PyRandom, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached(INSERT_BENCH)?;
    for i in 0..n {
        let value = rng.random() * 1000.0;
        let data = rng.alnum_string(50);
        // Python's implicit BEGIN: at i == 0 only.
        implicit_begin(conn)?;
        stmt.execute(params![format!("item_{i}"), value, data])?;
    }
    drop(stmt);
    // `conn.commit()`: the operation's one COMMIT.
    python_commit(conn)?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: n,
    })
}

/// Rows `batch_{i}`, generated first (timed), then `executemany`. Python:
/// BEGIN before the `executemany`, COMMIT at `conn.commit()`.
fn batch_inserts(conn: &Connection, rng: &mut PyRandom, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let rows: Vec<(String, f64, String)> = (0..n)
        .map(|i| {
            let name = format!("batch_{i}");
            let value = rng.random() * 1000.0;
            (name, value, rng.alnum_string(50))
        })
        .collect();
    let mut stmt = conn.prepare_cached(INSERT_BENCH)?;
    // Python's implicit BEGIN, once before `executemany` steps its rows.
    implicit_begin(conn)?;
    for (name, value, data) in &rows {
        stmt.execute(params![name, value, data])?;
    }
    drop(stmt);
    // `conn.commit()`: the operation's one COMMIT.
    python_commit(conn)?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: n,
    })
}

/// `SELECT COUNT(*)`; no transaction (SELECT). Rows: the count.
fn select_count(conn: &Connection) -> Result<Measured> {
    let start = Instant::now();
    let count: i64 = conn.query_row("SELECT COUNT(*) FROM bench", [], |row| row.get(0))?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: u64::try_from(count)?,
    })
}

/// `value BETWEEN low AND low + 100` through `idx_value`; no transaction.
/// Rows: queries run.
fn range_queries(conn: &Connection, rng: &mut PyRandom, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached(RANGE_QUERY)?;
    for _ in 0..n {
        let low = rng.random() * 500.0;
        fetch_all(&mut stmt, params![low, low + 100.0])?;
    }
    Ok(Measured {
        seconds: elapsed(start),
        rows: n,
    })
}

/// `name LIKE 'item_{i}%'` (LIKE is case-insensitive, so `idx_name` is not
/// used: a scan until 50 matches); no transaction. Rows: queries run.
fn like_queries(conn: &Connection, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached("SELECT * FROM bench WHERE name LIKE ? LIMIT 50")?;
    for i in 0..n {
        fetch_all(&mut stmt, params![format!("item_{i}%")])?;
    }
    Ok(Measured {
        seconds: elapsed(start),
        rows: n,
    })
}

/// `UPDATE … WHERE name = 'item_{i}'`. Python: BEGIN before the first
/// UPDATE, COMMIT at `conn.commit()`. Rows: rows changed.
fn updates(conn: &Connection, rng: &mut PyRandom, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached("UPDATE bench SET value = ? WHERE name = ?")?;
    let mut changed = 0;
    for i in 0..n {
        let value = rng.random() * 1000.0;
        // Python's implicit BEGIN: at i == 0 only.
        implicit_begin(conn)?;
        changed += stmt.execute(params![value, format!("item_{i}")])? as u64;
    }
    drop(stmt);
    // `conn.commit()`: the operation's one COMMIT.
    python_commit(conn)?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: changed,
    })
}

/// `DELETE … WHERE name = 'batch_{i}'`. Python: BEGIN before the first
/// DELETE, COMMIT at `conn.commit()`. Rows: rows deleted.
fn deletes(conn: &Connection, n: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached("DELETE FROM bench WHERE name = ?")?;
    let mut deleted = 0;
    for i in 0..n {
        // Python's implicit BEGIN: at i == 0 only.
        implicit_begin(conn)?;
        deleted += stmt.execute(params![format!("batch_{i}")])? as u64;
    }
    drop(stmt);
    // `conn.commit()`: the operation's one COMMIT.
    python_commit(conn)?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: deleted,
    })
}

/// Rows `tx_{i}` with 30-character data. Python runs `BEGIN` and `COMMIT`
/// itself; no implicit BEGIN, since a transaction is open at each INSERT.
fn transaction_inserts(conn: &Connection, rng: &mut PyRandom, n: u64) -> Result<Measured> {
    let start = Instant::now();
    // The script's own `c.execute("BEGIN")`.
    conn.execute_batch("BEGIN")?;
    let mut stmt = conn.prepare_cached(INSERT_BENCH)?;
    for i in 0..n {
        let value = rng.random() * 1000.0;
        let data = rng.alnum_string(30);
        stmt.execute(params![format!("tx_{i}"), value, data])?;
    }
    drop(stmt);
    // The script's own `c.execute("COMMIT")`.
    conn.execute_batch("COMMIT")?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: n,
    })
}

/// AVG/MIN/MAX/SUM, then a GROUP BY over the name prefix; no transaction.
/// Rows: the rows aggregated (the table's size, from the counts measured
/// before).
fn aggregates(conn: &Connection, table_rows: u64) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt =
        conn.prepare_cached("SELECT AVG(value), MIN(value), MAX(value), SUM(value) FROM bench")?;
    // `fetchone()`: the single row.
    let first = stmt.query_row([], |row| {
        (0..4)
            .map(|i| row.get::<_, Value>(i))
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    std::hint::black_box(first);
    let mut stmt =
        conn.prepare_cached("SELECT name, COUNT(*) FROM bench GROUP BY substr(name, 1, 4)")?;
    fetch_all(&mut stmt, [])?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: table_rows,
    })
}

/// The join's untimed setup: `bench2` rows `(randint(1, 60000),
/// random_string(20))`. Python: CREATE TABLE in autocommit (one write
/// transaction), then BEGIN before `executemany` and COMMIT at
/// `conn.commit()`.
fn join_setup(conn: &Connection, rng: &mut PyRandom, sizes: &PortSizes) -> Result<()> {
    conn.execute_batch("DROP TABLE IF EXISTS bench2")?;
    conn.execute_batch(
        "CREATE TABLE bench2 (id INTEGER PRIMARY KEY, bench_id INTEGER, extra TEXT)",
    )?;
    let rows: Vec<(i64, String)> = (0..sizes.join_rows)
        .map(|_| {
            let bench_id = rng.randint(1, sizes.join_max_id);
            (bench_id, rng.alnum_string(20))
        })
        .collect();
    let mut stmt = conn.prepare_cached("INSERT INTO bench2 (bench_id, extra) VALUES (?, ?)")?;
    // Python's implicit BEGIN before `executemany`.
    implicit_begin(conn)?;
    for (bench_id, extra) in &rows {
        stmt.execute(params![bench_id, extra])?;
    }
    drop(stmt);
    // `conn.commit()`.
    python_commit(conn)?;
    Ok(())
}

/// The timed part of the join: one SELECT; no transaction. Rows: rows
/// returned (at most 1000).
fn join_query(conn: &Connection) -> Result<Measured> {
    let start = Instant::now();
    let mut stmt = conn.prepare_cached(
        "SELECT b.name, b.value, b2.extra
         FROM bench b
         JOIN bench2 b2 ON b.id = b2.bench_id
         WHERE b.value > 500
         LIMIT 1000",
    )?;
    let rows = fetch_all(&mut stmt, [])?;
    Ok(Measured {
        seconds: elapsed(start),
        rows,
    })
}

/// Four threads, each with its own connection, `PRAGMA journal_mode=WAL`
/// and its own `random.Random(thread_id)`, running range queries. Timed as
/// wall time from before the first thread starts to after the last ends.
/// No writes, except that in the fsync mode the first reader's PRAGMA
/// switches the file from DELETE to WAL (one write transaction). Rows:
/// queries run by all threads.
fn concurrent_reads(db: &Db, sizes: &PortSizes) -> Result<Measured> {
    let start = Instant::now();
    thread::scope(|scope| {
        let readers: Vec<_> = (0..sizes.reader_threads)
            .map(|id| scope.spawn(move || reader(db, id as u32, sizes.queries_per_thread)))
            .collect();
        for (id, handle) in readers.into_iter().enumerate() {
            handle
                .join()
                .map_err(|_| anyhow!("reader thread {id} panicked"))?
                .with_context(|| format!("reader thread {id}"))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Measured {
        seconds: elapsed(start),
        rows: sizes.reader_threads * sizes.queries_per_thread,
    })
}

fn reader(db: &Db, id: u32, queries: u64) -> Result<()> {
    let conn = db.connect()?;
    reader_journal_mode(&conn)?;
    let mut rng = PyRandom::seed(id);
    let mut stmt = conn.prepare(RANGE_QUERY)?;
    for _ in 0..queries {
        let low = rng.random() * 500.0;
        fetch_all(&mut stmt, params![low, low + 100.0])?;
    }
    drop(stmt);
    conn.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// The reader's `PRAGMA journal_mode=WAL`. Where it switches a rollback
/// journal file to WAL (fsync mode), a reader that took its read lock while
/// another was switching can get SQLITE_BUSY without the busy handler being
/// called (SQLite does not wait on a lock upgrade inside a read
/// transaction). In Python that would end the thread, its queries silently
/// missing from the result; here the PRAGMA is retried, and then finds the
/// file in WAL. (Not seen in 60 fsync runs; a guard, not a workaround.)
fn reader_journal_mode(conn: &Connection) -> Result<()> {
    const RETRIES: u32 = 500;
    for _ in 0..RETRIES {
        match crate::set_journal_mode(conn, "WAL") {
            Err(e) if is_busy(&e) => thread::sleep(Duration::from_millis(10)),
            other => return other,
        }
    }
    crate::set_journal_mode(conn, "WAL")
}

fn is_busy(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
        .is_some_and(|code| matches!(code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}
