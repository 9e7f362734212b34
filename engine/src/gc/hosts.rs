//! What each daemon's sandboxes stand on, published for the collector.
//!
//! Unnamed sandboxes are not in the catalog, and a sandbox's disk moves
//! onto each snapshot taken of it. So every daemon keeps one object,
//! `gc/hosts/<host id>`, listing the manifests and VM states its
//! sandboxes use, rewritten within seconds of a change (well inside any
//! grace period), and at least every [`HEARTBEAT`] while it runs. The
//! mark reads them all as roots. A host gone for good keeps its roots
//! until `cairn gc --forget-host` deletes them, which it does only for a
//! host silent for longer than a time-out (see [`check_forgettable`]).

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::objstore::{ObjectStore, PutMode, StoreError};

pub const HOSTS: &str = "gc/hosts/";
/// A running daemon publishes its roots at least this often, changed or
/// not: roots older than a few of these are a stopped host's.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(600);
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoots {
    pub format: u32,
    pub host: String,
    /// Manifest ids (hex) the host's sandboxes read.
    pub manifests: BTreeSet<String>,
    /// Other objects they need (VM-state blobs).
    pub keys: BTreeSet<String>,
    /// When it was written, in seconds since the epoch (0: by a build
    /// from before this field).
    #[serde(default)]
    pub published: u64,
}

impl HostRoots {
    pub fn new(host: &str) -> HostRoots {
        HostRoots {
            format: FORMAT,
            host: host.to_owned(),
            ..HostRoots::default()
        }
    }
}

/// Where `host`'s roots live (a host id's `:` is not a key character).
pub fn key(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{HOSTS}{safe}")
}

/// Writes `roots`, stamped with the time now.
pub async fn publish(store: &dyn ObjectStore, roots: &HostRoots) -> Result<(), StoreError> {
    let stamped = HostRoots {
        published: crate::gc::state::now_secs(),
        ..roots.clone()
    };
    let data = Bytes::from(serde_json::to_vec(&stamped).expect("host roots serialize"));
    store
        .put(&key(&roots.host), data, PutMode::Overwrite)
        .await?;
    Ok(())
}

/// Reads one host's roots; a bad object is an error (the mark stops).
pub async fn read(store: &dyn ObjectStore, key: &str) -> Result<Option<HostRoots>, StoreError> {
    let Some(v) = store.get_versioned(key).await? else {
        return Ok(None);
    };
    let roots: HostRoots = serde_json::from_slice(&v.data).map_err(|e| {
        StoreError::new("read", store.uri(), key, ErrorKind::Corrupt, format!("a daemon's roots are unreadable ({e}); garbage collection deletes nothing until it is fixed or deleted"))
    })?;
    if roots.format != FORMAT {
        return Err(StoreError::new(
            "read",
            store.uri(),
            key,
            ErrorKind::Unsupported,
            format!("format {}, this build reads {FORMAT}", roots.format),
        ));
    }
    Ok(Some(roots))
}

/// Why a host's roots may not be forgotten.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unforgettable {
    #[error("no host `{0}` has roots in the store (a gc report's `hosts` lists those that do)")]
    Unknown(String),
    #[error("host `{host}` published its roots {secs_ago} s ago, within the time-out of {timeout_secs} s: its daemon may be running (it republishes every {} s); stop it first, or wait", HEARTBEAT.as_secs())]
    Alive {
        host: String,
        secs_ago: u64,
        timeout_secs: u64,
    },
}

/// Whether `roots` (read at `key` for `host`; None if absent) may be
/// forgotten at `now` (seconds since the epoch): only a host that has not
/// published for longer than `timeout`. Forgetting a host that comes back
/// is safe within the grace period: its next publication makes its
/// chunks referenced again before they can be deleted.
pub fn check_forgettable(
    host: &str,
    roots: Option<&HostRoots>,
    now: u64,
    timeout: std::time::Duration,
) -> Result<(), Unforgettable> {
    let roots = roots.ok_or_else(|| Unforgettable::Unknown(host.to_owned()))?;
    let secs_ago = now.saturating_sub(roots.published);
    if secs_ago < timeout.as_secs() {
        return Err(Unforgettable::Alive {
            host: host.to_owned(),
            secs_ago,
            timeout_secs: timeout.as_secs(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_a_silent_host_may_be_forgotten() {
        let mut roots = HostRoots::new("h");
        roots.published = 1_000;
        let timeout = Duration::from_secs(1_800);
        assert!(matches!(
            check_forgettable("h", Some(&roots), 2_000, timeout),
            Err(Unforgettable::Alive {
                secs_ago: 1_000,
                ..
            })
        ));
        assert_eq!(check_forgettable("h", Some(&roots), 2_800, timeout), Ok(()));
        assert_eq!(
            check_forgettable("h", None, 2_800, timeout),
            Err(Unforgettable::Unknown("h".into()))
        );
        // Roots from before the stamp are as old as can be.
        roots.published = 0;
        assert_eq!(check_forgettable("h", Some(&roots), 2_000, timeout), Ok(()));
    }
}
