//! The mark's roots: everything the catalog names.
//!
//! Images of every project (and public names, and names from before the
//! catalog), snapshots in every state (pending and uploading ones name
//! their manifests only once uploaded; until then their chunks are
//! protected by the writers' protocol, `super::guard`), completed
//! snapshots' descriptors, and the images sandboxes were made from (a
//! sandbox made from a snapshot is covered by that snapshot). A record
//! that cannot be read stops the run: nothing is deleted on a partial
//! mark.

use std::collections::HashSet;

use crate::catalog::{self, record, CatalogError, SandboxRecord, SandboxSource, SnapshotRecord};
use crate::id::ManifestId;
use crate::layout;
use crate::objstore::ObjectStore;

/// What the catalog keeps alive.
#[derive(Debug, Default)]
pub struct Roots {
    pub manifests: HashSet<ManifestId>,
    /// Other objects named directly (VM-state blobs).
    pub keys: HashSet<String>,
    /// Catalog records read.
    pub records: u64,
    /// The daemons whose roots were read.
    pub hosts: Vec<HostSeen>,
}

/// A daemon's published roots, as a run saw them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostSeen {
    pub host: String,
    /// Seconds since the epoch (0: by a build from before the stamp).
    pub published: u64,
    pub manifests: usize,
}

impl Roots {
    fn snapshot(
        &mut self,
        disk: Option<ManifestId>,
        memory: Option<ManifestId>,
        vm_state: Option<String>,
    ) {
        self.manifests.extend(disk);
        self.manifests.extend(memory);
        self.keys.extend(vm_state);
        self.records += 1;
    }
}

/// Reads every root in the store.
pub async fn collect(
    store: &dyn ObjectStore,
    forgotten: &std::collections::BTreeSet<String>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Roots, CatalogError> {
    let mut roots = Roots::default();
    progress("images");
    for (_, id) in catalog::image::every_name(store).await? {
        roots.manifests.insert(id?);
        roots.records += 1;
    }
    progress("snapshots");
    let mut snapshots = HashSet::new();
    for key in store
        .list(&format!("{}snapshots/", layout::CATALOG))
        .await?
    {
        if let Some(s) = record::read_live::<SnapshotRecord>(store, &key).await? {
            let r = s.record;
            snapshots.insert(r.id);
            roots.snapshot(r.disk, r.memory, r.vm_state);
        }
    }
    for key in store.list(layout::SNAPSHOTS).await? {
        let id = &key[layout::SNAPSHOTS.len()..];
        if let Some(d) = catalog::snapshot::read_descriptor(store, id).await? {
            snapshots.insert(d.id);
            roots.snapshot(Some(d.disk), d.memory, d.vm_state);
        }
    }
    progress("sandboxes");
    for key in store
        .list(&format!("{}sandboxes/", layout::CATALOG))
        .await?
    {
        let Some(s) = record::read_live::<SandboxRecord>(store, &key).await? else {
            continue;
        };
        let r = s.record;
        let snapshot = match r.source {
            SandboxSource::Image(id) => {
                roots.manifests.insert(id);
                None
            }
            SandboxSource::Snapshot(id) => Some(id),
        };
        for id in snapshot.iter().chain(r.snapshot.iter()) {
            if !snapshots.contains(id) {
                return Err(CatalogError::BadRecord {
                    key,
                    detail: format!("the sandbox stands on snapshot {id}, which is no longer in the store, so what it reads cannot be told: gc deletes nothing until the sandbox is removed"),
                });
            }
        }
        roots.records += 1;
    }
    progress("daemons");
    for key in store.list(super::hosts::HOSTS).await? {
        if forgotten.contains(&key) {
            continue;
        }
        let Some(host) = super::hosts::read(store, &key).await? else {
            continue;
        };
        roots.hosts.push(HostSeen {
            host: host.host.clone(),
            published: host.published,
            manifests: host.manifests.len(),
        });
        for m in &host.manifests {
            let id = m
                .parse::<ManifestId>()
                .map_err(|_| CatalogError::BadRecord {
                    key: key.clone(),
                    detail: format!("`{m}` is not a manifest id"),
                })?;
            roots.manifests.insert(id);
        }
        roots.keys.extend(host.keys);
        roots.records += 1;
    }
    Ok(roots)
}
