//! cairn's VMM-facing side: what speaks virtio, vhost-user and userfaultfd.
//!
//! Everything here sits on top of `cairn-engine` and adds only transport: the
//! engine sees bytes and offsets, this crate turns them into virtio-blk
//! requests and page-fault answers. So far: virtio-blk request parsing
//! (`blk::request`); the vhost-user-blk backend and the page server come next.

pub mod activity;
pub mod blk;
pub mod uffd;

pub use cairn_engine as engine;
