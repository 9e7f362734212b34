//! The daemon's overlay layers: one directory each under the state
//! directory, opened once however many disks stand on them (a clone shares
//! its source's frozen layers), deleted when no disk uses them any more.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::sandbox::PendingRecords;
use cairn_engine::overlay::Overlay;
use cairn_engine::ManifestId;

pub struct Layers {
    dir: PathBuf,
    open: HashMap<String, Arc<Overlay>>,
    /// Records saved unsynced: a new layer syncs them before its first
    /// FLUSH with writes answers.
    pending: PendingRecords,
}

/// A fresh layer id: 16 random bytes, hex.
pub fn new_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl Layers {
    pub fn new(state_dir: &Path) -> Result<Layers> {
        let dir = state_dir.join("layers");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Layers {
            dir,
            open: HashMap::new(),
            pending: PendingRecords::default(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The records saved unsynced, which new layers sync.
    pub fn pending(&self) -> &PendingRecords {
        &self.pending
    }

    /// A fresh, unsynced layer at `path` that syncs the pending records
    /// with itself.
    fn fresh(&self, path: &Path, base: &ManifestId, size: u64) -> Result<Arc<Overlay>> {
        let layer = Overlay::create_fresh(path, base, size)
            .with_context(|| format!("creating layer {}", path.display()))?;
        let pending = self.pending.clone();
        layer.before_first_sync(Arc::new(move || pending.sync()));
        Ok(layer)
    }

    /// A new, empty layer over image `base` of `size` bytes. Nothing is
    /// synced: the layer becomes durable at its first FLUSH with writes
    /// (see [`Overlay::create_fresh`]), so a clone or fork costs no sync
    /// per layer.
    pub fn create(&mut self, base: &ManifestId, size: u64) -> Result<(String, Arc<Overlay>)> {
        let id = new_id();
        let path = self.path(&id);
        let layer = self.fresh(&path, base, size)?;
        self.open.insert(id.clone(), layer.clone());
        Ok((id, layer))
    }

    /// Layer `id`, opened (and its journal and flush log replayed) if no
    /// disk holds it yet. A layer a crash cut before its first FLUSH (never
    /// durable, so it held no acknowledged write) is made again, empty,
    /// over `base` of `size` bytes.
    pub fn open(&mut self, id: &str, base: &ManifestId, size: u64) -> Result<Arc<Overlay>> {
        if let Some(l) = self.open.get(id) {
            return Ok(l.clone());
        }
        let path = self.path(id);
        let layer = if Overlay::is_whole(&path) {
            Overlay::open(&path).with_context(|| format!("opening layer {}", path.display()))?
        } else {
            tracing::warn!(layer = %path.display(), "a layer created just before a crash, never flushed: made again, empty");
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()))
                }
                _ => {}
            }
            self.fresh(&path, base, size)?
        };
        self.open.insert(id.to_owned(), layer.clone());
        Ok(layer)
    }

    /// Deletes the layers of `ids` that no disk in `in_use` stands on.
    pub fn release(&mut self, ids: &[String], in_use: &dyn Fn(&str) -> bool) {
        for id in ids {
            if in_use(id) {
                continue;
            }
            if let Some(layer) = self.open.remove(id) {
                layer.wait_for_checkpoint();
            }
            let path = self.path(id);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(layer = %path.display(), error = %e, "could not delete a layer no disk uses");
                }
            }
        }
    }

    /// Deletes layer directories no disk in `in_use` stands on (left by a
    /// crash between creating a layer and recording it).
    pub fn sweep(&mut self, in_use: &dyn Fn(&str) -> bool) -> Result<usize> {
        let mut orphans = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !in_use(&name) {
                orphans.push(name);
            }
        }
        let n = orphans.len();
        self.release(&orphans, in_use);
        Ok(n)
    }
}
