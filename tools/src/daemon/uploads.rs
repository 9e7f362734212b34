//! Snapshots of running sandboxes: the frozen layers folded into a new
//! disk image and uploaded in the background. A pending upload is recorded
//! in the state directory (`snapshots/<id>.json`) before its sandbox takes
//! another write, so a daemon restarted after a crash takes it up again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use cairn_engine::catalog::snapshot::{self, Completion};
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::import::ImportOptions;
use cairn_engine::manifest::Manifest;
use cairn_engine::overlay::Overlay;
use serde::{Deserialize, Serialize};

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
        if let Err(e) = std::fs::remove_file(self.path(state_dir)) {
            tracing::warn!(snapshot = %self.id, error = %e, "cannot delete a finished upload's record");
        }
    }
}

/// Folds `layers` over `base` into a disk image, stores it, and completes
/// the snapshot; marks it failed (with the reason) if that cannot be
/// done. Then forgets the pending record.
pub fn run(
    store: &ChunkStore,
    state_dir: &Path,
    host: &str,
    job: &PendingUpload,
    base: Arc<Manifest>,
    layers: &[Arc<Overlay>],
) {
    let remote = store.remote().clone();
    let rt = store.runtime();
    stall_for_tests();
    let outcome = (|| -> Result<()> {
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
            _ => return Ok(()),
        }
        let staging = state_dir.join("staging");
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let opts = ImportOptions::new(staging);
        let (manifest, _) =
            cairn_engine::snapshot::fold_layers(store, base, layers, &opts, &|_| {})
                .context("folding the frozen layers")?;
        rt.block_on(snapshot::complete(
            remote.as_ref(),
            &job.project,
            &job.id,
            Completion {
                disk: manifest.id(),
                memory: None,
                vm_state: None,
            },
        ))?;
        Ok(())
    })();
    match outcome {
        Ok(()) => tracing::info!(snapshot = %job.id, "snapshot completed"),
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(snapshot = %job.id, %reason, "snapshot failed");
            if let Err(e) = rt.block_on(snapshot::fail(
                remote.as_ref(),
                &job.project,
                &job.id,
                &reason,
            )) {
                tracing::error!(snapshot = %job.id, error = %e, "cannot mark the snapshot failed");
                // Kept: the next start tries again.
                return;
            }
        }
    }
    job.forget(state_dir);
}

/// Fault injector for the crash tests, named as such: with
/// `CAIRN_FAULT_STALL_UPLOADS_MS=N` every upload waits N ms before it
/// starts, so a test can kill the daemon while one is in flight.
fn stall_for_tests() {
    if let Some(ms) = std::env::var("CAIRN_FAULT_STALL_UPLOADS_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
