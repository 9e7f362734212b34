//! Snapshot records: pending, uploading, completed (with a durable URI)
//! or failed (with the reason), moved only forward and only by
//! compare-and-swap, so two hosts never both move one snapshot.
//!
//! ```text
//! pending ──▶ uploading ──▶ completed
//!    │            │
//!    └────────────┴───────▶ failed
//! ```
//! Completing writes the snapshot's durable descriptor
//! `snapshots/<id>` (once, if absent) before the record says completed;
//! the snapshot's URI is the store's location followed by that key. Only
//! a completed snapshot whose descriptor is in this store can be
//! registered as an image.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::image::{self, ImageRecord, Made, NewImage};
use super::record::{self, as_text, Kind, Stored};
use super::{check_project, is_record_id, new_id, store_location, CatalogError};
use crate::id::ManifestId;
use crate::layout;
use crate::objstore::{Conditional, ObjectStore, Precondition};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Uploading,
    Completed,
    Failed,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Uploading => "uploading",
            SnapshotState::Completed => "completed",
            SnapshotState::Failed => "failed",
        }
    }

    /// The moves the state machine allows.
    pub fn can_move_to(self, to: SnapshotState) -> bool {
        use SnapshotState::*;
        matches!(
            (self, to),
            (Pending, Uploading) | (Pending, Failed) | (Uploading, Completed) | (Uploading, Failed)
        )
    }

    /// Completed and failed snapshots never move again.
    pub fn is_final(self) -> bool {
        matches!(self, SnapshotState::Completed | SnapshotState::Failed)
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub project: String,
    /// The snapshot this one was taken over (a sandbox's previous one).
    pub parent: Option<String>,
    /// The image the sandbox's disk descends from.
    #[serde(with = "as_text::option")]
    pub image: Option<ManifestId>,
    /// The sandbox it was taken of.
    pub sandbox: Option<String>,
    /// The host taking and uploading it.
    pub host: String,
    pub created: String,
    pub updated: String,
    pub state: SnapshotState,
    /// Why it failed.
    pub reason: Option<String>,
    /// The disk's manifest, once uploaded.
    #[serde(with = "as_text::option")]
    pub disk: Option<ManifestId>,
    /// The memory image's manifest, if memory was taken.
    #[serde(with = "as_text::option")]
    pub memory: Option<ManifestId>,
    /// The key of the opaque VM-state blob (e.g. Firecracker's vmstate).
    pub vm_state: Option<String>,
    /// The durable URI, once completed.
    pub uri: Option<String>,
}

impl Kind for SnapshotRecord {
    const KIND: &'static str = "snapshot";
}

/// The durable, immutable description of a completed snapshot, at
/// `snapshots/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub format: u32,
    pub id: String,
    pub project: String,
    pub parent: Option<String>,
    #[serde(with = "as_text::option")]
    pub image: Option<ManifestId>,
    pub created: String,
    #[serde(with = "as_text")]
    pub disk: ManifestId,
    #[serde(with = "as_text::option")]
    pub memory: Option<ManifestId>,
    pub vm_state: Option<String>,
}

/// What [`create`] needs.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub project: String,
    pub parent: Option<String>,
    pub image: Option<ManifestId>,
    pub sandbox: Option<String>,
    pub host: String,
}

/// What a completed snapshot is made of.
#[derive(Debug, Clone)]
pub struct Completion {
    pub disk: ManifestId,
    pub memory: Option<ManifestId>,
    pub vm_state: Option<String>,
}

/// `STORE/snapshots/ID`: where a snapshot's descriptor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotUri {
    /// The store's location (`file:///dir`, `s3://bucket/prefix`).
    pub store: String,
    pub id: String,
}

impl SnapshotUri {
    pub fn new(store: &dyn ObjectStore, id: &str) -> SnapshotUri {
        SnapshotUri {
            store: store_location(store).trim_end_matches('/').to_owned(),
            id: id.to_owned(),
        }
    }
}

impl fmt::Display for SnapshotUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.store, layout::snapshot_key(&self.id))
    }
}

impl FromStr for SnapshotUri {
    type Err = CatalogError;

    fn from_str(uri: &str) -> Result<SnapshotUri, CatalogError> {
        let bad = |why| CatalogError::BadSnapshotUri {
            uri: uri.to_owned(),
            why,
        };
        if !uri.starts_with("file:///") && !uri.starts_with("s3://") {
            return Err(bad("it names no store (file:///... or s3://...)"));
        }
        let (store, id) = uri
            .rsplit_once(&format!("/{}", layout::SNAPSHOTS))
            .ok_or_else(|| bad("no /snapshots/ in it"))?;
        if !is_record_id(id) {
            return Err(bad("the id is not 32 hex digits"));
        }
        Ok(SnapshotUri {
            store: store.trim_end_matches('/').to_owned(),
            id: id.to_owned(),
        })
    }
}

