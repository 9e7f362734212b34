//! cairn's SQLite workload suite.
//!
//! `default`, `fsync` and `large` port the public `sandbox-sqlite-bench`
//! (tensorlakeai; a Python script over the `sqlite3` module) operation for
//! operation, with the same SQL, the same data (CPython's MT19937 reproduced
//! in `data.rs`) and the same transactions: where CPython's legacy
//! transaction control would run `BEGIN` and `COMMIT` is spelled out at each
//! operation in `ops.rs`. `storage` is our own mode (`storage.rs`) that
//! stresses the disk rather than the CPU. `image` (`image.rs`) reads a
//! database that is part of the disk image, as an application shipped with
//! its data does.
//!
//! What this crate must not know: anything of cairn itself. It runs inside a
//! guest on whatever disk it is given, so that the same binary measures cairn
//! and the baselines it is compared with.
//!
//! Differences from the Python script, on purpose: the database lives in
//! `--dir` rather than `/tmp/bench.db` and is kept after the run (the script
//! deletes it); one run per invocation (no `--iterations`); timings are not
//! rounded to 4 decimals before summing; a concurrent reader whose
//! journal-mode PRAGMA meets SQLITE_BUSY retries it instead of dying. Not
//! on purpose but inherent: there is no interpreter, so per-row overhead is
//! far smaller, and the four readers run in parallel where Python's hold
//! the GIL between SQLite calls.

mod data;
mod image;
mod modes;
mod ops;
mod report;
mod storage;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rusqlite::Connection;

pub use modes::Mode;
pub use report::{Operation, Report};

/// File name of the database inside `--dir`.
pub const DB_FILE: &str = "bench.db";

/// The kernel knob `--cold` writes to.
pub const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

/// A validated run request.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// Directory of the database (created if missing).
    pub dir: PathBuf,
    /// Storage mode only: the size of the bulk-inserted table, in MiB.
    pub db_mib: u64,
    /// Sync and drop the kernel's caches, and reopen the connection, before
    /// each operation.
    pub cold: bool,
    /// Multiplies every row count and size.
    pub scale: f64,
    /// Image mode only: build the database instead of reading it.
    pub prepare: bool,
}

impl Config {
    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    fn validate(&self) -> Result<()> {
        if !(self.scale.is_finite() && self.scale > 0.0 && self.scale <= 1000.0) {
            bail!("--scale must be in (0, 1000], got {}", self.scale);
        }
        if self.db_mib == 0 {
            bail!("--db-mib must be at least 1");
        }
        if self.prepare && self.mode != Mode::Image {
            bail!("--prepare builds the image mode's database: it needs --mode image");
        }
        Ok(())
    }
}

/// Called on every connection the suite opens, before anything runs on it
/// (tests install a commit hook here).
pub type OnOpen = dyn Fn(&mut Connection) -> rusqlite::Result<()> + Sync;

/// Runs the suite and returns its report.
pub fn run(config: &Config) -> Result<Report> {
    run_observed(config, &|_| Ok(()))
}

/// [`run`], calling `on_open` on every connection it opens.
pub fn run_observed(config: &Config, on_open: &OnOpen) -> Result<Report> {
    config.validate()?;
    let reads_image = config.mode == Mode::Image && !config.prepare;
    // Reading the image's database is always measured from cold caches.
    let config = &Config {
        cold: config.cold || reads_image,
        ..config.clone()
    };
    if config.cold {
        // Fail before touching anything if the caches cannot be dropped.
        drop_caches()?;
    }
    fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating {}", config.dir.display()))?;
    let path = config.db_path();
    if reads_image {
        if !path.is_file() {
            bail!(
                "{} is missing: the image mode reads a database built by \
                 `sqlite-suite --mode image --prepare`",
                path.display()
            );
        }
    } else {
        remove_db_files(&path)?;
    }
    let db = Db {
        path,
        pragmas: config.mode.pragmas(),
        cold: config.cold,
        on_open,
    };
    let mut operations = Vec::new();
    let storage_sizes = || modes::StorageSizes::new(config.db_mib, config.scale);
    match (
        config.mode,
        modes::PortSizes::new(config.mode, config.scale),
    ) {
        (_, Some(sizes)) => ops::run(&db, config.mode, &sizes, &mut operations)?,
        (Mode::Image, None) if config.prepare => {
            image::prepare(&db, &storage_sizes(), &mut operations)?
        }
        (Mode::Image, None) => image::run(&db, config.scale, &mut operations)?,
        (_, None) => storage::run(&db, &storage_sizes(), &mut operations)?,
    }
    Ok(Report::new(
        config,
        operations,
        rusqlite::version(),
        db_bytes(&db.path)?,
    ))
}

