//! The writers' half of the collection protocol (`docs/gc.md`).
//!
//! A writer (an import, a snapshot upload, an OCI build) reads the
//! collector's state once when its session starts. It then never relies
//! on a chunk that only condemned packs hold: it stores such a chunk
//! again. Before it names an existing object by content (a manifest, a
//! VM state) it takes that object off the condemned list, or waits out a
//! deletion under way and writes the object again. No writer takes a lock:
//! all of this is one GET of `gc/state` unless something it needs was
//! condemned, which is rare.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::state::{self, now_ms};
use crate::error::ErrorKind;
use crate::id::PackId;
use crate::layout;
use crate::objstore::{ObjectStore, PutMode, PutOutcome, StoreError};

/// How long a writer waits for a collector to finish deleting an object
/// it needs before giving up.
const DELETION_WAIT: Duration = Duration::from_secs(600);

/// What a writer knows of the collector from the start of its session.
#[derive(Debug, Clone)]
pub struct WriterView {
    avoided: HashSet<PackId>,
    grace: Option<Duration>,
    started: Instant,
}

impl WriterView {
    /// One GET of the collector's state.
    pub async fn load(store: &dyn ObjectStore) -> Result<WriterView, StoreError> {
        let (state, version) = state::load(store).await?;
        let avoided = state
            .condemned
            .keys()
            .chain(state.deleting.keys())
            .filter_map(|k| layout::pack_of_key(k))
            .collect();
        Ok(WriterView {
            avoided,
            grace: version.map(|_| state.grace()),
            started: Instant::now(),
        })
    }

    /// A view of a store never collected (tests, fresh stores).
    pub fn none() -> WriterView {
        WriterView {
            avoided: HashSet::new(),
            grace: None,
            started: Instant::now(),
        }
    }

    /// Whether chunks held only by `pack` must be stored again.
    pub fn avoids(&self, pack: &PackId) -> bool {
        self.avoided.contains(pack)
    }

    /// The collector's grace period, if the store was ever collected.
    pub fn grace(&self) -> Option<Duration> {
        self.grace
    }

    /// Whether this session has lasted longer than the collector's grace
    /// period: what it relied on at the start must be checked again.
    pub fn outlived_grace(&self) -> bool {
        self.grace.is_some_and(|g| self.started.elapsed() > g)
    }
}

/// Whether a collector has condemned `key` or is deleting it (one GET).
pub async fn is_condemned(store: &dyn ObjectStore, key: &str) -> Result<bool, StoreError> {
    Ok(state::load(store).await?.0.is_condemned(key))
}

/// Uploads a finished pack (data, then index) so that the collector will
/// not delete it: a pack with the same frames in the same order has the
/// same id, so an "already there" may be a condemned pack, which is kept
/// (and written again if a collector was deleting it).
pub async fn put_pack(
    store: &dyn ObjectStore,
    index: &crate::pack::PackIndex,
    path: &std::path::Path,
) -> Result<(), StoreError> {
    let key = layout::pack_key(&index.id);
    if store.put_file(&key, path).await? == PutOutcome::AlreadyExisted {
        keep(store, &key).await?;
        store.put_file(&key, path).await?;
    }
    store
        .put(
            &layout::pack_index_key(&index.id),
            bytes::Bytes::from(index.encode_tail()),
            PutMode::IfAbsent,
        )
        .await?;
    Ok(())
}

/// Makes sure the collector will not delete `key`, which the caller is
/// about to name: takes it off the condemned list, or, if a collector is
/// deleting it now, waits until it is gone (the caller then writes it
/// again: a put-if-absent creates it). One GET when nothing is condemned.
pub async fn keep(store: &dyn ObjectStore, key: &str) -> Result<(), StoreError> {
    let deadline = Instant::now() + DELETION_WAIT;
    loop {
        let mut wait = false;
        state::update::<StoreError>(store, |s| {
            // Each attempt decides afresh (a lost compare-and-swap repeats it).
            wait = false;
            if s.deleting.contains_key(key) {
                let live = s.lease.as_ref().is_some_and(|l| l.until_ms > now_ms());
                if live {
                    wait = true;
                    return Ok(false);
                }
                // Its collector is gone and past its lease: it deletes no more.
                s.deleting.remove(key);
                return Ok(true);
            }
            Ok(s.condemned.remove(key).is_some())
        })
        .await?;
        if !wait {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StoreError::new(
                "keep",
                store.uri(),
                key,
                ErrorKind::Transient,
                format!(
                    "a garbage collection has been deleting this object for {DELETION_WAIT:?}; run the write again once `cairn gc` has finished"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
