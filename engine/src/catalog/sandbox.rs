//! Sandbox records: named (the name unique in its project) or unnamed,
//! each with its state, its source, and the host that serves it with a
//! generation number.
//!
//! A named sandbox's record lives under its name (a lookup by name is one
//! GET) and an immutable pointer `catalog/sandbox-ids/<project>/<id>`
//! leads from its id to the name; an unnamed one's lives under its id.
//! Every change is a compare-and-swap that checks the caller still owns
//! the sandbox (its host and generation): a host that lost ownership,
//! because another took the sandbox over (generation + 1), is fenced.
//!
//! ```text
//! running ──▶ suspending ──▶ suspended ──(take, generation + 1)──▶ running
//!                 └──(suspend abandoned)──▶ running
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use super::record::{self, as_text, Created, Kind, Stored};
use super::{check_project, check_sandbox_name, is_record_id, new_id, CatalogError};
use crate::id::ManifestId;
use crate::layout;
use crate::objstore::ObjectStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Suspending,
    Suspended,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Suspending => "suspending",
            SandboxState::Suspended => "suspended",
        }
    }

    /// The moves its owner may make (taking a suspended sandbox over is
    /// [`take`]'s).
    pub fn can_move_to(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Running, Suspending) | (Suspending, Suspended) | (Suspending, Running)
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sandbox was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxSource {
    Image(#[serde(with = "as_text")] ManifestId),
    Snapshot(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: Option<String>,
    pub project: String,
    pub state: SandboxState,
    pub source: SandboxSource,
    /// The host serving it (or that suspended it).
    pub host: String,
    /// Bumped by every take-over; checked on every change.
    pub generation: u64,
    /// The snapshot its suspend made, to resume from.
    pub snapshot: Option<String>,
    pub created: String,
    pub updated: String,
}

impl SandboxRecord {
    /// Where its record is: its name if it has one, else its id.
    pub fn key(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    pub fn owner(&self) -> Owner {
        Owner {
            host: self.host.clone(),
            generation: self.generation,
        }
    }
}

impl Kind for SandboxRecord {
    const KIND: &'static str = "sandbox";
}

/// A named sandbox's id, pointing at its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdPointer {
    name: String,
}

impl Kind for IdPointer {
    const KIND: &'static str = "sandbox-id";
}

/// Who may change a sandbox: the host serving it, at its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub generation: u64,
}

/// What [`create`] needs.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub project: String,
    pub name: Option<String>,
    pub source: SandboxSource,
    pub host: String,
}

fn not_found(store: &dyn ObjectStore, project: &str, key: &str) -> CatalogError {
    CatalogError::NoSuchSandbox {
        key: key.to_owned(),
        project: project.to_owned(),
        store: store.uri().to_owned(),
    }
}

/// A new sandbox, running on `new.host` at generation 1. A named one
/// takes its name: of hosts racing for it, exactly one wins.
pub async fn create(
    store: &dyn ObjectStore,
    new: NewSandbox,
) -> Result<SandboxRecord, CatalogError> {
    check_project(&new.project)?;
    if let Some(n) = &new.name {
        check_sandbox_name(n)?;
    }
    let now = record::now();
    let mut rec = SandboxRecord {
        id: new_id(),
        name: new.name,
        project: new.project,
        state: SandboxState::Running,
        source: new.source,
        host: new.host,
        generation: 1,
        snapshot: None,
        created: now.clone(),
        updated: now,
    };
    let project = rec.project.clone();
    match rec.name.clone() {
        Some(name) => {
            match record::create(store, &layout::sandbox_key(&project, &name), &rec).await? {
                Created::Won(_) => {}
                Created::Taken(held) => {
                    return Err(CatalogError::NameTaken {
                        what: "sandbox",
                        name,
                        project,
                        holder: format!("sandbox {} on {}", held.record.id, held.record.host),
                    })
                }
            }
            let pointer = IdPointer { name };
            // A fresh id: nothing is there.
            record::create_fresh(store, &layout::sandbox_id_key(&project, &rec.id), &pointer)
                .await?;
        }
        None => {
            while !record::create_fresh(store, &layout::sandbox_key(&project, &rec.id), &rec)
                .await?
            {
                rec.id = new_id();
            }
        }
    }
    Ok(rec)
}

/// A sandbox by name (one GET) or id (one GET; two for a named one).
pub async fn get(
    store: &dyn ObjectStore,
    project: &str,
    name_or_id: &str,
) -> Result<Option<Stored<SandboxRecord>>, CatalogError> {
    check_project(project)?;
    if !is_record_id(name_or_id) {
        check_sandbox_name(name_or_id)?;
        return record::read_live(store, &layout::sandbox_key(project, name_or_id)).await;
    }
    let id = name_or_id;
    if let Some(s) = record::read_live(store, &layout::sandbox_key(project, id)).await? {
        return Ok(Some(s));
    }
    let Some(p) =
        record::read_live::<IdPointer>(store, &layout::sandbox_id_key(project, id)).await?
    else {
        return Ok(None);
    };
    Ok(
        record::read_live::<SandboxRecord>(store, &layout::sandbox_key(project, &p.record.name))
            .await?
            // The name may have been removed and taken again since.
            .filter(|s| s.record.id == id),
    )
}

