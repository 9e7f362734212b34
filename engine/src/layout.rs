//! Where things live in an object store: the key scheme of a cairn store.
//!
//! ```text
//! packs/<pack id>.pack      frames, index, footer
//! packs/<pack id>.idx       the pack's index and footer alone (one GET)
//! manifests/<manifest id>   canonical manifest bytes
//! refs/images/<name>        "<manifest id>\n" (before the catalog: read as
//!                           project `default`, never written)
//! wsets/<manifest id>       the recorded working set of a memory image
//! snapshots/<snapshot id>   a completed snapshot's durable descriptor
//! catalog/...               the catalog's records (below)
//! ```
//! Packs, manifests and snapshot descriptors are written once; `wsets/`
//! and `catalog/` change (catalog records only by compare-and-swap).
//!
//! The catalog (`docs/formats/catalog.md`):
//! ```text
//! catalog/images/<project>/<name>            an image name's record
//! catalog/public-images/<name>               a public name's claim (a copy)
//! catalog/snapshots/<project>/<snapshot id>  a snapshot's state
//! catalog/sandboxes/<project>/<name or id>   a sandbox: by name if named
//! catalog/sandbox-ids/<project>/<id>         a named sandbox's id -> name
//! ```

use crate::id::{ManifestId, PackId};

pub const PACKS: &str = "packs/";
pub const MANIFESTS: &str = "manifests/";
pub const IMAGE_REFS: &str = "refs/images/";
pub const WORKING_SETS: &str = "wsets/";

pub fn pack_key(id: &PackId) -> String {
    format!("{PACKS}{id}.pack")
}

pub fn pack_index_key(id: &PackId) -> String {
    format!("{PACKS}{id}.idx")
}

/// The pack id named by a `packs/<id>.idx` key.
pub fn pack_of_index_key(key: &str) -> Option<PackId> {
    key.strip_prefix(PACKS)?.strip_suffix(".idx")?.parse().ok()
}

/// The pack id named by a `packs/<id>.pack` key.
pub fn pack_of_key(key: &str) -> Option<PackId> {
    key.strip_prefix(PACKS)?.strip_suffix(".pack")?.parse().ok()
}

pub fn manifest_key(id: &ManifestId) -> String {
    format!("{MANIFESTS}{id}")
}

pub fn image_ref_key(name: &str) -> String {
    format!("{IMAGE_REFS}{name}")
}

pub fn working_set_key(id: &ManifestId) -> String {
    format!("{WORKING_SETS}{id}")
}

pub const SNAPSHOTS: &str = "snapshots/";
pub const CATALOG: &str = "catalog/";

/// A completed snapshot's durable descriptor (its URI is the store's
/// followed by this key).
pub fn snapshot_key(id: &str) -> String {
    format!("{SNAPSHOTS}{id}")
}

pub const VM_STATES: &str = "vmstate/";

/// An opaque VM-state blob (e.g. Firecracker's vmstate file), by the
/// BLAKE3 hash of its content.
pub fn vm_state_key(hash_hex: &str) -> String {
    format!("{VM_STATES}{hash_hex}")
}

/// Where a project's image names are listed.
pub fn images_prefix(project: &str) -> String {
    format!("{CATALOG}images/{project}/")
}

pub fn image_key(project: &str, name: &str) -> String {
    format!("{}{name}", images_prefix(project))
}

pub const PUBLIC_IMAGES: &str = "catalog/public-images/";

pub fn public_image_key(name: &str) -> String {
    format!("{PUBLIC_IMAGES}{name}")
}

pub fn snapshots_prefix(project: &str) -> String {
    format!("{CATALOG}snapshots/{project}/")
}

pub fn snapshot_record_key(project: &str, id: &str) -> String {
    format!("{}{id}", snapshots_prefix(project))
}

pub fn sandboxes_prefix(project: &str) -> String {
    format!("{CATALOG}sandboxes/{project}/")
}

/// A sandbox's record: under its name if it has one, else its id.
pub fn sandbox_key(project: &str, name_or_id: &str) -> String {
    format!("{}{name_or_id}", sandboxes_prefix(project))
}

pub fn sandbox_id_key(project: &str, id: &str) -> String {
    format!("{CATALOG}sandbox-ids/{project}/{id}")
}
