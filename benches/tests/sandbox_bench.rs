//! `sandbox-bench` end to end at a tiny scale (a 64 MiB image, 10 clones):
//! every part runs against a real `cairn daemon` and the JSON holds every
//! figure. No timing is asserted. Needs the `cairn` binary built next to
//! the benchmark (CI builds the workspace) and, for the qcow2 baseline,
//! qemu-img and qemu-io (skipped without them).

use std::process::Command;

use serde_json::Value;

#[test]
fn every_part_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sandbox.json");
    let qcow2 = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox-bench"));
    cmd.args(["--sizes", "64M", "--rate-size", "64M", "--written", "8M"])
        .args(["--samples", "3", "--copy-samples", "1", "--fork-batch", "3"])
        .args(["--clones", "10", "--clients", "2", "--rounds", "1"])
        .args(["--suspend-written", "0,4M", "--suspend-rounds", "1"])
        .arg("--work")
        .arg(dir.path().join("work"))
        .arg("--json-out")
        .arg(&json)
        .env(
            "CAIRN_BIN",
            env!("CARGO_BIN_EXE_sandbox-bench").replace("sandbox-bench", "cairn"),
        );
    if !qcow2 {
        cmd.arg("--no-qcow2");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sandbox-bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ops: Vec<&str> = report["clone_fork"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    for want in [
        "cairn clone (API)",
        "cairn fork (API, count 1)",
        "full copy",
    ] {
        assert!(ops.iter().any(|o| o.starts_with(want)), "{want}: {ops:?}");
    }
    assert_eq!(ops.iter().any(|o| o.starts_with("qcow2")), qcow2, "{ops:?}");
    assert_eq!(report["rate"]["sequential"]["latency_s"]["n"], 10);
    assert_eq!(report["rate"]["concurrent"]["clones"], 10);
    assert_eq!(report["pause"]["flush_s"]["n"], 1);
    assert_eq!(report["pause"]["snapshot_pause_s"]["n"], 1);
    let suspend = report["suspend_resume"].as_array().unwrap();
    assert_eq!(suspend.len(), 2);
    for s in suspend {
        assert!(s["resume_to_first_read_s"]["p50"].as_f64().unwrap() > 0.0);
    }
    for part in [
        "1. clone and fork",
        "2. clones per second",
        "3. snapshot pause",
        "4. suspend",
    ] {
        assert!(stdout.contains(part), "{part} missing: {stdout}");
    }
}
