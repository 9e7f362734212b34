//! Runs the built `sqlite-suite` binary in every mode at a small scale and
//! checks its JSON line and the database it leaves behind.

use std::path::Path;
use std::process::{Command, Output};

use rusqlite::Connection;
use serde_json::Value;

const PREFIX: &str = "CAIRN-SQLITE ";

const PORT_OPS: [&str; 11] = [
    "sequential_inserts",
    "batch_inserts",
    "select_count",
    "range_queries",
    "like_queries",
    "updates",
    "deletes",
    "transaction_inserts",
    "aggregates",
    "join_query",
    "concurrent_reads",
];

/// Ops of the ported modes that commit inside their timed part.
const PORT_COMMITTING: [&str; 5] = [
    "sequential_inserts",
    "batch_inserts",
    "updates",
    "deletes",
    "transaction_inserts",
];

fn suite(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sqlite-suite"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running sqlite-suite")
}

/// Runs the suite with `--json` and returns the parsed report.
fn run_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = suite(dir, &all);
    assert!(
        output.status.success(),
        "sqlite-suite {all:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_report(output)
}

/// Checks the output's shape and total, and returns the parsed report.
fn parse_report(output: Output) -> Value {
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stdout:?}");
    let json = lines[0].strip_prefix(PREFIX).expect("CAIRN-SQLITE prefix");
    let report: Value = serde_json::from_str(json).unwrap();

    let ops = report["operations"].as_array().unwrap();
    let mut sum = 0.0;
    for op in ops {
        let seconds = op["seconds"].as_f64().unwrap();
        assert!(seconds >= 0.0, "{op}");
        sum += seconds;
    }
    let total = report["total_seconds"].as_f64().unwrap();
    assert!(
        (total - sum).abs() <= 1e-9 * sum.abs().max(f64::MIN_POSITIVE),
        "total {total} != sum {sum}"
    );
    assert!(report["db_bytes"].as_u64().unwrap() > 0);
    report
}

fn names(report: &Value) -> Vec<String> {
    report["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["name"].as_str().unwrap().to_owned())
        .collect()
}

fn op<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["name"] == name)
        .unwrap_or_else(|| panic!("no operation {name}"))
}

fn rows(report: &Value, name: &str) -> u64 {
    op(report, name)["rows"].as_u64().unwrap()
}

fn count(conn: &Connection, table: &str) -> u64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let n: i64 = conn.query_row(&sql, [], |row| row.get(0)).unwrap();
    n.try_into().unwrap()
}

fn journal_mode(conn: &Connection) -> String {
    conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap()
}

/// The Python sizes times 0.01, in `PORT_OPS` order, for the ops whose rows
/// are a size (all but `join_query`, checked against the database).
struct Scaled {
    seq: u64,
    batch: u64,
    range: u64,
    like: u64,
    updates: u64,
    deletes: u64,
    tx: u64,
}

fn check_port_mode(mode: &str, s: Scaled) {
    let dir = tempfile::tempdir().unwrap();
    let report = run_json(dir.path(), &["--mode", mode, "--scale", "0.01"]);
    assert_eq!(report["mode"], mode);
    assert_eq!(report["scale"], 0.01);
    assert_eq!(report["cold"], false);
    assert_eq!(names(&report), PORT_OPS);

    let table_rows = s.seq + s.batch - s.deletes + s.tx;
    let expected = [
        ("sequential_inserts", s.seq),
        ("batch_inserts", s.batch),
        ("select_count", s.seq + s.batch),
        ("range_queries", s.range),
        ("like_queries", s.like),
        ("updates", s.updates),
        ("deletes", s.deletes),
        ("transaction_inserts", s.tx),
        ("aggregates", table_rows),
        // 4 threads × round(500 × 0.01) queries.
        ("concurrent_reads", 20),
    ];
    for (name, want) in expected {
        assert_eq!(rows(&report, name), want, "{mode} {name}");
    }
    for name in PORT_OPS {
        let heavy = mode == "fsync" && PORT_COMMITTING.contains(&name);
        assert_eq!(op(&report, name)["fsync_heavy"], heavy, "{mode} {name}");
    }

    let db = dir.path().join("bench.db");
    assert!(db.exists());
    let conn = Connection::open(&db).unwrap();
    assert_eq!(count(&conn, "bench"), table_rows);
    // round(10 000 × 0.01) rows in bench2.
    assert_eq!(count(&conn, "bench2"), 100);
    // The join ran on the data as it still is: same rows.
    let joined: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT b.name FROM bench b JOIN bench2 b2 ON b.id = b2.bench_id
             WHERE b.value > 500 LIMIT 1000)",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(joined > 0);
    assert_eq!(rows(&report, "join_query"), joined as u64);
    // The readers' PRAGMA leaves every ported mode in WAL, fsync included.
    assert_eq!(journal_mode(&conn), "wal");
}

#[test]
fn default_mode() {
    check_port_mode(
        "default",
        Scaled {
            seq: 100,
            batch: 500,
            range: 10,
            like: 5,
            updates: 50,
            deletes: 20,
            tx: 50,
        },
    );
}

