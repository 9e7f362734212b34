//! End to end: an OCI image (the `boot` fixture layout: busybox, an
//! /init, a setuid script) imported with `cairn image import`, served by
//! `cairn disk serve`, booted by QEMU (TCG) with the guest fixture's
//! kernel and initramfs; the guest runs the image's Cmd, read back from
//! `cairn image describe`. Needs the guest fixture (CAIRN_GUEST_DIR or
//! fixtures/out/guest) and qemu-system-x86.

mod common;
mod oci_common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn an_imported_oci_image_boots_and_runs_its_command() {
    let guest = common::qemu::guest_dir();
    let layout = oci_common::fixtures().join("boot");
    let env = oci_common::Env::new();
    let dir = &env.dir;
    let cairn = || env.command();
    common::run_ok(
        cairn()
            .args(["--json", "image", "import"])
            .arg(format!("oci:{}:latest", layout.display())),
    );
    let described = common::run_ok(cairn().args(["--json", "image", "describe", "boot"]));
    let d: serde_json::Value = serde_json::from_slice(&described.stdout).unwrap();
    let cmd = d["image"]["config"]["Cmd"][0].as_str().unwrap().to_owned();
    assert_eq!(cmd, "/usr/bin/greet");

    // The expected hash of a 3 MiB file, from the layer itself.
    let blobs = layout.join("blobs/sha256");
    let manifest_index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = manifest_index["manifests"][0]["digest"].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(&mdigest[7..])).unwrap()).unwrap();
    let layer = blobs.join(&m["layers"][0]["digest"].as_str().unwrap()[7..]);
    let out = common::run_ok(Command::new("sh").arg("-c").arg(format!(
        "tar -xzOf {} usr/bin/big | sha256sum",
        layer.display()
    )));
    let want_big = String::from_utf8_lossy(&out.stdout)[..16].to_owned();

    let socket = dir.path().join("blk.sock");
    let mut server = cairn()
        .args(["--json", "disk", "serve", "boot", "--socket"])
        .arg(&socket)
        .arg("--overlay")
        .arg(dir.path().join("overlay"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.contains("\"ready\":true"), "not ready: {ready:?}");

    let mut qemu = common::qemu_guest(&guest, &socket, &format!("cmd={cmd}"))
        .spawn()
        .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
    let (tx, lines) = mpsc::channel();
    let stdout = qemu.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(170);
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("CAIRN-GUEST") || line.contains("Kernel panic") {
            panic!("guest failed: {line}\n{}", seen.join("\n"));
        }
        if line.contains("CAIRN-OCI") {
            seen.push(line.trim().to_owned());
        }
        if line.contains("CAIRN-OCI: done") {
            break;
        }
    }
    // The guest powers off after "done"; on a timeout it is stopped here.
    if !seen.iter().any(|l| l.contains("CAIRN-OCI: done")) {
        let _ = qemu.kill();
    }
    let _ = qemu.wait();
    let _ = server.kill();
    let _ = server.wait();
    let all = seen.join("\n");
    assert!(
        all.contains("CAIRN-OCI: greet hello from an OCI image"),
        "{all}"
    );
    assert!(all.contains("CAIRN-OCI: setuid 4755"), "{all}");
    assert!(all.contains(&format!("CAIRN-OCI: big {want_big}")), "{all}");
}
