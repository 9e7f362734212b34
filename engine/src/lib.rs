//! cairn's storage core: a content-addressed chunk store for VM disks and
//! memory, with no knowledge of any VMM.
//!
//! Bytes flow: an image is cut into fixed-size chunks named by their
//! BLAKE3 id ([`id`]); each stored chunk is written as a CRC-checked,
//! usually zstd-compressed [`frame`]; frames are appended to [`pack`]s that
//! live in an [`objstore`] (a directory or an S3 bucket); a [`manifest`]
//! lists an image's chunks and is itself content-addressed.
//!
//! Invariants: bytes from a remote tier are checked against their BLAKE3
//! id before anything uses or caches them; local bytes are checked by CRC
//! on every read; all-zero chunks are never stored.

// Two audited exceptions: the cache maps its own files (`cache::entry`),
// and `sched` sets threads' scheduling with system calls.
#![deny(unsafe_code)]

pub mod cache;
pub mod error;
pub mod frame;
pub mod gc;
pub mod id;
pub mod le;
pub mod manifest;
pub mod memory;
pub mod objstore;
pub mod overlay;
pub mod pack;
pub mod sched;
pub mod size;

pub use error::ErrorKind;
pub use id::{ChunkId, ManifestId, PackId};
pub mod catalog;
pub mod chunkstore;
pub mod disk;
pub mod export;
pub mod import;
pub mod layout;
pub mod locate;
pub mod oci;
pub mod snapshot;
pub mod verify;
