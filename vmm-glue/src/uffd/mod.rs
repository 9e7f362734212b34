//! The userfaultfd page server: VM memory snapshots served lazily.
//!
//! A VMM resuming from a snapshot maps guest memory empty, registers it
//! with a userfaultfd and hands that to cairn over a Unix socket
//! (Firecracker's external page-fault handler protocol, [`handshake`]).
//! cairn answers each missing-page fault from the snapshot's chunks
//! ([`server`]), and installs the recorded working set ahead of the guest.
//! The engine side (memory images, working sets) knows nothing of this.

mod copy;
pub mod handshake;
pub mod harness;
mod pages;
pub mod server;
mod stats;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

pub use handshake::{parse_regions, GuestRegion, HandshakeError};
pub use server::{
    serve_connection, DisplayChain, ResumeReport, ServeConfig, ServeError, ServedSnapshot,
    DEFAULT_FAULT_BYTES, DEFAULT_PREFETCH_WORKERS,
};
pub use stats::Histogram;

/// Listens on `socket` (a stale socket file there is replaced), calls
/// `ready` once it accepts connections, then serves one VMM connection
/// after another, handing each resume's outcome to `done`, until `done`
/// returns false.
pub fn serve(
    socket: &Path,
    snapshot: &ServedSnapshot,
    cfg: &ServeConfig,
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
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if !done(serve_connection(snapshot, stream, cfg)) {
            break;
        }
    }
    Ok(())
}
