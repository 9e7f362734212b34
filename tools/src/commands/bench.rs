//! `cairn bench NAME`: runs a benchmark program from benches/, which is
//! built beside `cairn` (same target directory) and kept out of this
//! binary, with what it measures against (QEMU, qemu-storage-daemon,
//! plotting). With `--json`, its tables go to stderr and its record (the
//! file every benchmark writes with `--json-out`) is printed on stdout as
//! one JSON object.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};

pub fn run(name: &str, args: &[String], store: Option<&str>, json: bool) -> Result<ExitCode> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("no benchmark named {name:?}");
    }
    let exe = std::env::current_exe().context("locating the cairn binary")?;
    let program = exe
        .parent()
        .context("the cairn binary has no directory")?
        .join(format!("{name}-bench"));
    if !program.exists() {
        bail!(
            "no benchmark named {name:?}: {} is missing (build it with `cargo build --release -p cairn-benches`)",
            program.display()
        );
    }
    let mut cmd = Command::new(&program);
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    cmd.args(args).env("CAIRN_BIN", &exe);
    if !json {
        let err = cmd.exec();
        return Err(err).with_context(|| format!("running {}", program.display()));
    }
    // The record: where the caller asked for it, else a temporary file.
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let asked = args
        .iter()
        .position(|a| a == "--json-out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let record = match asked {
        Some(path) => path,
        None => {
            let path = tmp.path().join("record.json");
            cmd.arg("--json-out").arg(&path);
            path
        }
    };
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr")?;
    let status = cmd
        .stdout(Stdio::from(stderr))
        .status()
        .with_context(|| format!("running {}", program.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", program.display());
    }
    let text = std::fs::read(&record)
        .with_context(|| format!("reading the benchmark's record {}", record.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("the benchmark's record {} is not JSON", record.display()))?;
    println!("{value}");
    Ok(ExitCode::SUCCESS)
}
