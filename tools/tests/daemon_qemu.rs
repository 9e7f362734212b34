//! End to end: `cairn daemon` serves sandboxes' root disks to QEMU (TCG)
//! guests. A named sandbox boots and writes a marker; with its VM paused
//! through QMP it is snapshotted and cloned, then it writes on; the clone
//! boots in a second QEMU with the disk as it was at the clone and writes
//! its own file; the snapshot, registered as an image, boots a third
//! sandbox; the named one, suspended, is resumed and booted on a second
//! daemon (its own state and cache) that shares the store, moto's S3
//! server. A second test migrates a guest's sandbox while the guest
//! fsyncs file after file: to the other daemon while it runs, and back
//! while it is paused (QMP `stop` and `cont`); the guest goes on each time
//! against the daemon it moved to. A third leaves a guest idle until its
//! sandbox is suspended, and its next write resumes it. Every check reads
//! files in a guest.
//!
//! Needs the guest fixture (`fixtures/build-guest.sh`, path in
//! CAIRN_GUEST_DIR or fixtures/out/guest), qemu-system-x86, debugfs
//! (e2fsprogs) and moto (tools/dev/moto-server.sh); `tools/dev/test.sh`
//! provides them all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{sandbox_via, Env};
use common::qemu::{field, guest_dir, Guest, Qmp, BOOT};
use serde_json::Value;
use std::os::unix::fs::symlink;

/// The guest's /init for this test (the fixture's own /init knows only its
/// jobs). `cairn.job=` on the kernel command line picks the job,
/// `cairn.token=` makes the files' contents this run's. Lines starting
/// with CAIRN- are for the test; it answers CAIRN-WAITING by typing a line
/// on the console.
///   origin  write /data/marker; wait; write /data/after-clone; wait; show
///   clone   show; write /data/clone; show
///   look    show
///   idle    write /data/marker; wait; write /data/after-clone; show
///   migrate write /data/marker, then /data/f1../data/f60 (each fsynced,
///           0.2 s apart); read them all back (page cache dropped)
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
job=$(sed -n 's/.*cairn\.job=\([a-z]*\).*/\1/p' /proc/cmdline)
token=$(sed -n 's/.*cairn\.token=\([0-9a-z]*\).*/\1/p' /proc/cmdline)
must() { "$@" || { echo "CAIRN-GUEST: '$*' failed"; poweroff -f; }; }
# put NAME: /data/NAME holds "NAME-TOKEN", fsynced with its directory.
put() {
    echo "$1-$token" >"/data/$1" || { echo "CAIRN-GUEST: cannot write /data/$1"; poweroff -f; }
    must sync "/data/$1" /data
    sync
}
get() { cat "/data/$1" 2>/dev/null || echo -; }
# What the disk holds: the page cache dropped first, so reads go to it.
show() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    echo "CAIRN-SEEN marker=$(get marker) after=$(get after-clone) clone=$(get clone)"
}
wait_go() {
    echo "CAIRN-WAITING $1"
    read -r go || { echo "CAIRN-GUEST: the console closed"; poweroff -f; }
}
echo "CAIRN-INIT job=$job"
case "$job" in
origin)
    must mount -o remount,rw /
    put marker
    echo "CAIRN-WRITTEN marker"
    wait_go clone
    put after-clone
    echo "CAIRN-WRITTEN after-clone"
    wait_go look
    show
    ;;
clone)
    show
    must mount -o remount,rw /
    put clone
    echo "CAIRN-WRITTEN clone"
    show
    ;;
look)
    show
    ;;
idle)
    must mount -o remount,rw /
    put marker
    echo "CAIRN-WRITTEN marker"
    wait_go idle
    put after-clone
    echo "CAIRN-WRITTEN after"
    show
    ;;
migrate)
    must mount -o remount,rw /
    put marker
    echo "CAIRN-WRITTEN marker"
    i=1
    while [ $i -le 60 ]; do
        put "f$i"
        echo "CAIRN-FSYNCED $i"
        sleep 0.2
        i=$((i + 1))
    done
    sync
    echo 3 >/proc/sys/vm/drop_caches
    bad=0
    i=1
    while [ $i -le 60 ]; do
        [ "$(get "f$i")" = "f$i-$token" ] || bad=$((bad + 1))
        i=$((i + 1))
    done
    echo "CAIRN-FILES marker=$(get marker) n=60 bad=$bad"
    ;;
