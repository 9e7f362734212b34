//! Everything the daemon serves on this host, and the operations on it.
//! Each operation is quick and local (no upload waits in here) and leaves
//! the state directory consistent at every step, so a crash anywhere is
//! recovered by [`Host::recover`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cairn_engine::catalog;
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::disk::Disk;
use cairn_engine::gc::hosts::HostRoots;
use cairn_engine::manifest::Manifest;
use cairn_engine::overlay::{Overlay, BLOCK};
use cairn_engine::ManifestId;
use serde::Serialize;

use super::claims::{self, Claims};
use super::dozing::{DozeFiles, Dozed, Dozing};
use super::layers::Layers;
use super::pages::{PageConfig, PageServer};
use super::sandbox::{
    copy_sparse, new_id, now, write_durably, MemoryParent, Records, Running, SandboxRecord,
};
use super::uploads::{self, MachineState, PendingUpload};
use cairn_engine::catalog::snapshot::{NewSnapshot, SnapshotRecord, SnapshotState};

/// Why an operation was refused, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no sandbox `{0}` on this host (see `cairn sandbox ls`)")]
    NoSuchSandbox(String),
    #[error("a sandbox named `{0}` already exists")]
    NameTaken(String),
    #[error("{0}")]
    BadRequest(String),
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    pub id: String,
    pub name: Option<String>,
    pub project: String,
    pub state: &'static str,
    pub image: String,
    pub image_name: Option<String>,
    pub base: String,
    pub disk_socket: PathBuf,
    /// Whether a VMM is connected to the disk socket now.
    pub vmm_connected: bool,
    pub memory_socket: Option<PathBuf>,
    /// The memory image its page server serves.
    pub memory: Option<String>,
    /// Its VM-state blob (e.g. Firecracker's vmstate file), as a local file.
    pub vm_state: Option<PathBuf>,
    pub layers: usize,
    /// Queues of its virtio-blk device.
    pub queues: u16,
    /// Its idle time-out, if it is suspended when idle.
    pub idle_suspend_ms: Option<u64>,
    /// Bytes its live layer holds (written since its last snapshot).
    pub bytes_written: u64,
    /// Bytes its guest read (since it was last started here) from the
    /// host's cache or its own layers, and from the store, waiting.
    pub read_local_bytes: u64,
    pub read_store_bytes: u64,
    pub cloned_from: Option<String>,
    /// Its latest snapshot, else the one it was made from.
    pub snapshot: Option<String>,
    pub created: u64,
    pub served_since: u64,
}

impl SandboxView {
    fn of(r: &Running) -> SandboxView {
        let rec = &r.record;
        let reads = r.read_counts();
        SandboxView {
            id: rec.id.clone(),
            name: rec.name.clone(),
            project: rec.project.clone(),
            state: "running",
            image: rec.image.clone(),
            image_name: rec.image_name.clone(),
            base: rec.base.clone(),
            disk_socket: r.disk_socket.clone(),
            vmm_connected: r.vmm_connected(),
            memory_socket: r.pages.as_ref().map(|p| p.socket.clone()),
            memory: rec.memory.clone(),
            vm_state: r.vm_state_path.clone(),
            layers: rec.layers.len(),
            queues: rec.queues,
            idle_suspend_ms: rec.idle_suspend_ms,
            bytes_written: r.disk.live().dirty_count() * BLOCK,
            read_local_bytes: reads.local_bytes,
            read_store_bytes: reads.store_bytes,
            cloned_from: rec.cloned_from.clone(),
            snapshot: rec.snapshot.clone(),
            created: rec.created,
            served_since: r.served_since,
        }
    }
}

/// What a new sandbox is made from: an image or a completed snapshot.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CreateRequest {
    pub name: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default = "one")]
    pub queues: u16,
    /// Suspend it after this many milliseconds without a disk request
    /// (named sandboxes only); the next request for it resumes it.
    #[serde(default)]
    pub idle_suspend_ms: Option<u64>,
    /// What a sandbox resumed after idling keeps of itself.
    #[serde(skip)]
    pub kept: Kept,
}

/// What a sandbox suspended for idling keeps across its resume: its local
/// id, so its disk socket's path (its idle time-out goes in the request).
#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub id: Option<String>,
}

fn default_project() -> String {
    "default".into()
}

fn one() -> u16 {
    1
}

/// Which suspended sandbox to resume here, and how to serve it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ResumeRequest {
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default = "one")]
    pub queues: u16,
}

/// Sandboxes from one completed snapshot: `name` (with `-1`, `-2`, ...
/// when `count` is more than one) or unnamed.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ForkRequest {
    pub name: Option<String>,
    #[serde(default = "one_count")]
    pub count: u32,
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default = "one")]
    pub queues: u16,
}

fn one_count() -> u32 {
    1
}

/// The most sandboxes one fork makes.
pub const MAX_FORK: u32 = 1000;

/// A VMM's memory file and VM-state blob, given with a snapshot, clone
/// or suspend: paths on the daemon's host, read by the daemon.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct MachineInput {
    #[serde(default)]
    pub memory: Option<PathBuf>,
    /// The memory file is a sparse diff (holes unchanged) over the memory
    /// the sandbox was started from, as Firecracker's diff snapshots are.
    #[serde(default)]
    pub memory_diff: bool,
    #[serde(default)]
    pub vm_state: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct CloneRequest {
    pub name: Option<String>,
    #[serde(flatten)]
    pub machine: MachineInput,
}

/// Where a new sandbox starts from.
struct Source {
    /// The image it descends from, and its name as asked for.
    image: ManifestId,
    image_name: Option<String>,
    /// The manifest its first layer stands on.
    base: ManifestId,
    memory: Option<ManifestId>,
    vm_state: Option<String>,
}

struct Inner {
    layers: Layers,
    sandboxes: BTreeMap<String, Running>,
}

/// What a suspend for a migration did, for its report.
pub struct Switched {
    /// The catalog's record: suspended, with its snapshot.
    pub record: catalog::sandbox::SandboxRecord,
    /// When this host stopped serving the disk.
    pub stopped: Instant,
    /// Bytes the last delta held: written since the last pre-copy round.
    pub delta_bytes: u64,
}

/// Layers that snapshots being uploaded stand on, by snapshot id: kept
/// until their upload ends, whatever happens to their sandbox.
type Uploading = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

pub struct Host {
    state_dir: PathBuf,
    records: Records,
    claims: Claims,
    socket_dir: PathBuf,
    store: ChunkStore,
    /// Who this host is in the catalog's records.
    host_id: String,
    inner: Arc<Mutex<Inner>>,
    uploading: Uploading,
    pages: PageConfig,
    /// How long an upload is tried again while the store does not answer.
    upload_timeout: Duration,
    /// Manifests loaded, by id (at most [`MANIFESTS_KEPT`]).
    manifests: Mutex<HashMap<ManifestId, Arc<Manifest>>>,
    /// Sandboxes suspended for idling, by name.
    dozing: Mutex<BTreeMap<String, Dozing>>,
    /// The same, in the state directory, for the next start.
    doze_files: DozeFiles,
    /// Held by a suspend for idling from its start to its entry in
    /// `dozing`, and by a wake: a request that comes meanwhile (the
    /// sandbox no longer served, not yet dozing) waits for it.
    dozing_turn: Mutex<()>,
    idle_suspends: std::sync::atomic::AtomicU64,
    idle_wakes: std::sync::atomic::AtomicU64,
}

