//! Names this host is taking in the catalog.
//!
//! A named sandbox takes its name in the catalog (create, clone, fork) or
//! takes it over (resume) before its record exists in the state
//! directory. A crash between the two would leave the catalog saying
//! "running on this host" of a sandbox no record here names: its name
//! stuck. So a claim is written durably before the catalog call and
//! deleted once the record is saved (or the name given back); at start
//! the daemon gives back every name claimed that no record names: a
//! create's is removed, a resume's sandbox is suspended again (its
//! snapshot is still there to resume from).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::sandbox::{read_json_dir, write_durably};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    pub project: String,
    pub name: String,
}

#[derive(Clone)]
pub struct Claims {
    dir: PathBuf,
}

impl Claims {
    pub fn new(state_dir: &Path) -> Claims {
        Claims {
            dir: state_dir.join("claims"),
        }
    }

    /// One file per claim: project names (checked before) have no `.`.
    fn path(&self, c: &Claim) -> PathBuf {
        self.dir.join(format!("{}.{}.json", c.project, c.name))
    }

    /// Records, durably, that this host is about to take `name`.
    pub fn claim(&self, project: &str, name: &str) -> Result<Claim> {
        let c = Claim {
            project: project.to_owned(),
            name: name.to_owned(),
        };
        write_durably(&self.path(&c), &serde_json::to_vec(&c)?)?;
        Ok(c)
    }

    /// The claim is settled: the record is saved or the name given back.
    /// Not synced: a claim found again after a crash is settled again.
    pub fn settle(&self, c: &Claim) {
        if let Err(e) = std::fs::remove_file(self.path(c)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(sandbox = %c.name, error = %e, "cannot delete a settled claim");
            }
        }
    }

    pub fn load_all(&self) -> Result<Vec<Claim>> {
        read_json_dir(&self.dir, "a name claim").context("reading the name claims")
    }
}

/// Fault injector for the crash tests, named as such: with
/// `CAIRN_FAULT_CRASH_AFTER_CLAIM=1` the daemon aborts right after a
/// name is taken in the catalog, before the sandbox is recorded.
pub fn crash_after_claim_for_tests() {
    if std::env::var_os("CAIRN_FAULT_CRASH_AFTER_CLAIM").is_some_and(|v| v == "1") {
        tracing::error!("fault injection: aborting after a name was taken in the catalog");
        std::process::abort();
    }
}