*)
    echo "CAIRN-GUEST: no job $job"
    ;;
esac
must mount -o remount,ro /
echo "CAIRN-DONE"
poweroff -f
"#;

/// A copy of the fixture's root disk with [`INIT`] as its /init, written
/// with debugfs (no mount needed).
fn test_rootfs(env: &Env, guest: &Path) -> PathBuf {
    let image = env.path("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &image).unwrap();
    let init = env.path("init");
    std::fs::write(&init, INIT).unwrap();
    let script = env.path("debugfs.cmds");
    std::fs::write(
        &script,
        format!(
            "cd /\nrm init\nwrite {} init\nsif init mode 0100755\n",
            init.display()
        ),
    )
    .unwrap();
    common::run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&image),
    );
    // debugfs reports some failures only on stderr: read the result back.
    let out = common::run_ok(
        Command::new("debugfs")
            .args(["-R", "cat /init"])
            .arg(&image),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        INIT,
        "the test's /init did not land in {}",
        image.display()
    );
    image
}

/// The guest fixture, a store on moto tagged `tag` holding the test's
/// root disk as image `guest`, and this run's token.
fn guest_env(tag: &str) -> (PathBuf, Env, String) {
    let guest = guest_dir();
    let env = Env::moto(tag);
    let rootfs = test_rootfs(&env, &guest);
    common::run_ok(
        env.cairn()
            .args(["--json", "image", "import-raw", "--name", "guest"])
            .arg(&rootfs),
    );
    (guest, env, format!("{:016x}", fastrand::u64(..)))
}

/// QEMU booting `sandbox`'s disk socket with `job`; with a QMP socket at
/// `qmp` if given.
fn boot(guest: &Path, sandbox: &Value, job: &str, token: &str, qmp: Option<&Path>) -> Guest {
    let name = sandbox["name"].as_str().unwrap_or("unnamed");
    let socket = Path::new(
        sandbox["disk_socket"]
            .as_str()
            .unwrap_or_else(|| panic!("no disk_socket in {sandbox}")),
    );
    let mut qemu = common::qemu_guest(
        guest,
        socket,
        &format!("cairn.job={job} cairn.token={token}"),
    );
    if let Some(qmp) = qmp {
        qemu.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    Guest::start(&format!("{name} ({job})"), qemu)
}

/// What `who`'s CAIRN-SEEN line says each file holds ("-": absent).
fn seen<'a>(who: &str, line: &'a str) -> [&'a str; 3] {
    println!("{who}: {line}");
    ["marker", "after", "clone"].map(|k| field(line, k))
}