/// Manifests the daemon keeps loaded; past that, it starts over.
const MANIFESTS_KEPT: usize = 256;

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// Layers in use: under a served disk or an upload.
fn layers_in_use(inner: &Inner, uploading: &Uploading) -> std::collections::HashSet<String> {
    let uploading = uploading.lock().unwrap_or_else(|p| p.into_inner());
    inner
        .sandboxes
        .values()
        .flat_map(|r| r.record.layers.iter().cloned())
        .chain(uploading.values().flatten().cloned())
        .collect()
}

/// Once `job`'s layers are uploaded as image `folded`, every sandbox
/// standing on them (the one snapshotted, and clones sharing its frozen
/// layers) stands on `folded` instead: its stack, and so its reads and
/// its next snapshot, no longer grow by a layer per snapshot. The record
/// is saved after the swap and the layers deleted after that, so a crash
/// anywhere leaves a stack that reads the same.
fn rebase(
    inner: &mut Inner,
    records: &Records,
    job: &PendingUpload,
    layers: &[Arc<Overlay>],
    folded: Arc<Manifest>,
) {
    for running in inner.sandboxes.values_mut() {
        let rec = &running.record;
        if rec.base != job.base
            || rec.layers.len() <= job.layers.len()
            || rec.layers[..job.layers.len()] != job.layers[..]
        {
            continue;
        }
        if !running.disk.rebase(folded.clone(), layers) {
            continue;
        }
        let mut next = rec.clone();
        next.base = folded.id().to_hex();
        next.layers.drain(..job.layers.len());
        if let Err(e) = records.save(&next) {
            // The old record still names layers that read the same.
            tracing::warn!(sandbox = %rec.id, error = %format!("{e:#}"), "cannot record a rebase");
        }
        running.record = next;
    }
}

