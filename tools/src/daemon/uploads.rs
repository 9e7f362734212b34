//! Snapshots of running sandboxes: the frozen layers folded into a new
//! disk image and uploaded in the background. A pending upload is recorded
//! in the state directory (`snapshots/<id>.json`) before its sandbox takes
//! another write, so a daemon restarted after a crash takes it up again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use cairn_engine::catalog::snapshot::{self, Completion};
use cairn_engine::catalog::CatalogError;
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::import::ImportError;
use cairn_engine::import::ImportOptions;
use cairn_engine::layout;
use cairn_engine::manifest::Manifest;
use cairn_engine::memory::{import_memory, MemLayout};
use cairn_engine::objstore::StoreError;
use cairn_engine::overlay::Overlay;
use cairn_engine::ManifestId;
use serde::{Deserialize, Serialize};

use super::sandbox::MemoryParent;

/// What an upload needs to run again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingUpload {
    /// The snapshot's id in the catalog.
    pub id: String,
    pub project: String,
    /// The manifest the layers stand on.
    pub base: String,
    /// The frozen layers, bottom to top.
    pub layers: Vec<String>,
    /// The memory and VM state taken with the disk, if any.
    #[serde(default)]
    pub machine: Option<MachineState>,
    /// A named sandbox's name and generation when it was taken: the
    /// upload commits only while this host still owns it at that
    /// generation.
    #[serde(default)]
    pub fence: Option<Fence>,
}

/// Who must still own a named sandbox for its snapshot to commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub generation: u64,
}

/// Another host took the sandbox over: this host may not write its data.
#[derive(Debug, thiserror::Error)]
#[error(
    "fenced: sandbox {name} is now served by {host} at generation {now}; this host held generation {held}, so its snapshot may not commit"
)]
pub struct Fenced {
    pub name: String,
    pub host: String,
    pub now: u64,
    pub held: u64,
}

/// Fails with [`Fenced`] once the catalog says `fence`'s sandbox is owned
/// by another host or at a later generation (a removed sandbox fences
/// nothing: no one else serves it).
fn check_fence(store: &ChunkStore, project: &str, host: &str, fence: &Fence) -> Result<()> {
    let remote = store.remote().clone();
    let current = store
        .runtime()
        .block_on(cairn_engine::catalog::sandbox::get(
            remote.as_ref(),
            project,
            &fence.name,
        ))?;
    match current.map(|s| s.record) {
        Some(rec) if rec.host != host || rec.generation != fence.generation => Err(Fenced {
            name: fence.name.clone(),
            host: rec.host,
            now: rec.generation,
            held: fence.generation,
        }
        .into()),
        _ => Ok(()),
    }
}

/// A VMM's memory file and VM-state blob, copied into the state
/// directory when the snapshot is taken (the VMM may reuse its files),
/// imported with the disk, deleted when the upload ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineState {
    /// The copied memory file.
    pub memory: Option<PathBuf>,
    /// The memory a diff file is over (None: a full file).
    pub memory_parent: Option<MemoryParent>,
    /// The copied VM-state blob.
    pub vm_state: Option<PathBuf>,
}

impl MachineState {
    /// The copied files.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.memory.iter().chain(self.vm_state.iter())
    }

    /// Deletes the copied files (`owner` names them in warnings).
    pub fn remove_files(&self, owner: &str) {
        for f in self.files() {
            if let Err(e) = std::fs::remove_file(f) {
                tracing::warn!(%owner, file = %f.display(), error = %e, "cannot delete a copied VMM file");
            }
        }
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

impl PendingUpload {
    fn path(&self, state_dir: &Path) -> PathBuf {
        dir(state_dir).join(format!("{}.json", self.id))
    }

    /// Records the upload durably (temporary file, sync, rename, directory sync).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        super::sandbox::write_durably(&self.path(state_dir), &serde_json::to_vec_pretty(self)?)
    }

    /// Every recorded upload.
    pub fn load_all(state_dir: &Path) -> Result<Vec<PendingUpload>> {
        super::sandbox::read_json_dir(&dir(state_dir), "an upload record")
    }

    fn forget(&self, state_dir: &Path) {
        if let Some(m) = &self.machine {
            m.remove_files(&self.id);
        }
        if let Err(e) = std::fs::remove_file(self.path(state_dir)) {
            tracing::warn!(snapshot = %self.id, error = %e, "cannot delete a finished upload's record");
        }
    }
}

