//! Garbage collection: deleting what nothing references, safely while
//! other hosts write into the same store, with no lock they must take.
//!
//! The rule (`docs/gc.md` has the argument): a run marks everything the
//! catalog references, **condemns** what is unreferenced (writes it into
//! `gc/state` with the time), and deletes only what an earlier run
//! condemned at least the grace period before this run's mark began and
//! this mark still finds unreferenced. Writers ([`guard`]) read the state
//! when their session starts and never rely on what is condemned then;
//! what is condemned later cannot be deleted before their session (shorter
//! than the grace period) has committed its roots, which the deleting
//! run's mark then sees. Packs that are mostly dead are rewritten: their
//! live frames copied into new packs, then the old pack condemned.
//!
//! One run at a time holds a lease in the state; writers never wait for it.

pub mod guard;
mod homes;
pub mod hosts;
mod plan;
mod roots;
mod run;
pub(crate) mod spill;
pub mod state;

use std::path::PathBuf;

use crate::catalog::CatalogError;
use crate::error::ErrorKind;
use crate::id::PackId;
use crate::locate::LocateError;
use crate::objstore::StoreError;
use crate::pack::PackError;

pub use guard::{keep, WriterView};
pub use plan::{pack_bytes, plan, Marked, Plan, Rewrite, Rules};
pub use run::{run, GcOptions, GcReport};

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the catalog's roots: {0}; nothing was deleted")]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error("writing a rewritten pack: {0}")]
    Pack(#[from] PackError),
    #[error("pack {pack} has a bad frame, so it is not rewritten: {detail} (`cairn verify --deep` says more)")]
    BadFrame { pack: PackId, detail: String },
    #[error("staging directory {path}")]
    Staging {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another garbage collection holds the store ({by}, for {secs_left} s more); run again later")]
    Busy { by: String, secs_left: u64 },
    #[error("this run's lease on the store ran out or was taken over; what it decided is kept and the next run goes on from there")]
    LostLease,
    #[error("cannot forget a host's roots: {0}; nothing was deleted")]
    Forget(#[from] hosts::Unforgettable),
}

impl GcError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            GcError::Store(e) => e.kind(),
            GcError::Catalog(e) => e.kind(),
            GcError::Locate(e) => e.kind(),
            GcError::Pack(e) => e.kind(),
            GcError::BadFrame { .. } => ErrorKind::Corrupt,
            GcError::Staging { .. } => ErrorKind::Io,
            GcError::Busy { .. } | GcError::LostLease => ErrorKind::Conflict,
            GcError::Forget(hosts::Unforgettable::Unknown(_)) => ErrorKind::NotFound,
            GcError::Forget(hosts::Unforgettable::Alive { .. }) => ErrorKind::Conflict,
        }
    }
}
