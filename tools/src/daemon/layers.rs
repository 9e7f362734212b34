//! The daemon's overlay layers: one directory each under the state
//! directory, opened once however many disks stand on them (a clone shares
//! its source's frozen layers), deleted when no disk uses them any more.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::sandbox::Records;
use cairn_engine::overlay::Overlay;
use cairn_engine::ManifestId;

pub struct Layers {
    dir: PathBuf,
    open: HashMap<String, Arc<Overlay>>,
    /// The sandbox records: a fresh layer writes the deferred ones that
    /// list it before its first FLUSH with writes answers.
    records: Records,
}

/// A fresh layer id: 16 random bytes, hex.
pub fn new_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl Layers {
    pub fn new(state_dir: &Path, records: Records) -> Result<Layers> {
        let dir = state_dir.join("layers");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Layers {
            dir,
            open: HashMap::new(),
            records,
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Fresh layer `id` (see [`Overlay::create_fresh`]): made on disk at
    /// its first write; its first FLUSH with writes makes it durable and
    /// writes the deferred records that list it before it answers.
    fn fresh(&self, id: &str, base: &ManifestId, size: u64) -> Arc<Overlay> {
        let layer = Overlay::create_fresh(&self.path(id), base, size);
        let (records, id) = (self.records.clone(), id.to_owned());
        layer.before_first_sync(Arc::new(move || {
            records
                .write_naming(&id)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
        }));
        layer
    }

    /// A new, empty layer over image `base` of `size` bytes. Nothing
    /// touches the disk until it is written, and nothing is synced until
    /// its first FLUSH with writes: a clone or fork costs no file.
    pub fn create(&mut self, base: &ManifestId, size: u64) -> (String, Arc<Overlay>) {
        let id = new_id();
        let layer = self.fresh(&id, base, size);
        self.open.insert(id.clone(), layer.clone());
        (id, layer)
    }

    /// Layer `id`, opened (and its journal and flush log replayed) if no
    /// disk holds it yet. A layer never written, or one a crash cut before
    /// its first FLUSH (never durable, so it held no acknowledged write),
    /// is made again, empty, over `base` of `size` bytes.
    pub fn open(&mut self, id: &str, base: &ManifestId, size: u64) -> Result<Arc<Overlay>> {
        if let Some(l) = self.open.get(id) {
            return Ok(l.clone());
        }
        let path = self.path(id);
        let layer = if Overlay::is_whole(&path) {
            Overlay::open(&path).with_context(|| format!("opening layer {}", path.display()))?
        } else {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::warn!(layer = %path.display(), "a layer created just before a crash, never flushed: made again, empty")
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()))
                }
                Err(_) => {}
            }
            self.fresh(id, base, size)
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
