//! Everything the daemon serves on this host, and the operations on it.
//! Each operation is quick and local (no upload waits in here) and leaves
//! the state directory consistent at every step, so a crash anywhere is
//! recovered by [`Host::recover`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context as _, Result};
use cairn_engine::catalog;
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::disk::Disk;
use cairn_engine::manifest::Manifest;
use cairn_engine::overlay::BLOCK;
use cairn_engine::ManifestId;
use serde::Serialize;

use super::layers::Layers;
use super::sandbox::{new_id, now, Running, SandboxRecord};

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
    pub memory_socket: Option<PathBuf>,
    pub layers: usize,
    /// Bytes its live layer holds (written since its last snapshot).
    pub bytes_written: u64,
    pub cloned_from: Option<String>,
    pub created: u64,
    pub served_since: u64,
}

impl SandboxView {
    fn of(r: &Running) -> SandboxView {
        let rec = &r.record;
        SandboxView {
            id: rec.id.clone(),
            name: rec.name.clone(),
            project: rec.project.clone(),
            state: "running",
            image: rec.image.clone(),
            image_name: rec.image_name.clone(),
            base: rec.base.clone(),
            disk_socket: r.disk_socket.clone(),
            memory_socket: None,
            layers: rec.layers.len(),
            bytes_written: r.disk.live().dirty_count() * BLOCK,
            cloned_from: rec.cloned_from.clone(),
            created: rec.created,
            served_since: r.served_since,
        }
    }
}

/// What a new sandbox is made from.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CreateRequest {
    pub name: Option<String>,
    pub image: String,
    #[serde(default = "default_project")]
    pub project: String,
    #[serde(default = "one")]
    pub queues: u16,
}

fn default_project() -> String {
    "default".into()
}

fn one() -> u16 {
    1
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct CloneRequest {
    pub name: Option<String>,
}

struct Inner {
    layers: Layers,
    sandboxes: BTreeMap<String, Running>,
}

pub struct Host {
    state_dir: PathBuf,
    socket_dir: PathBuf,
    store: ChunkStore,
    inner: Mutex<Inner>,
}

impl Host {
    pub fn new(state_dir: &Path, socket_dir: &Path, store: ChunkStore) -> Result<Host> {
        std::fs::create_dir_all(socket_dir)
            .with_context(|| format!("creating {}", socket_dir.display()))?;
        Ok(Host {
            state_dir: state_dir.to_owned(),
            socket_dir: socket_dir.to_owned(),
            inner: Mutex::new(Inner {
                layers: Layers::new(state_dir)?,
                sandboxes: BTreeMap::new(),
            }),
            store,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    fn disk_socket(&self, id: &str) -> PathBuf {
        self.socket_dir.join(format!("{}.disk.sock", &id[..16]))
    }

    fn load_manifest(&self, id: &ManifestId) -> Result<Arc<Manifest>> {
        let remote = self.store.remote().clone();
        let m = self
            .store
            .runtime()
            .block_on(catalog::load_manifest(remote.as_ref(), id))?;
        Ok(Arc::new(m))
    }

    /// Serves every sandbox the state directory records, as it was; deletes
    /// layers no record names (a crash between making and recording one).
    pub fn recover(&self) -> Result<usize> {
        let records = SandboxRecord::load_all(&self.state_dir)?;
        let mut inner = self.lock();
        let named: std::collections::HashSet<String> = records
            .iter()
            .flat_map(|r| r.layers.iter().cloned())
            .collect();
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
        Ok(n)
    }

    /// Opens a record's layers (all but the top frozen) and serves its disk.
    fn serve(&self, inner: &mut Inner, record: SandboxRecord) -> Result<Running> {
        let base: ManifestId = record.base.parse().context("record's base manifest id")?;
        let manifest = self.load_manifest(&base)?;
        let mut layers = Vec::new();
        for (i, id) in record.layers.iter().enumerate() {
            let layer = inner.layers.open(id)?;
            if i + 1 < record.layers.len() && !layer.is_frozen() {
                layer.freeze()?;
            }
            layers.push(layer);
        }
        let disk = Disk::open(manifest, self.store.clone(), layers)?;
        let socket = self.disk_socket(&record.id);
        Running::start(record, disk, &socket)
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

    /// A new sandbox from an image (name or id).
    pub fn create(&self, req: CreateRequest) -> Result<SandboxView> {
        if req.queues == 0 || req.queues > 16 {
            bail!(Refusal::BadRequest(format!(
                "queues must be 1 to 16, not {}",
                req.queues
            )));
        }
        catalog::check_project(&req.project)?;
        let remote = self.store.remote().clone();
        let image = self.store.runtime().block_on(catalog::resolve(
            remote.as_ref(),
            &req.project,
            &req.image,
        ))?;
        let manifest = self.load_manifest(&image)?;
        let mut inner = self.lock();
        Self::check_name(&inner, &req.name)?;
        let (layer_id, layer) = inner.layers.create(&image, manifest.logical_size)?;
        let record = SandboxRecord {
            id: new_id(),
            name: req.name,
            project: req.project,
            image: image.to_hex(),
            image_name: (req.image != image.to_hex()).then_some(req.image),
            base: image.to_hex(),
            layers: vec![layer_id],
            cloned_from: None,
            queues: req.queues,
            created: now(),
        };
        record.save(&self.state_dir)?;
        let disk = Disk::open(manifest, self.store.clone(), vec![layer])?;
        let socket = self.disk_socket(&record.id);
        let running = Running::start(record, disk, &socket)?;
        let view = SandboxView::of(&running);
        inner.sandboxes.insert(view.id.clone(), running);
        Ok(view)
    }

    /// A second sandbox with the disk of `source` as it is now; `source`
    /// keeps running on a fresh layer. Costs `source` one FLUSH.
    pub fn clone_sandbox(&self, source: &str, req: CloneRequest) -> Result<SandboxView> {
        let mut inner = self.lock();
        Self::check_name(&inner, &req.name)?;
        let src =
            Self::find(&inner, source).ok_or_else(|| Refusal::NoSuchSandbox(source.to_owned()))?;
        let (base, size) = (src.disk.base(), src.disk.size());
        let src_id = src.record.id.clone();
        let (next_id, next) = inner.layers.create(&base.id(), size)?;
        let (clone_layer_id, clone_layer) = inner.layers.create(&base.id(), size)?;
        // Recorded before the freeze: after a crash, the source's old top
        // is a frozen layer under an empty one, whatever happened.
        let running = inner.sandboxes.get_mut(&src_id).expect("found above");
        let mut src_record = running.record.clone();
        src_record.layers.push(next_id);
        src_record.save(&self.state_dir)?;
        running.record = src_record.clone();
        let frozen = running.disk.freeze(next)?;
        let record = SandboxRecord {
            id: new_id(),
            name: req.name,
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
            queues: src_record.queues,
            created: now(),
        };
        record.save(&self.state_dir)?;
        let disk = Disk::open(
            base,
            self.store.clone(),
            [frozen, vec![clone_layer]].concat(),
        )?;
        let socket = self.disk_socket(&record.id);
        let running = Running::start(record, disk, &socket)?;
        let view = SandboxView::of(&running);
        inner.sandboxes.insert(view.id.clone(), running);
        Ok(view)
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
        drop(running.stop());
        SandboxRecord::delete(&self.state_dir, &id)?;
        let mut inner = self.lock();
        let in_use: std::collections::HashSet<String> = inner
            .sandboxes
            .values()
            .flat_map(|r| r.record.layers.iter().cloned())
            .collect();
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
    }
}
