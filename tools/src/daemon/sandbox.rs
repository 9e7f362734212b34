//! One sandbox on this host: its record in the state directory and, while
//! it runs, its disk and the vhost-user-blk server that serves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// Suspended by the daemon after this long without a disk request
    /// (named sandboxes only), and resumed at the next request for it.
    #[serde(default)]
    pub idle_suspend_ms: Option<u64>,
    /// What its VMM's next diff memory file is over: the memory of its
    /// latest snapshot or clone taken with memory (the VMM starts tracking
    /// dirty pages again there), else (when absent) `memory`.
    #[serde(default)]
    pub memory_parent: Option<MemoryParent>,
}

/// The memory a diff memory file is over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum MemoryParent {
    /// A stored memory image, by id.
    Image(String),
    /// The memory of a snapshot whose upload may still run.
    Snapshot { snapshot: String },
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
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let sync = |p: &Path| std::fs::File::open(p)?.sync_all();
    std::fs::write(&tmp, bytes)
        .and_then(|()| sync(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| sync(dir))
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

/// The sandbox records of the state directory (`sandboxes/ID.json`).
///
/// A record whose loss in a crash loses no acknowledged write may be
/// deferred: kept in memory, and written (durably) by the first FLUSH with
/// writes of a fresh layer it lists, before that FLUSH answers (see
/// [`Records::write_naming`]), or by a later save of the same sandbox. A
/// clone, fork or unnamed create then costs no file at all.
#[derive(Clone)]
pub struct Records {
    dir: PathBuf,
    deferred: Arc<Mutex<HashMap<String, SandboxRecord>>>,
}

impl Records {
    pub fn new(state_dir: &Path) -> Records {
        Records {
            dir: state_dir.join("sandboxes"),
            deferred: Arc::default(),
        }
    }

    fn deferred(&self) -> MutexGuard<'_, HashMap<String, SandboxRecord>> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn write(&self, record: &SandboxRecord) -> Result<()> {
        let text = serde_json::to_vec_pretty(record).expect("plain struct");
        write_durably(&self.path(&record.id), &text)
    }

    /// Writes `record` durably (temporary file, sync, rename, directory
    /// sync); a deferred version of it is dropped.
    pub fn save(&self, record: &SandboxRecord) -> Result<()> {
        let mut deferred = self.deferred();
        deferred.remove(&record.id);
        self.write(record)
    }

    /// Keeps `record` to be written by the first FLUSH of a fresh layer it
    /// lists: for a record whose loss in a crash loses no acknowledged
    /// write (an unnamed sandbox's, or one whose new layer holds nothing
    /// flushed and whose old record still reads the same).
    pub fn defer(&self, record: &SandboxRecord) {
        self.deferred().insert(record.id.clone(), record.clone());
    }

    /// Writes, durably, every deferred record that lists `layer`.
    pub fn write_naming(&self, layer: &str) -> Result<()> {
        let mut deferred = self.deferred();
        let naming: Vec<String> = deferred
            .values()
            .filter(|r| r.layers.iter().any(|l| l == layer))
            .map(|r| r.id.clone())
            .collect();
        for id in naming {
            self.write(&deferred[&id])?;
            deferred.remove(&id);
        }
        Ok(())
    }

    /// Writes every deferred record (at shutdown).
    pub fn write_all(&self) -> Result<()> {
        let mut deferred = self.deferred();
        for record in deferred.values() {
            self.write(record)?;
        }
        deferred.clear();
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        let mut deferred = self.deferred();
        deferred.remove(id);
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("deleting {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Every record written, oldest first.
    pub fn load_all(&self) -> Result<Vec<SandboxRecord>> {
        let mut out: Vec<SandboxRecord> = read_json_dir(&self.dir, "a sandbox record")?;
        out.sort_by_key(|r| (r.created, r.id.clone()));
        Ok(out)
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
    /// any, is added by the caller); on `listener` if given, bound at
    /// `socket` already (a VMM may wait in its backlog).
    pub fn start(
        record: SandboxRecord,
        disk: Arc<Disk>,
        socket: &Path,
        listener: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Running> {
        let cfg = DeviceConfig {
            capacity_bytes: disk.size(),
            read_only: false,
            queues: record.queues,
            serial: format!("cairn-{}", &record.id[..12]),
            poll: cairn_vmm_glue::blk::DEFAULT_POLL,
        };
        let backend = BlkBackend::new(cfg, (0..record.queues).map(|_| disk.queue()).collect());
        let server = BlkServer::start_on(socket, listener, backend)
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
    pub fn stop(self) -> Result<SandboxRecord> {
        self.stop_with(false)
    }

    /// As [`Running::stop`], for a sandbox served elsewhere next: stops
    /// serving at once; a connected VMM is cut off at its next request
    /// (see `BlkServer::park_and_stop`), and reconnects elsewhere.
    pub fn hand_off(self) -> Result<SandboxRecord> {
        self.stop_with(true)
    }

    /// How long since its disk was last asked for anything, or its
    /// memory for a page.
    pub fn idle_for(&self) -> std::time::Duration {
        let disk = self
            .server
            .as_ref()
            .map_or(std::time::Duration::ZERO, BlkServer::idle_for);
        self.pages.as_ref().map_or(disk, |p| disk.min(p.idle_for()))
    }

    /// Bytes its guest read, by source (zero once it stopped serving).
    pub fn read_counts(&self) -> cairn_vmm_glue::blk::ReadCounts {
        self.server
            .as_ref()
            .map(BlkServer::read_counts)
            .unwrap_or_default()
    }

    /// Whether a VMM is connected to its disk socket now.
    pub fn vmm_connected(&self) -> bool {
        self.server.as_ref().is_some_and(BlkServer::vmm_connected)
    }

    fn stop_with(mut self, hand_off: bool) -> Result<SandboxRecord> {
        if let Some(p) = self.pages.take() {
            p.stop();
        }
        if let Some(s) = self.server.take() {
            if hand_off {
                s.park_and_stop()
            } else {
                s.stop()
            }
            .context("stopping the disk server")?;
        }
        self.disk.flush().context("flushing the disk")?;
        Ok(self.record)
    }
}
