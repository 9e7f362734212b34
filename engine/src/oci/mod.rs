//! OCI images into cairn images: a registry, an OCI layout or a docker
//! archive in; a deterministic ext4 root disk, chunked and deduplicated
//! like any import, with the image's config beside it, out.
//!
//! The pipeline ([`import`]): resolve the reference to one image
//! ([`source`]), apply its layers in order to an in-memory [`tree`]
//! ([`layer`]; file bytes go to a spool file in the staging directory),
//! lay the tree out as ext4 ([`ext4`]) and stream that disk into the
//! chunk store ([`crate::import::import_pieces`]) with [`image::ImageMeta`]
//! as the manifest's meta. Nothing is written to the host's file system
//! from a layer's paths, so no entry can escape the image; nothing is
//! named here (the caller names the image once the import succeeded).
//!
//! Must not know: the CLI, progress bars, image names.

pub mod build;
pub mod digest;
pub mod error;
pub mod ext4;
pub mod image;
mod import;
pub mod layer;
pub mod reference;
pub mod source;
pub mod tree;

pub use error::OciError;
pub use import::{build_disk, import, import_layers, DiskStats, OciImport, OciProgress, Staged};

use std::path::PathBuf;

use crate::import::ImportOptions;
use layer::Limits;
use source::Platform;

/// How an OCI import runs.
#[derive(Debug, Clone)]
pub struct OciOptions {
    pub platform: Platform,
    /// The root disk's size; `None`: the content plus headroom.
    pub disk_size: Option<u64>,
    /// Plain HTTP to the registry.
    pub insecure: bool,
    /// The Docker config to read credentials from (default: `$DOCKER_CONFIG`
    /// or `~/.docker`).
    pub docker_config: Option<PathBuf>,
    pub limits: Limits,
    /// Chunking and staging; `meta` is replaced by the image's.
    pub import: ImportOptions,
    pub runtime: tokio::runtime::Handle,
}
