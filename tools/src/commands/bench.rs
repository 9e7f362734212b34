//! `cairn bench NAME`: runs a benchmark program from benches/, which is
//! built beside `cairn` (same target directory) and kept out of this
//! binary, with what it measures against (QEMU, qemu-storage-daemon,
//! plotting).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

pub fn run(name: &str, args: &[String], store: Option<&str>) -> Result<ExitCode> {
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
    let err = cmd.args(args).env("CAIRN_BIN", &exe).exec();
    Err(err).with_context(|| format!("running {}", program.display()))
}
