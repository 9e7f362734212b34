//! What can go wrong with a catalog operation, and its kind.

use crate::error::ErrorKind;
use crate::id::ManifestId;
use crate::manifest::ManifestError;
use crate::objstore::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no image named `{name}` in project `{project}` of {store}, nor a public one (see `cairn image ls`)")]
    NoSuchImage {
        name: String,
        project: String,
        store: String,
    },
    #[error("no manifest {id} in {store}")]
    NoSuchManifest { id: ManifestId, store: String },
    #[error("manifest {id} is referenced by no image, snapshot or sandbox and garbage collection has condemned it: it cannot be named again; import the image again")]
    Condemned { id: ManifestId },
    #[error("`{name}` is not a valid {what}: {rule}")]
    BadName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    #[error("catalog record `{key}` is unreadable: {detail} (a record written by a newer cairn, or damaged)")]
    BadRecord { key: String, detail: String },
    #[error("the {what} name `{name}` is taken in project `{project}` (by {holder}): remove it first or choose another name")]
    NameTaken {
        what: &'static str,
        name: String,
        project: String,
        holder: String,
    },
    #[error("the public image name `{name}` is taken by project `{owner}`: public names are unique in the store; choose another name")]
    PublicNameTaken { name: String, owner: String },
    #[error("no snapshot {id} in project `{project}` of {store} (see `cairn snapshot ls`)")]
    NoSuchSnapshot {
        id: String,
        project: String,
        store: String,
    },
    #[error("snapshot {id} belongs to project `{owner}`, not `{project}`: pass --project {owner}")]
    SnapshotOfOtherProject {
        id: String,
        project: String,
        owner: String,
    },
    #[error("snapshot {uri} is in another store than {store}: register it with --store pointing at its store")]
    ForeignSnapshot { uri: String, store: String },
    #[error("`{uri}` is not a snapshot URI: {why} (expected STORE/snapshots/ID, as `cairn snapshot describe` prints)")]
    BadSnapshotUri { uri: String, why: &'static str },
    #[error("snapshot {id} cannot be registered: it is {state}{detail}")]
    NotRegistrable {
        id: String,
        state: &'static str,
        detail: String,
    },
    #[error("snapshot {id} is marked completed but its durable object {key} is missing from {store}: it cannot be registered")]
    NotDurable {
        id: String,
        key: String,
        store: String,
    },
    #[error("{what} {id} cannot move from {from} to {to}")]
    IllegalMove {
        what: &'static str,
        id: String,
        from: String,
        to: String,
    },
    #[error("sandbox {id} is served by {host} (generation {generation}), not by {caller} (generation {caller_generation}): this host lost ownership")]
    Fenced {
        id: String,
        host: String,
        generation: u64,
        caller: String,
        caller_generation: u64,
    },
    #[error("no sandbox `{key}` in project `{project}` of {store} (see `cairn sandbox ls`)")]
    NoSuchSandbox {
        key: String,
        project: String,
        store: String,
    },
    #[error("{what} {id} is {state}: {hint}")]
    Busy {
        what: &'static str,
        id: String,
        state: String,
        hint: &'static str,
    },
    #[error("record `{key}` kept changing under {attempts} attempts to update it; try again")]
    Contended { key: String, attempts: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("manifest {id} is unreadable")]
    Manifest {
        id: ManifestId,
        #[source]
        source: ManifestError,
    },
}

impl CatalogError {
    pub fn kind(&self) -> ErrorKind {
        use CatalogError::*;
        match self {
            NoSuchImage { .. }
            | NoSuchManifest { .. }
            | Condemned { .. }
            | NoSuchSnapshot { .. }
            | NoSuchSandbox { .. } => ErrorKind::NotFound,
            BadName { .. } | BadSnapshotUri { .. } | ForeignSnapshot { .. } => {
                ErrorKind::InvalidInput
            }
            SnapshotOfOtherProject { .. } => ErrorKind::InvalidInput,
            BadRecord { .. } | NotDurable { .. } => ErrorKind::Corrupt,
            NameTaken { .. }
            | PublicNameTaken { .. }
            | NotRegistrable { .. }
            | IllegalMove { .. }
            | Fenced { .. }
            | Busy { .. } => ErrorKind::Conflict,
            Contended { .. } => ErrorKind::Transient,
            Store(e) => e.kind(),
            Manifest { source, .. } => source.kind(),
        }
    }
}
