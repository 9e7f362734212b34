//! Two processes race for the same names and the same records, round
//! after round, against moto's S3 server (conditional writes atomic) and
//! a `file://` store: of two hosts, exactly one wins each name, each state
//! move and each take-over, and the record says which.
//!
//! The racers are this test binary run again (`race_child`, ignored in a
//! normal run), one per host, each started on a line from the parent so
//! that both race within microseconds of each other.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use cairn_engine::catalog::{
    sandbox, snapshot, CatalogError, NewSandbox, NewSnapshot, SandboxSource, SandboxState,
};
use cairn_engine::objstore::{FileStore, ObjectStore, Resilient, S3Store};
use cairn_engine::ManifestId;

const ROUNDS: usize = 30;
const PROJECT: &str = "race";

fn source() -> SandboxSource {
    SandboxSource::Image(ManifestId::of(b"race image"))
}

/// The store a racer opens: `file:///dir` or `moto:BUCKET`.
async fn open(spec: &str) -> Arc<dyn ObjectStore> {
    if let Some(bucket) = spec.strip_prefix("moto:") {
        let s3 = S3Store::connect(&common::moto_options(bucket)).await;
        return Arc::new(Resilient::new(Arc::new(s3), common::fast_retries(), 8));
    }
    let dir = spec.strip_prefix("file://").expect("file:// or moto:");
    Arc::new(FileStore::open(std::path::Path::new(dir)).unwrap())
}

fn outcome<T>(r: Result<T, CatalogError>) -> String {
    match r {
        Ok(_) => "won".to_owned(),
        Err(e) if e.kind() == cairn_engine::ErrorKind::Conflict => "lost".to_owned(),
        Err(e) => format!("error:{}", e.to_string().replace(' ', "_")),
    }
}

#[test]
#[ignore = "a racer: run by the race tests as a child process"]
fn race_child() {
    let spec = std::env::var("CAIRN_RACE_STORE").expect("run by the race tests");
    let host = std::env::var("CAIRN_RACE_HOST").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(open(&spec));
    let s = store.as_ref();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        let (Some("go"), Some(round), Some(snap)) = (words.next(), words.next(), words.next())
        else {
            break;
        };
        let (name, moved, took) = rt.block_on(async {
            let new = NewSandbox {
                project: PROJECT.into(),
                name: Some(format!("name-{round}")),
                source: source(),
                host: host.clone(),
            };
            let name = outcome(sandbox::create(s, new).await);
            let moved = outcome(snapshot::start_upload(s, PROJECT, snap, &host).await);
            let took =
                outcome(sandbox::take(s, PROJECT, &format!("take-{round}"), &host, false).await);
            (name, moved, took)
        });
        println!("race {round} {name} {moved} {took}");
        std::io::stdout().flush().unwrap();
    }
}

struct Racer {
    host: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Racer {
    fn start(spec: &str, host: &str) -> Racer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "race_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CAIRN_RACE_STORE", spec)
            .env("CAIRN_RACE_HOST", host)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Racer {
            host: host.to_owned(),
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// The racer's outcomes of `round`: name, move, take.
    fn result(&mut self, round: usize) -> [String; 3] {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "{} exited",
                self.host
            );
            // libtest's "test race_child ... " may stand before the first.
            if let Some((_, rest)) = line.split_once(&format!("race {round} ")) {
                let w: Vec<_> = rest.split_whitespace().map(str::to_owned).collect();
                return [w[0].clone(), w[1].clone(), w[2].clone()];
            }
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn race(spec: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(open(spec));
    let s = store.as_ref();
    let mut racers = [Racer::start(spec, "host-a"), Racer::start(spec, "host-b")];
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        // The record both move, and the suspended sandbox both take.
        let (snap, owner) = rt.block_on(async {
            let new = NewSnapshot {
                project: PROJECT.into(),
                parent: None,
                image: None,
                sandbox: None,
                host: "parent".into(),
            };
            let snap = snapshot::create(s, new).await.unwrap();
            let sb = sandbox::create(
                s,
                NewSandbox {
                    project: PROJECT.into(),
                    name: Some(format!("take-{round}")),
                    source: source(),
                    host: "parent".into(),
                },
            )
            .await
            .unwrap();
            let key = sb.key().to_owned();
            let o = sb.owner();
            sandbox::set_state(s, PROJECT, &key, &o, SandboxState::Suspending, None)
                .await
                .unwrap();
            sandbox::set_state(
                s,
                PROJECT,
                &key,
                &o,
                SandboxState::Suspended,
                Some(&snap.id),
            )
            .await
            .unwrap();
            (snap.id, o)
        });
        assert_eq!(owner.generation, 1);
        for r in racers.iter_mut() {
            writeln!(r.stdin, "go {round} {snap}").unwrap();
        }
        let results = [racers[0].result(round), racers[1].result(round)];
        let (name, moved, took) = rt.block_on(async {
            (
                sandbox::get(s, PROJECT, &format!("name-{round}"))
                    .await
                    .unwrap()
                    .unwrap()
                    .record,
                snapshot::get(s, PROJECT, &snap)
                    .await
                    .unwrap()
                    .unwrap()
                    .record,
                sandbox::get(s, PROJECT, &format!("take-{round}"))
                    .await
                    .unwrap()
                    .unwrap()
                    .record,
            )
        });
        let holders = [name.host, moved.host, took.host];
        for race in 0..3 {
            let won: Vec<usize> = (0..2).filter(|&i| results[i][race] == "won").collect();
            let lost: Vec<usize> = (0..2).filter(|&i| results[i][race] == "lost").collect();
            assert!(
                won.len() == 1 && lost.len() == 1,
                "round {round}, race {race}: {results:?}"
            );
            assert_eq!(
                holders[race], racers[won[0]].host,
                "round {round}, race {race}"
            );
            wins[won[0]] += 1;
        }
        assert_eq!((took.generation, took.state), (2, SandboxState::Running));
    }
    // Both hosts won some: the races were real, not one host always first.
    assert!(wins.iter().all(|&w| w > 0), "wins per host: {wins:?}");
}

#[test]
fn two_processes_never_both_win_a_name_or_a_move_on_moto() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = common::unique("t-race");
    rt.block_on(async {
        let s3 = S3Store::connect(&common::moto_options(&bucket)).await;
        s3.ensure_bucket().await
    })
    .unwrap();
    race(&format!("moto:{bucket}"));
}

#[test]
fn two_processes_never_both_win_a_name_or_a_move_on_file() {
    let dir = tempfile::tempdir().unwrap();
    race(&format!("file://{}", dir.path().display()));
}