/// The longest wait between two tries of an upload.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Whether `e` is worth trying again: the store or the catalog did not
/// answer (stopped, unreachable, 5xx, throttled).
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(|s| s.kind().is_transient())
            || c.downcast_ref::<CatalogError>()
                .is_some_and(|s| s.kind().is_transient())
            || c.downcast_ref::<ImportError>()
                .is_some_and(|s| s.kind().is_transient())
    })
}

/// Runs `attempt` until it succeeds, fails for good, or (for transient
/// failures) `give_up_after` has passed; waits between tries, doubling
/// from half a second.
fn with_retries<T>(
    what: &str,
    give_up_after: Duration,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        match attempt() {
            Err(e)
                if transient(&e)
                    && started
                        .elapsed()
                        .checked_add(delay)
                        .is_some_and(|t| t < give_up_after) =>
            {
                tracing::warn!(%what, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "the store did not answer; trying again");
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            other => return other,
        }
    }
}

/// Folds `layers` over `base` into a disk image, stores it, and completes
/// the snapshot. While the store does not answer, the snapshot stays
/// uploading and the upload is tried again, for up to `give_up_after`;
/// then, or on any other failure, the snapshot is marked failed with the
/// reason (tried until the catalog answers). Then forgets the pending
/// record. Returns the disk image made, if the snapshot completed now.
pub fn run(
    store: &ChunkStore,
    state_dir: &Path,
    host: &str,
    job: &PendingUpload,
    base: Arc<Manifest>,
    layers: &[Arc<Overlay>],
    give_up_after: Duration,
) -> Option<Arc<Manifest>> {
    let remote = store.remote().clone();
    let rt = store.runtime();
    // Fault injector for the crash tests: every upload waits this long
    // before it starts, so a test can kill the daemon while one is in flight.
    crate::faults::pause_for_tests("CAIRN_FAULT_STALL_UPLOADS_MS");
    let outcome = with_retries(
        &job.id,
        give_up_after,
        || -> Result<Option<Arc<Manifest>>> {
            let current = rt
                .block_on(snapshot::get(remote.as_ref(), &job.project, &job.id))?
                .with_context(|| format!("snapshot {} is not in the catalog", job.id))?
                .record;
            match current.state {
                snapshot::SnapshotState::Pending => {
                    rt.block_on(snapshot::start_upload(
                        remote.as_ref(),
                        &job.project,
                        &job.id,
                        host,
                    ))?;
                }
                snapshot::SnapshotState::Uploading => {}
                // Finished before a crash hid it: nothing left to do.
                _ => return Ok(None),
            }
            if let Some(f) = &job.fence {
                check_fence(store, &job.project, host, f)?;
            }
            let staging = state_dir.join("staging");
            std::fs::create_dir_all(&staging)
                .with_context(|| format!("creating {}", staging.display()))?;
            let opts = ImportOptions::new(staging);
            let (manifest, _) =
                cairn_engine::snapshot::fold_layers(store, base.clone(), layers, &opts, &|_| {})
                    .context("folding the frozen layers")?;
            let (memory, vm_state) = match &job.machine {
                Some(m) => store_machine(store, &job.project, m, &opts, give_up_after)?,
                None => (None, None),
            };
            // Checked again last: a take-over during the upload fences it.
            if let Some(f) = &job.fence {
                check_fence(store, &job.project, host, f)?;
            }
            rt.block_on(snapshot::complete(
                remote.as_ref(),
                &job.project,
                &job.id,
                Completion {
                    disk: manifest.id(),
                    memory,
                    vm_state,
                },
            ))?;
            Ok(Some(Arc::new(manifest)))
        },
    );
    let folded = match outcome {
        Ok(m) => {
            tracing::info!(snapshot = %job.id, "snapshot completed");
            m
        }
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(snapshot = %job.id, %reason, "snapshot failed");
            let marked = with_retries(&job.id, Duration::MAX, || {
                Ok(rt.block_on(snapshot::fail(
                    remote.as_ref(),
                    &job.project,
                    &job.id,
                    &reason,
                ))?)
            });
            if let Err(e) = marked {
                tracing::error!(snapshot = %job.id, error = %e, "cannot mark the snapshot failed");
                // Kept: the next start tries again.
                return None;
            }
            None
        }
    };
    job.forget(state_dir);
    folded
}

