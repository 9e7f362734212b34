//! Sandboxes this host suspended for idling, kept in the state directory
//! so that a restarted daemon rings their doorbells again: a VMM that
//! connects to a dozing sandbox's disk socket after a daemon upgrade
//! still wakes it.
//!
//! A file is written once the sandbox is suspended in the catalog and
//! deleted once it is served again. One left behind by a crash in between
//! is checked against the catalog at start: only a sandbox still
//! suspended by this host gets its doorbell back.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::idle::Doorbell;
use super::sandbox::{read_json_dir, write_durably};

/// What a dozing sandbox keeps across its wake: its local id (so its disk
/// socket's path), its catalog key and its serving settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dozed {
    pub name: String,
    pub id: String,
    pub project: String,
    pub queues: u16,
    pub idle_suspend_ms: Option<u64>,
}

/// A sandbox this host suspended for idling, resumed at the next request
/// for it: an API call naming it, or a VMM connecting to its disk socket
/// (a doorbell listens there meanwhile).
pub struct Dozing {
    pub kept: Dozed,
    pub doorbell: Option<Doorbell>,
    /// The doorbell's listener once it stops, for the disk server.
    pub listener: Option<UnixListener>,
}

#[derive(Clone)]
pub struct DozeFiles {
    dir: PathBuf,
}

impl DozeFiles {
    pub fn new(state_dir: &Path) -> DozeFiles {
        DozeFiles {
            dir: state_dir.join("dozing"),
        }
    }

    /// By id: a sandbox id is hex.
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Records, durably, that `d` dozes here.
    pub fn save(&self, d: &Dozed) -> Result<()> {
        write_durably(&self.path(&d.id), &serde_json::to_vec(d)?)
    }

    /// `id` is served again (or gone). Not synced: a file found again
    /// after a crash is checked against the catalog.
    pub fn remove(&self, id: &str) {
        if let Err(e) = std::fs::remove_file(self.path(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(sandbox = %id, error = %e, "cannot delete a dozing sandbox's file");
            }
        }
    }

    pub fn load_all(&self) -> Result<Vec<Dozed>> {
        read_json_dir(&self.dir, "a dozing sandbox").context("reading the dozing sandboxes")
    }
}
