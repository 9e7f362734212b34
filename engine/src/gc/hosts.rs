//! What each daemon's sandboxes stand on, published for the collector.
//!
//! Unnamed sandboxes are not in the catalog, and a sandbox's disk moves
//! onto each snapshot taken of it. So every daemon keeps one object,
//! `gc/hosts/<host id>`, listing the manifests and VM states its
//! sandboxes use, rewritten within seconds of a change (well inside any
//! grace period). The mark reads them all as roots. A host gone for good
//! keeps its roots until its object is deleted by hand.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::objstore::{ObjectStore, PutMode, StoreError};

pub const HOSTS: &str = "gc/hosts/";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoots {
    pub format: u32,
    pub host: String,
    /// Manifest ids (hex) the host's sandboxes read.
    pub manifests: BTreeSet<String>,
    /// Other objects they need (VM-state blobs).
    pub keys: BTreeSet<String>,
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

pub async fn publish(store: &dyn ObjectStore, roots: &HostRoots) -> Result<(), StoreError> {
    let data = Bytes::from(serde_json::to_vec(roots).expect("host roots serialize"));
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
