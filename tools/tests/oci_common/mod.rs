//! Shared by the OCI test binaries: the fixture layouts and a `cairn` on a
//! fresh `file://` store.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

use crate::common;

/// The layouts `fixtures/build-oci-layouts.py` builds (once per binary).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oci-fixtures");
        common::run_ok(
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/build-oci-layouts.py"))
                .arg(&out),
        );
        out
    })
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: String,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}", dir.path().join("store").display());
        Env { dir, store }
    }

    /// DOCKER_CONFIG for every command: the test's own (credential
    /// helpers put there are on PATH), never the user's.
    pub fn docker_config(&self) -> PathBuf {
        let d = self.dir.path().join("docker");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(["--store", &self.store, "--cache-dir"])
            .arg(self.dir.path().join("cache"))
            .args(["--cache-size", "256M"])
            .env("DOCKER_CONFIG", self.docker_config())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.docker_config().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        c
    }

    pub fn cairn(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    pub fn ok_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cairn(&all);
        assert!(
            out.status.success(),
            "cairn {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Image names in the store.
    pub fn names(&self) -> Vec<String> {
        self.ok_json(&["image", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
