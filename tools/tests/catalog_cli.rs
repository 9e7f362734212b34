//! `cairn image register|rm|ls|describe`, `cairn snapshot ls|describe|rm`
//! and `--project` / `CAIRN_PROJECT` end to end on a `file://` store; the
//! snapshot records a daemon would write are made through the engine's API.

use std::process::{Command, Output};

use cairn_engine::catalog::{snapshot, NewSnapshot};
use cairn_engine::objstore::FileStore;
use cairn_engine::ManifestId;
use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn store_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    fn cairn(&self, project: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.arg("--store")
            .arg(format!("file://{}", self.store_dir().display()))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .env_remove("CAIRN_PROJECT");
        if let Some(p) = project {
            c.env("CAIRN_PROJECT", p);
        }
        c.args(args).output().unwrap()
    }

    fn json(&self, project: Option<&str>, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let o = self.cairn(project, &all);
        assert!(o.status.success(), "cairn {args:?}: {}", err(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Fails, saying all of `want`.
    fn refused(&self, project: Option<&str>, args: &[&str], want: &[&str]) {
        let o = self.cairn(project, args);
        assert_eq!(o.status.code(), Some(1), "cairn {args:?} did not fail");
        for w in want {
            assert!(
                err(&o).contains(w),
                "cairn {args:?}: `{}` does not say {w}",
                err(&o)
            );
        }
    }
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn import(env: &Env, project: Option<&str>, name: &str, seed: u8) -> String {
    let file = env.dir.path().join(format!("{name}.raw"));
    let bytes: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i as u8) ^ seed ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&file, bytes).unwrap();
    let r = env.json(
        project,
        &[
            "image",
            "import-raw",
            file.to_str().unwrap(),
            "--name",
            name,
        ],
    );
    r["id"].as_str().unwrap().to_owned()
}

/// A snapshot record in `state`, as a daemon would leave it.
fn snapshot_in(env: &Env, state: &str, image: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = FileStore::open(&env.store_dir()).unwrap();
    let image: ManifestId = image.parse().unwrap();
    rt.block_on(async {
        let new = NewSnapshot {
            project: "default".into(),
            parent: None,
            image: Some(image),
            sandbox: None,
            host: "host-a".into(),
        };
        let s = snapshot::create(&store, new).await.unwrap();
        if state != "pending" {
            snapshot::start_upload(&store, "default", &s.id, "host-a")
                .await
                .unwrap();
        }
        match state {
            "failed" => {
                snapshot::fail(&store, "default", &s.id, "the upload ran out of retries")
                    .await
                    .unwrap();
            }
            "completed" => {
                let done = snapshot::Completion {
                    disk: image,
                    memory: None,
                    vm_state: None,
                };
                snapshot::complete(&store, "default", &s.id, done)
                    .await
                    .unwrap();
            }
            _ => {}
        }
        s.id
    })
}

fn uri(env: &Env, id: &str) -> String {
    format!(
        "file://{}/snapshots/{id}",
        env.store_dir().canonicalize().unwrap().display()
    )
}

#[test]
fn register_says_why_it_refuses_and_registers_a_completed_snapshot() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let base = import(&env, None, "base", 1);
    let pending = snapshot_in(&env, "pending", &base);
    let uploading = snapshot_in(&env, "uploading", &base);
    let failed = snapshot_in(&env, "failed", &base);
    let completed = snapshot_in(&env, "completed", &base);

    let reg = |id: &str| {
        vec![
            "image".to_owned(),
            "register".into(),
            uri(&env, id),
            "--name".into(),
            "reg".into(),
        ]
    };
    let run = |v: Vec<String>, want: &[&str]| {
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        env.refused(None, &a, want)
    };
    run(reg(&pending), &["pending", "still being taken"]);
    run(reg(&uploading), &["uploading", "has not finished"]);
    run(reg(&failed), &["failed", "the upload ran out of retries"]);
    let unknown = "0123456789abcdef0123456789abcdef";
    run(reg(unknown), &["no snapshot", unknown]);
    let foreign = format!("file:///elsewhere/store/snapshots/{completed}");
    env.refused(
        None,
        &["image", "register", &foreign, "--name", "reg"],
        &["another store"],
    );
    env.refused(
        None,
        &["image", "register", "s3://b/p/snapshots/x", "--name", "reg"],
        &["not a snapshot URI"],
    );
    // Another project does not have it.
    let u = uri(&env, &completed);
    env.refused(
        Some("team"),
        &["image", "register", &u, "--name", "reg"],
        &["belongs to project `default`"],
    );

    let dockerfile = env.dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM base\nRUN true\n").unwrap();
    let r = env.json(
        None,
        &[
            "image",
            "register",
            &u,
            "--name",
            "reg",
            "--public",
            "--dockerfile",
            dockerfile.to_str().unwrap(),
        ],
    );
    assert_eq!(
        (r["id"].as_str(), r["parent"].as_str()),
        (Some(base.as_str()), Some(base.as_str()))
    );
    assert_eq!(r["made"]["how"], "register");
    assert_eq!(r["made"]["from"], u.as_str());
    assert_eq!(r["made"]["dockerfile"], "FROM base\nRUN true\n");
    assert_eq!(r["public"], true);
    // Its disk is its parent's: nothing of its own.
    assert_eq!(r["unique_bytes"], 0);

    // Public: seen from another project, by ls and describe.
    let ls = env.json(Some("team"), &["image", "ls"]);
    let names: Vec<_> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap(), i["project"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("reg", "default")]);
    let d = env.json(Some("team"), &["image", "describe", "reg"]);
    assert_eq!(d["record"]["made"]["how"], "register");
    assert_eq!(d["id"], base.as_str());
    // By id: the record of a name for it.
    let d = env.json(None, &["image", "describe", &base]);
    assert_eq!(d["record"]["project"], "default");
    assert_eq!(d["record"]["made"]["how"], "import-raw");
    let text = String::from_utf8_lossy(&env.cairn(None, &["image", "describe", "reg"]).stdout)
        .into_owned();
    for w in [
        "project         default (public)",
        "made by         register from",
        "parent",
        "unique bytes",
    ] {
        assert!(text.contains(w), "{text}");
    }

    // Snapshots: listed with their states; described; removed when final.
    let ls = env.json(None, &["snapshot", "ls"]);
    let mut states: Vec<(String, String)> = ls["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    states.sort();
    let mut want = vec![
        (pending.clone(), "pending".to_owned()),
        (uploading.clone(), "uploading".to_owned()),
        (failed.clone(), "failed".to_owned()),
        (completed.clone(), "completed".to_owned()),
    ];
    want.sort();
    assert_eq!(states, want);
    let page = env.json(None, &["snapshot", "ls", "--limit", "3"]);
    assert_eq!(page["snapshots"].as_array().unwrap().len(), 3);
    let rest = env.json(
        None,
        &["snapshot", "ls", "--after", page["next"].as_str().unwrap()],
    );
    assert_eq!(rest["snapshots"].as_array().unwrap().len(), 1);
    let d = env.json(None, &["snapshot", "describe", &completed]);
    assert_eq!(d["uri"], u.as_str());
    env.refused(
        None,
        &["snapshot", "rm", &uploading],
        &["still being taken", "--force"],
    );
    env.json(None, &["snapshot", "rm", &failed]);
    env.json(None, &["snapshot", "rm", &uploading, "--force"]);
    env.refused(None, &["snapshot", "describe", &failed], &["no snapshot"]);

    // rm: the name goes, in every project; the data stays until gc.
    env.json(None, &["image", "rm", "reg"]);
    env.refused(
        Some("team"),
        &["image", "describe", "reg"],
        &["no image named `reg`"],
    );
    env.refused(None, &["image", "rm", "reg"], &["no image named `reg`"]);
    env.json(None, &["image", "describe", &base]);
}

#[test]
fn projects_keep_their_own_names() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let a = import(&env, Some("team-a"), "web", 1);
    let b = import(&env, Some("team-b"), "web", 2);
    assert_ne!(a, b);
    assert_eq!(
        env.json(Some("team-a"), &["image", "describe", "web"])["id"],
        a.as_str()
    );
    assert_eq!(
        env.json(None, &["--project", "team-b", "image", "describe", "web"])["id"],
        b.as_str()
    );
    env.refused(
        None,
        &["image", "describe", "web"],
        &["no image named `web` in project `default`"],
    );
    // A name is unique within its project: another image is refused.
    let other = env.dir.path().join("other.raw");
    std::fs::write(&other, b"other bytes").unwrap();
    env.refused(
        Some("team-a"),
        &[
            "image",
            "import-raw",
            other.to_str().unwrap(),
            "--name",
            "web",
        ],
        &["taken in project `team-a`"],
    );
    let ls = env.json(Some("team-a"), &["image", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    env.refused(
        None,
        &["--project", "Bad", "image", "ls"],
        &["not a valid project name"],
    );
}