fn key(project: &str, id: &str) -> String {
    layout::snapshot_record_key(project, id)
}

fn not_found(store: &dyn ObjectStore, project: &str, id: &str) -> CatalogError {
    CatalogError::NoSuchSnapshot {
        id: id.to_owned(),
        project: project.to_owned(),
        store: store.uri().to_owned(),
    }
}

/// A new snapshot, pending, with a fresh id.
pub async fn create(
    store: &dyn ObjectStore,
    new: NewSnapshot,
) -> Result<SnapshotRecord, CatalogError> {
    check_project(&new.project)?;
    let now = record::now();
    let mut rec = SnapshotRecord {
        id: new_id(),
        project: new.project,
        parent: new.parent,
        image: new.image,
        sandbox: new.sandbox,
        host: new.host,
        created: now.clone(),
        updated: now,
        state: SnapshotState::Pending,
        reason: None,
        disk: None,
        memory: None,
        vm_state: None,
        uri: None,
    };
    // 128 random bits do not collide; if they ever did, take another.
    while !record::create_fresh(store, &key(&rec.project, &rec.id), &rec).await? {
        rec.id = new_id();
    }
    Ok(rec)
}

/// The snapshot's record and version: one GET.
pub async fn get(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
) -> Result<Option<Stored<SnapshotRecord>>, CatalogError> {
    check_project(project)?;
    if !is_record_id(id) {
        return Ok(None);
    }
    record::read_live(store, &key(project, id)).await
}

/// Moves the record to `to` by compare-and-swap, after `fill` sets what
/// the new state carries; refuses a move the state machine does not allow.
async fn transition(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
    to: SnapshotState,
    mut fill: impl FnMut(&mut SnapshotRecord),
) -> Result<SnapshotRecord, CatalogError> {
    check_project(project)?;
    let updated = record::update(store, &key(project, id), |cur: &SnapshotRecord| {
        if !cur.state.can_move_to(to) {
            return Err(CatalogError::IllegalMove {
                what: "snapshot",
                id: id.to_owned(),
                from: cur.state.to_string(),
                to: to.to_string(),
            });
        }
        let mut next = cur.clone();
        next.state = to;
        next.updated = record::now();
        fill(&mut next);
        Ok(next)
    })
    .await?;
    updated
        .map(|s| s.record)
        .ok_or_else(|| not_found(store, project, id))
}

/// Pending to uploading, by `host` (which then owns the upload).
pub async fn start_upload(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
    host: &str,
) -> Result<SnapshotRecord, CatalogError> {
    transition(store, project, id, SnapshotState::Uploading, |r| {
        r.host = host.to_owned()
    })
    .await
}

/// Pending or uploading to failed, with the reason.
pub async fn fail(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
    reason: &str,
) -> Result<SnapshotRecord, CatalogError> {
    transition(store, project, id, SnapshotState::Failed, |r| {
        r.reason = Some(reason.to_owned())
    })
    .await
}

/// Uploading to completed: checks that what it is made of is in the
/// store, writes its durable descriptor, then moves the record.
pub async fn complete(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
    done: Completion,
) -> Result<SnapshotRecord, CatalogError> {
    let cur = get(store, project, id)
        .await?
        .ok_or_else(|| not_found(store, project, id))?
        .record;
    if !cur.state.can_move_to(SnapshotState::Completed) {
        return Err(CatalogError::IllegalMove {
            what: "snapshot",
            id: id.to_owned(),
            from: cur.state.to_string(),
            to: SnapshotState::Completed.to_string(),
        });
    }
    for m in std::iter::once(&done.disk).chain(done.memory.as_ref()) {
        if store.head(&layout::manifest_key(m)).await?.is_none() {
            return Err(CatalogError::NoSuchManifest {
                id: *m,
                store: store.uri().to_owned(),
            });
        }
    }
    if let Some(blob) = &done.vm_state {
        if store.head(blob).await?.is_none() {
            return Err(CatalogError::BadRecord {
                key: blob.clone(),
                detail: format!("the VM-state blob of snapshot {id} is not in the store"),
            });
        }
    }
    let desc = Descriptor {
        format: record::FORMAT,
        id: id.to_owned(),
        project: project.to_owned(),
        parent: cur.parent.clone(),
        image: cur.image,
        created: cur.created.clone(),
        disk: done.disk,
        memory: done.memory,
        vm_state: done.vm_state.clone(),
    };
    let desc_key = layout::snapshot_key(id);
    let body = Bytes::from(serde_json::to_vec(&desc).expect("descriptors serialize"));
    if store.put_if(&desc_key, body, Precondition::Absent).await? == Conditional::PreconditionFailed
        && read_descriptor(store, id).await?.as_ref() != Some(&desc)
    {
        return Err(CatalogError::IllegalMove {
            what: "snapshot",
            id: id.to_owned(),
            from: "completed by another host with other contents".to_owned(),
            to: SnapshotState::Completed.to_string(),
        });
    }
    let uri = SnapshotUri::new(store, id).to_string();
    transition(store, project, id, SnapshotState::Completed, |r| {
        r.disk = Some(done.disk);
        r.memory = done.memory;
        r.vm_state = done.vm_state.clone();
        r.uri = Some(uri.clone());
    })
    .await
}

