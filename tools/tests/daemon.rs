//! `cairn daemon` and `cairn sandbox`: sandboxes created from an image and
//! cloned while they run, each disk read and written through libblkio (the
//! vhost-user client QEMU and fio use), every byte compared; the daemon
//! killed with SIGKILL and restarted loses no flushed write; refusals say
//! why.

mod common;

use std::io::Write;
use std::path::Path;

use cairn_benches::blk_client::Client;
use common::daemon::{http_get, sandbox_via};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// The daemon's environment ([`common::daemon::Env`], a `file://` store)
/// with a 16 MiB image imported as `base`.
struct Env {
    shared: common::daemon::Env,
    image: Vec<u8>,
}

impl std::ops::Deref for Env {
    type Target = common::daemon::Env;
    fn deref(&self) -> &common::daemon::Env {
        &self.shared
    }
}

impl Env {
    /// A 16 MiB image (random and text stretches) imported as `base`.
    fn new() -> Env {
        Env::on(common::daemon::Env::file())
    }

    /// [`Env::new`] on another store.
    fn on(shared: common::daemon::Env) -> Env {
        let mut rng = fastrand::Rng::with_seed(12);
        let mut image = Vec::with_capacity(16 * MIB);
        for i in 0..16 {
            match i % 2 {
                0 => image.extend((0..MIB).map(|_| rng.u8(..))),
                _ => image.extend((0..MIB).map(|j| b"cairn daemon ..."[j % 16])),
            }
        }
        let env = Env { shared, image };
        std::fs::write(env.path("image.raw"), &env.image).unwrap();
        common::run_ok(
            env.cairn()
                .args(["image", "import-raw", "--name", "base"])
                .arg(env.path("image.raw")),
        );
        env
    }
}

impl Env {
    /// Sandbox `a` from `base`, with `len` bytes of `fill` written at
    /// `offset` and flushed: its view, a connected client, the disk's model.
    fn written_a(&self, offset: usize, len: usize, fill: u8) -> (Value, Client, Vec<u8>) {
        let a = self.sandbox(&["create", "a", "--image", "base"]);
        let mut ca = connect(&a);
        let mut model = self.image.clone();
        put(&mut ca, &mut model, offset, len, fill);
        ca.flush().unwrap();
        (a, ca, model)
    }

    /// Sandbox `id`'s record in the state directory.
    fn record_path(&self, id: &str) -> std::path::PathBuf {
        self.path("state")
            .join("sandboxes")
            .join(format!("{id}.json"))
    }
}

fn connect(view: &Value) -> Client {
    Client::connect(Path::new(view["disk_socket"].as_str().unwrap())).unwrap()
}

/// Writes `fill` at `offset` of the disk and of its model.
fn put(c: &mut Client, model: &mut [u8], offset: usize, len: usize, fill: u8) {
    c.write(offset as u64, &vec![fill; len]).unwrap();
    model[offset..offset + len].fill(fill);
}

fn whole(c: &mut Client, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for off in (0..len).step_by(MIB) {
        out.extend(c.read(off as u64, MIB.min(len - off)).unwrap());
    }
    out
}

