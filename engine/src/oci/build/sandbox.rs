//! Where RUN steps execute: a small interface, so that a VM-based builder
//! can replace the namespace sandbox, and bubblewrap behind it.
//!
//! A step under a non-root USER: bubblewrap runs as the host's root (as for
//! every step: it needs the build root, which may sit in a directory only
//! root can enter), sets up the sandbox, and then runs the command through
//! `cairn-run-as` (`engine/run-as/main.rs`, a static executable built by
//! `build.rs` and embedded here), which sets the groups, the gid and the uid
//! and executes the command. Nothing maps ids: the command's uid is the
//! host's, so the kernel checks its access to the build root's files
//! exactly as it would in the image, and what it creates is owned by that
//! uid and gid, which the layer records. The helper is bound read-only at
//! `/dev/.cairn-run-as`, inside the sandbox's own `/dev` (a tmpfs): the
//! step sees it, the build root never holds it, and no host path shows.
//!
//! Why not bubblewrap's own `--uid`/`--gid`: they need a user namespace.
//! With `--unshare-user` bubblewrap maps the sandbox uid to its own (root),
//! so files would be owned by root and root-only files writable; with
//! `--userns` (an identity-mapped namespace) it changes uid before gid (so
//! the gid change fails) and sets the sandbox up after dropping to the uid
//! (so it cannot reach a build root under `/root`). Why not the image's own
//! `setpriv` or `su`: many images have neither, or no passwd entry for a
//! numeric USER.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::oci::error::OciError;

/// The executable `build.rs` makes from `run-as/main.rs`.
const RUN_AS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cairn-run-as"));

/// Where a step finds [`RUN_AS`].
const RUN_AS_PATH: &str = "/dev/.cairn-run-as";

/// Numeric ids a step runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Identity {
    /// Root with no supplementary group: a step runs as the sandbox starts.
    pub fn is_root(&self) -> bool {
        self.uid == 0 && self.gid == 0 && self.groups.is_empty()
    }
}

/// One RUN step to execute.
pub struct Run<'a> {
    /// The build's root file system on the host (becomes `/`).
    pub root: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub workdir: &'a str,
    pub user: &'a Identity,
}

/// The helper written beside the build root for one step, removed after.
struct HelperFile(PathBuf);

impl HelperFile {
    fn write(root: &Path) -> Result<HelperFile, OciError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let name = format!(".cairn-run-as-{:016x}", fastrand::u64(..));
        let p = root.parent().unwrap_or(root).join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o555)
            .open(&p)
            .map_err(|e| OciError::io("cannot write", &p, e))?;
        let file = HelperFile(p);
        f.write_all(RUN_AS)
            .map_err(|e| OciError::io("cannot write", &file.0, e))?;
        Ok(file)
    }
}

impl Drop for HelperFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
        let helper = if r.user.is_root() {
            c.arg("--");
            None
        } else {
            let h = HelperFile::write(r.root)?;
            c.arg("--ro-bind").arg(&h.0).arg(RUN_AS_PATH);
            let groups: Vec<String> = r.user.groups.iter().map(u32::to_string).collect();
            c.args(["--", RUN_AS_PATH])
                .arg(r.user.uid.to_string())
                .arg(r.user.gid.to_string())
                .arg(groups.join(","));
            Some(h)
        };
        c.args(r.argv);
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
        drop(helper);
        if !status.success() {
            let who = if r.user.is_root() {
                String::new()
            } else {
                format!(" (as uid {}, gid {})", r.user.uid, r.user.gid)
            };
            return Err(OciError::Build(format!(
                "RUN {}{who} failed: {status}",
                r.argv.join(" ")
            )));
        }
        Ok(())
    }
}