#[test]
fn a_booted_sandbox_is_cloned_and_snapshotted_while_paused_and_resumed_on_another_daemon() {
    let (guest, env, token) = guest_env("daemon-qemu");
    let marker = format!("marker-{token}");
    let after = format!("after-clone-{token}");
    let clone = format!("clone-{token}");
    let (daemon_a, _) = env.daemon();
    let (daemon_b, _) = env.daemon_b();

    // 1. A named sandbox from the image boots and writes the marker (fsynced).
    let alpha = env.sandbox(&["create", "alpha", "--image", "guest"]);
    assert_eq!(alpha["name"], "alpha", "{alpha}");
    let qmp_socket = env.path("alpha.qmp");
    let mut ga = boot(&guest, &alpha, "origin", &token, Some(&qmp_socket));
    ga.expect("CAIRN-WRITTEN marker", BOOT);
    ga.expect("CAIRN-WAITING clone", BOOT);

    // 2. Paused through QMP: snapshot and clone; then it runs on and writes
    // a second file, after the clone.
    let mut qmp = Qmp::connect(&qmp_socket);
    qmp.execute("stop");
    assert_eq!(qmp.execute("query-status")["running"], false);
    let snap = env.sandbox(&["snapshot", "alpha"]);
    let snap_id = snap["id"].as_str().unwrap().to_owned();
    let beta = env.sandbox(&["clone", "alpha", "beta"]);
    assert_eq!(beta["cloned_from"], alpha["id"], "{beta}");
    qmp.execute("cont");
    assert_eq!(qmp.execute("query-status")["running"], true);
    ga.send("go");
    ga.expect("CAIRN-WRITTEN after-clone", BOOT);
    ga.expect("CAIRN-WAITING look", BOOT);

    // 3. The clone, booted in a second QEMU while alpha still runs: the
    // disk at the clone (the marker, not the later file); it writes its own.
    let mut gb = boot(&guest, &beta, "clone", &token, None);
    let line = gb.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("the clone", &line),
        [marker.as_str(), "-", "-"],
        "the clone: {line}"
    );
    gb.expect("CAIRN-WRITTEN clone", BOOT);
    let line = gb.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("the clone after its write", &line),
        [marker.as_str(), "-", clone.as_str()],
        "the clone after writing its file: {line}"
    );
    gb.expect("CAIRN-DONE", BOOT);
    gb.finish();
    // Alpha does not see the clone's file (its guest reads its disk with the
    // page cache dropped; checked again below from a fresh boot of its
    // disk on the second daemon), and shuts down.
    ga.send("go");
    let line = ga.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("alpha", &line),
        [marker.as_str(), after.as_str(), "-"],
        "alpha after the clone wrote: {line}"
    );
    ga.expect("CAIRN-DONE", BOOT);
    ga.finish();
    drop(qmp);

    // 4. The snapshot completes; registered as an image, it starts a
    // sandbox whose guest sees the disk at the snapshot.
    let done = env.settled(&snap_id);
    assert_eq!(done["state"], "completed", "{done}");
    let listed = env.json(&["snapshot", "ls"]);
    let entry = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == snap_id.as_str())
        .unwrap_or_else(|| panic!("snapshot ls does not list {snap_id}: {listed}"));
    assert_eq!(entry["state"], "completed", "{entry}");
    let uri = done["uri"].as_str().unwrap();
    env.json(&["image", "register", uri, "--name", "snapped"]);
    let gamma = env.sandbox(&["create", "gamma", "--image", "snapped"]);
    let mut gg = boot(&guest, &gamma, "look", &token, None);

    // 5. Alpha (its QEMU shut down) suspended here, resumed on the second
    // daemon, booted there: its files, and not the clone's.
    let suspended = env.sandbox(&["suspend", "alpha"]);
    assert_eq!(suspended["state"], "suspended", "{suspended}");
    let resumed = sandbox_via(env.cairn_b(), &["resume", "alpha"]);
    assert_eq!(resumed["name"], "alpha", "{resumed}");
    let mut gr = boot(&guest, &resumed, "look", &token, None);

    let line = gg.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("gamma (the snapshot's image)", &line),
        [marker.as_str(), "-", "-"],
        "a sandbox from the snapshot's image: {line}"
    );
    gg.expect("CAIRN-DONE", BOOT);
    gg.finish();
    let line = gr.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("alpha resumed on the second daemon", &line),
        [marker.as_str(), after.as_str(), "-"],
        "alpha resumed on the second daemon: {line}"
    );
    gr.expect("CAIRN-DONE", BOOT);
    gr.finish();

    daemon_a.signal("-TERM");
    daemon_b.signal("-TERM");
}

/// Points `link` (the path a VMM reaches its disk by) at `socket`, at once.
fn repoint(env: &Env, link: &Path, socket: &Value) {
    let next = env.path("disk-link.next");
    symlink(socket.as_str().unwrap(), &next).unwrap();
    std::fs::rename(&next, link).unwrap();
}

/// The guest's next `n` CAIRN-FSYNCED lines: it goes on writing.
fn fsyncs(g: &mut Guest, n: usize) {
    for _ in 0..n {
        g.expect("CAIRN-FSYNCED", BOOT);
    }
}

