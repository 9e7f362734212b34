//! The VMM on the other end of a connection: who it is, whether it is
//! still there, and killing it first when a session ends without it.
//!
//! The process is named by a pidfd taken when the connection is accepted
//! (SO_PEERPIDFD; on kernels before 6.5, pidfd_open of the SO_PEERCRED pid
//! right away), never by its pid alone: a pid is reused once the process
//! is gone, a pidfd never names another process. The pidfd turns readable
//! when the VMM exits, which is how a session learns the resume is over
//! (Firecracker before 1.12 closes its socket right after the handshake,
//! so the socket says nothing).
//!
//! [`VmmGuard`] owns the server's copy of the userfaultfd. Armed once it
//! holds it (before that the VMM depends on nothing of ours) and dropped
//! while armed (the server failed, panicked, or was stopped while the VMM
//! runs), it kills the VMM before it closes the userfaultfd: a VMM left
//! running would hang on its next fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::process::{getpid, pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use userfaultfd::Uffd;

/// `SO_PEERPIDFD` (Linux 6.5, <asm-generic/socket.h>; the libc crate does
/// not have it for x86-64 yet).
const SO_PEERPIDFD: libc::c_int = 77;

/// The VMM process, as taken at accept.
#[derive(Debug)]
pub struct VmmProcess {
    pid: Option<Pid>,
    pidfd: Option<OwnedFd>,
}

impl VmmProcess {
    /// The process that connected `stream`.
    pub fn of_peer(stream: &UnixStream) -> VmmProcess {
        let pid = rustix::net::sockopt::socket_peercred(stream)
            .ok()
            .map(|c| c.pid);
        let pidfd = match peer_pidfd(stream) {
            Ok(fd) => Some(fd),
            Err(_) => pid.and_then(|pid| pidfd_open(pid, PidfdFlags::empty()).ok()),
        };
        if pidfd.is_none() {
            tracing::warn!(
                pid = pid.map(|p| p.as_raw_nonzero().get()),
                "no pidfd for the VMM: its exit is seen only when a copy finds its memory gone, and it cannot be killed"
            );
        }
        VmmProcess { pid, pidfd }
    }

    /// Process `pid`, named by a pidfd opened now.
    pub fn of_pid(pid: i32) -> io::Result<VmmProcess> {
        let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::other("pid 0 names no process"))?;
        Ok(VmmProcess {
            pid: Some(pid),
            pidfd: Some(pidfd_open(pid, PidfdFlags::empty())?),
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid.map(|p| p.as_raw_nonzero().get())
    }

    /// Whether the VMM is this very process (a test harness plays it).
    pub fn is_this_process(&self) -> bool {
        self.pid == Some(getpid())
    }

    /// Readable once the VMM has exited.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    pub fn has_exited(&self) -> bool {
        let Some(fd) = self.exit_fd() else {
            return false;
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec::default())), Ok(1))
    }

    /// Sends SIGKILL through the pidfd. Ok(false) when there was nothing to
    /// kill: the process is gone (its pid may name another one by now), it
    /// is this process, or there is no pidfd.
    pub fn kill(&self) -> io::Result<bool> {
        if self.is_this_process() {
            return Ok(false);
        }
        let Some(fd) = &self.pidfd else {
            return Ok(false);
        };
        match pidfd_send_signal(fd, Signal::KILL) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn peer_pidfd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one int) into `fd`,
    // which lives on this stack frame, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new descriptor for us;
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Owns the server's userfaultfd; kills the VMM first when dropped armed.
pub struct VmmGuard {
    vmm: VmmProcess,
    kill: bool,
    armed: bool,
    uffd: Option<Uffd>,
}

impl VmmGuard {
    /// Armed by [`VmmGuard::adopt`]; with `kill` false it only logs what
    /// it would have done.
    pub fn new(vmm: VmmProcess, kill: bool) -> VmmGuard {
        VmmGuard {
            vmm,
            kill,
            armed: false,
            uffd: None,
        }
    }

    pub fn vmm(&self) -> &VmmProcess {
        &self.vmm
    }