#[test]
fn fsync_mode() {
    check_port_mode(
        "fsync",
        Scaled {
            seq: 50,
            batch: 200,
            range: 5,
            like: 2,
            updates: 20,
            deletes: 10,
            tx: 50,
        },
    );
}

#[test]
fn large_mode() {
    check_port_mode(
        "large",
        Scaled {
            seq: 500,
            batch: 2000,
            range: 20,
            like: 10,
            updates: 100,
            deletes: 50,
            tx: 100,
        },
    );
}

#[test]
fn storage_mode() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_json(
        dir.path(),
        &["--mode", "storage", "--db-mib", "4", "--scale", "0.01"],
    );
    assert_eq!(report["mode"], "storage");
    // 4 MiB × 0.01 / 656 bytes a row = 63.9 → 64 rows; a tenth is 6.
    let expected = [
        ("commit_per_insert", 30, true),
        ("bulk_insert", 64, true),
        ("create_index", 64, true),
        ("point_lookups", 100, false),
        ("full_scan", 64, false),
        ("update_random", 6, true),
        ("delete_range", 6, true),
        ("vacuum", 58, true),
        ("integrity_check", 58, false),
    ];
    let want_names: Vec<_> = expected.iter().map(|(name, _, _)| *name).collect();
    assert_eq!(names(&report), want_names);
    for (name, want_rows, heavy) in expected {
        assert_eq!(rows(&report, name), want_rows, "{name}");
        assert_eq!(op(&report, name)["fsync_heavy"], heavy, "{name}");
    }

    let conn = Connection::open(dir.path().join("bench.db")).unwrap();
    assert_eq!(count(&conn, "kv"), 30);
    assert_eq!(count(&conn, "t1"), 58);
    assert_eq!(journal_mode(&conn), "delete");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn table_output_lists_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let output = suite(dir.path(), &["--mode", "default", "--scale", "0.01"]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    for name in PORT_OPS {
        assert!(stdout.contains(name), "{name} missing from {stdout}");
    }
    assert!(stdout.contains("total"));
    assert!(!stdout.contains(PREFIX));
}

#[test]
fn reruns_replace_the_previous_database() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        run_json(dir.path(), &["--mode", "fsync", "--scale", "0.01"]);
    }
    let conn = Connection::open(dir.path().join("bench.db")).unwrap();
    assert_eq!(count(&conn, "bench"), 290);
}

/// `--cold` drops the kernel's caches, which needs root: skipped otherwise.
#[test]
fn cold_default_mode_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: --cold needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = suite(
        dir.path(),
        &["--json", "--cold", "--mode", "default", "--scale", "0.01"],
    );
    if !output.status.success() {
        // Root without a writable /proc/sys (a container): the error must
        // name the file.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("/proc/sys/vm/drop_caches"), "{stderr}");
        return;
    }
    let report = parse_report(output);
    assert_eq!(report["cold"], true);
    assert_eq!(names(&report), PORT_OPS);
    assert_eq!(rows(&report, "sequential_inserts"), 100);
    let conn = Connection::open(dir.path().join("bench.db")).unwrap();
    assert_eq!(count(&conn, "bench"), 630);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let output = suite(dir.path(), &["--mode", "default", "--scale", "0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--scale"));
    let output = suite(dir.path(), &["--mode", "bogus"]);
    assert!(!output.status.success());
}

/// The image mode: `--prepare` builds a database the same every time; a run
/// reads it (from cold caches, so as root) and leaves it unchanged.
#[test]
fn image_mode_reads_the_prepared_database_and_leaves_it_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let missing = suite(dir.path(), &["--mode", "image"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("--prepare"), "{stderr}");
    assert!(
        !dir.path().join("bench.db").exists(),
        "a failed run made a file"
    );

    let prepare = ["--mode", "image", "--prepare", "--db-mib", "2"];
    let built = run_json(dir.path(), &prepare);
    assert_eq!(names(&built), ["bulk_insert", "create_index"]);
    // 2 MiB / 656 bytes a row = 3196.9 → 3197 rows.
    assert_eq!(rows(&built, "bulk_insert"), 3197);
    let db = dir.path().join("bench.db");
    let first = std::fs::read(&db).unwrap();
    run_json(dir.path(), &prepare);
    assert!(std::fs::read(&db).unwrap() == first, "a rebuild differs");

    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "reading the image's database drops the page cache, which needs root"
        );
        eprintln!("skipped the read: it needs root");
        return;
    }
    let report = run_json(dir.path(), &["--mode", "image"]);
    assert_eq!(report["cold"], true);
    assert_eq!(names(&report), ["point_lookups", "range_scan", "full_scan"]);
    assert_eq!(rows(&report, "point_lookups"), 10_000);
    assert_eq!(rows(&report, "range_scan"), 319);
    assert_eq!(rows(&report, "full_scan"), 3197);
    assert!(
        std::fs::read(&db).unwrap() == first,
        "a read changed the file"
    );
}
