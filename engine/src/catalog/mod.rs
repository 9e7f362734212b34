//! The catalog: projects, images, snapshots and sandboxes, kept in the
//! object store itself, so every host that shares a store shares it.
//!
//! Each record is a small JSON object at one key (`crate::layout`,
//! `docs/formats/catalog.md`). A name is taken with a conditional create
//! (`If-None-Match: *`, or a compare-and-swap over a removed name's
//! tombstone), and a record changes only by compare-and-swap on its
//! version (`If-Match` on the ETag): of two hosts racing for a name or a
//! state move, exactly one wins, and the other is told what happened.
//! No host keeps the truth in memory; a lookup by name is one GET, a page
//! of a listing one LIST.
//!
//! The functions here take the object store and are the engine's API for
//! the CLI and the daemon: [`image`] names and resolves images,
//! [`snapshot`] moves snapshots through their states and registers
//! completed ones as images, [`sandbox`] keeps named and unnamed
//! sandboxes with the host that serves each, fenced by a generation.
//! What must not be here: anything about VMMs, sockets or local paths.

mod error;
pub mod image;
mod names;
pub mod record;
pub mod sandbox;
pub mod snapshot;

pub use error::CatalogError;
pub use image::{ImageRecord, Made, NewImage};
pub use names::{
    check_name, check_project, check_sandbox_name, is_record_id, new_id, DEFAULT_PROJECT,
};
pub use record::Stored;
pub use sandbox::{NewSandbox, Owner, SandboxRecord, SandboxSource, SandboxState};
pub use snapshot::{NewSnapshot, SnapshotRecord, SnapshotState, SnapshotUri};

use crate::error::ErrorKind;
use crate::id::ManifestId;
use crate::layout;
use crate::manifest::Manifest;
use crate::objstore::{ListPage, ObjectStore};

/// The store's location as URIs name it: its URI without the endpoint an
/// S3 store's [`ObjectStore::uri`] adds for messages.
pub fn store_location(store: &dyn ObjectStore) -> &str {
    let uri = store.uri();
    uri.split_once(" (at ").map_or(uri, |(l, _)| l)
}

/// The manifest id a name (in `project`, or public) or an id names.
pub async fn resolve(
    store: &dyn ObjectStore,
    project: &str,
    name_or_id: &str,
) -> Result<ManifestId, CatalogError> {
    Ok(image::resolve(store, project, name_or_id).await?.id)
}

/// Fetches and checks (digest, format) manifest `id`.
pub async fn load_manifest(
    store: &dyn ObjectStore,
    id: &ManifestId,
) -> Result<Manifest, CatalogError> {
    let bytes = match store.get(&layout::manifest_key(id), None).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(CatalogError::NoSuchManifest {
                id: *id,
                store: store.uri().to_owned(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    Manifest::decode_verified(&bytes, *id)
        .map_err(|source| CatalogError::Manifest { id: *id, source })
}

/// One page of the last key segments under `prefix`: one LIST.
pub(crate) async fn list_names(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, Option<String>), CatalogError> {
    let after = start_after.map(|a| format!("{prefix}{a}"));
    let ListPage { keys, truncated } = store.list_page(prefix, after.as_deref(), limit).await?;
    let names: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter(|n| !n.contains('/'))
        .map(str::to_owned)
        .collect();
    let next = if truncated {
        keys.last()
            .and_then(|k| k.strip_prefix(prefix))
            .map(str::to_owned)
    } else {
        None
    };
    Ok((names, next))
}
