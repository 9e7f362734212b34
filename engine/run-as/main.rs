//! `cairn-run-as UID GID GROUPS PROGRAM [ARG...]`: becomes UID, with GID
//! and the supplementary GROUPS (comma-separated, possibly empty), then
//! executes PROGRAM (found on PATH). A RUN step under a non-root USER runs
//! through it inside the build sandbox (see `src/oci/build/sandbox.rs`).
//!
//! It is built by `build.rs` as its own static executable (no cargo
//! dependency, glibc linked in), since it runs in the image's root file
//! system, which may have no C library or a different one. The engine
//! embeds its bytes. Its unsafe code is three calls into the C library,
//! the only way to set the supplementary groups from Rust's standard
//! library (`CommandExt::groups` is unstable).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

extern "C" {
    fn setgroups(size: usize, list: *const u32) -> i32;
    fn setresgid(rgid: u32, egid: u32, sgid: u32) -> i32;
    fn setresuid(ruid: u32, euid: u32, suid: u32) -> i32;
}

fn fail(what: &str, e: std::io::Error) -> ExitCode {
    eprintln!("cairn-run-as: {what}: {e}");
    ExitCode::from(127)
}

fn check(rc: i32) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [uid, gid, groups, program, rest @ ..] = args.as_slice() else {
        eprintln!("usage: cairn-run-as UID GID GROUPS PROGRAM [ARG...]");
        return ExitCode::from(127);
    };
    let id = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| std::io::Error::other(format!("`{s}` is not a numeric id")))
    };
    let ids = (|| {
        let groups = groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(id)
            .collect::<std::io::Result<Vec<u32>>>()?;
        Ok::<_, std::io::Error>((id(uid)?, id(gid)?, groups))
    })();
    let (uid, gid, groups) = match ids {
        Ok(v) => v,
        Err(e) => return fail("bad arguments", e),
    };
    // Groups first and the user last: once the user is not root, the
    // process may no longer change its groups.
    // SAFETY: `groups` is a live slice of `groups.len()` gid_t (u32) values
    // that setgroups only reads.
    if let Err(e) = check(unsafe { setgroups(groups.len(), groups.as_ptr()) }) {
        return fail("cannot set the supplementary groups", e);
    }
    // SAFETY: plain integer arguments; no memory is shared.
    if let Err(e) = check(unsafe { setresgid(gid, gid, gid) }) {
        return fail(&format!("cannot set the group id to {gid}"), e);
    }
    // SAFETY: plain integer arguments; no memory is shared.
    if let Err(e) = check(unsafe { setresuid(uid, uid, uid) }) {
        return fail(&format!("cannot set the user id to {uid}"), e);
    }
    let e = Command::new(program).args(rest).exec();
    fail(&format!("cannot run {program}"), e)
}
