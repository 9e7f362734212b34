//! The userfaultfd page server: VM memory snapshots served lazily.
//!
//! A VMM resuming from a snapshot maps guest memory empty, registers it
//! with a userfaultfd and hands that to cairn over a Unix socket
//! (Firecracker's external page-fault handler protocol, [`handshake`]).
//! cairn answers each missing-page fault from the snapshot's chunks and
//! installs the recorded working set ahead of the guest. The engine side
//! (memory images, working sets) knows nothing of this.
//!
//! One connection ([`server`]): the VMM named by a pidfd ([`vmm`]), the
//! snapshot loaded beforehand ([`snapshot`]), a session ([`session`]) whose
//! fault loop ([`fault_loop`]) and prefetch workers ([`prefetch`]) meet in
//! the page bitmaps ([`pages`]) and the handoff ([`handoff`]), and a report
//! ([`report`]).

mod copy;
mod fault_loop;
pub mod handoff;
pub mod handshake;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
mod inject;
mod pages;
mod prefetch;
mod report;
pub mod server;
mod session;
mod snapshot;
mod stats;
mod stop;
pub mod vmm;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

use rustix::event::{poll, PollFd, PollFlags};

pub use handshake::{parse_regions, GuestRegion, HandshakeError};
pub use inject::{FaultInjector, InjectionPoint};
pub use report::ResumeReport;
pub use server::{
    serve_connection, DisplayChain, ServeConfig, ServeError, DEFAULT_FAULT_BYTES,
    DEFAULT_PREFETCH_WORKERS,
};
pub use session::End;
pub use snapshot::{Recorded, ServedSnapshot};
pub use stats::Histogram;
pub use stop::Stop;

/// Listens on `socket` (a stale socket file there is replaced), calls
/// `ready` once it accepts connections, then serves one VMM connection
/// after another, handing each resume's outcome to `done`, until `done`
/// returns false or `stop` is requested (which also ends a resume under
/// way, with its report).
pub fn serve(
    socket: &Path,
    snapshot: &ServedSnapshot,
    cfg: &ServeConfig,
    stop: &Stop,
    ready: impl FnOnce(),
    mut done: impl FnMut(Result<ResumeReport, ServeError>) -> bool,
) -> io::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    ready();
    while !stop.requested() {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if !done(serve_connection(snapshot, stream, cfg, stop)) {
            break;
        }
    }
    Ok(())
}