    /// Takes the userfaultfd the VMM passed, non-blocking whatever the VMM
    /// made it (its poll reports only errors otherwise, and a read would
    /// block the fault loop).
    pub fn adopt(&mut self, fd: File) -> io::Result<()> {
        let flags = fcntl_getfl(&fd)?;
        if !flags.contains(OFlags::NONBLOCK) {
            fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
        }
        // SAFETY: `fd` is a descriptor we own (received over SCM_RIGHTS);
        // ownership moves into the Uffd, which closes it once.
        let uffd = unsafe { Uffd::from_raw_fd(File::into_raw_fd(fd)) };
        self.uffd = Some(uffd);
        self.armed = true;
        Ok(())
    }

    /// The userfaultfd, once adopted and until the end.
    pub fn uffd(&self) -> Option<&Uffd> {
        self.uffd.as_ref()
    }

    /// The VMM is gone: nothing to kill.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Ends the resume now: kills the VMM if armed, then closes the
    /// userfaultfd. What dropping does, at a time of the caller's choosing.
    pub fn end(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.kill_vmm();
        }
        self.uffd = None;
    }

    fn kill_vmm(&self) {
        let pid = self.vmm.pid();
        if !self.kill {
            tracing::info!(
                pid,
                "the VMM may hang on its next fault (not killed: told not to)"
            );
        } else if self.vmm.is_this_process() {
            tracing::warn!(pid, "the VMM is this process: not killed");
        } else {
            match self.vmm.kill() {
                Ok(true) => tracing::error!(
                    pid,
                    "killed the VMM, which would otherwise hang on its next fault"
                ),
                Ok(false) => tracing::info!(pid, "the VMM had already gone"),
                Err(e) => tracing::error!(pid, error = %e, "killing the VMM failed"),
            }
        }
    }
}

impl Drop for VmmGuard {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command};

    fn sleeper() -> Child {
        Command::new("sleep").arg("1000").spawn().unwrap()
    }

    /// A new process with pid `pid`, made by setting the namespace's last
    /// pid just below it (root only). Other processes on the machine race
    /// for pids, so it tries a few times; None when it cannot.
    fn sleeper_with_pid(pid: i32) -> Option<Child> {
        for _ in 0..200 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
            let mut child = sleeper();
            if child.id() as i32 == pid {
                return Some(child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    /// A guard armed as if it held the VMM's userfaultfd (a descriptor
    /// stands in for it: the guard only owns and closes it).
    fn armed(vmm: VmmProcess, kill: bool) -> VmmGuard {
        let mut guard = VmmGuard::new(vmm, kill);
        guard.adopt(File::open("/dev/null").unwrap()).unwrap();
        guard
    }

    #[test]
    fn a_reused_pid_is_never_signalled() {
        let mut vmm_child = sleeper();
        let pid = vmm_child.id() as i32;
        let vmm = VmmProcess::of_pid(pid).unwrap();
        assert!(!vmm.has_exited());
        vmm_child.kill().unwrap();
        vmm_child.wait().unwrap();
        assert!(vmm.has_exited());
        let Some(mut reused) = sleeper_with_pid(pid) else {
            crate::uffd::harness::VmmHarness::missing_prerequisite(&format!(
                "cannot make a process take pid {pid} here (not root?)"
            ));
            return;
        };
        // The guard of a session whose VMM died and whose pid now names
        // another process: dropping it armed must leave that one alone.
        drop(armed(vmm, true));
        // End it with SIGTERM: it dies of SIGKILL only if the guard sent one.
        let pid = Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, Signal::TERM).unwrap();
        assert_eq!(
            reused.wait().unwrap().signal(),
            Some(libc::SIGTERM),
            "the process that took the VMM's pid was killed"
        );
    }

    #[test]
    fn an_armed_guard_kills_a_live_vmm_and_no_other_does() {
        let mut child = sleeper();
        drop(armed(VmmProcess::of_pid(child.id() as i32).unwrap(), true));
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        let mut child = sleeper();
        let vmm = || VmmProcess::of_pid(child.id() as i32).unwrap();
        let mut guard = armed(vmm(), true);
        guard.disarm();
        drop(guard);
        armed(vmm(), false).end();
        // Before the VMM handed over its userfaultfd, nothing is at stake.
        drop(VmmGuard::new(vmm(), true));
        let pid = Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, Signal::TERM).unwrap();
        assert_eq!(
            child.wait().unwrap().signal(),
            Some(libc::SIGTERM),
            "left alone"
        );

        let me = VmmProcess::of_pid(std::process::id() as i32).unwrap();
        assert!(me.is_this_process());
        assert!(!me.kill().unwrap(), "never this process");
    }
}