fn check_owner(rec: &SandboxRecord, owner: &Owner) -> Result<(), CatalogError> {
    if rec.host == owner.host && rec.generation == owner.generation {
        Ok(())
    } else {
        Err(CatalogError::Fenced {
            id: rec.id.clone(),
            host: rec.host.clone(),
            generation: rec.generation,
            caller: owner.host.clone(),
            caller_generation: owner.generation,
        })
    }
}

/// Moves the sandbox at `key` ([`SandboxRecord::key`]) to `to`, as its
/// owner; a suspended one records the snapshot to resume from.
pub async fn set_state(
    store: &dyn ObjectStore,
    project: &str,
    key: &str,
    owner: &Owner,
    to: SandboxState,
    snapshot: Option<&str>,
) -> Result<SandboxRecord, CatalogError> {
    check_project(project)?;
    record::update(
        store,
        &layout::sandbox_key(project, key),
        |cur: &SandboxRecord| {
            check_owner(cur, owner)?;
            if !cur.state.can_move_to(to) {
                return Err(CatalogError::IllegalMove {
                    what: "sandbox",
                    id: cur.id.clone(),
                    from: cur.state.to_string(),
                    to: to.to_string(),
                });
            }
            let mut next = cur.clone();
            next.state = to;
            next.updated = record::now();
            if let Some(s) = snapshot {
                next.snapshot = Some(s.to_owned());
            }
            Ok(next)
        },
    )
    .await?
    .map(|s| s.record)
    .ok_or_else(|| not_found(store, project, key))
}

/// Takes the named sandbox over for `host` (resume, here or on another
/// host): suspended to running at the next generation, which fences the
/// previous owner. A sandbox still served is refused unless `force`
/// (its host is gone for good).
pub async fn take(
    store: &dyn ObjectStore,
    project: &str,
    name: &str,
    host: &str,
    force: bool,
) -> Result<SandboxRecord, CatalogError> {
    check_project(project)?;
    check_sandbox_name(name)?;
    record::update(
        store,
        &layout::sandbox_key(project, name),
        |cur: &SandboxRecord| {
            if cur.state != SandboxState::Suspended && !force {
                return Err(CatalogError::Busy {
                    what: "sandbox",
                    id: cur.id.clone(),
                    state: format!(
                        "{} on {} (generation {})",
                        cur.state, cur.host, cur.generation
                    ),
                    hint: "suspend it there first, or pass --force if that host is gone for good",
                });
            }
            let mut next = cur.clone();
            next.state = SandboxState::Running;
            next.host = host.to_owned();
            next.generation = cur.generation + 1;
            next.updated = record::now();
            Ok(next)
        },
    )
    .await?
    .map(|s| s.record)
    .ok_or_else(|| not_found(store, project, name))
}

/// Removes the sandbox at `key`: a suspended one by anyone, one being
/// served only by its owner. A removed name can be taken again.
pub async fn remove(
    store: &dyn ObjectStore,
    project: &str,
    key: &str,
    owner: Option<&Owner>,
    by: &str,
) -> Result<SandboxRecord, CatalogError> {
    check_project(project)?;
    let k = layout::sandbox_key(project, key);
    let removed = record::remove(store, &k, by, |cur: &SandboxRecord| {
        match (cur.state, owner) {
            (SandboxState::Suspended, _) => Ok(()),
            (_, Some(o)) => check_owner(cur, o),
            (state, None) => Err(CatalogError::Busy {
                what: "sandbox",
                id: cur.id.clone(),
                state: format!("{state} on {}", cur.host),
                hint: "remove it through the daemon that serves it",
            }),
        }
    })
    .await?
    .ok_or_else(|| not_found(store, project, key))?;
    // Ids are never reused: an id's key can go once its record is a tombstone.
    if removed.name.is_some() {
        store
            .delete(&layout::sandbox_id_key(project, &removed.id))
            .await?;
    } else {
        store.delete(&k).await?;
    }
    Ok(removed)
}

/// One page of `project`'s sandboxes, as the names of named ones and the
/// ids of the others, in order: one LIST. Removed names may be in it (a
/// lookup says they are gone).
pub async fn list_page(
    store: &dyn ObjectStore,
    project: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, Option<String>), CatalogError> {
    check_project(project)?;
    super::list_names(
        store,
        &layout::sandboxes_prefix(project),
        start_after,
        limit,
    )
    .await
}
