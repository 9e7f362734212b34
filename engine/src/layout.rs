//! Where things live in an object store: the key scheme of a cairn store.
//!
//! ```text
//! packs/<pack id>.pack      frames, index, footer
//! packs/<pack id>.idx       the pack's index and footer alone (one GET)
//! manifests/<manifest id>   canonical manifest bytes
//! refs/images/<name>        "<manifest id>\n"
//! wsets/<manifest id>       the recorded working set of a memory image
//! ```
//! Everything but `refs/` and `wsets/` is content-addressed and written once.

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

pub fn manifest_key(id: &ManifestId) -> String {
    format!("{MANIFESTS}{id}")
}

pub fn image_ref_key(name: &str) -> String {
    format!("{IMAGE_REFS}{name}")
}

pub fn working_set_key(id: &ManifestId) -> String {
    format!("{WORKING_SETS}{id}")
}
