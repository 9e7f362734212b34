//! `cairn gc`: what nothing references goes, what something references
//! stays, while another host imports, snapshots and clones into the same
//! store (moto, whose conditional writes are atomic as on S3); every image
//! and snapshot is exported and compared byte for byte afterwards.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_benches::blk_client::Client;
use common::daemon::{http_get, sandbox_via, Env};
use common::run_ok;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// `cairn image import-raw` through `cairn` (a host's CLI).
fn import(env: &Env, mut cairn: std::process::Command, name: &str, bytes: &[u8]) {
    let file = env.path(&format!("{name}.raw"));
    std::fs::write(&file, bytes).unwrap();
    run_ok(
        cairn
            .args(["image", "import-raw", "--name", name])
            .arg(&file),
    );
}

fn export(env: &Env, image: &str) -> Vec<u8> {
    let file = env.path(&format!("{image}.out"));
    run_ok(env.cairn().args(["image", "export", image]).arg(&file));
    std::fs::read(&file).unwrap()
}

fn gc(env: &Env, args: &[&str]) -> Value {
    env.json(&[&["gc"], args].concat())
}

/// Bytes of data a `file://` store holds: packs, manifests, working sets,
/// VM states (not the catalog's records and tombstones).
fn stored_bytes(env: &Env) -> u64 {
    let root = env.path("store");
    ["packs", "manifests", "wsets", "vmstate"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).into_iter().flatten())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn verify_deep(env: &Env) {
    let out = run_ok(env.cairn().args(["--json", "verify", "--deep"]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"], Value::Array(vec![]), "{report}");
}

fn connect(view: &Value) -> Client {
    Client::connect(Path::new(view["disk_socket"].as_str().unwrap())).unwrap()
}

fn whole(c: &mut Client, len: usize) -> Vec<u8> {
    (0..len)
        .step_by(MIB)
        .flat_map(|off| c.read(off as u64, MIB).unwrap())
        .collect()
}

/// Waits until a dry run marks exactly `n` live manifests (a daemon
/// publishes its sandboxes' roots within a second of a change).
fn until_live_manifests(env: &Env, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gc(env, &["--dry-run"]);
        if r["live_manifests"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "still {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn gc_after_removing_images_snapshots_and_sandboxes_returns_the_store_to_its_size() {
    let env = Env::file();
    let base = random(1, 16 * MIB);
    import(&env, env.cairn(), "base", &base);
    let before = stored_bytes(&env);

    // Another image sharing a quarter of base, a sandbox of it written to
    // and snapshotted, a sandbox from the snapshot, the snapshot named.
    let other = [&base[..4 * MIB], &random(2, 4 * MIB)[..]].concat();
    import(&env, env.cairn(), "other", &other);
    let (daemon, _) = env.daemon();
    let s1 = env.sandbox(&["create", "s1", "--image", "other"]);
    let mut c1 = connect(&s1);
    c1.write(2 * MIB as u64, &vec![0x5a; MIB]).unwrap();
    c1.flush().unwrap();
    let snap = env.sandbox(&["snapshot", "s1"]);
    let id = snap["id"].as_str().unwrap().to_owned();
    let done = env.settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    env.sandbox(&["create", "s2", "--snapshot", &id]);
    env.json(&[
        "image",
        "register",
        done["uri"].as_str().unwrap(),
        "--name",
        "snapped",
    ]);
    assert!(stored_bytes(&env) > before + 4 * MIB as u64);

    // Nothing is condemned while all of it is referenced.
    let r = gc(&env, &["--grace", "0s"]);
    assert_eq!(
        (r["condemned"].as_u64(), r["deleted"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );

    drop(c1);
    env.sandbox(&["rm", "s2"]);
    env.sandbox(&["rm", "s1"]);
    env.json(&["snapshot", "rm", &id]);
    env.json(&["image", "rm", "other"]);
    env.json(&["image", "rm", "snapped"]);
    until_live_manifests(&env, 1);

    // The first run condemns, the next (the grace period over) deletes.
    let first = gc(&env, &["--grace", "0s"]);
    assert!(
        first["condemned"].as_u64().unwrap() >= 4,
        "two packs, two manifests: {first}"
    );
    assert_eq!(first["deleted"], 0, "{first}");
    assert!(stored_bytes(&env) > before);
    let second = gc(&env, &["--grace", "0s"]);
    assert_eq!(second["deleted"], first["condemned"], "{second}");
    assert_eq!(stored_bytes(&env), before, "{first}\n{second}");
    assert_eq!(second["reclaimed_bytes"], first["condemned_bytes"]);
    let metrics = http_get(&env.socket(), "/metrics");
    assert!(metrics.contains("cairn_gc_runs_total 3\n"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "cairn_gc_reclaimed_bytes_total {}\n",
            second["reclaimed_bytes"]
        )),
        "{metrics}"
    );
    verify_deep(&env);
    assert!(export(&env, "base") == base);
    daemon.signal("-TERM");
}

/// A daemon gone for good keeps what its unnamed sandboxes stood on
/// until `gc --forget-host` deletes its roots, which is refused while the
/// host may still be running.
#[test]
fn a_host_gone_for_good_is_forgotten_and_its_data_collected() {
    let env = Env::file();
    let base = random(3, 8 * MIB);
    import(&env, env.cairn(), "base", &base);
    let before = stored_bytes(&env);
    import(&env, env.cairn(), "gone", &random(4, 8 * MIB));
    let (daemon, _) = env.daemon();
    // An unnamed sandbox: only its host's roots keep its image.
    env.sandbox(&["create", "--image", "gone"]);
    env.json(&["image", "rm", "gone"]);
    until_live_manifests(&env, 2);
    let seen = gc(&env, &["--dry-run"]);
    let hosts = seen["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{seen}");
    let host = hosts[0]["host"].as_str().unwrap().to_owned();
    assert_eq!(hosts[0]["manifests"], 1, "{seen}");
    assert!(hosts[0]["published"].as_u64().unwrap() > 0, "{seen}");
    daemon.signal("-KILL");

    // It published a moment ago: it may be running.
    let refused = |args: &[&str], why: &str| {
        let out = env.cairn().arg("gc").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    };
    refused(&["--forget-host", &host], "published its roots");
    refused(&["--forget-host", "no-such-host"], "no host `no-such-host`");
    let r = gc(&env, &["--grace", "0s"]);
    assert_eq!(r["condemned"], 0, "its roots still hold: {r}");

    // Known gone (`--host-timeout 0s`): a dry run says so and changes
    // nothing; a run forgets it and condemns its image.
    let forget = [
        "--forget-host",
        &host,
        "--host-timeout",
        "0s",
        "--grace",
        "0s",
    ];
    let dry = gc(&env, &[&forget[..], &["--dry-run"]].concat());
    assert_eq!(dry["forgotten_hosts"], serde_json::json!([host]), "{dry}");
    assert_eq!(
        gc(&env, &["--dry-run"])["hosts"].as_array().unwrap().len(),
        1
    );
    let first = gc(&env, &forget);
    assert_eq!(first["forgotten_hosts"], serde_json::json!([host]));
    assert_eq!(first["hosts"], serde_json::json!([]), "{first}");
    assert!(first["condemned"].as_u64().unwrap() >= 2, "{first}");
    gc(&env, &["--grace", "0s"]);
    assert_eq!(stored_bytes(&env), before);
    verify_deep(&env);
    assert!(export(&env, "base") == base);
}

#[test]
fn an_image_stored_again_while_condemned_survives_a_run_before_it_is_named() {
    let env = Env::file();
    let image = random(3, 8 * MIB);
    import(&env, env.cairn(), "first", &image);
    env.json(&["image", "rm", "first"]);
    let r = gc(&env, &["--grace", "2s"]);
    assert_eq!(r["condemned"], 2, "its pack and manifest: {r}");
    std::thread::sleep(Duration::from_millis(2500));

    // The same bytes again: the same pack and manifest, already in the
    // store and condemned long enough to be deleted. The import pauses
    // between storing them and naming them (a fault injector), and a run
    // passes in that window: it must not delete them.
    let file = env.path("again.raw");
    std::fs::write(&file, &image).unwrap();
    let mut again = env
        .cairn()
        .env("CAIRN_FAULT_PAUSE_BEFORE_NAMING_MS", "3000")
        .args(["image", "import-raw", "--name", "again"])
        .arg(&file)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let during = gc(&env, &["--grace", "2s"]);
    assert_eq!(during["deleted"], 0, "{during}");
    assert!(again.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(2500));
    let after = gc(&env, &["--grace", "2s"]);
    assert_eq!(after["deleted"], 0, "{after}");
    verify_deep(&env);
    assert!(export(&env, "again") == image);
}

#[test]
fn a_dry_run_changes_nothing_and_a_second_collector_is_refused() {
    let env = Env::file();
    import(&env, env.cairn(), "gone", &random(4, 2 * MIB));
    env.json(&["image", "rm", "gone"]);
    let dry = gc(&env, &["--dry-run", "--grace", "0s"]);
    assert_eq!(dry["condemned"], 2, "{dry}");
    assert!(
        !env.path("store/gc/state").exists(),
        "a dry run wrote state"
    );

    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000;
    std::fs::create_dir_all(env.path("store/gc")).unwrap();
    std::fs::write(
        env.path("store/gc/state"),
        format!(r#"{{"format":1,"grace_secs":60,"condemned":{{}},"deleting":{{}},"lease":{{"by":"elsewhere:1","until_ms":{until}}},"runs":0,"reclaimed_bytes":0}}"#),
    )
    .unwrap();
    let out = env.cairn().args(["--json", "gc"]).output().unwrap();
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["kind"], "conflict", "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("elsewhere:1"),
        "{err}"
    );
}

/// A second host (daemon B and its CLI, its own cache) imports images that
/// share chunks with removed ones, snapshots sandboxes, clones them and
/// imports a removed image again, while this host collects garbage over
/// and over with a short grace period.
#[test]
fn gc_races_imports_snapshots_and_clones_from_another_host_on_s3() {
    let env = Env::moto("gc");
    let base = random(10, 8 * MIB);
    import(&env, env.cairn(), "base", &base);
    let garbage = random(11, 8 * MIB);
    import(&env, env.cairn(), "garbage", &garbage);
    env.json(&["image", "rm", "garbage"]);
    let (daemon_b, _) = env.daemon_b();

    let stop = AtomicBool::new(false);
    let (runs, deleted) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut images: Vec<(String, Vec<u8>)> = vec![("base".into(), base.clone())];
    let mut clones: Vec<(Value, Vec<u8>)> = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = gc(&env, &["--grace", "6s"]);
                runs.fetch_add(1, Ordering::Relaxed);
                deleted.fetch_add(r["deleted"].as_u64().unwrap(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        // Stops the collector however this thread ends (a failed assert too).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        for round in 0..4u64 {
            let name = format!("imp{round}");
            let bytes = [&garbage[..4 * MIB], &random(100 + round, 4 * MIB)[..]].concat();
            import(&env, env.cairn_b(), &name, &bytes);
            // Garbage made during the race.
            import(&env, env.cairn_b(), "tmp", &random(200 + round, MIB));
            run_ok(env.cairn_b().args(["image", "rm", "tmp"]));

            let sb = format!("sb{round}");
            let view = sandbox_via(env.cairn_b(), &["create", &sb, "--image", &name]);
            let mut c = connect(&view);
            let mut model = bytes.clone();
            c.write(MIB as u64, &vec![round as u8 + 1; 256 << 10])
                .unwrap();
            model[MIB..MIB + (256 << 10)].fill(round as u8 + 1);
            c.flush().unwrap();
            let snap = sandbox_via(env.cairn_b(), &["snapshot", &sb]);
            let clone = sandbox_via(env.cairn_b(), &["clone", &sb, &format!("cl{round}")]);
            let id = snap["id"].as_str().unwrap().to_owned();
            let done = env.settled(&id);
            assert_eq!(done["state"], "completed", "{done}");
            let snapped = format!("snap{round}");
            env.json(&[
                "image",
                "register",
                done["uri"].as_str().unwrap(),
                "--name",
                &snapped,
            ]);
            images.push((name, bytes));
            images.push((snapped, model.clone()));
            clones.push((clone, model));
            if round == 1 {
                import(&env, env.cairn_b(), "again", &garbage);
                images.push(("again".into(), garbage.clone()));
            }
            std::thread::sleep(Duration::from_millis(1500));
        }
    });
    // Runs past the grace period finish what the race condemned.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(6500));
        deleted.fetch_add(
            gc(&env, &["--grace", "6s"])["deleted"].as_u64().unwrap(),
            Ordering::Relaxed,
        );
    }
    assert!(
        runs.load(Ordering::Relaxed) >= 4,
        "only {runs:?} runs raced"
    );
    assert!(
        deleted.load(Ordering::Relaxed) >= 4,
        "the race's garbage was not collected: {deleted:?}"
    );
    verify_deep(&env);
    for (name, bytes) in &images {
        assert!(export(&env, name) == *bytes, "image {name} changed");
    }
    for (view, model) in &clones {
        assert!(
            whole(&mut connect(view), model.len()) == *model,
            "clone {view}"
        );
    }
    daemon_b.signal("-TERM");
}