/// Imports a memory file (full, or a diff over its parent, waited for
/// up to `wait` if it is a snapshot of `project` still uploading) and
/// stores a VM-state blob: their manifest id and key.
pub fn store_machine(
    store: &ChunkStore,
    project: &str,
    m: &MachineState,
    opts: &ImportOptions,
    wait: Duration,
) -> Result<(Option<ManifestId>, Option<String>)> {
    let memory = match &m.memory {
        Some(path) => {
            let parent = match &m.memory_parent {
                Some(p) => Some(memory_image(store, project, p, wait)?),
                None => None,
            };
            Some(import_memory_file(store, path, parent.as_ref(), opts)?)
        }
        None => None,
    };
    let vm_state = match &m.vm_state {
        Some(path) => Some(store_vm_state(store, path)?),
        None => None,
    };
    Ok((memory, vm_state))
}

/// The memory image `parent` names: its id, or the memory of its
/// snapshot once that is uploaded (waited for up to `wait`).
fn memory_image(
    store: &ChunkStore,
    project: &str,
    parent: &MemoryParent,
    wait: Duration,
) -> Result<ManifestId> {
    let id = match parent {
        MemoryParent::Image(id) => id,
        MemoryParent::Snapshot { snapshot: id } => {
            let remote = store.remote().clone();
            let started = Instant::now();
            loop {
                let rec = store
                    .runtime()
                    .block_on(snapshot::get(remote.as_ref(), project, id))?
                    .with_context(|| {
                        format!("the memory parent, snapshot {id}, is not in the catalog")
                    })?
                    .record;
                match rec.state {
                    snapshot::SnapshotState::Completed => {
                        return rec.memory.with_context(|| {
                            format!("the memory parent, snapshot {id}, has no memory")
                        })
                    }
                    snapshot::SnapshotState::Failed => anyhow::bail!(
                        "the memory parent, snapshot {id}, failed: {}",
                        rec.reason.unwrap_or_default()
                    ),
                    _ if started.elapsed() > wait => anyhow::bail!(
                        "the memory parent, snapshot {id}, is still not uploaded after {} s",
                        wait.as_secs()
                    ),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
    };
    id.parse().context("the memory parent's id")
}

/// Imports the memory file at `path` with 4 KiB pages, as a diff over
/// memory image `parent` when one is given.
pub fn import_memory_file(
    store: &ChunkStore,
    path: &Path,
    parent: Option<&ManifestId>,
    opts: &ImportOptions,
) -> Result<ManifestId> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let mut layout = MemLayout::single(len, 4096);
    let parent = match parent {
        Some(&id) => {
            layout.parent = Some(id);
            let remote = store.remote().clone();
            Some(Arc::new(store.runtime().block_on(
                cairn_engine::catalog::load_manifest(remote.as_ref(), &id),
            )?))
        }
        None => None,
    };
    let (manifest, _) = import_memory(store, path, &layout, parent, opts, &|_| {})
        .with_context(|| format!("importing memory file {}", path.display()))?;
    Ok(manifest.id())
}

/// Stores a VM-state blob under its content's hash; returns the key.
pub fn store_vm_state(store: &ChunkStore, path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    std::fs::File::open(path)
        .and_then(|mut f| std::io::copy(&mut f, &mut hasher))
        .with_context(|| format!("reading {}", path.display()))?;
    let key = layout::vm_state_key(&hasher.finalize().to_hex());
    let remote = store.remote().clone();
    store
        .runtime()
        .block_on(async {
            cairn_engine::gc::keep(remote.as_ref(), &key).await?;
            remote.put_file(&key, path).await
        })
        .with_context(|| format!("storing VM state {} as {key}", path.display()))?;
    Ok(key)
}