/// This daemon's name in the catalog: the host's name and an id kept in
/// the state directory, so that two daemons on one machine are two hosts.
fn host_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let id = format!("{}:{:08x}", crate::context::host_name(), fastrand::u32(..));
            super::sandbox::write_durably(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

impl Host {
    pub fn new(
        state_dir: &Path,
        socket_dir: &Path,
        store: ChunkStore,
        pages: PageConfig,
        upload_timeout: Duration,
    ) -> Result<Host> {
        std::fs::create_dir_all(socket_dir)
            .with_context(|| format!("creating {}", socket_dir.display()))?;
        let records = Records::new(state_dir);
        Ok(Host {
            state_dir: state_dir.to_owned(),
            records: records.clone(),
            claims: Claims::new(state_dir),
            socket_dir: socket_dir.to_owned(),
            inner: Arc::new(Mutex::new(Inner {
                layers: Layers::new(state_dir, records)?,
                sandboxes: BTreeMap::new(),
            })),
            host_id: host_id(state_dir)?,
            uploading: Arc::default(),
            store,
            pages,
            upload_timeout,
            manifests: Mutex::default(),
            dozing: Mutex::default(),
            doze_files: DozeFiles::new(state_dir),
            dozing_turn: Mutex::default(),
            idle_suspends: Default::default(),
            idle_wakes: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// What this host's sandboxes read from the store: the collector's
    /// roots for them (`cairn_engine::gc::hosts`).
    pub fn gc_roots(&self) -> HostRoots {
        let inner = self.lock();
        let mut roots = HostRoots::new(&self.host_id);
        for r in inner.sandboxes.values().map(|r| &r.record) {
            roots.manifests.insert(r.image.clone());
            roots.manifests.insert(r.base.clone());
            roots.manifests.extend(r.memory.clone());
            if let Some(MemoryParent::Image(m)) = &r.memory_parent {
                roots.manifests.insert(m.clone());
            }
            roots.keys.extend(r.vm_state.clone());
        }
        roots
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    fn disk_socket(&self, id: &str) -> PathBuf {
        self.socket_dir.join(format!("{}.disk.sock", &id[..16]))
    }

    fn memory_socket(&self, id: &str) -> PathBuf {
        self.socket_dir.join(format!("{}.mem.sock", &id[..16]))
    }

    fn vm_state_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("vm-state").join(id)
    }

    /// Snapshot uploads under way.
    pub fn uploads_in_flight(&self) -> usize {
        self.uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Serves a sandbox: its disk, and its memory and VM state if it has them.
    fn start(&self, record: SandboxRecord, disk: Arc<Disk>) -> Result<Running> {
        self.start_on(record, disk, None)
    }

    /// [`Host::start`], its disk served on `listener` if given (bound at
    /// its socket's path already).
    fn start_on(
        &self,
        record: SandboxRecord,
        disk: Arc<Disk>,
        listener: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Running> {
        let mut pages = None;
        if let Some(m) = &record.memory {
            let id: ManifestId = m.parse().context("record's memory image id")?;
            pages = Some(PageServer::start(
                &self.store,
                id,
                &self.memory_socket(&record.id),
                &self.pages,
            )?);
        }
        let mut vm_state_path = None;
        if let Some(key) = &record.vm_state {
            let path = self.vm_state_path(&record.id);
            if !path.exists() {
                let remote = self.store.remote().clone();
                let bytes = self
                    .store
                    .runtime()
                    .block_on(remote.get(key, None))
                    .with_context(|| format!("fetching the VM state {key}"))?;
                write_durably(&path, &bytes)?;
            }
            vm_state_path = Some(path);
        }
        let socket = self.disk_socket(&record.id);
        let mut running = Running::start(record, disk, &socket, listener)?;
        running.pages = pages;
        running.vm_state_path = vm_state_path;
        Ok(running)
    }

    /// Copies a VMM's files into the state directory (the VMM may write
    /// them again) for an upload; checks them first.
    fn take_machine(
        &self,
        record: &SandboxRecord,
        input: &MachineInput,
    ) -> Result<Option<MachineState>> {
        if input.memory.is_none() && input.vm_state.is_none() {
            if input.memory_diff {
                bail!(Refusal::BadRequest(
                    "memory_diff without a memory file".into()
                ));
            }
            return Ok(None);
        }
        let parent = record
            .memory_parent
            .clone()
            .or_else(|| record.memory.clone().map(MemoryParent::Image));
        let memory_parent = match (input.memory_diff, parent) {
            (false, _) => None,
            (true, Some(p)) => Some(p),
            (true, None) => bail!(Refusal::BadRequest(format!(
                "sandbox {} was not started from memory: a diff has nothing to be over; give a full memory file",
                record.id
            ))),
        };
        let dir = self.state_dir.join("inputs");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A regular file's size, or the refusal.
        let file_len = |from: &Path| -> Result<u64> {
            let meta = std::fs::metadata(from)
                .map_err(|e| Refusal::BadRequest(format!("cannot read {}: {e}", from.display())))?;
            if !meta.is_file() {
                bail!(Refusal::BadRequest(format!(
                    "{} is not a file",
                    from.display()
                )));
            }
            Ok(meta.len())
        };
        let copy = |from: &Path, ext: &str| -> Result<PathBuf> {
            let to = dir.join(format!("{}.{ext}", new_id()));
            copy_sparse(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        let memory = match &input.memory {
            Some(m) => {
                let len = file_len(m)?;
                if len == 0 || len % 4096 != 0 {
                    bail!(Refusal::BadRequest(format!(
                        "{} is {len} bytes, not a whole number of 4 KiB pages: is it a memory file?",
                        m.display()
                    )));
                }
                Some(copy(m, "mem")?)
            }
            None => None,
        };
        let vm_state = match &input.vm_state {
            Some(v) => {
                file_len(v)?;
                Some(copy(v, "vmstate")?)
            }
            None => None,
        };
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
        Ok(Some(MachineState {
            memory,
            memory_parent,
            vm_state,
        }))
    }

    /// Manifest `id`, from the store the first time (manifests never
    /// change: their id is their content's hash).
    fn load_manifest(&self, id: &ManifestId) -> Result<Arc<Manifest>> {
        let cached = |m: &Mutex<HashMap<ManifestId, Arc<Manifest>>>| {
            m.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
        };
        if let Some(m) = cached(&self.manifests) {
            return Ok(m);
        }
        let remote = self.store.remote().clone();
        let m = Arc::new(
            self.store
                .runtime()
                .block_on(catalog::load_manifest(remote.as_ref(), id))?,
        );
        let mut map = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MANIFESTS_KEPT {
            map.clear();
        }
        map.insert(*id, m.clone());
        Ok(m)
    }

    /// Serves every sandbox the state directory records, as it was, and
    /// takes up the snapshot uploads it records; deletes layers nothing
    /// names (a crash between making and recording one). Returns how many
    /// sandboxes and uploads.
    pub fn recover(&self) -> Result<(usize, usize)> {
        // What the last run left unsynced (fresh layers written but never
        // flushed: see `Overlay::create_fresh`) is read back from
        // the page cache below and served as it is; it is made durable
        // first, or an OS crash after this start could lose it under
        // writes acknowledged since. One syncfs covers it all.
        let dir = std::fs::File::open(&self.state_dir)
            .with_context(|| format!("opening {}", self.state_dir.display()))?;
        rustix::fs::syncfs(&dir)
            .with_context(|| format!("syncing the file system of {}", self.state_dir.display()))?;
        let loaded = self.records.load_all()?;
        self.give_back_claims(&loaded)?;
        let mut records = self.reconcile(loaded)?;
        let jobs = PendingUpload::load_all(&self.state_dir)?;
        let mut inner = self.lock();
        // A sandbox whose top layer another stands on (a clone's record, or
        // an upload, made durable before its own record took the new layer
        // a crash then lost): that layer is frozen, so a new one goes on
        // before the disk is served. Nothing was written since the crash:
        // the clone's or snapshot's instant is now.
        let below_top: std::collections::HashSet<&String> = records
            .iter()
            .flat_map(|r| &r.layers[..r.layers.len().saturating_sub(1)])
            .chain(jobs.iter().flat_map(|j| &j.layers))
            .collect();
        let frozen_tops: Vec<bool> = records
            .iter()
            .map(|r| r.layers.last().is_some_and(|t| below_top.contains(t)))
            .collect();
        for (rec, frozen_top) in records.iter_mut().zip(frozen_tops) {
            if frozen_top {
                let base: ManifestId = rec.base.parse().context("record's base manifest id")?;
                let size = self.load_manifest(&base)?.logical_size;
                let (next, _) = inner.layers.create(&base, size);
                rec.layers.push(next);
                self.records.save(rec)?;
            }
        }
        let named: std::collections::HashSet<String> = records
            .iter()
            .flat_map(|r| r.layers.iter().cloned())
            .chain(jobs.iter().flat_map(|j| j.layers.iter().cloned()))
            .collect();
        self.sweep_inputs(&jobs);
        let swept = inner.layers.sweep(&|id| named.contains(id))?;
        if swept > 0 {
            tracing::info!(layers = swept, "deleted layers no sandbox recorded");
        }
        let n = records.len();
        for record in records {
            let id = record.id.clone();
            let running = self
                .serve(&mut inner, record)
                .with_context(|| format!("recovering sandbox {id}"))?;
            inner.sandboxes.insert(id, running);
        }
        let uploads = jobs.len();
        for job in jobs {
            let id = job.id.clone();
            self.start_upload(&mut inner, job)
                .with_context(|| format!("resuming the upload of snapshot {id}"))?;
        }
        Ok((n, uploads))
    }

    /// Gives back every name a crash left claimed (see [`claims`]) that no
    /// record names: a create's name is removed from the catalog, a
    /// resumed sandbox is suspended again. A claim the catalog cannot
    /// settle now is kept for the next start.
    fn give_back_claims(&self, records: &[SandboxRecord]) -> Result<()> {
        use catalog::sandbox::SandboxState;
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        for c in self.claims.load_all()? {
            let recorded = records
                .iter()
                .any(|r| r.project == c.project && r.name.as_deref() == Some(&c.name));
            if recorded {
                self.claims.settle(&c);
                continue;
            }
            let given_back = (|| -> Result<&str, catalog::CatalogError> {
                let Some(cur) = rt
                    .block_on(catalog::sandbox::get(remote.as_ref(), &c.project, &c.name))?
                    .map(|s| s.record)
                else {
                    return Ok("not in the catalog");
                };
                if cur.host != self.host_id || cur.state == SandboxState::Suspended {
                    return Ok("not held by this host");
                }
                if cur.snapshot.is_some() {
                    self.suspend_again(&c.project, &c.name, &cur.owner())?;
                    return Ok("a resume cut by a crash: suspended again");
                }
                rt.block_on(catalog::sandbox::remove(
                    remote.as_ref(),
                    &c.project,
                    &c.name,
                    Some(&cur.owner()),
                    &self.host_id,
                ))?;
                Ok("a create cut by a crash: name given back")
            })();
            match given_back {
                Ok(what) => {
                    tracing::info!(sandbox = %c.name, project = %c.project, what, "settled a name claimed before a crash");
                    self.claims.settle(&c);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %c.name, error = %e, "cannot settle a name claimed before a crash; trying again at the next start");
                }
            }
        }
        Ok(())
    }

    /// Puts a sandbox taken over for a resume that was never served back
    /// to suspended (at the snapshot it was resumed from).
    fn suspend_again(
        &self,
        project: &str,
        name: &str,
        owner: &catalog::sandbox::Owner,
    ) -> Result<(), catalog::CatalogError> {
        use catalog::sandbox::SandboxState;
        let remote = self.store.remote().clone();
        self.store.runtime().block_on(async {
            for state in [SandboxState::Suspending, SandboxState::Suspended] {
                catalog::sandbox::set_state(remote.as_ref(), project, name, owner, state, None)
                    .await?;
            }
            Ok(())
        })
    }

    /// The named sandboxes of `records` as the catalog has them: one this
    /// host no longer owns (taken over elsewhere, removed) or whose suspend
    /// completed before a crash is forgotten here, not served; one whose
    /// suspend a crash cut short is running again. When the catalog does
    /// not answer, every record is kept (and served).
    fn reconcile(&self, records: Vec<SandboxRecord>) -> Result<Vec<SandboxRecord>> {
        use catalog::sandbox::SandboxState;
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        let mut kept = Vec::new();
        for rec in records {
            let Some(name) = rec.name.clone().filter(|_| rec.generation > 0) else {
                kept.push(rec);
                continue;
            };
            let owner = self.owner(rec.generation);
            let found = match rt.block_on(catalog::sandbox::get(
                remote.as_ref(),
                &rec.project,
                &name,
            )) {
                Ok(f) => f.map(|s| s.record),
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %e, "the catalog did not answer; serving the sandbox as recorded here");
                    kept.push(rec);
                    continue;
                }
            };
            let why_not = match &found {
                None => Some("its name is no longer in the catalog"),
                Some(c) if c.owner() != owner => Some("another host has taken it over"),
                Some(c) if c.state == SandboxState::Suspended => Some("its suspend completed"),
                Some(_) => None,
            };
            if let Some(why) = why_not {
                tracing::info!(sandbox = %name, why, "not serving a recorded sandbox");
                self.forget(&rec.id)?;
                continue;
            }
            if found.is_some_and(|c| c.state == SandboxState::Suspending) {
                rt.block_on(catalog::sandbox::set_state(
                    remote.as_ref(),
                    &rec.project,
                    &name,
                    &owner,
                    SandboxState::Running,
                    None,
                ))
                .with_context(|| format!("marking {name} running again after a cut suspend"))?;
                tracing::info!(sandbox = %name, "a suspend cut by a crash: running again");
            }
            kept.push(rec);
        }
        Ok(kept)
    }

    /// Deletes copied VMM files no recorded upload names (a snapshot
    /// refused, or a crash, after the copy).
    fn sweep_inputs(&self, jobs: &[PendingUpload]) {
        let named: std::collections::HashSet<&PathBuf> = jobs
            .iter()
            .flat_map(|j| j.machine.iter().flat_map(MachineState::files))
            .collect();
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("inputs")) else {
            return;
        };
        for path in dir.flatten().map(|e| e.path()) {
            if !named.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Uploads `job` on its own thread; its layers are kept until it ends.
    fn start_upload(&self, inner: &mut Inner, job: PendingUpload) -> Result<()> {
        let base_id: ManifestId = job.base.parse().context("upload's base manifest id")?;
        let base = self.load_manifest(&base_id)?;
        let mut layers = Vec::new();
        for id in &job.layers {
            let layer = inner.layers.open(id, &base_id, base.logical_size)?;
            if !layer.is_frozen() {
                layer.freeze()?;
            }
            layers.push(layer);
        }
        self.uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id.clone(), job.layers.clone());
        let (store, state_dir, records, host) = (
            self.store.clone(),
            self.state_dir.clone(),
            self.records.clone(),
            self.host_id.clone(),
        );
        let (uploading, shared) = (self.uploading.clone(), self.inner.clone());
        let upload_timeout = self.upload_timeout;
        std::thread::Builder::new()
            .name("cairn-upload".into())
            .spawn(move || {
                let folded = uploads::run(
                    &store,
                    &state_dir,
                    &host,
                    &job,
                    base,
                    &layers,
                    upload_timeout,
                );
                let mut inner = lock(&shared);
                if let Some(disk) = folded {
                    rebase(&mut inner, &records, &job, &layers, disk);
                }
                uploading
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&job.id);
                let in_use = layers_in_use(&inner, &uploading);
                inner.layers.release(&job.layers, &|l| in_use.contains(l));
            })
            .context("starting an upload thread")?;
        Ok(())
    }

    /// Snapshots a running sandbox at the instant of the call: its live
    /// layer is frozen (one FLUSH; every write completed before is in, none
    /// issued after) and a fresh one put above it, then the frozen stack is
    /// folded and uploaded in the background. Returns the pending record.
    pub fn snapshot(&self, key: &str, input: MachineInput) -> Result<SnapshotRecord> {
        // The VMM's files are copied first, without the lock.
        let record = self.get_record(key)?;
        let machine = self.take_machine(&record, &input)?;
        let mut inner = self.lock();
        let src = Self::find(&inner, key).ok_or_else(|| Refusal::NoSuchSandbox(key.to_owned()))?;
        let size = src.disk.size();
        let src_record = src.record.clone();
        let with_memory = machine.as_ref().is_some_and(|m| m.memory.is_some());
        // The catalog's record first: if this fails, nothing has changed.
        let (snap, job) = self.record_upload(&src_record, src_record.snapshot.clone(), machine)?;
        let (next_id, next) = inner.layers.create(&src_record.base_id()?, size);
        let mut record = src_record;
        record.layers.push(next_id);
        record.snapshot = Some(snap.id.clone());
        if with_memory {
            // The VMM's next diff is over this snapshot's memory: that must
            // not be lost in a crash.
            record.memory_parent = Some(MemoryParent::Snapshot {
                snapshot: snap.id.clone(),
            });
            self.records.save(&record)?;
        } else {
            // Deferred: `next` writes it before its first FLUSH answers;
            // until then a crash leaves the old record, whose top the
            // upload record shows frozen (see `recover`).
            self.records.defer(&record);
        }
        let running = inner.sandboxes.get_mut(&record.id).expect("found above");
        running.record = record;
        running.disk.freeze(next)?;
        self.start_upload(&mut inner, job)?;
        Ok(snap)
    }

    /// A pending snapshot of `record`'s layers over `base`: its catalog
    /// record, and its upload recorded in the state directory.
    fn record_upload(
        &self,
        record: &SandboxRecord,
        parent: Option<String>,
        machine: Option<MachineState>,
    ) -> Result<(SnapshotRecord, PendingUpload)> {
        let image: ManifestId = record.image.parse().context("record's image id")?;
        let remote = self.store.remote().clone();
        let snap = self.store.runtime().block_on(catalog::snapshot::create(
            remote.as_ref(),
            NewSnapshot {
                project: record.project.clone(),
                parent,
                image: Some(image),
                sandbox: Some(record.id.clone()),
                host: self.host_id.clone(),
            },
        ))?;
        let job = PendingUpload {
            id: snap.id.clone(),
            project: record.project.clone(),
            base: record.base.clone(),
            layers: record.layers.clone(),
            machine,
            fence: match (&record.name, record.generation) {
                (Some(name), g) if g > 0 => Some(uploads::Fence {
                    name: name.clone(),
                    generation: g,
                }),
                _ => None,
            },
        };
        job.save(&self.state_dir)?;
        Ok((snap, job))
    }

    /// Layers in use: under a served disk or an upload.
    fn layers_in_use(&self, inner: &Inner) -> std::collections::HashSet<String> {
        layers_in_use(inner, &self.uploading)
    }

    /// Opens a record's layers (all but the top frozen) and serves its disk.
    fn serve(&self, inner: &mut Inner, record: SandboxRecord) -> Result<Running> {
        let base: ManifestId = record.base.parse().context("record's base manifest id")?;
        let manifest = self.load_manifest(&base)?;
        let mut layers = Vec::new();
        for (i, id) in record.layers.iter().enumerate() {
            let layer = inner.layers.open(id, &base, manifest.logical_size)?;
            if i + 1 < record.layers.len() && !layer.is_frozen() {
                layer.freeze()?;
            }
            layers.push(layer);
        }
        let disk = Disk::open(manifest, self.store.clone(), layers)?;
        self.start(record, disk)
    }

    /// Saves a new sandbox's record: durably for a named one (its name is
    /// in the catalog: it must not vanish in a crash), deferred for an
    /// unnamed one (ephemeral; its new layer writes the record before its
    /// first FLUSH answers, so a crash before that loses a sandbox that
    /// acknowledged no write).
    fn save_new(&self, record: &SandboxRecord) -> Result<()> {
        match record.name {
            Some(_) => self.records.save(record),
            None => {
                self.records.defer(record);
                Ok(())
            }
        }
    }

    /// A copy of a sandbox's record.
    fn get_record(&self, key: &str) -> Result<SandboxRecord> {
        let inner = self.lock();
        Ok(Self::find(&inner, key)
            .ok_or_else(|| Refusal::NoSuchSandbox(key.to_owned()))?
            .record
            .clone())
    }

    fn find<'a>(inner: &'a Inner, key: &str) -> Option<&'a Running> {
        inner.sandboxes.get(key).or_else(|| {
            inner
                .sandboxes
                .values()
                .find(|r| r.record.name.as_deref() == Some(key))
        })
    }

    fn check_name(inner: &Inner, name: &Option<String>) -> Result<()> {
        if let Some(n) = name {
            catalog::check_name(n)?;
            if inner
                .sandboxes
                .values()
                .any(|r| r.record.name.as_deref() == Some(n))
            {
                bail!(Refusal::NameTaken(n.clone()));
            }
        }
        Ok(())
    }

    /// What `req` starts from.
    fn source(&self, req: &CreateRequest) -> Result<Source> {
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        match (&req.image, &req.snapshot) {
            (Some(image), None) => {
                let id = rt.block_on(catalog::resolve(remote.as_ref(), &req.project, image))?;
                Ok(Source {
                    image: id,
                    image_name: (*image != id.to_hex()).then(|| image.clone()),
                    base: id,
                    memory: None,
                    vm_state: None,
                })
            }
            (None, Some(snap)) => {
                let rec = rt
                    .block_on(catalog::snapshot::get(remote.as_ref(), &req.project, snap))?
                    .ok_or_else(|| {
                        Refusal::BadRequest(format!(
                            "no snapshot `{snap}` in project `{}` (see `cairn snapshot ls`)",
                            req.project
                        ))
                    })?
                    .record;
                let Some(disk) = rec.disk.filter(|_| rec.state == SnapshotState::Completed) else {
                    bail!(Refusal::BadRequest(format!(
                        "snapshot {snap} is {}{}: a sandbox starts only from a completed one",
                        rec.state,
                        rec.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    )));
                };
                Ok(Source {
                    image: rec.image.unwrap_or(disk),
                    image_name: None,
                    base: disk,
                    memory: rec.memory,
                    vm_state: rec.vm_state,
                })
            }
            _ => bail!(Refusal::BadRequest(
                "give either an image or a snapshot to start from".into()
            )),
        }
    }

    /// A new sandbox from an image (name or id) or a completed snapshot.
    pub fn create(&self, req: CreateRequest) -> Result<SandboxView> {
        if req.idle_suspend_ms.is_some() && req.name.is_none() {
            bail!(Refusal::BadRequest(
                "only a named sandbox can be suspended when idle (an unnamed one has no place in the catalog to resume from)".into()
            ));
        }
        if req.queues == 0 || req.queues > 16 {
            bail!(Refusal::BadRequest(format!(
                "queues must be 1 to 16, not {}",
                req.queues
            )));
        }
        catalog::check_project(&req.project)?;
        let source = self.source(&req)?;
        let mut inner = self.lock();
        Self::check_name(&inner, &req.name)?;
        let from = match &req.snapshot {
            Some(s) => catalog::sandbox::SandboxSource::Snapshot(s.clone()),
            None => catalog::sandbox::SandboxSource::Image(source.image),
        };
        let (project, name) = (req.project.clone(), req.name.clone());
        self.named(&project, name.as_deref(), from, |generation| {
            self.serve_new(&mut inner, req, source, generation, None)
        })
    }

    /// Runs `make` with the generation of the name it serves: a named
    /// sandbox first takes its name in the catalog (of two hosts that race
    /// for it, one wins) and gives it back if `make` fails; an unnamed one
    /// is generation 0, not in the catalog.
    fn named<T>(
        &self,
        project: &str,
        name: Option<&str>,
        source: catalog::sandbox::SandboxSource,
        make: impl FnOnce(u64) -> Result<T>,
    ) -> Result<T> {
        let Some(name) = name else {
            return make(0);
        };
        let claim = self.claims.claim(project, name)?;
        let remote = self.store.remote().clone();
        let taken = self.store.runtime().block_on(catalog::sandbox::create(
            remote.as_ref(),
            catalog::sandbox::NewSandbox {
                project: project.to_owned(),
                name: Some(name.to_owned()),
                source,
                host: self.host_id.clone(),
            },
        ));
        let made = match taken {
            Ok(rec) => {
                claims::crash_after_claim_for_tests();
                let made = make(rec.generation);
                if made.is_err() {
                    self.release_name(project, name, rec.generation);
                }
                made
            }
            Err(e) => Err(e.into()),
        };
        self.claims.settle(&claim);
        made
    }

    /// Removes a name this host holds at `generation` from the catalog;
    /// a failure is logged (the name stays taken until removed by hand).
    fn release_name(&self, project: &str, name: &str, generation: u64) {
        if generation == 0 {
            return;
        }
        let owner = self.owner(generation);
        let remote = self.store.remote().clone();
        if let Err(e) = self.store.runtime().block_on(catalog::sandbox::remove(
            remote.as_ref(),
            project,
            name,
            Some(&owner),
            &self.host_id,
        )) {
            tracing::warn!(sandbox = %name, error = %e, "cannot give the name back to the catalog");
        }
    }

    /// This host as the catalog's owner of a named sandbox at `generation`.
    fn owner(&self, generation: u64) -> catalog::sandbox::Owner {
        catalog::sandbox::Owner {
            host: self.host_id.clone(),
            generation,
        }
    }

    /// Suspends a named sandbox: stops serving it (its VMM should be
    /// stopped first), snapshots and uploads its disk, records the snapshot
    /// in the catalog as the one to resume from, and frees its local state.
    /// Returns when the snapshot is completed.
    pub fn suspend(
        &self,
        key: &str,
        input: MachineInput,
    ) -> Result<catalog::sandbox::SandboxRecord> {
        self.suspend_with(key, input, false).map(|s| s.record)
    }

    /// The switch of a migration: [`Host::suspend`], but a VMM still
    /// connected is not waited for (it is cut off at its next request,
    /// and reconnects to the next host); says when serving
    /// stopped and how big the last delta was.
    pub fn suspend_for_migration(&self, key: &str, input: MachineInput) -> Result<Switched> {
        self.suspend_with(key, input, true)
    }

    fn suspend_with(&self, key: &str, input: MachineInput, hand_off: bool) -> Result<Switched> {
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        let record = self.get_record(key)?;
        // Earlier snapshots of it finish first, while it is still served:
        // its disk is rebased onto them, so the suspend uploads only what
        // was written since, and none of them commits after a resume
        // elsewhere (their commit would be fenced).
        self.wait_for_uploads_over(&record.layers);
        let Some(name) = record.name.clone() else {
            bail!(Refusal::BadRequest(format!(
                "sandbox {} has no name: only a named sandbox can be suspended (unnamed ones go when their daemon stops); remove it, or snapshot it",
                record.id
            )));
        };
        let machine = self.take_machine(&record, &input)?;
        let mut inner = self.lock();
        let found =
            Self::find(&inner, key).ok_or_else(|| Refusal::NoSuchSandbox(key.to_owned()))?;
        let record = found.record.clone();
        let owner = self.owner(record.generation);
        use catalog::sandbox::SandboxState;
        rt.block_on(catalog::sandbox::set_state(
            remote.as_ref(),
            &record.project,
            &name,
            &owner,
            SandboxState::Suspending,
            None,
        ))?;
        let running = inner.sandboxes.remove(&record.id).expect("found above");
        // The stop (which waits for a connected VMM) and the upload run
        // without the lock: other sandboxes are served meanwhile.
        drop(inner);
        let disk = running.disk.clone();
        let delta_bytes = disk
            .layers()
            .iter()
            .filter(|l| !l.is_frozen())
            .map(|l| l.dirty_count() * BLOCK)
            .sum();
        // Serving ends as the stop begins (the flush that follows is part
        // of the time unserved).
        let stopped = Instant::now();
        let outcome = (|| -> Result<String> {
            if hand_off {
                running.hand_off()
            } else {
                running.stop()
            }
            .context("stopping the sandbox")?;
            let layers = disk.layers();
            for l in &layers {
                if !l.is_frozen() {
                    l.freeze()?;
                }
            }
            let (snap, job) =
                self.record_upload(&record, record.snapshot.clone(), machine.clone())?;
            uploads::run(
                &self.store,
                &self.state_dir,
                &self.host_id,
                &job,
                disk.base(),
                &layers,
                self.upload_timeout,
            );
            let done = rt
                .block_on(catalog::snapshot::get(
                    remote.as_ref(),
                    &record.project,
                    &snap.id,
                ))?
                .context("the suspend snapshot's record vanished")?
                .record;
            if done.state != SnapshotState::Completed {
                bail!(
                    "the suspend snapshot {} is {}: {}",
                    snap.id,
                    done.state,
                    done.reason.unwrap_or_default()
                );
            }
            Ok(snap.id)
        })();
        let mut inner = self.lock();
        let snapshot = match outcome {
            Ok(s) => s,
            Err(e) => {
                // Served again as it was, on a fresh live layer (the old top
                // was frozen for the snapshot); the catalog says running.
                let back = (|| -> Result<Running> {
                    let mut again = record.clone();
                    let (next, _) = inner.layers.create(&record.base_id()?, disk.size());
                    again.layers.push(next);
                    self.records.save(&again)?;
                    self.serve(&mut inner, again)
                })();
                let _ = rt.block_on(catalog::sandbox::set_state(
                    remote.as_ref(),
                    &record.project,
                    &name,
                    &owner,
                    SandboxState::Running,
                    None,
                ));
                match back {
                    Ok(r) => {
                        inner.sandboxes.insert(record.id.clone(), r);
                    }
                    Err(b) => {
                        tracing::error!(sandbox = %name, error = %format!("{b:#}"), "a sandbox whose suspend failed could not be served again; restart the daemon")
                    }
                }
                return Err(e.context(format!("suspending {name}")));
            }
        };
        let suspended = rt.block_on(catalog::sandbox::set_state(
            remote.as_ref(),
            &record.project,
            &name,
            &owner,
            SandboxState::Suspended,
            Some(&snapshot),
        ))?;
        self.forget(&record.id)?;
        let in_use = self.layers_in_use(&inner);
        inner
            .layers
            .release(&record.layers, &|l| in_use.contains(l));
        Ok(Switched {
            record: suspended,
            stopped,
            delta_bytes,
        })
    }

    /// Waits until no snapshot upload stands on any of `layers`.
    fn wait_for_uploads_over(&self, layers: &[String]) {
        loop {
            let busy = self
                .uploading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|under| under.iter().any(|l| layers.contains(l)));
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One pre-copy round of a migration: snapshots the running sandbox
    /// (its live layer frozen, a fresh one above it) and waits for the
    /// upload, after which its disk stands on the uploaded image. Returns
    /// the snapshot as completed and the bytes it took up.
    pub fn precopy(&self, key: &str) -> Result<(SnapshotRecord, u64)> {
        let bytes = self.get(key)?.bytes_written;
        let snap = self.snapshot(key, MachineInput::default())?;
        self.wait_for_uploads_over(&self.get_record(key)?.layers);
        let remote = self.store.remote().clone();
        let done = self
            .store
            .runtime()
            .block_on(catalog::snapshot::get(
                remote.as_ref(),
                &snap.project,
                &snap.id,
            ))?
            .context("a pre-copy snapshot's record vanished")?
            .record;
        if done.state != SnapshotState::Completed {
            bail!(
                "pre-copy snapshot {} is {}: {}",
                done.id,
                done.state,
                done.reason.unwrap_or_default()
            );
        }
        Ok((done, bytes))
    }

    /// This daemon's name in the catalog.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Named sandboxes idle for at least their idle time-out.
    pub fn idle_sandboxes(&self) -> Vec<SandboxView> {
        let inner = self.lock();
        inner
            .sandboxes
            .values()
            .filter(|r| {
                r.record.idle_suspend_ms.is_some_and(|ms| {
                    r.record.name.is_some() && r.idle_for() >= Duration::from_millis(ms)
                })
            })
            .map(SandboxView::of)
            .collect()
    }

    /// Suspends named sandbox `name` for idling, as `suspend` does (a
    /// connected VMM is cut off at its next request), and
    /// keeps a doorbell on its disk socket's path: a VMM connecting there
    /// rings `wake`.
    pub fn doze(
        &self,
        name: &str,
        input: MachineInput,
        wake: std::sync::mpsc::Sender<String>,
    ) -> Result<()> {
        let _turn = self.dozing_turn.lock().unwrap_or_else(|p| p.into_inner());
        let record = self.get_record(name)?;
        self.suspend_with(name, input, true)?;
        // Fault injector for the tests: widens the window between the
        // sandbox leaving the served ones and its doorbell.
        crate::faults::pause_for_tests("CAIRN_FAULT_PAUSE_BEFORE_DOZING_MS");
        let doorbell = self.ring_doorbell(&record.id, name, wake);
        let kept = Dozed {
            name: name.to_owned(),
            id: record.id,
            project: record.project,
            queues: record.queues,
            idle_suspend_ms: record.idle_suspend_ms,
        };
        if let Err(e) = self.doze_files.save(&kept) {
            tracing::warn!(sandbox = %name, error = %format!("{e:#}"), "a daemon restart will not ring this sandbox's doorbell again");
        }
        self.idle_suspends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dozing_map().insert(
            name.to_owned(),
            Dozing {
                kept,
                doorbell,
                listener: None,
            },
        );
        Ok(())
    }

    /// Rings the doorbells of the sandboxes this host had suspended for
    /// idling when it last stopped (see [`super::dozing`]), so that a VMM
    /// connecting to one wakes it as before; returns how many. One that
    /// is served again or taken over elsewhere meanwhile is forgotten.
    pub fn ring_doorbells_again(&self, wake: &std::sync::mpsc::Sender<String>) -> Result<usize> {
        use catalog::sandbox::SandboxState;
        let _turn = self.dozing_turn.lock().unwrap_or_else(|p| p.into_inner());
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        let mut rung = 0;
        for kept in self.doze_files.load_all()? {
            let served_here = self.lock().sandboxes.contains_key(&kept.id);
            let current = rt.block_on(catalog::sandbox::get(
                remote.as_ref(),
                &kept.project,
                &kept.name,
            ));
            let still_dozing = !served_here
                && match current {
                    Ok(Some(cur)) => {
                        cur.record.state == SandboxState::Suspended
                            && cur.record.host == self.host_id
                    }
                    Ok(None) => false,
                    Err(e) => {
                        // The wake's take-over settles it.
                        tracing::warn!(sandbox = %kept.name, error = %e, "cannot check a dozing sandbox in the catalog; its doorbell rings anyway");
                        true
                    }
                };
            if !still_dozing {
                self.doze_files.remove(&kept.id);
                continue;
            }
            let doorbell = self.ring_doorbell(&kept.id, &kept.name, wake.clone());
            self.dozing_map().insert(
                kept.name.clone(),
                Dozing {
                    kept,
                    doorbell,
                    listener: None,
                },
            );
            rung += 1;
        }
        Ok(rung)
    }

    /// A doorbell on sandbox `id`'s disk socket, ringing `wake` with
    /// `name`; None (logged) if the socket cannot be listened on.
    fn ring_doorbell(
        &self,
        id: &str,
        name: &str,
        wake: std::sync::mpsc::Sender<String>,
    ) -> Option<super::idle::Doorbell> {
        super::idle::Doorbell::ring(&self.disk_socket(id), name, wake)
            .map_err(|e| tracing::warn!(sandbox = %name, error = %format!("{e:#}"), "no doorbell on the disk socket: only an API call resumes it"))
            .ok()
    }

    fn dozing_map(&self) -> MutexGuard<'_, BTreeMap<String, Dozing>> {
        self.dozing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resumes `key` (a name or a sandbox id) if it is a sandbox this host
    /// suspended for idling (its disk socket at the same path); None if it
    /// is not one.
    pub fn wake(&self, key: &str) -> Result<Option<SandboxView>> {
        let _turn = self.dozing_turn.lock().unwrap_or_else(|p| p.into_inner());
        let taken = {
            let mut dozing = self.dozing_map();
            let name = if dozing.contains_key(key) {
                Some(key.to_owned())
            } else {
                dozing
                    .iter()
                    .find(|(_, d)| d.kept.id == key)
                    .map(|(name, _)| name.clone())
            };
            name.and_then(|n| dozing.remove_entry(&n))
        };
        let Some((name, mut doze)) = taken else {
            return Ok(None);
        };
        if let Some(bell) = doze.doorbell.take() {
            match bell.take_listener() {
                Ok(l) => doze.listener = Some(l),
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %format!("{e:#}"), "the doorbell's listener is lost; the disk socket is made again")
                }
            }
        }
        let Dozed {
            id,
            project,
            queues,
            ..
        } = doze.kept.clone();
        let view = self.resume_as(&name, &project, queues, Some(doze))?;
        self.doze_files.remove(&id);
        self.idle_wakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(view))
    }

    /// Resumes a suspended named sandbox on this host (the one that
    /// suspended it or another sharing the store): takes it over in the
    /// catalog (the next generation fences any earlier owner) and serves a
    /// disk from its suspend snapshot.
    pub fn resume(&self, name: &str, project: &str, queues: u16) -> Result<SandboxView> {
        if let Some(v) = self.wake(name)? {
            return Ok(v);
        }
        self.resume_as(name, project, queues, None)
    }

    /// [`Host::resume`]; a sandbox that was suspended here for idling
    /// (`doze`) keeps its local id, so its disk socket's path, and its
    /// idle time-out.
    fn resume_as(
        &self,
        name: &str,
        project: &str,
        queues: u16,
        doze: Option<Dozing>,
    ) -> Result<SandboxView> {
        catalog::check_project(project)?;
        let remote = self.store.remote().clone();
        let rt = self.store.runtime();
        let mut inner = self.lock();
        Self::check_name(&inner, &Some(name.to_owned()))?;
        let claim = self.claims.claim(project, name)?;
        let taken = rt.block_on(catalog::sandbox::take(
            remote.as_ref(),
            project,
            name,
            &self.host_id,
            false,
        ));
        let served = taken.map_err(anyhow::Error::from).and_then(|taken| {
            claims::crash_after_claim_for_tests();
            self.serve_taken(&mut inner, name, project, queues, taken, doze)
        });
        self.claims.settle(&claim);
        served
    }

    /// The local half of [`Host::resume`]: serves the sandbox taken over
    /// as `taken`, or puts it back to suspended.
    fn serve_taken(
        &self,
        inner: &mut Inner,
        name: &str,
        project: &str,
        queues: u16,
        taken: catalog::sandbox::SandboxRecord,
        mut doze: Option<Dozing>,
    ) -> Result<SandboxView> {
        let listener = doze.as_mut().and_then(|d| d.listener.take());
        let snapshot = taken
            .snapshot
            .clone()
            .context("the catalog's record of a suspended sandbox names no snapshot")?;
        let req = CreateRequest {
            name: Some(name.to_owned()),
            image: None,
            snapshot: Some(snapshot),
            project: project.to_owned(),
            queues,
            idle_suspend_ms: doze.as_ref().and_then(|d| d.kept.idle_suspend_ms),
            kept: Kept {
                id: doze.map(|d| d.kept.id),
            },
        };
        let served = self
            .source(&req)
            .and_then(|source| self.serve_new(inner, req, source, taken.generation, listener));
        if served.is_err() {
            // Back to suspended, for this host or another to try again.
            let _ = self.suspend_again(project, name, &self.owner(taken.generation));
        }
        served
    }

    /// The local half of [`Host::create`] and [`Host::resume`]: a layer,
    /// the record, the server.
    fn serve_new(
        &self,
        inner: &mut Inner,
        req: CreateRequest,
        source: Source,
        generation: u64,
        listener: Option<std::os::unix::net::UnixListener>,
    ) -> Result<SandboxView> {
        let manifest = self.load_manifest(&source.base)?;
        let (layer_id, layer) = inner.layers.create(&source.base, manifest.logical_size);
        let record = SandboxRecord {
            id: req.kept.id.unwrap_or_else(new_id),
            name: req.name,
            project: req.project,
            image: source.image.to_hex(),
            image_name: source.image_name,
            base: source.base.to_hex(),
            layers: vec![layer_id],
            cloned_from: None,
            snapshot: req.snapshot,
            generation,
            queues: req.queues,
            created: now(),
            memory: source.memory.map(|m| m.to_hex()),
            vm_state: source.vm_state,
            memory_parent: None,
            idle_suspend_ms: req.idle_suspend_ms,
        };
        self.save_new(&record)?;
        let disk = Disk::open(manifest, self.store.clone(), vec![layer])?;
        let running = self.start_on(record, disk, listener)?;
        let view = SandboxView::of(&running);
        inner.sandboxes.insert(view.id.clone(), running);
        Ok(view)
    }

    /// `req.count` sandboxes from snapshot `snapshot`, each on its own
    /// layer over the snapshot's disk. All or nothing: if one cannot be
    /// made, those made before it are removed.
    pub fn fork(&self, snapshot: &str, req: ForkRequest) -> Result<Vec<SandboxView>> {
        if req.count == 0 || req.count > MAX_FORK {
            bail!(Refusal::BadRequest(format!(
                "count must be 1 to {MAX_FORK}, not {}",
                req.count
            )));
        }
        let names: Vec<Option<String>> = (1..=req.count)
            .map(|i| match (&req.name, req.count) {
                (Some(n), 1) => Some(n.clone()),
                (Some(n), _) => Some(format!("{n}-{i}")),
                (None, _) => None,
            })
            .collect();
        let mut made: Vec<SandboxView> = Vec::new();
        for name in names {
            let one = CreateRequest {
                name,
                image: None,
                snapshot: Some(snapshot.to_owned()),
                project: req.project.clone(),
                queues: req.queues,
                idle_suspend_ms: None,
                kept: Kept::default(),
            };
            match self.create(one) {
                Ok(v) => made.push(v),
                Err(e) => {
                    for v in &made {
                        if let Err(undo) = self.remove(&v.id) {
                            tracing::warn!(sandbox = %v.id, error = %format!("{undo:#}"), "undoing a failed fork");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(made)
    }

    /// A second sandbox with the disk of `source` as it is now; `source`
    /// keeps running on a fresh layer. Costs `source` one FLUSH.
    pub fn clone_sandbox(&self, source: &str, req: CloneRequest) -> Result<SandboxView> {
        // Memory is imported before the disk's instant, without the lock:
        // the VMM is paused while it wrote the file and until this returns.
        let machine = self.clone_machine(&self.get_record(source)?, &req.machine)?;
        let mut inner = self.lock();
        Self::check_name(&inner, &req.name)?;
        let src =
            Self::find(&inner, source).ok_or_else(|| Refusal::NoSuchSandbox(source.to_owned()))?;
        let (base, size) = (src.disk.base(), src.disk.size());
        let src_id = src.record.id.clone();
        let image: ManifestId = src.record.image.parse().context("record's image id")?;
        let project = src.record.project.clone();
        let view = self.named(
            &project,
            req.name.as_deref(),
            catalog::sandbox::SandboxSource::Image(image),
            |generation| {
                self.clone_onto(
                    &mut inner,
                    &src_id,
                    req.name.clone(),
                    generation,
                    base,
                    size,
                    machine,
                )
            },
        )?;
        if req.machine.memory.is_some() {
            // The source's VMM wrote that memory file: its next diff is
            // over the clone's memory.
            if let (Some(src), Some(m)) = (inner.sandboxes.get_mut(&src_id), &view.memory) {
                src.record.memory_parent = Some(MemoryParent::Image(m.clone()));
                self.records.save(&src.record)?;
            }
        }
        Ok(view)
    }

    /// A clone's memory and VM state, stored now: its page server serves
    /// them at once. Returns (memory image id, VM-state key).
    fn clone_machine(
        &self,
        src: &SandboxRecord,
        input: &MachineInput,
    ) -> Result<(Option<String>, Option<String>)> {
        let Some(taken) = self.take_machine(src, input)? else {
            return Ok((src.memory.clone(), src.vm_state.clone()));
        };
        let staging = self.state_dir.join("staging");
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let stored = uploads::store_machine(
            &self.store,
            &src.project,
            &taken,
            &cairn_engine::import::ImportOptions::new(staging),
            self.upload_timeout,
        );
        taken.remove_files(&src.id);
        let (memory, vm_state) = stored?;
        Ok((
            memory.map(|m| m.to_hex()).or_else(|| src.memory.clone()),
            vm_state.or_else(|| src.vm_state.clone()),
        ))
    }

    /// The local half of [`Host::clone_sandbox`].
    #[allow(clippy::too_many_arguments)]
    fn clone_onto(
        &self,
        inner: &mut Inner,
        src_id: &str,
        name: Option<String>,
        generation: u64,
        base: Arc<Manifest>,
        size: u64,
        (memory, vm_state): (Option<String>, Option<String>),
    ) -> Result<SandboxView> {
        let src_id = src_id.to_owned();
        let base_id = inner.sandboxes[&src_id].record.base_id()?;
        let (clone_layer_id, clone_layer) = inner.layers.create(&base_id, size);
        let running = &inner.sandboxes[&src_id];
        let (src_record, frozen) = match running.disk.frozen_if_clean() {
            // Nothing written since the source's last freeze: the clone
            // stands on its frozen layers; the source is left as it is.
            Some(frozen) => (running.record.clone(), frozen),
            None => {
                let (next_id, next) = inner.layers.create(&base_id, size);
                // Deferred, before the freeze: `next` writes it before its
                // first FLUSH answers. If a crash keeps only the clone's
                // record, the source's old top is found under the clone's
                // layer and frozen (see `recover`).
                let running = inner.sandboxes.get_mut(&src_id).expect("found above");
                let mut src_record = running.record.clone();
                src_record.layers.push(next_id);
                self.records.defer(&src_record);
                running.record = src_record.clone();
                let frozen = running.disk.freeze(next)?;
                (src_record, frozen)
            }
        };
        let record = SandboxRecord {
            id: new_id(),
            name,
            project: src_record.project.clone(),
            image: src_record.image.clone(),
            image_name: src_record.image_name.clone(),
            base: src_record.base.clone(),
            layers: src_record.layers[..frozen.len()]
                .iter()
                .cloned()
                .chain([clone_layer_id])
                .collect(),
            cloned_from: Some(src_id),
            idle_suspend_ms: None,
            snapshot: src_record.snapshot.clone(),
            generation,
            queues: src_record.queues,
            created: now(),
            memory,
            vm_state,
            memory_parent: None,
        };
        self.save_new(&record)?;
        let disk = Disk::open(
            base,
            self.store.clone(),
            [frozen, vec![clone_layer]].concat(),
        )?;
        let running = self.start(record, disk)?;
        let view = SandboxView::of(&running);
        inner.sandboxes.insert(view.id.clone(), running);
        Ok(view)
    }

    /// Deletes a sandbox's record and local files.
    fn forget(&self, id: &str) -> Result<()> {
        let _ = std::fs::remove_file(self.vm_state_path(id));
        self.records.delete(id)
    }

    pub fn list(&self) -> Vec<SandboxView> {
        self.lock()
            .sandboxes
            .values()
            .map(SandboxView::of)
            .collect()
    }

    pub fn get(&self, key: &str) -> Result<SandboxView> {
        let inner = self.lock();
        let r = Self::find(&inner, key).ok_or_else(|| Refusal::NoSuchSandbox(key.to_owned()))?;
        Ok(SandboxView::of(r))
    }

    /// Stops serving a sandbox (a connected VMM is waited for) and deletes
    /// it with the layers no other sandbox stands on.
    pub fn remove(&self, key: &str) -> Result<()> {
        let running = {
            let mut inner = self.lock();
            let id = Self::find(&inner, key)
                .ok_or_else(|| Refusal::NoSuchSandbox(key.to_owned()))?
                .record
                .id
                .clone();
            inner.sandboxes.remove(&id).expect("found above")
        };
        let layers = running.record.layers.clone();
        let id = running.record.id.clone();
        let named = running
            .record
            .name
            .clone()
            .map(|n| (running.record.project.clone(), n, running.record.generation));
        drop(running.stop());
        self.forget(&id)?;
        if let Some((project, name, generation)) = named {
            self.release_name(&project, &name, generation);
        }
        let mut inner = self.lock();
        let in_use = self.layers_in_use(&inner);
        inner.layers.release(&layers, &|l| in_use.contains(l));
        Ok(())
    }

    /// Stops serving everything; unnamed sandboxes are deleted, named ones
    /// kept for the next start.
    pub fn shutdown(&self) {
        let keys: Vec<(String, bool)> = self
            .lock()
            .sandboxes
            .values()
            .map(|r| (r.record.id.clone(), r.record.name.is_none()))
            .collect();
        for (id, ephemeral) in keys {
            if ephemeral {
                if let Err(e) = self.remove(&id) {
                    tracing::warn!(sandbox = %id, error = %format!("{e:#}"), "removing an unnamed sandbox at shutdown failed");
                }
            } else if let Some(r) = self.lock().sandboxes.remove(&id) {
                if let Err(e) = r.stop() {
                    tracing::warn!(sandbox = %id, error = %format!("{e:#}"), "stopping a sandbox at shutdown failed");
                }
            }
        }
        if let Err(e) = self.records.write_all() {
            tracing::warn!(error = %format!("{e:#}"), "writing the sandbox records at shutdown failed");
        }
        // Sandboxes suspended for idling stay suspended (resumed by an API
        // call on any host, as any suspended one); their doorbells ring
        // again at the next start.
        for (_, mut d) in std::mem::take(&mut *self.dozing_map()) {
            if let Some(bell) = d.doorbell.take() {
                drop(bell.take_listener());
            }
        }
    }

    /// Sandboxes suspended for idling so far, and woken.
    pub fn idle_counts(&self) -> (u64, u64) {
        (
            self.idle_suspends
                .load(std::sync::atomic::Ordering::Relaxed),
            self.idle_wakes.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}
