//! `cairn daemon` on a store for the tests: a temporary directory with the
//! store (or a bucket on moto), one daemon or two (two hosts: each its own
//! socket, state directory and cache), and the CLI pointed at them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: String,
    /// Set on every `cairn` command (credentials for the store).
    pub envs: Vec<(String, String)>,
}

pub struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Waits for a daemon that ends by itself (a fault injector aborts it).
    pub fn ended(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Sends `signal` and waits for the process to end.
    pub fn signal(mut self, signal: &str) {
        let pid = self.child.id().to_string();
        super::run_ok(Command::new("kill").args([signal, &pid]));
        self.child.wait().unwrap();
    }
}

impl Env {
    /// A `file://` store in a fresh temporary directory.
    pub fn file() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}", dir.path().join("store").display());
        Env {
            dir,
            store,
            envs: Vec::new(),
        }
    }

    /// A fresh bucket on the S3 server at `endpoint` (with its keys).
    pub fn s3(endpoint: &str, key: &str, secret: &str) -> Env {
        let bucket = format!("cairn-{:08x}", fastrand::u32(..));
        Env {
            dir: tempfile::tempdir().unwrap(),
            store: format!("s3://{bucket}/store?endpoint={endpoint}"),
            envs: [
                ("AWS_ACCESS_KEY_ID", key),
                ("AWS_SECRET_ACCESS_KEY", secret),
                ("AWS_REGION", "us-east-1"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec(),
        }
    }

    /// A fresh bucket on moto's S3 server (`tools/dev/moto-server.sh`),
    /// whose conditional writes are atomic: the catalog's names hold there
    /// as on a real S3. moto checks no credentials; any are given.
    pub fn moto(tag: &str) -> Env {
        let endpoint = std::env::var("CAIRN_TEST_MOTO_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .expect(
                "CAIRN_TEST_MOTO_ENDPOINT is not set: eval \"$(tools/dev/moto-server.sh start)\" \
                 (tools/dev/test.sh does)",
            );
        let bucket = format!("cairn-{tag}-{:08x}", fastrand::u32(..));
        Env {
            dir: tempfile::tempdir().unwrap(),
            store: format!("s3://{bucket}/store?endpoint={endpoint}"),
            envs: [
                ("AWS_ACCESS_KEY_ID", "moto"),
                ("AWS_SECRET_ACCESS_KEY", "moto"),
                ("AWS_REGION", "us-east-1"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("daemon.sock")
    }

    fn command(&self, cache: &str, socket: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.envs(self.envs.iter().map(|(k, v)| (k, v)))
            .args(["--store", &self.store, "--cache-dir"])
            .arg(self.path(cache))
            .arg("--daemon")
            .arg(self.path(socket));
        c
    }

    /// `cairn` on the store, with the first host's cache and daemon.
    pub fn cairn(&self) -> Command {
        self.command("cache", "daemon.sock")
    }

    /// Starts the daemon and waits for its ready line.
    pub fn daemon(&self) -> (Daemon, Value) {
        self.daemon_with(&[])
    }

    /// [`Env::daemon`] with extra environment (fault injectors).
    pub fn daemon_with(&self, envs: &[(&str, &str)]) -> (Daemon, Value) {
        self.start_daemon(self.cairn(), "state", envs)
    }

    /// A second host on the same store: its own daemon socket, state
    /// directory and cache. Its commands come from [`Env::cairn_b`].
    pub fn daemon_b(&self) -> (Daemon, Value) {
        self.start_daemon(self.cairn_b(), "state-b", &[])
    }

    pub fn cairn_b(&self) -> Command {
        self.command("cache-b", "daemon-b.sock")
    }

    fn start_daemon(
        &self,
        mut cairn: Command,
        state: &str,
        envs: &[(&str, &str)],
    ) -> (Daemon, Value) {
        let mut child = cairn
            .envs(envs.iter().copied())
            // The tests' VMMs (the uffd harness) are the test process.
            .args(["--json", "daemon", "--no-kill-vmm", "--state-dir"])
            .arg(self.path(state))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {line:?}"));
        assert_eq!(ready["ready"], true, "{line}");
        (Daemon { child }, ready)
    }

    /// `cairn --json sandbox ARGS`, which must succeed: its JSON.
    pub fn sandbox(&self, args: &[&str]) -> Value {
        sandbox_via(self.cairn(), args)
    }

    /// `cairn sandbox ARGS`, which must fail: its output.
    pub fn sandbox_fails(&self, args: &[&str]) -> Output {
        let out = self.cairn().arg("sandbox").args(args).output().unwrap();
        assert!(!out.status.success(), "sandbox {args:?} succeeded");
        out
    }

    /// `cairn --json ARGS` (not a sandbox command), which must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = super::run_ok(self.cairn().arg("--json").args(args));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits (up to 30 s) for sandbox `key` to stand on `n` layers.
    pub fn eventually_layers(&self, key: &str, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let d = self.sandbox(&["describe", key]);
            if d["layers"] == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key} still has {} layers, not {n}",
                d["layers"]
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits for snapshot `id` to leave pending and uploading.
    pub fn settled(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let d = self.json(&["snapshot", "describe", id]);
            let state = d["state"].as_str().unwrap_or_default().to_owned();
            if state == "completed" || state == "failed" {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "snapshot {id} still {state} after 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `cairn --json sandbox ARGS` through `cmd`, which must succeed.
pub fn sandbox_via(mut cmd: Command, args: &[&str]) -> Value {
    let out = super::run_ok(cmd.args(["--json", "sandbox"]).args(args));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A GET over the daemon's socket, raw HTTP/1.1: the body.
pub fn http_get(socket: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: cairn\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}
