//! One sandbox on this host: its record in the state directory and, while
//! it runs, its disk and the vhost-user-blk server that serves it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use cairn_engine::disk::Disk;
use cairn_vmm_glue::blk::{BlkBackend, BlkServer, DeviceConfig};
use serde::{Deserialize, Serialize};

use super::pages::PageServer;

/// What the state directory keeps of a sandbox: enough to serve it again
/// after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub name: Option<String>,
    pub project: String,
    /// The image it was made from (a manifest id) and the name it was
    /// asked for by, if any.
    pub image: String,
    pub image_name: Option<String>,
    /// The manifest its layers stand on (the image, or a later snapshot
    /// they were rebased onto).
    pub base: String,
    /// Its disk's layers, bottom to top; the top one is live. A layer is
    /// recorded before it takes any write.
    pub layers: Vec<String>,
    /// The sandbox it was cloned from, if any.
    pub cloned_from: Option<String>,
    /// Its latest snapshot, else the one it was made from: the parent of
    /// its next snapshot.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// A named sandbox's generation in the catalog while this host serves
    /// it (0: unnamed, not in the catalog).
    #[serde(default)]
    pub generation: u64,
    pub queues: u16,
    /// Seconds since the epoch.
    pub created: u64,
    /// The memory image its page server serves, if it has memory.
    #[serde(default)]
    pub memory: Option<String>,
    /// The store key of its VM-state blob, if any.
    #[serde(default)]
    pub vm_state: Option<String>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh sandbox id: 16 random bytes, hex.
pub fn new_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Writes `bytes` to `path` durably: a temporary file, synced, renamed
/// over it, the directory synced.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_whole(path, bytes, true)
}

/// Replaces `path` with `bytes` whole (a temporary file renamed over it);
/// with `sync`, the file is synced before the rename and the directory
/// after it.
fn write_whole(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let sync_file = |p: &Path| match sync {
        true => std::fs::File::open(p)?.sync_all(),
        false => Ok(()),
    };
    std::fs::write(&tmp, bytes)
        .and_then(|()| sync_file(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| sync_file(dir))
        .with_context(|| format!("saving {}", path.display()))
}

/// Copies `from` to `to` keeping its holes (a diff memory file's holes
/// mean "unchanged": a plain copy would turn them into written zeros),
/// and syncs the copy.
pub fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let data = match seek(&src, SeekFrom::Data(pos)) {
            Ok(at) => at.min(len),
            Err(rustix::io::Errno::NXIO) => len,
            // No SEEK_DATA here: all of it is data.
            Err(_) => pos,
        };
        if data >= len {
            break;
        }
        let end = match seek(&src, SeekFrom::Hole(data)) {
            Ok(at) => at.clamp(data + 1, len),
            Err(_) => len,
        };
        let mut at = data;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    dst.sync_all()
}

/// Records written without a sync, made durable together by [`Self::sync`]
/// (which every new layer runs before its first FLUSH with writes answers).
#[derive(Clone, Default)]
pub struct PendingRecords(Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>);

impl PendingRecords {
    fn add(&self, path: PathBuf) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path);
    }

    /// Syncs every pending record (one since deleted is skipped) and their
    /// directories.
    pub fn sync(&self) -> std::io::Result<()> {
        let paths = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        let outcome = (|| {
            let mut dirs = std::collections::BTreeSet::new();
            for p in &paths {
                match std::fs::File::open(p) {
                    Ok(f) => f.sync_all()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                dirs.extend(p.parent().map(Path::to_owned));
            }
            for d in dirs {
                std::fs::File::open(&d)?.sync_all()?;
            }
            Ok(())
        })();
        if outcome.is_err() {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(paths);
        }
        outcome
    }
}

/// Every `*.json` file in `dir` (created if missing), parsed; `what`
/// names them in errors.
pub fn read_json_dir<T: serde::de::DeserializeOwned>(dir: &Path, what: &str) -> Result<Vec<T>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push(
                serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not {what}", path.display()))?,
            );
        }
    }
    Ok(out)
}

impl SandboxRecord {
    /// The manifest its layers stand on.
    pub fn base_id(&self) -> Result<cairn_engine::ManifestId> {
        self.base.parse().context("the record's base manifest id")
    }

    fn path(state_dir: &Path, id: &str) -> PathBuf {
        state_dir.join("sandboxes").join(format!("{id}.json"))
    }

    /// Writes the record durably (temporary file, sync, rename, directory sync).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("plain struct");
        write_durably(&Self::path(state_dir, &self.id), &text)
    }

    /// Writes the record whole (temporary file, rename) without a sync, and
    /// leaves it to `pending`: for a record whose loss in a crash loses no
    /// acknowledged write, because its new layers sync it before their
    /// first FLUSH answers.
    pub fn save_unsynced(&self, state_dir: &Path, pending: &PendingRecords) -> Result<()> {
        let path = Self::path(state_dir, &self.id);
        let text = serde_json::to_vec_pretty(self).expect("plain struct");
        write_whole(&path, &text, false)?;
        pending.add(path);
        Ok(())
    }

    pub fn delete(state_dir: &Path, id: &str) -> Result<()> {
        let path = Self::path(state_dir, id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("deleting {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Every record in the state directory.
    pub fn load_all(state_dir: &Path) -> Result<Vec<SandboxRecord>> {
        let mut out: Vec<SandboxRecord> =
            read_json_dir(&state_dir.join("sandboxes"), "a sandbox record")?;
        out.sort_by_key(|r| (r.created, r.id.clone()));
        Ok(out)
    }
}

/// A sandbox being served.
pub struct Running {
    pub record: SandboxRecord,
    pub disk: Arc<Disk>,
    pub disk_socket: PathBuf,
    server: Option<BlkServer>,
    /// Its memory's page server, when it has memory.
    pub pages: Option<PageServer>,
    /// Its VM-state blob, fetched from the store.
    pub vm_state_path: Option<PathBuf>,
    pub served_since: u64,
}

impl Running {
    /// Serves `disk` on `socket` with `record.queues` queues (memory, if
    /// any, is added by the caller).
    pub fn start(record: SandboxRecord, disk: Arc<Disk>, socket: &Path) -> Result<Running> {
        let cfg = DeviceConfig {
            capacity_bytes: disk.size(),
            read_only: false,
            queues: record.queues,
            serial: format!("cairn-{}", &record.id[..12]),
            poll: cairn_vmm_glue::blk::DEFAULT_POLL,
        };
        let backend = BlkBackend::new(cfg, (0..record.queues).map(|_| disk.queue()).collect());
        let server = BlkServer::start(socket, backend)
            .with_context(|| format!("serving vhost-user-blk on {}", socket.display()))?;
        Ok(Running {
            record,
            disk,
            disk_socket: socket.to_owned(),
            server: Some(server),
            pages: None,
            vm_state_path: None,
            served_since: now(),
        })
    }

    /// Stops serving (waits for a connected VMM to go) and makes every
    /// completed write durable.
    pub fn stop(mut self) -> Result<SandboxRecord> {
        if let Some(p) = self.pages.take() {
            p.stop();
        }
        if let Some(s) = self.server.take() {
            s.stop().context("stopping the disk server")?;
        }
        self.disk.flush().context("flushing the disk")?;
        Ok(self.record)
    }
}