#[test]
fn sandboxes_are_created_cloned_while_running_and_survive_a_killed_daemon() {
    let env = Env::new();
    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 0);

    // A named sandbox from the image: its disk is the image.
    let a = env.sandbox(&["create", "alpha", "--image", "base"]);
    assert_eq!(a["name"], "alpha");
    assert_eq!(a["state"], "running");
    assert!(a["memory_socket"].is_null());
    let mut ca = connect(&a);
    let mut model_a = env.image.clone();
    assert!(whole(&mut ca, env.image.len()) == model_a);
    put(&mut ca, &mut model_a, 4096, 8192, 0xa1);
    put(&mut ca, &mut model_a, 9 * MIB, 4096, 0xa1);
    ca.flush().unwrap();

    // A clone while it runs (its VMM connected): the clone has the disk as
    // it was; the two diverge from then on.
    let b = env.sandbox(&["clone", "alpha", "beta"]);
    assert_eq!(b["cloned_from"], a["id"]);
    let at_clone = model_a.clone();
    put(&mut ca, &mut model_a, 4096, 4096, 0xa2);
    let mut cb = connect(&b);
    let mut model_b = at_clone.clone();
    assert!(
        whole(&mut cb, env.image.len()) == model_b,
        "the clone is the disk at the clone"
    );
    put(&mut cb, &mut model_b, 9 * MIB, 4096, 0xb1);
    put(&mut cb, &mut model_b, 15 * MIB, 4096, 0xb1);
    cb.flush().unwrap();
    ca.flush().unwrap();
    assert!(
        whole(&mut ca, env.image.len()) == model_a,
        "the clone's writes are not in alpha"
    );
    assert!(
        whole(&mut cb, env.image.len()) == model_b,
        "alpha's writes are not in the clone"
    );

    // Clones of a source with nothing written since its last freeze
    // stand on its frozen layers: its stack does not grow.
    let gamma = env.sandbox(&["clone", "beta"]);
    let delta = env.sandbox(&["clone", "beta"]);
    assert_eq!(env.sandbox(&["describe", "beta"])["layers"], 3);
    assert_eq!(gamma["layers"], 3);
    assert_eq!(delta["layers"], 3);
    for v in [&gamma, &delta] {
        assert!(whole(&mut connect(v), env.image.len()) == model_b);
    }
    put(&mut connect(&gamma), &mut model_b.clone(), 0, 4096, 0xc1);
    assert!(whole(&mut connect(&delta), env.image.len()) == model_b);
    assert!(whole(&mut cb, env.image.len()) == model_b);
    for v in [&gamma, &delta] {
        env.sandbox(&["rm", v["id"].as_str().unwrap()]);
    }

    // The API lists both; describe by name; metrics are served.
    let ls = env.sandbox(&["ls"]);
    assert_eq!(ls["sandboxes"].as_array().unwrap().len(), 2);
    let d = env.sandbox(&["describe", "beta"]);
    assert_eq!(d["id"], b["id"]);
    assert_eq!(d["layers"], 3);
    let metrics = http_get(&env.socket(), "/metrics");
    assert!(metrics.contains("cairn_sandboxes 2"), "{metrics}");
    // Every byte its guest read is counted once, from the cache or the
    // store: beta read its whole disk three times.
    let read = |source: &str| {
        metric(
            &metrics,
            &format!("cairn_sandbox_read_bytes_total{{sandbox=\"beta\",source=\"{source}\"}}"),
        )
    };
    assert_eq!(read("local") + read("store"), 3.0 * env.image.len() as f64);
    assert_eq!(d["read_local_bytes"].as_f64().unwrap(), read("local"));
    assert!(
        metrics.contains("cairn_api_request_seconds_count{op=\"clone\",outcome=\"ok\"} 3"),
        "{metrics}"
    );

    // Refusals say why.
    let out = env.sandbox_fails(&["create", "alpha", "--image", "base"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = env.sandbox_fails(&["create", "--image", "no-such-image"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-image"));
    let out = env.sandbox_fails(&["rm", "gamma"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox `gamma`"));

    // kill -9 of the daemon: every flushed write is there after a restart.
    drop(ca);
    drop(cb);
    daemon.signal("-KILL");
    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 2);
    let a2 = env.sandbox(&["describe", "alpha"]);
    let b2 = env.sandbox(&["describe", "beta"]);
    assert!(whole(&mut connect(&a2), env.image.len()) == model_a);
    assert!(whole(&mut connect(&b2), env.image.len()) == model_b);

    // A second daemon on the same state directory is refused.
    let out = env
        .cairn()
        .args(["daemon", "--socket"])
        .arg(env.path("other.sock"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another daemon"));

    // rm: gone, and its own layer deleted; alpha keeps the layer they share.
    env.sandbox(&["rm", "beta"]);
    assert_eq!(
        env.sandbox(&["ls"])["sandboxes"].as_array().unwrap().len(),
        1
    );
    assert!(
        whole(
            &mut connect(&env.sandbox(&["describe", "alpha"])),
            env.image.len()
        ) == model_a
    );
    let layers = std::fs::read_dir(env.path("state").join("layers"))
        .unwrap()
        .count();
    assert_eq!(layers, 2, "alpha's frozen layer and its live one");
    daemon.signal("-TERM");

    // No daemon: the CLI says how to start one.
    let out = env.sandbox_fails(&["ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cairn daemon"));
}

#[test]
fn a_running_sandbox_is_snapshotted_and_new_sandboxes_start_from_the_snapshot() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let a = env.sandbox(&["create", "alpha", "--image", "base"]);
    let mut ca = connect(&a);
    let mut model = env.image.clone();
    put(&mut ca, &mut model, 0, 4096, 0x51);
    put(&mut ca, &mut model, 5 * MIB, 3 * 4096, 0x52);
    ca.flush().unwrap();

    // The snapshot is the disk at the call; alpha runs on, its VMM connected.
    let snap = env.sandbox(&["snapshot", "alpha"]);
    let id = snap["id"].as_str().unwrap().to_owned();
    assert!(
        matches!(snap["state"].as_str(), Some("pending" | "uploading")),
        "{snap}"
    );
    let at_snapshot = model.clone();
    put(&mut ca, &mut model, 0, 4096, 0x53);
    ca.flush().unwrap();
    let done = env.settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    assert!(done["uri"]
        .as_str()
        .unwrap()
        .ends_with(&format!("snapshots/{id}")));
    // Once uploaded, alpha stands on the snapshot's image: the folded
    // layer is dropped, its stack back to one layer.
    env.eventually_layers("alpha", 1);
    assert!(
        whole(&mut ca, env.image.len()) == model,
        "alpha keeps its writes"
    );

    // A sandbox from the snapshot has the disk at the snapshot.
    let b = env.sandbox(&["create", "beta", "--snapshot", &id]);
    assert_eq!(b["snapshot"], id.as_str());
    let mut cb = connect(&b);
    assert!(
        whole(&mut cb, env.image.len()) == at_snapshot,
        "the snapshot is the disk at the call, not after"
    );

    // Forked three times: three sandboxes, each with the disk at the
    // snapshot, each diverging on its own.
    let forks = env.sandbox(&["fork", &id, "worker", "--count", "3"]);
    let forks = forks["sandboxes"].as_array().unwrap().clone();
    let names: Vec<_> = forks.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["worker-1", "worker-2", "worker-3"]);
    let mut first = connect(&forks[0]);
    first.write(0, &[0x54; 4096]).unwrap();
    first.flush().unwrap();
    assert!(whole(&mut connect(&forks[1]), env.image.len()) == at_snapshot);
    // A fork that cannot be made whole makes nothing: batch-1 is made,
    // batch-2 is taken, so batch-1 goes again.
    env.sandbox(&["fork", &id, "batch-2"]);
    let out = env.sandbox_fails(&["fork", &id, "batch", "--count", "3"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let listed = env.sandbox(&["ls"]);
    let mut names: Vec<_> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["alpha", "batch-2", "beta", "worker-1", "worker-2", "worker-3"]
    );

    // Registered as an image, it starts sandboxes like any image.
    let uri = done["uri"].as_str().unwrap();
    env.json(&["image", "register", uri, "--name", "snapped"]);
    let c = env.sandbox(&["create", "--image", "snapped"]);
    assert!(whole(&mut connect(&c), env.image.len()) == at_snapshot);

    // Refusals say why.
    let out = env.sandbox_fails(&["snapshot", "gamma"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox `gamma`"));
    let out = env.sandbox_fails(&["create", "--snapshot", "0123456789abcdef0123456789abcdef"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The upload's record is gone once it finished; a restart keeps alpha.
    let pending = std::fs::read_dir(env.path("state").join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pending, 0, "a finished upload left its record");
    drop(ca);
    drop(cb);
    daemon.signal("-KILL");
    let (daemon, ready) = env.daemon();
    // The unnamed one flushed no write: its record was never written.
    assert_eq!(ready["recovered"], 6, "the six named ones");
    assert!(
        whole(
            &mut connect(&env.sandbox(&["describe", "alpha"])),
            env.image.len()
        ) == model
    );
    daemon.signal("-TERM");
}

#[test]
fn an_upload_cut_by_a_killed_daemon_resumes_at_the_next_start() {
    let env = Env::new();
    // Fault injector: uploads wait 60 s before they start, so the kill
    // below lands while this one is in flight.
    let (daemon, _) = env.daemon_with(&[("CAIRN_FAULT_STALL_UPLOADS_MS", "60000")]);
    let a = env.sandbox(&["create", "alpha", "--image", "base"]);
    let mut ca = connect(&a);
    let mut model = env.image.clone();
    put(&mut ca, &mut model, 3 * MIB, MIB, 0x61);
    put(&mut ca, &mut model, 4 * MIB, MIB, 0x61);
    ca.flush().unwrap();
    let snap = env.sandbox(&["snapshot", "alpha"]);
    let id = snap["id"].as_str().unwrap().to_owned();
    let at_snapshot = model.clone();
    put(&mut ca, &mut model, 3 * MIB, 4096, 0x62);
    ca.flush().unwrap();
    drop(ca);
    daemon.signal("-KILL");
    let state = env.json(&["snapshot", "describe", &id])["state"].clone();
    assert_eq!(state, "pending", "the kill landed before the upload began");

    let (daemon, ready) = env.daemon();
    assert_eq!(ready["uploads_resumed"], 1, "{ready}");
    let done = env.settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    let b = env.sandbox(&["create", "--snapshot", &id]);
    assert!(whole(&mut connect(&b), env.image.len()) == at_snapshot);
    assert!(
        whole(
            &mut connect(&env.sandbox(&["describe", "alpha"])),
            env.image.len()
        ) == model
    );
    daemon.signal("-TERM");
}

#[test]
fn a_suspended_sandbox_resumes_on_another_host_that_shares_the_store() {
    let env = Env::new();
    let (daemon_a, _) = env.daemon();
    let (daemon_b, _) = env.daemon_b();
    let a = env.sandbox(&["create", "alpha", "--image", "base"]);
    let mut ca = connect(&a);
    let mut model = env.image.clone();
    put(&mut ca, &mut model, 2 * MIB, 4096, 0x71);
    put(&mut ca, &mut model, 11 * MIB, 8192, 0x72);
    ca.flush().unwrap();
    drop(ca);

    // Two hosts never both hold a name.
    let out = env
        .cairn_b()
        .args(["sandbox", "create", "alpha", "--image", "base"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is taken"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nor resumes one that is running elsewhere.
    let out = env
        .cairn_b()
        .args(["sandbox", "resume", "alpha"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("suspend it there first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unnamed sandbox is not suspended.
    let u = env.sandbox(&["create", "--image", "base"]);
    let out = env.sandbox_fails(&["suspend", u["id"].as_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a named sandbox"));

    // Suspended on A: gone from A, its snapshot completed.
    let s = env.sandbox(&["suspend", "alpha"]);
    assert_eq!(s["state"], "suspended", "{s}");
    let snap = s["snapshot"].as_str().unwrap().to_owned();
    assert_eq!(
        env.json(&["snapshot", "describe", &snap])["state"],
        "completed"
    );
    let left: Vec<_> = env.sandbox(&["ls"])["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(left, [Value::Null], "only the unnamed one stays on A");

    // Resumed on B, with its own cache: the disk as it was.
    let b = sandbox_via(env.cairn_b(), &["resume", "alpha"]);
    assert_eq!(b["name"], "alpha");
    let mut cb = connect(&b);
    assert!(
        whole(&mut cb, env.image.len()) == model,
        "B serves alpha's disk"
    );
    put(&mut cb, &mut model, 2 * MIB, 4096, 0x73);
    cb.flush().unwrap();
    drop(cb);
    // A cannot take it back while B serves it; after B suspends, it can.
    let out = env.sandbox_fails(&["resume", "alpha"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("suspend it there first"));
    sandbox_via(env.cairn_b(), &["suspend", "alpha"]);
    let back = env.sandbox(&["resume", "alpha"]);
    assert!(whole(&mut connect(&back), env.image.len()) == model);

    // rm gives the name back to the catalog: B may take it.
    env.sandbox(&["rm", "alpha"]);
    sandbox_via(env.cairn_b(), &["create", "alpha", "--image", "base"]);
    daemon_a.signal("-TERM");
    daemon_b.signal("-TERM");
}

/// Reads all of guest memory through a sandbox's page server, as a VMM
/// resumed from it would (the harness in this process), and compares it.
/// A VMM (the harness) resuming from `view`'s memory socket, its guest
/// memory `size` bytes.
fn connect_memory(view: &Value, size: usize) -> cairn_vmm_glue::uffd::harness::VmmHarness {
    use cairn_vmm_glue::uffd::harness::{RegionSpec, VmmHarness};
    let socket = view["memory_socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no memory socket: {view}"));
    let mut vmm = VmmHarness::new(&[RegionSpec {
        size: size as u64,
        page_size: 4096,
    }])
    .unwrap();
    vmm.connect(Path::new(socket)).unwrap();
    vmm
}

fn assert_memory(vmm: &cairn_vmm_glue::uffd::harness::VmmHarness, view: &Value, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    vmm.read(0, &mut got);
    let first_bad = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none(),
        "{}: memory differs from byte {first_bad:?}",
        view["id"]
    );
}

fn assert_memory_served(view: &Value, want: &[u8]) {
    let mut vmm = connect_memory(view, want.len());
    assert_memory(&vmm, view, want);
    vmm.disconnect();
}

#[test]
fn memory_and_vm_state_are_snapshotted_forked_diffed_and_cloned() {
    use std::io::{Seek, SeekFrom};
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let size = 8usize << 20;
    let memory = cairn_vmm_glue::uffd::harness::synthetic_memory(size as u64, 9);
    let mem = env.path("vm.mem");
    std::fs::write(&mem, &memory).unwrap();
    let vm_state = env.path("vm.state");
    std::fs::write(&vm_state, b"vmstate: registers and devices, one").unwrap();

    let a = env.sandbox(&["create", "vm", "--image", "base"]);
    assert!(a["memory_socket"].is_null(), "{a}");
    let mut ca = connect(&a);
    let mut disk = env.image.clone();
    put(&mut ca, &mut disk, 3 * MIB, 4096, 0x61);
    ca.flush().unwrap();
    // A diff needs memory to be over: refused, with the reason.
    let out = env.sandbox_fails(&[
        "snapshot",
        "vm",
        "--memory",
        mem.to_str().unwrap(),
        "--memory-diff",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not started from memory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let odd = env.path("odd.mem");
    std::fs::write(&odd, vec![1u8; 5000]).unwrap();
    let out = env.sandbox_fails(&["snapshot", "vm", "--memory", odd.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("4 KiB pages"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A full memory file and a VM state with the disk.
    let snap = env.sandbox(&[
        "snapshot",
        "vm",
        "--memory",
        mem.to_str().unwrap(),
        "--vm-state",
        vm_state.to_str().unwrap(),
    ]);
    let id = snap["id"].as_str().unwrap().to_owned();
    // The VMM may write its files again at once: the daemon took copies.
    std::fs::write(&mem, vec![0u8; size]).unwrap();
    std::fs::write(&vm_state, b"overwritten").unwrap();
    let done = env.settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    assert!(done["memory"].is_string(), "{done}");
    assert!(done["vm_state"].is_string(), "{done}");

    // Forked twice: each serves the memory byte-exact, has the VM state
    // as a file, and the disk at the snapshot.
    let forks = env.sandbox(&["fork", &id, "--count", "2"]);
    let forks = forks["sandboxes"].as_array().unwrap().clone();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        assert_memory_served(f, &memory);
        let state = std::fs::read(f["vm_state"].as_str().unwrap()).unwrap();
        assert_eq!(state, b"vmstate: registers and devices, one");
        assert!(whole(&mut connect(f), env.image.len()) == disk);
    }
    assert_ne!(forks[0]["memory_socket"], forks[1]["memory_socket"]);

    // A Firecracker-style diff over the fork's memory: written pages are
    // data, holes unchanged. `pages` into the diff file and the model.
    let diff = env.path("diff.mem");
    let write_diff = |pages: &[usize], fill: u8, model: &mut Vec<u8>| {
        let mut file = std::fs::File::create(&diff).unwrap();
        file.set_len(size as u64).unwrap();
        for &p in pages {
            let page = vec![p as u8 ^ fill; 4096];
            file.seek(SeekFrom::Start((p * 4096) as u64)).unwrap();
            file.write_all(&page).unwrap();
            model[p * 4096..][..4096].copy_from_slice(&page);
        }
    };
    let diff_snapshot = |sandbox: &str| -> String {
        let snap = env.sandbox(&[
            "snapshot",
            sandbox,
            "--memory",
            diff.to_str().unwrap(),
            "--memory-diff",
        ]);
        snap["id"].as_str().unwrap().to_owned()
    };
    let mut child = memory.clone();
    write_diff(&[0, 5, 700, 2047], 0x3c, &mut child);
    let fork0 = forks[0]["id"].as_str().unwrap();
    let id2 = diff_snapshot(fork0);
    // The next diff is over that snapshot's memory (the VMM tracks dirty
    // pages from each snapshot on), taken before its upload ends.
    let mut grandchild = child.clone();
    write_diff(&[5, 6], 0x5d, &mut grandchild);
    let id3 = diff_snapshot(fork0);
    let done2 = env.settled(&id2);
    assert_eq!(done2["state"], "completed", "{done2}");
    assert_eq!(done2["parent"], id.as_str(), "{done2}");
    let from_diff = env.sandbox(&["create", "--snapshot", &id2]);
    assert_memory_served(&from_diff, &child);
    assert!(from_diff["vm_state"].is_null(), "{from_diff}");
    let done3 = env.settled(&id3);
    assert_eq!(done3["state"], "completed", "{done3}");
    assert_eq!(done3["parent"], id2.as_str(), "{done3}");
    let from_diff3 = env.sandbox(&["create", "--snapshot", &id3]);
    assert_memory_served(&from_diff3, &grandchild);

    // A clone with memory serves it at once (no upload waited for).
    let mut cloned = grandchild.clone();
    cloned[size - 4096..].fill(0x77);
    std::fs::write(&mem, &cloned).unwrap();
    let c = env.sandbox(&["clone", fork0, "twin", "--memory", mem.to_str().unwrap()]);
    assert_memory_served(&c, &cloned);
    // The source's next diff is over the memory it gave the clone.
    let mut after_clone = cloned.clone();
    write_diff(&[9], 0x6e, &mut after_clone);
    let id4 = diff_snapshot(fork0);
    assert_eq!(env.settled(&id4)["state"], "completed");
    let from_diff4 = env.sandbox(&["create", "--snapshot", &id4]);
    assert_memory_served(&from_diff4, &after_clone);
    // A clone without memory arguments keeps its source's.
    let plain = env.sandbox(&["clone", &id_of(&forks[1])]);
    assert_memory_served(&plain, &memory);

    // Removing a sandbox stops its page server, which ends the resume
    // under way (the harness VMM, which never exits) and reports it.
    for v in [
        &forks[0],
        &forks[1],
        &from_diff,
        &from_diff3,
        &from_diff4,
        &c,
        &plain,
    ] {
        env.sandbox(&["rm", &id_of(v)]);
        let socket = v["memory_socket"].as_str().unwrap();
        assert!(!Path::new(socket).exists(), "{socket} left behind");
    }
    let metrics = http_get(&env.socket(), "/metrics");
    let resumes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cairn_memory_resumes_total "))
        .unwrap_or_else(|| panic!("no resume counter in {metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(resumes, 7, "{metrics}");
    drop(ca);
    daemon.signal("-TERM");
}

fn id_of(view: &Value) -> String {
    view["id"].as_str().unwrap().to_owned()
}

/// The store's server stopped during an upload: the snapshot completes once
/// it is back; past the daemon's upload timeout it is marked failed with
/// the reason instead. (A private s3s-fs, stopped and started again.)
#[test]
fn an_upload_outlives_a_stopped_store_or_fails_with_the_reason_after_a_bound() {
    use common::private_s3::{PrivateS3, PRIVATE_KEY, PRIVATE_SECRET};
    let root = tempfile::tempdir().unwrap();
    let mut s3 = PrivateS3::start(&root.path().join("s3"));
    let env = Env::on(common::daemon::Env::s3(
        &s3.endpoint,
        PRIVATE_KEY,
        PRIVATE_SECRET,
    ));
    let pause = std::time::Duration::from_secs(4);

    // Bounded at 1 s: the store is away for 4 s, so the snapshot fails,
    // and says so once the catalog answers again.
    let (daemon, _) = env.daemon_with(&[
        ("CAIRN_FAULT_STALL_UPLOADS_MS", "500"),
        ("CAIRN_UPLOAD_TIMEOUT", "1"),
    ]);
    let (_, ca, mut model) = env.written_a(MIB, 8192, 0x71);
    let snap = env.sandbox(&["snapshot", "a"]);
    s3.kill();
    std::thread::sleep(pause);
    s3.restart();
    let failed = env.settled(snap["id"].as_str().unwrap());
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failed}"
    );
    drop(ca);
    daemon.signal("-TERM");

    // Unbounded (the default): the same outage ends in a completed
    // snapshot with the disk at the call.
    let (daemon, _) = env.daemon_with(&[("CAIRN_FAULT_STALL_UPLOADS_MS", "500")]);
    let mut ca = connect(&env.sandbox(&["describe", "a"]));
    put(&mut ca, &mut model, 2 * MIB, 4096, 0x72);
    ca.flush().unwrap();
    let snap = env.sandbox(&["snapshot", "a"]);
    let id = snap["id"].as_str().unwrap().to_owned();
    s3.kill();
    std::thread::sleep(pause);
    s3.restart();
    let done = env.settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    let forked = env.sandbox(&["fork", &id]);
    let f = &forked["sandboxes"][0];
    assert!(whole(&mut connect(f), env.image.len()) == model);
    drop(ca);
    daemon.signal("-TERM");
}

/// A daemon killed in the middle of a suspend: at its next start the
/// sandbox runs again (the catalog no longer says suspending), with every
/// flushed write, and a second suspend and a resume work.
#[test]
fn a_suspend_cut_by_a_killed_daemon_leaves_the_sandbox_running() {
    let env = Env::new();
    let (daemon, _) = env.daemon_with(&[("CAIRN_FAULT_STALL_UPLOADS_MS", "3000")]);
    let (_, ca, model) = env.written_a(7 * MIB, 3 * 4096, 0x81);
    drop(ca);
    let suspend = env
        .cairn()
        .args(["sandbox", "suspend", "a"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The upload is stalled for 3 s: the kill lands mid-suspend.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    daemon.signal("-KILL");
    let out = suspend.wait_with_output().unwrap();
    assert!(!out.status.success(), "the suspend cannot have completed");

    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 1, "{ready}");
    let d = env.sandbox(&["describe", "a"]);
    assert!(whole(&mut connect(&d), env.image.len()) == model);
    let suspended = env.sandbox(&["suspend", "a"]);
    assert_eq!(suspended["state"], "suspended", "{suspended}");
    let back = env.sandbox(&["resume", "a"]);
    assert!(whole(&mut connect(&back), env.image.len()) == model);
    daemon.signal("-TERM");
}

/// New layers cost nothing until written: a clone or fork makes no file.
/// A layer's first write makes its files, unsynced; its first FLUSH with
/// writes makes them durable. A layer a crash cut before that (here: its
/// metadata gone, as an unsynced creation may leave it) or never written
/// (no directory at all) is made again, empty, and the sandbox is served;
/// flushed writes in the layers under it are all there.
#[test]
fn a_layer_lost_before_its_first_flush_is_made_again_empty() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let (_a, ca, model) = env.written_a(4 * MIB, 8192, 0x91);
    let clone = env.sandbox(&["clone", "a", "b"]);
    drop(ca);
    let top = |view: &Value| -> std::path::PathBuf {
        let rec: Value =
            serde_json::from_slice(&std::fs::read(env.record_path(&id_of(view))).unwrap()).unwrap();
        let id = rec["layers"].as_array().unwrap().last().unwrap();
        env.path("state").join("layers").join(id.as_str().unwrap())
    };
    assert!(
        !top(&clone).exists(),
        "a clone's layer is made by its first write"
    );
    // Written, not flushed: made, unsynced.
    let mut cb = connect(&clone);
    cb.write(6 * MIB as u64, &[0x93; 4096]).unwrap();
    assert!(top(&clone).join("overlay.json").exists());
    drop(cb);
    daemon.signal("-KILL");
    std::fs::remove_file(top(&clone).join("overlay.json")).unwrap();
    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 2, "{ready}");
    for name in ["a", "b"] {
        let mut c = connect(&env.sandbox(&["describe", name]));
        assert!(whole(&mut c, env.image.len()) == model, "{name}");
        // And it takes writes and flushes again.
        c.write(0, &[0x92; 4096]).unwrap();
        c.flush().unwrap();
    }
    daemon.signal("-KILL");
    let (daemon, _) = env.daemon();
    let mut c = connect(&env.sandbox(&["describe", "b"]));
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x92; 4096]);
    drop(c);
    daemon.signal("-TERM");
}

/// A clone, fork or unnamed create writes no file: the records that only
/// a fresh layer's writes would need are written by that layer's first
/// FLUSH with writes, before it answers. An unnamed sandbox that never
/// flushed is gone after a crash; every flushed one is back.
#[test]
fn records_are_written_by_the_first_flush_of_a_layer_they_list() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let layers = |view: &Value| -> Option<usize> {
        let bytes = std::fs::read(env.record_path(&id_of(view))).ok()?;
        let rec: Value = serde_json::from_slice(&bytes).unwrap();
        Some(rec["layers"].as_array().unwrap().len())
    };
    let idle = env.sandbox(&["create", "--image", "base"]);
    let u = env.sandbox(&["create", "--image", "base"]);
    assert_eq!(layers(&u), None);
    let mut cu = connect(&u);
    cu.write(0, &[0x31; 4096]).unwrap();
    assert_eq!(layers(&u), None, "written, not flushed");
    cu.flush().unwrap();
    assert_eq!(layers(&u), Some(1));

    let (a, mut ca, _) = env.written_a(MIB, 4096, 0x32);
    assert_eq!(
        layers(&a),
        Some(1),
        "a named sandbox's record is durable at once"
    );
    let b = env.sandbox(&["clone", "a", "b"]);
    assert_eq!(layers(&b), Some(2));
    assert_eq!(
        layers(&a),
        Some(1),
        "the source's new layer is not written yet"
    );
    ca.write(2 * MIB as u64, &[0x33; 4096]).unwrap();
    ca.flush().unwrap();
    assert_eq!(layers(&a), Some(2));
    drop((cu, ca));

    daemon.signal("-KILL");
    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 3, "{ready}");
    let listed = env.sandbox(&["ls"]);
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&id_of(&idle).as_str()), "{listed}");
    let mut cu = connect(&env.sandbox(&["describe", &id_of(&u)]));
    assert_eq!(cu.read(0, 4096).unwrap(), vec![0x31; 4096]);
    drop(cu);
    daemon.signal("-TERM");
}

/// A daemon that dies between taking a name in the catalog and recording
/// the sandbox (fault injector: `CAIRN_FAULT_CRASH_AFTER_CLAIM` aborts it
/// right there) gives the name back at its next start: a create's name
/// can be taken again; a resumed sandbox is suspended again and then
/// resumes with its files.
#[test]
fn a_name_taken_just_before_a_crash_is_given_back_at_the_next_start() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let (_a, ca, model) = env.written_a(MIB, 8192, 0x41);
    drop(ca);
    env.sandbox(&["suspend", "a"]);
    daemon.signal("-TERM");

    let crash = [("CAIRN_FAULT_CRASH_AFTER_CLAIM", "1")];
    let (daemon, _) = env.daemon_with(&crash);
    env.sandbox_fails(&["create", "fresh", "--image", "base"]);
    assert!(!daemon.ended().success());
    let (daemon, _) = env.daemon_with(&crash);
    env.sandbox_fails(&["resume", "a"]);
    assert!(!daemon.ended().success());

    let (daemon, _) = env.daemon();
    env.sandbox(&["create", "fresh", "--image", "base"]);
    let back = env.sandbox(&["resume", "a"]);
    assert!(whole(&mut connect(&back), env.image.len()) == model);
    let claims = std::fs::read_dir(env.path("state").join("claims")).unwrap();
    assert_eq!(claims.count(), 0, "settled claims are deleted");
    daemon.signal("-TERM");
}

/// Records of unnamed sandboxes and of a source's new layer are deferred
/// (their new layers write them at their first FLUSH). A crash that keeps
/// the clone's record but not the source's new one (here: the source's
/// record put back as it was before the clone, in case it was written)
/// must not let the source write into the layer its clone stands on.
#[test]
fn a_source_record_lost_in_a_crash_does_not_let_it_write_under_its_clone() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let (a, ca, model) = env.written_a(2 * MIB, 8192, 0xa1);
    let id = id_of(&a);
    let record = env.record_path(&id);
    let before = std::fs::read(&record).unwrap();
    let b = env.sandbox(&["clone", "a", "b"]);
    drop(ca);
    daemon.signal("-KILL");
    std::fs::write(&record, before).unwrap();

    let (daemon, ready) = env.daemon();
    assert_eq!(ready["recovered"], 2, "{ready}");
    let mut ca = connect(&env.sandbox(&["describe", "a"]));
    assert_eq!(env.sandbox(&["describe", "a"])["layers"], 2);
    ca.write(2 * MIB as u64, &[0xa2; 4096]).unwrap();
    ca.flush().unwrap();
    let mut cb = connect(&env.sandbox(&["describe", &id_of(&b)]));
    assert!(
        whole(&mut cb, env.image.len()) == model,
        "the clone changed"
    );
    drop((ca, cb));
    daemon.signal("-TERM");
}

/// A cached chunk that rots on disk under a running daemon is caught by
/// its CRC, fetched again, and counted on `/metrics`: the guest reads the
/// image's bytes, never the rotten ones.
#[test]
fn a_rotten_cached_chunk_is_fetched_again_and_counted() {
    let env = Env::new();
    let (daemon, _) = env.daemon();
    let s = env.sandbox(&["create", "rot", "--image", "base"]);
    assert!(whole(&mut connect(&s), env.image.len()) == env.image);
    let before = http_get(&env.socket(), "/metrics");
    assert!(metric(&before, "cairn_cache_bytes") > 0.0, "{before}");
    assert!(metric(&before, "cairn_cache_capacity_bytes") > 0.0);

    // Flip the last byte of every cached chunk (chunk data, under its
    // CRCs), in place: the daemon's mappings see it.
    let mut rotten = 0;
    for entry in std::fs::read_dir(env.path("cache").join("chunks")).unwrap() {
        use std::os::unix::fs::FileExt;
        let path = entry.unwrap().path();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = f.metadata().unwrap().len() - 1;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        rotten += 1;
    }
    assert!(rotten > 0, "nothing was cached");

    assert!(
        whole(&mut connect(&s), env.image.len()) == env.image,
        "a rotten chunk reached the guest"
    );
    let after = http_get(&env.socket(), "/metrics");
    let crc = metric(&after, "cairn_store_events_total{event=\"crc_failure\"}");
    assert!(crc >= 1.0, "{after}");
    assert!(
        metric(&after, "cairn_remote_gets_total") > metric(&before, "cairn_remote_gets_total"),
        "fetched again: {after}"
    );
    daemon.signal("-TERM");
}

/// The value of metric line `name` (labels included) in `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_running_sandbox_migrates_to_another_daemon_and_back_with_every_flushed_write() {
    let env = Env::on(common::daemon::Env::moto("migrate"));
    let (daemon_a, _) = env.daemon();
    let (daemon_b, _) = env.daemon_b();
    let (socket_a, socket_b) = (env.socket(), env.path("daemon-b.sock"));
    let health = http_get(&socket_b, "/v1/health");
    let body = health.split("\r\n\r\n").nth(1).unwrap();
    let host_b = serde_json::from_str::<Value>(body).unwrap()["host"].clone();

    // 2 MiB written and flushed on A; its client stays connected, as a
    // paused VMM does, and is cut off by the switch.
    let a = env.sandbox(&["create", "alpha", "--image", "base"]);
    let mut ca = connect(&a);
    let mut model = env.image.clone();
    put(&mut ca, &mut model, MIB, MIB, 0x41);
    put(&mut ca, &mut model, 2 * MIB, MIB, 0x42);
    ca.flush().unwrap();
    let to_b = socket_b.to_str().unwrap();
    let r = env.sandbox(&["migrate", "alpha", "--to", to_b]);
    println!("{r:#}");
    assert_eq!(r["to_host"], host_b, "{r}");
    assert_eq!(r["generation"], 2, "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "one round uploads the 2 MiB: {r}");
    assert_eq!(rounds[0]["bytes"], 2 * MIB, "{r}");
    assert_eq!(r["delta_bytes"], 0, "nothing written after the round: {r}");
    assert!(
        !Path::new(a["disk_socket"].as_str().unwrap()).exists(),
        "A stopped serving alpha's disk"
    );
    drop(ca);
    assert_eq!(
        env.sandbox(&["ls"])["sandboxes"].as_array().unwrap().len(),
        0,
        "A serves nothing"
    );
    assert_eq!(
        env.json(&["snapshot", "describe", r["snapshot"].as_str().unwrap()])["state"],
        "completed"
    );
    // The pre-copy round's snapshot was a step: gone from the catalog.
    let ids: Vec<Value> = env.json(&["snapshot", "ls"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(ids, [r["snapshot"].clone()], "{r}");

    // B serves the disk as it was; it writes, and the sandbox goes back to
    // A with no pre-copy: the switch's delta carries B's write.
    let mut cb = connect(&r["sandbox"]);
    assert!(whole(&mut cb, env.image.len()) == model, "B serves alpha");
    put(&mut cb, &mut model, 5 * MIB, 512 << 10, 0x43);
    cb.flush().unwrap();
    // With the VM's memory, served on A by a page server.
    let memory: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    let mem = env.path("vm.mem");
    std::fs::write(&mem, &memory).unwrap();
    let back = sandbox_via(
        env.cairn_b(),
        &[
            "migrate",
            "alpha",
            "--to",
            socket_a.to_str().unwrap(),
            "--max-rounds",
            "0",
            "--memory",
            mem.to_str().unwrap(),
        ],
    );
    assert_memory_served(&back["sandbox"], &memory);
    drop(cb);
    assert_eq!(back["generation"], 3, "{back}");
    assert_eq!(back["rounds"].as_array().unwrap().len(), 0, "{back}");
    assert_eq!(back["delta_bytes"], 512 << 10, "{back}");
    let mut c = connect(&back["sandbox"]);
    assert!(
        whole(&mut c, env.image.len()) == model,
        "A serves every write made on either host"
    );
    drop(c);

    // The counters on B: one migration out, its unserved time observed.
    let m = http_get(&socket_b, "/metrics");
    assert_eq!(metric(&m, "cairn_migrations_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "cairn_migration_unserved_seconds_count"), 1.0);
    assert_eq!(
        metric(&m, "cairn_migration_delta_bytes_total"),
        (512 << 10) as f64
    );

    // Refusals: to itself, and an unnamed sandbox.
    let out = env.sandbox_fails(&["migrate", "alpha", "--to", socket_a.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is this daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let u = env.sandbox(&["create", "--image", "base"]);
    let out = env.sandbox_fails(&["migrate", u["id"].as_str().unwrap(), "--to", to_b]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a named sandbox"));
    assert!(
        env.sandbox(&["describe", "alpha"])["disk_socket"].is_string(),
        "a refused migration leaves the sandbox served"
    );
    daemon_a.signal("-TERM");
    daemon_b.signal("-TERM");
}

#[test]
fn a_snapshot_upload_is_fenced_once_another_host_takes_the_sandbox_over() {
    let env = Env::new();
    // Uploads wait 3 s before they start: the take-over lands meanwhile.
    let (daemon, _) = env.daemon_with(&[("CAIRN_FAULT_STALL_UPLOADS_MS", "3000")]);
    let (_a, ca, _) = env.written_a(0, 4096, 0x51);
    drop(ca);
    let snap = env.sandbox(&["snapshot", "a"]);
    let id = snap["id"].as_str().unwrap().to_owned();
    // Another host takes `a` over in the catalog (as a forced resume does
    // once this host is declared gone): generation 2.
    let store = cairn_engine::objstore::FileStore::open(&env.path("store")).unwrap();
    let taken = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(cairn_engine::catalog::sandbox::take(
            &store, "default", "a", "intruder", true,
        ))
        .unwrap();
    assert_eq!(taken.generation, 2);
    let done = env.settled(&id);
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("fenced") && reason.contains("intruder"),
        "{reason}"
    );
    daemon.signal("-TERM");
}

/// Connects to the disk socket at `socket` (a sandbox suspended for
/// idling is resumed by the connection), trying for up to 20 s; the time
/// it took.
fn connect_resuming(socket: &Path) -> (Client, std::time::Duration) {
    let t = std::time::Instant::now();
    loop {
        match Client::connect(socket) {
            Ok(c) => return (c, t.elapsed()),
            Err(e) => assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "{} never served again: {e:#}",
                socket.display()
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (up to 20 s) until the daemon no longer serves `name`.
fn until_dozing(env: &Env, name: &str) {
    let t = std::time::Instant::now();
    while env.sandbox(&["ls"]).to_string().contains(name) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{name} was not suspended for idling"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_idle_sandbox_is_suspended_and_resumed_by_its_vmm_or_an_api_call() {
    let env = Env::new();
    // The hook "pauses the VMM and has it write its memory": it records
    // the call and names a memory file.
    let memory: Vec<u8> = (0..MIB).map(|i| (i * 13 % 241) as u8).collect();
    let mem = env.path("idle.mem");
    std::fs::write(&mem, &memory).unwrap();
    let calls = env.path("hook-calls");
    let hook = format!(
        "echo \"$CAIRN_SANDBOX $CAIRN_DISK_SOCKET\" >>{}; printf '{{\"memory\": \"{}\"}}'",
        calls.display(),
        mem.display()
    );
    // A fault injector holds each suspend for idling for 0.5 s between
    // the sandbox leaving the served ones and its doorbell: a request in
    // that window must wait for it, not find no sandbox.
    let (daemon, _) = env.daemon_with(&[
        ("CAIRN_IDLE_HOOK", hook.as_str()),
        ("CAIRN_FAULT_PAUSE_BEFORE_DOZING_MS", "500"),
    ]);
    let s = env.sandbox(&[
        "create",
        "sleepy",
        "--image",
        "base",
        "--idle-suspend",
        "2s",
    ]);
    assert_eq!(s["idle_suspend_ms"], 2000, "{s}");
    let socket = Path::new(s["disk_socket"].as_str().unwrap()).to_owned();
    let mut c = connect(&s);
    let mut model = env.image.clone();
    put(&mut c, &mut model, 3 * MIB, 8192, 0x5a);
    c.flush().unwrap();
    drop(c);

    // Idle for two seconds: the hook runs, the sandbox is suspended.
    until_dozing(&env, "sleepy");
    let called = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(called.trim(), format!("sleepy {}", socket.display()));

    // A VMM connecting to the same socket path resumes it there, with
    // its disk and the memory the hook named.
    let (mut c, took) = connect_resuming(&socket);
    println!("idle suspend to first connection served: {took:?}");
    assert!(
        whole(&mut c, env.image.len()) == model,
        "the disk after waking"
    );
    put(&mut c, &mut model, 9 * MIB, 4096, 0x5b);
    c.flush().unwrap();
    drop(c);
    let woken = env.sandbox(&["describe", "sleepy"]);
    assert_eq!(woken["disk_socket"], s["disk_socket"], "{woken}");
    assert_eq!(woken["idle_suspend_ms"], 2000, "kept across the wake");

    // A guest that only touches memory is not idle: with its disk
    // quiet, page faults every 250 ms for twice the idle time keep it
    // running (its last page is dropped first, so each touch faults, and
    // reads zeros). (A page server serves one VMM process until it exits,
    // so this harness is also the one that checks the memory.)
    let hook_calls = || std::fs::read_to_string(&calls).unwrap().lines().count();
    let before = hook_calls();
    let mut vmm = connect_memory(&woken, memory.len());
    let last_page = memory.len() as u64 - 4096;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut touches = 0;
    while std::time::Instant::now() < until {
        // Checked before each touch: a page server stopped by a suspend
        // would leave the harness's next drop of a page waiting forever.
        assert_eq!(
            hook_calls(),
            before,
            "suspended while its guest faulted pages"
        );
        vmm.remove(last_page, 4096).unwrap();
        assert_eq!(
            vmm.read_byte(last_page + 1),
            0,
            "a dropped page reads zeros"
        );
        touches += 1;
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(touches >= 10, "{touches} touches");
    let busy = env.sandbox(&["describe", "sleepy"]);
    assert_eq!(busy["state"], "running", "faulting is not idle: {busy}");
    assert_eq!(hook_calls(), before, "no suspend while it faults");
    assert_memory(&vmm, &woken, &memory[..last_page as usize]);
    vmm.disconnect();

    // Idle again; this time an API call wakes it, at once (in the
    // injector's window), naming it by its id (kept across the wakes).
    until_dozing(&env, "sleepy");
    assert_eq!(woken["id"], s["id"]);
    let again = env.sandbox(&["describe", s["id"].as_str().unwrap()]);
    assert_eq!(again["state"], "running", "{again}");
    let mut c = connect(&again);
    assert!(
        whole(&mut c, env.image.len()) == model,
        "the disk after the API wake"
    );
    drop(c);
    // (At least: a slow machine may let it idle out once more between
    // two steps.)
    let m = http_get(&env.socket(), "/metrics");
    assert!(
        metric(&m, "cairn_idle_total{event=\"suspend\"}") >= 2.0,
        "{m}"
    );
    assert!(metric(&m, "cairn_idle_total{event=\"wake\"}") >= 2.0, "{m}");

    // The daemon dies while the sandbox dozes (its suspend complete, as
    // the metric counts it): the restarted one rings its doorbell again,
    // and a VMM at the same path wakes it.
    let suspends = || {
        metric(
            &http_get(&env.socket(), "/metrics"),
            "cairn_idle_total{event=\"suspend\"}",
        )
    };
    let before = suspends();
    let t = std::time::Instant::now();
    while suspends() <= before {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "never dozed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon.signal("-KILL");
    let (daemon, ready) = env.daemon_with(&[("CAIRN_IDLE_HOOK", hook.as_str())]);
    assert_eq!(ready["dozing"], 1, "{ready}");
    let (mut c, _) = connect_resuming(&socket);
    assert!(
        whole(&mut c, env.image.len()) == model,
        "the disk after a wake by a restarted daemon"
    );
    drop(c);
    let after = env.sandbox(&["describe", "sleepy"]);
    assert_eq!(after["disk_socket"], s["disk_socket"], "{after}");
    assert_eq!(after["idle_suspend_ms"], 2000, "{after}");
    daemon.signal("-TERM");
}
