//! Where RUN steps execute: a small interface, so that a VM-based builder
//! can replace the namespace sandbox, and bubblewrap behind it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::oci::error::OciError;

/// One RUN step to execute.
pub struct Run<'a> {
    /// The build's root file system on the host (becomes `/`).
    pub root: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub workdir: &'a str,
}

/// Runs commands over a root file system, isolated from the host.
pub trait Sandbox {
    fn run(&self, run: &Run<'_>) -> Result<(), OciError>;
}

/// bubblewrap: its own mount, pid, ipc and uts namespaces, the build root
/// as `/`, a fresh `/proc` and `/dev`, no host path visible but a copy of
/// the host's resolver configuration; the host's network (package mirrors
/// must be reachable).
pub struct Bubblewrap {
    /// A copy of the host's `/etc/resolv.conf`, bound read-only.
    pub resolv_conf: Option<PathBuf>,
}

impl Sandbox for Bubblewrap {
    fn run(&self, r: &Run<'_>) -> Result<(), OciError> {
        let mut c = Command::new("bwrap");
        c.arg("--bind").arg(r.root).arg("/");
        c.args(["--proc", "/proc", "--dev", "/dev"]);
        c.args([
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "cairn-build",
        ]);
        c.args(["--die-with-parent", "--new-session", "--clearenv"]);
        if let Some(resolv) = &self.resolv_conf {
            if r.root.join("etc").is_dir() && !r.root.join("etc/resolv.conf").is_symlink() {
                c.arg("--ro-bind").arg(resolv).arg("/etc/resolv.conf");
            }
        }
        for (k, v) in r.env {
            c.args(["--setenv", k, v]);
        }
        c.args(["--chdir", r.workdir]);
        c.arg("--").args(r.argv);
        // The step's output goes to stderr: stdout is for results.
        let err = std::io::stderr();
        let out = std::os::fd::AsFd::as_fd(&err)
            .try_clone_to_owned()
            .map_err(|e| OciError::io("cannot pass stderr to", "bwrap", e))?;
        c.stdin(Stdio::null()).stdout(Stdio::from(out));
        let status = c.status().map_err(|e| {
            OciError::Build(format!(
                "cannot start bwrap ({e}): install bubblewrap (tools/dev/setup.sh does)"
            ))
        })?;
        if !status.success() {
            return Err(OciError::Build(format!(
                "RUN {} failed: {status}",
                r.argv.join(" ")
            )));
        }
        Ok(())
    }
}