/// Removes a previous run's database and its journals.
fn remove_db_files(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = sidecar(path, suffix);
        match fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", file.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The database plus its WAL, as the Python script's `get_db_size` counts.
fn db_bytes(path: &Path) -> Result<u64> {
    let mut total = 0;
    for suffix in ["", "-wal"] {
        let file = sidecar(path, suffix);
        match fs::metadata(&file) {
            Ok(meta) => total += meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("stat {}", file.display())),
        }
    }
    Ok(total)
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`.
fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    fs::write(DROP_CACHES, "3").with_context(|| {
        format!(
            "--cold: cannot write 3 to {DROP_CACHES} (dropping the page cache needs root \
             and a writable /proc/sys)"
        )
    })
}

/// Where the database is and how connections to it are opened.
pub(crate) struct Db<'a> {
    pub path: PathBuf,
    pub pragmas: modes::Pragmas,
    pub cold: bool,
    on_open: &'a OnOpen,
}

impl Db<'_> {
    /// Python's `sqlite3.connect(path)`: open, no statements run. rusqlite
    /// sets the same 5 s busy timeout as Python's default `timeout=5.0`.
    pub(crate) fn connect(&self) -> Result<Connection> {
        let mut conn = Connection::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        (self.on_open)(&mut conn).context("connection hook")?;
        Ok(conn)
    }

    /// [`Db::connect`], then the mode's PRAGMAs in the script's order.
    pub(crate) fn open(&self) -> Result<Connection> {
        let conn = self.connect()?;
        let pragmas = self.pragmas;
        set_journal_mode(&conn, pragmas.journal_mode)?;
        conn.execute_batch(&format!("PRAGMA synchronous={}", pragmas.synchronous))?;
        conn.execute_batch(&format!("PRAGMA cache_size=-{}", pragmas.cache_kib))?;
        Ok(conn)
    }

    /// With `--cold`, before an operation's timed part: close `conn`, sync
    /// and drop the kernel's caches, and open a fresh connection (so
    /// SQLite's page cache is empty too). Without `--cold`, returns `conn`.
    /// Call only between transactions.
    pub(crate) fn chill(&self, conn: Connection) -> Result<Connection> {
        if !self.cold {
            return Ok(conn);
        }
        conn.close()
            .map_err(|(_, e)| e)
            .context("closing the connection")?;
        drop_caches()?;
        self.open()
    }

    /// [`Db::chill`] for when no connection is open.
    pub(crate) fn chill_closed(&self) -> Result<()> {
        if self.cold {
            drop_caches()?;
        }
        Ok(())
    }
}

/// `PRAGMA journal_mode=<mode>`, checking that SQLite switched.
pub(crate) fn set_journal_mode(conn: &Connection, mode: &str) -> Result<()> {
    let now: String =
        conn.query_row(&format!("PRAGMA journal_mode={mode}"), [], |row| row.get(0))?;
    if !now.eq_ignore_ascii_case(mode) {
        bail!("PRAGMA journal_mode={mode} left the database in journal mode {now}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Runs `mode` at a small scale and counts SQLite commits (write
    /// transactions) over every connection the suite opens.
    fn count_commits(mode: Mode, cold: bool) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            mode,
            dir: dir.path().to_owned(),
            db_mib: 4,
            cold,
            scale: 0.01,
            prepare: false,
        };
        let commits = Arc::new(AtomicU64::new(0));
        let hook_commits = commits.clone();
        let on_open = move |conn: &mut Connection| {
            let commits = hook_commits.clone();
            conn.commit_hook(Some(move || {
                commits.fetch_add(1, Ordering::SeqCst);
                false
            }))
        };
        run_observed(&config, &on_open).unwrap();
        commits.load(Ordering::SeqCst)
    }

    /// The Python script's commits in the default and large modes (WAL):
    ///  1. `PRAGMA journal_mode=WAL` on the new, empty file writes the WAL
    ///     version into the header: a write transaction of its own;
    ///  2. `CREATE TABLE bench` (DDL runs in autocommit: no implicit BEGIN);
    ///  3. `CREATE INDEX idx_name`;
    ///  4. `CREATE INDEX idx_value` (the `DROP TABLE IF EXISTS` of absent
    ///     tables write nothing, and the following `commit()` finds no open
    ///     transaction);
    ///  5. sequential inserts: implicit BEGIN at the first INSERT, `commit()`;
    ///  6. batch inserts: implicit BEGIN before `executemany`, `commit()`;
    ///  7. updates: implicit BEGIN, `commit()`;
    ///  8. deletes: implicit BEGIN, `commit()`;
    ///  9. transaction inserts: explicit `BEGIN` … `COMMIT`;
    /// 10. join setup: `CREATE TABLE bench2` in autocommit;
    /// 11. join setup: implicit BEGIN before `executemany`, `commit()`.
    ///
    /// The readers' `PRAGMA journal_mode=WAL` finds the file in WAL already.
    const WAL_MODE_COMMITS: u64 = 11;

    /// The fsync mode starts in DELETE mode, which is SQLite's default, so
    /// commit 1 above does not happen; instead the first concurrent reader's
    /// `PRAGMA journal_mode=WAL` switches the file to WAL, one write
    /// transaction. (Checked against the header's change counter, 11, after a
    /// Python run.)
    const FSYNC_MODE_COMMITS: u64 = 11;

    #[test]
    fn default_mode_commits_like_python() {
        assert_eq!(count_commits(Mode::Default, false), WAL_MODE_COMMITS);
    }

    #[test]
    fn large_mode_commits_like_python() {
        assert_eq!(count_commits(Mode::Large, false), WAL_MODE_COMMITS);
    }

    #[test]
    fn fsync_mode_commits_like_python() {
        assert_eq!(count_commits(Mode::Fsync, false), FSYNC_MODE_COMMITS);
    }

    /// Storage mode: the `kv` and `t1` tables (2), one commit per
    /// `commit_per_insert` row (30 at this scale), then bulk insert, create
    /// index, update and delete, one each (4). VACUUM rewrites the file in a
    /// transaction it commits itself, below the statement-level commit that
    /// calls the hook, so it is not counted; lookups, the scan and the
    /// integrity check write nothing.
    #[test]
    fn storage_mode_commits_once_per_test() {
        assert_eq!(count_commits(Mode::Storage, false), 2 + 30 + 4);
    }

    /// `--cold` reopens the connection before each operation, re-running the
    /// PRAGMAs; none of that commits.
    #[test]
    fn cold_default_mode_commits_like_python() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        assert_eq!(count_commits(Mode::Default, true), WAL_MODE_COMMITS);
    }

    #[test]
    fn invalid_scale_is_rejected() {
        let config = Config {
            mode: Mode::Default,
            dir: PathBuf::from("/nonexistent"),
            db_mib: 1,
            cold: false,
            scale: 0.0,
            prepare: false,
        };
        let err = run(&config).unwrap_err();
        assert!(err.to_string().contains("--scale"), "{err}");
    }
}
