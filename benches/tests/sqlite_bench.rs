//! `sqlite-bench` end to end at a small scale: real QEMU guests on every
//! way of serving the disk (cairn cold and warm, qemu-storage-daemon,
//! QEMU's virtio-blk) and the host reference, each running the suite;
//! the medians, the JSON and the plots it writes. Needs root (loop
//! device, dropping caches) and QEMU, as CI has them.

use std::process::Command;

use serde_json::Value;

const WAYS: [&str; 5] = ["cairn-cold", "cairn-warm", "qsd", "virtio-blk", "host"];

#[test]
fn every_way_runs_the_suite_and_the_results_line_up() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sqlite.json");
    let out = Command::new(env!("CARGO_BIN_EXE_sqlite-bench"))
        .args([
            "--modes",
            "default,storage",
            "--scale",
            "0.01",
            "--db-mib",
            "4",
        ])
        .args(["--repeat", "1", "--work"])
        .arg(dir.path().join("work"))
        .arg("--json-out")
        .arg(&json)
        .arg("--plot-dir")
        .arg(dir.path())
        .env(
            "CAIRN_BIN",
            env!("CARGO_BIN_EXE_sqlite-bench").replace("sqlite-bench", "cairn"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sqlite-bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2 * WAYS.len(), "one sample per mode and way");
    for mode in ["default", "storage"] {
        let of_mode: Vec<&Value> = samples.iter().filter(|s| s["mode"] == mode).collect();
        let ways: Vec<&str> = of_mode.iter().map(|s| s["way"].as_str().unwrap()).collect();
        assert_eq!(ways, WAYS, "{mode}");
        // Every way ran the same operations on the same rows: the guest's
        // disk held and returned what the host's did.
        let ops = |s: &Value| -> Vec<(String, u64)> {
            s["report"]["operations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    (
                        o["name"].as_str().unwrap().to_owned(),
                        o["rows"].as_u64().unwrap(),
                    )
                })
                .collect()
        };
        let host = ops(of_mode[4]);
        assert_eq!(
            host.len(),
            if mode == "default" { 11 } else { 9 },
            "{host:?}"
        );
        for s in &of_mode {
            assert_eq!(ops(s), host, "{mode} on {}", s["way"]);
            assert_eq!(
                s["report"]["cold"],
                mode == "storage",
                "{mode}: storage runs cold"
            );
            assert!(s["report"]["total_seconds"].as_f64().unwrap() > 0.0);
            // Every guest disk is write-back and takes FLUSH, or fsync
            // timings are not comparable.
            if s["way"] != "host" {
                assert_eq!(s["write_cache"], "write back", "{mode} on {}", s["way"]);
            }
        }
        let summary = &report["summary"][mode];
        for w in WAYS {
            assert!(
                summary["seconds"]["TOTAL"][w]["median"].as_f64().unwrap() > 0.0,
                "{mode} {w}: {summary}"
            );
        }
        // One repetition: each ratio is that repetition's, its range a point.
        let ratio = &summary["ratios"]["cairn warm / qsd"]["TOTAL"];
        assert_eq!(ratio["n"], 1, "{summary}");
        assert_eq!(ratio["min"], ratio["max"], "{summary}");
        let svg = std::fs::read_to_string(dir.path().join(format!("sqlite-{mode}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("qemu-storage-daemon"),
            "{mode} plot"
        );
        assert!(stdout.contains(&format!("== {mode}")), "{stdout}");
    }
    assert!(stdout.contains("cairn warm / qsd"), "{stdout}");
    assert!(stdout.contains("cairn warm / virtio-blk"), "{stdout}");
}