#[test]
fn a_guest_goes_on_against_the_daemon_its_sandbox_migrated_to_running_or_paused() {
    let (guest, env, token) = guest_env("migrate-qemu");
    let (daemon_a, _) = env.daemon();
    let (daemon_b, _) = env.daemon_b();

    // The VMM reaches its disk through a path the orchestrator points at
    // whichever daemon serves the sandbox (a symlink), and reconnects.
    let alpha = env.sandbox(&["create", "alpha", "--image", "guest"]);
    let link = env.path("alpha.disk");
    symlink(alpha["disk_socket"].as_str().unwrap(), &link).unwrap();
    let qmp_socket = env.path("alpha.qmp");
    let mut qemu = common::qemu_guest_with(
        &guest,
        &link,
        &format!("cairn.job=migrate cairn.token={token}"),
        ",reconnect=1",
    );
    qemu.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()));
    let mut g = Guest::start("alpha (migrate)", qemu);
    g.expect("CAIRN-WRITTEN marker", BOOT);
    g.expect("CAIRN-FSYNCED 3", BOOT);

    // 1. To the second daemon while the guest runs and fsyncs: QEMU is cut
    // off at its next request and reconnects through the repointed path.
    let to_b = env.path("daemon-b.sock");
    let r = env.sandbox(&["migrate", "alpha", "--to", to_b.to_str().unwrap()]);
    repoint(&env, &link, &r["sandbox"]["disk_socket"]);
    println!("migration while running: {r:#}");
    assert_eq!(r["generation"], 2, "{r}");
    assert!(
        r["rounds"][0]["bytes"].as_u64().unwrap() > 0,
        "the guest's writes went up in a pre-copy round: {r}"
    );
    fsyncs(&mut g, 3);

    // 2. Back while paused: QEMU keeps its connection to the second daemon
    // until `cont`, is cut off then, and reconnects to the first.
    let mut qmp = Qmp::connect(&qmp_socket);
    qmp.execute("stop");
    let to_a = env.socket();
    let back = sandbox_via(
        env.cairn_b(),
        &["migrate", "alpha", "--to", to_a.to_str().unwrap()],
    );
    repoint(&env, &link, &back["sandbox"]["disk_socket"]);
    println!("migration while paused: {back:#}");
    assert_eq!(back["generation"], 3, "{back}");
    qmp.execute("cont");
    assert_eq!(qmp.execute("query-status")["running"], true);

    let line = g.expect("CAIRN-FILES", BOOT);
    println!("alpha after both migrations: {line}");
    assert_eq!(field(&line, "marker"), format!("marker-{token}"), "{line}");
    assert_eq!(
        field(&line, "bad"),
        "0",
        "every file the guest fsynced, on either daemon and across both switches, reads back: {line}"
    );
    g.expect("CAIRN-DONE", BOOT);
    g.finish();
    drop(qmp);

    // The first daemon took the guest's writes after `cont`; the second
    // serves nothing.
    let a = env.sandbox(&["describe", "alpha"]);
    assert!(a["bytes_written"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(
        sandbox_via(env.cairn_b(), &["ls"])["sandboxes"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    daemon_a.signal("-TERM");
    daemon_b.signal("-TERM");
}

#[test]
fn an_idle_guest_is_suspended_and_its_next_write_resumes_it() {
    let (guest, env, token) = guest_env("idle-qemu");
    let (daemon, _) = env.daemon();
    let sleepy = env.sandbox(&[
        "create",
        "sleepy",
        "--image",
        "guest",
        "--idle-suspend",
        "2s",
    ]);
    let socket = Path::new(sleepy["disk_socket"].as_str().unwrap());
    let qemu = common::qemu_guest_with(
        &guest,
        socket,
        &format!("cairn.job=idle cairn.token={token}"),
        ",reconnect=1",
    );
    let mut g = Guest::start("sleepy (idle)", qemu);
    g.expect("CAIRN-WRITTEN marker", BOOT);
    g.expect("CAIRN-WAITING idle", BOOT);

    // The guest waits at its console, its disk untouched: the sandbox is
    // suspended (QEMU still runs, connected).
    let deadline = std::time::Instant::now() + BOOT;
    while env.sandbox(&["ls"]).to_string().contains("sleepy") {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle guest's sandbox was never suspended"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Its next write: QEMU is cut off and reconnects to the same path,
    // where the doorbell resumes the sandbox, whose server takes QEMU's
    // waiting connection.
    g.send("go");
    g.expect("CAIRN-WRITTEN after", BOOT);
    let line = g.expect("CAIRN-SEEN", BOOT);
    assert_eq!(
        seen("the woken guest", &line)[..2],
        [format!("marker-{token}"), format!("after-clone-{token}")],
        "{line}"
    );
    g.expect("CAIRN-DONE", BOOT);
    g.finish();
    // (It may also have idled out, and been woken, while the kernel booted.)
    let m = common::daemon::http_get(&env.socket(), "/metrics");
    let wakes: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cairn_idle_total{event=\"wake\"} "))
        .unwrap_or_else(|| panic!("no wakes counted: {m}"))
        .parse()
        .unwrap();
    assert!(wakes >= 1.0, "{m}");
    daemon.signal("-TERM");
}
