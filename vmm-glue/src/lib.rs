//! cairn's VMM-facing side: what speaks virtio, vhost-user and userfaultfd.
//!
//! Everything here sits on top of `cairn-engine` and adds only transport: the
//! engine sees bytes and offsets, this crate turns them into virtio-blk
//! requests and page-fault answers. Nothing here yet: the vhost-user-blk
//! backend (issue 3) and the page server (issue 4) land in this crate.

pub use cairn_engine as engine;
