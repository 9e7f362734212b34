//! Every benchmark binary run once at a tiny scale, so that none rots
//! between the runs that record figures: each must finish and write what
//! it writes. Nothing here looks at timings. They need what the test
//! script provides: the S3 and moto servers, the guest fixtures, QEMU and
//! qemu-storage-daemon.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// One bench at a time: they time things and start servers and guests.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs bench `exe` with `args`; it must succeed.
fn run(exe: &str, args: &[&str]) -> String {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
    assert!(
        out.status.success(),
        "{exe} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn store_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    // A small disk: random, repeated and zero stretches.
    let mut rng = fastrand::Rng::with_seed(3);
    let mut image = Vec::new();
    for i in 0..12 {
        match i % 3 {
            0 => image.extend((0..1 << 20).map(|_| rng.u8(..))),
            1 => image.extend((0..1 << 20).map(|j| b"cairn smoke "[j % 12])),
            _ => image.extend(std::iter::repeat_n(0u8, 1 << 20)),
        }
    }
    let raw = dir.path().join("image.raw");
    std::fs::write(&raw, &image).unwrap();
    let out = dir.path().join("store.json");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    run(
        env!("CARGO_BIN_EXE_store-bench"),
        &[
            "--image",
            arg(&raw),
            "--runs",
            "1",
            "--reads",
            "20",
            "--work",
            arg(&work),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(json(&out).is_object());
}

#[test]
fn catalog_bench_runs() {
    // Through `cairn --json bench`: the tables on stderr, the record on
    // stdout as one JSON object.
    let bench = Path::new(env!("CARGO_BIN_EXE_catalog-bench"));
    let cairn = bench.with_file_name("cairn");
    assert!(
        cairn.exists(),
        "{} is missing: `cargo test --workspace` builds it beside the benchmarks",
        cairn.display()
    );
    let printed = run(
        arg(&cairn),
        &[
            "--json",
            "bench",
            "catalog",
            "--sizes",
            "150",
            "--page",
            "20",
            "--samples",
            "5",
            "--stores",
            "file,s3",
        ],
    );
    let figures: Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {printed}"));
    for store in ["file", "s3"] {
        let rows = figures["stores"][store].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{store}");
        assert_eq!(rows[0]["records"], 150);
        assert!(rows[0]["page"]["p50_us"].as_u64().unwrap() > 0);
    }
}

#[test]
fn gc_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gc.json");
    let printed = run(
        env!("CARGO_BIN_EXE_gc-bench"),
        &[
            "--chunks",
            "2000,20000",
            "--dir",
            arg(dir.path()),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(printed.contains("store 10x larger"), "{printed}");
    let rows = json(&out)["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["snapshots"], 200);
    assert_eq!(rows[1]["gc"]["report"]["live_chunks"], 20000);
    assert!(rows[1]["verify"]["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn resume_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("resume.json");
    run(
        env!("CARGO_BIN_EXE_resume-bench"),
        &[
            "--size-mib",
            "16",
            "--rounds",
            "1",
            "--sweep-kib",
            "4",
            "--sweep-workers",
            "1",
            "--s3",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
            "--plot",
            arg(&dir.path().join("resume.svg")),
        ],
    );
    assert!(json(&out).is_object());
}

#[test]
fn disk_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("disk.json");
    run(
        env!("CARGO_BIN_EXE_disk-bench"),
        &[
            "--image-mib",
            "16",
            "--beyond-mapped-mib",
            "24",
            "--sparse-gib",
            "1",
            "--seconds",
            "0.2",
            "--rounds",
            "1",
            "--work",
            arg(dir.path()),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(json(&out).is_object());
}

#[test]
fn sqlite_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sqlite.json");
    run(
        env!("CARGO_BIN_EXE_sqlite-bench"),
        &[
            "--modes",
            "default,image",
            "--ways",
            "cairn-cold,qsd",
            "--repeat",
            "1",
            "--scale",
            "0.01",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
            "--plot-dir",
            arg(dir.path()),
        ],
    );
    let figures = json(&out);
    let image = &figures["summary"]["image"];
    let ratio = &image["ratios"]["cairn cold / qsd"]["TOTAL"];
    assert_eq!(ratio["n"], 1, "{image}");
    assert!(ratio["median"].as_f64().unwrap() > 0.0);
    let tables = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(tables.contains("| full_scan |"), "{tables}");
}

#[test]
fn sandbox_bench_fleet_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fleet.json");
    // With the test guest built (tools/dev/test.sh sets CAIRN_GUEST_DIR),
    // one QEMU guest boots during each step.
    let guests = usize::from(std::env::var_os("CAIRN_GUEST_DIR").is_some());
    let printed = run(
        env!("CARGO_BIN_EXE_sandbox-bench"),
        &[
            "--fleet",
            "1,3",
            "--fleet-guests",
            &guests.to_string(),
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(printed.contains("a fleet of idle sandboxes"), "{printed}");
    let rows = json(&out)["fleet"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3, "before, 1, 3");
    // A step creates up to its count; its guests come on top.
    assert_eq!(rows[2]["sandboxes"], 3 + guests, "{rows:?}");
    assert!(rows[2]["threads"].as_u64().unwrap() > 0);
    assert!(rows[2]["rss_bytes"].as_u64().unwrap() > 0);
    for row in &rows[1..] {
        let booted = row["guests_booted"].as_array().unwrap();
        assert_eq!(booted.len(), guests, "{row}");
        assert!(booted.iter().all(|b| b["total_s"].as_f64().unwrap() > 0.0));
    }
}

#[test]
fn sandbox_bench_migration_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("migrate.json");
    let printed = run(
        env!("CARGO_BIN_EXE_sandbox-bench"),
        &[
            "--migrate",
            "4M",
            "--migrate-rounds",
            "2",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(
        printed.contains("migration to a second daemon"),
        "{printed}"
    );
    let rows = json(&out)["migrate"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2, "pre-copy and stop-and-copy");
    for r in &rows {
        assert_eq!(r["runs"].as_array().unwrap().len(), 2, "{r}");
        assert!(r["client_gap_s"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows[1]["mode"], "stop-and-copy");
    assert!(rows[1]["delta_bytes"]["p50"].as_f64().unwrap() >= (4 << 20) as f64);
}

#[test]
fn sandbox_bench_idle_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("idle.json");
    let printed = run(
        env!("CARGO_BIN_EXE_sandbox-bench"),
        &[
            "--idle",
            "1",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(printed.contains("suspend on idle"), "{printed}");
    let idle = &json(&out)["idle"];
    for k in ["doorbell_to_first_read_s", "api_resume_to_first_read_s"] {
        assert_eq!(idle[k]["n"], 1, "{idle}");
        assert!(idle[k]["p50"].as_f64().unwrap() > 0.0, "{idle}");
    }
}

#[test]
fn sandbox_bench_fairness_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fairness.json");
    let printed = run(
        env!("CARGO_BIN_EXE_sandbox-bench"),
        &[
            "--fairness",
            "2",
            "--fairness-region",
            "1M",
            "--fairness-secs",
            "0.3",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(printed.contains("fairness"), "{printed}");
    let v = &json(&out)["fairness"];
    assert!(v["warm_alone_s"]["n"].as_u64().unwrap() > 0, "{v}");
    assert!(v["warm_loaded_s"]["n"].as_u64().unwrap() > 0, "{v}");
    assert!(v["cold_bytes"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn sandbox_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sandbox.json");
    run(
        env!("CARGO_BIN_EXE_sandbox-bench"),
        &[
            "--sizes",
            "64M",
            "--written",
            "1M",
            "--samples",
            "2",
            "--copy-samples",
            "1",
            "--fork-batch",
            "2",
            "--clones",
            "20",
            "--clients",
            "2",
            "--rate-size",
            "64M",
            "--rounds",
            "1",
            "--suspend-written",
            "0",
            "--suspend-rounds",
            "1",
            "--work",
            arg(&dir.path().join("work")),
            "--json-out",
            arg(&out),
        ],
    );
    assert!(json(&out)["rate"].is_object());
}