/// The durable descriptor of snapshot `id`, if it is in the store.
pub async fn read_descriptor(
    store: &dyn ObjectStore,
    id: &str,
) -> Result<Option<Descriptor>, CatalogError> {
    let key = layout::snapshot_key(id);
    let Some(v) = store.get_versioned(&key).await? else {
        return Ok(None);
    };
    if v.data.len() > record::MAX_RECORD_BYTES {
        return Err(CatalogError::BadRecord {
            key,
            detail: format!("{} bytes", v.data.len()),
        });
    }
    serde_json::from_slice(&v.data)
        .map(Some)
        .map_err(|e| CatalogError::BadRecord {
            key,
            detail: e.to_string(),
        })
}

/// One page of `project`'s snapshot ids, in order: one LIST.
pub async fn list_page(
    store: &dyn ObjectStore,
    project: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, Option<String>), CatalogError> {
    check_project(project)?;
    super::list_names(
        store,
        &layout::snapshots_prefix(project),
        start_after,
        limit,
    )
    .await
}

/// Removes a completed or failed snapshot's record and descriptor (its
/// data goes at the next garbage collection). One still being taken is
/// refused unless `force` (its host is gone for good).
pub async fn remove(
    store: &dyn ObjectStore,
    project: &str,
    id: &str,
    force: bool,
    by: &str,
) -> Result<SnapshotRecord, CatalogError> {
    check_project(project)?;
    let k = key(project, id);
    let removed = record::remove(store, &k, by, |r: &SnapshotRecord| {
        if r.state.is_final() || force {
            Ok(())
        } else {
            Err(CatalogError::Busy {
                what: "snapshot",
                id: id.to_owned(),
                state: r.state.to_string(),
                hint: "it is still being taken; wait until it completes or fails, or pass --force if its host is gone for good",
            })
        }
    })
    .await?
    .ok_or_else(|| not_found(store, project, id))?;
    // Ids are never reused: the tombstone has done its work.
    store.delete(&layout::snapshot_key(id)).await?;
    store.delete(&k).await?;
    Ok(removed)
}

/// Names a completed snapshot's disk as image `name` in `project`.
/// Refuses, saying why, a snapshot in another store, one unknown here,
/// one of another project, and one pending, uploading or failed.
pub async fn register(
    store: &dyn ObjectStore,
    project: &str,
    uri: &str,
    name: &str,
    public: bool,
    dockerfile: Option<String>,
) -> Result<ImageRecord, CatalogError> {
    super::check_name(name)?;
    let parsed: SnapshotUri = uri.parse()?;
    let here = SnapshotUri::new(store, &parsed.id);
    if parsed.store != here.store {
        return Err(CatalogError::ForeignSnapshot {
            uri: uri.to_owned(),
            store: here.store,
        });
    }
    let Some(rec) = get(store, project, &parsed.id).await? else {
        return Err(match read_descriptor(store, &parsed.id).await? {
            Some(d) if d.project != project => CatalogError::SnapshotOfOtherProject {
                id: parsed.id,
                project: project.to_owned(),
                owner: d.project,
            },
            _ => not_found(store, project, &parsed.id),
        });
    };
    let rec = rec.record;
    let detail = match rec.state {
        SnapshotState::Completed => None,
        SnapshotState::Pending => Some(": it is still being taken; register it once `cairn snapshot describe` says completed".to_owned()),
        SnapshotState::Uploading => Some(": its upload has not finished; register it once `cairn snapshot describe` says completed".to_owned()),
        SnapshotState::Failed => Some(format!(
            " ({}); take a new snapshot",
            rec.reason.as_deref().unwrap_or("no reason recorded")
        )),
    };
    if let Some(detail) = detail {
        return Err(CatalogError::NotRegistrable {
            id: rec.id,
            state: rec.state.as_str(),
            detail,
        });
    }
    let desc = read_descriptor(store, &rec.id)
        .await?
        .ok_or_else(|| CatalogError::NotDurable {
            id: rec.id.clone(),
            key: layout::snapshot_key(&rec.id),
            store: store.uri().to_owned(),
        })?;
    image::create(
        store,
        NewImage {
            project: project.to_owned(),
            name: name.to_owned(),
            id: desc.disk,
            public,
            parent: desc.image,
            made: Made {
                how: "register".to_owned(),
                from: Some(here.to_string()),
                dockerfile,
            },
        },
    )
    .await
}
