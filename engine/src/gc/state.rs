//! The collector's shared state: one JSON object, `gc/state`, changed only
//! by compare-and-swap.
//!
//! It holds what is condemned (found unreferenced by a run, and when),
//! what a run is deleting right now, the grace period writers measure
//! their sessions against, and the lease that keeps two collectors from
//! running at once. Writers never need it to be there: a store that was
//! never collected has none.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::objstore::{Conditional, ObjectStore, Precondition, StoreError, Version};

/// Where the state lives.
pub const STATE_KEY: &str = "gc/state";
/// The state format this build reads and writes.
const FORMAT: u32 = 1;
/// Compare-and-swap attempts before a change gives up as contended.
const MAX_ATTEMPTS: u32 = 64;

/// An object found unreferenced: when, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    /// Unix milliseconds of the run that condemned it.
    pub at_ms: u64,
    pub bytes: u64,
}

/// The collector that holds the store, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub by: String,
    pub until_ms: u64,
}

/// The whole state. Keys are object keys: `packs/<id>.pack` stands for a
/// pack and its `.idx`; others are manifests, working sets, VM states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    pub format: u32,
    /// The last run's grace period, in seconds.
    pub grace_secs: u64,
    pub condemned: BTreeMap<String, Condemned>,
    /// Being deleted by the lease holder: writers that need one of these
    /// wait until it is gone, then write it again.
    pub deleting: BTreeMap<String, Condemned>,
    pub lease: Option<Lease>,
    /// Runs that finished, the bytes they deleted and the packs they
    /// rewrote, in all.
    pub runs: u64,
    pub reclaimed_bytes: u64,
    #[serde(default)]
    pub packs_rewritten: u64,
}

impl Default for GcState {
    fn default() -> GcState {
        GcState {
            format: FORMAT,
            grace_secs: 0,
            condemned: BTreeMap::new(),
            deleting: BTreeMap::new(),
            lease: None,
            runs: 0,
            reclaimed_bytes: 0,
            packs_rewritten: 0,
        }
    }
}

impl GcState {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs)
    }

    /// Whether `key` is condemned or being deleted: nothing may rely on it.
    pub fn is_condemned(&self, key: &str) -> bool {
        self.condemned.contains_key(key) || self.deleting.contains_key(key)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

fn bad_state(store: &dyn ObjectStore, detail: String) -> StoreError {
    StoreError::new("read", store.uri(), STATE_KEY, ErrorKind::Corrupt, format!("{detail}; move the object aside to start collecting afresh (nothing is lost: what it condemned is condemned again by the next run)"))
}

/// The state and its version (`None`: never written).
pub async fn load(store: &dyn ObjectStore) -> Result<(GcState, Option<Version>), StoreError> {
    let Some(v) = store.get_versioned(STATE_KEY).await? else {
        return Ok((GcState::default(), None));
    };
    let state: GcState =
        serde_json::from_slice(&v.data).map_err(|e| bad_state(store, e.to_string()))?;
    if state.format != FORMAT {
        return Err(bad_state(
            store,
            format!("format {}, this build reads {FORMAT}", state.format),
        ));
    }
    Ok((state, Some(v.version)))
}

/// Applies `change` to the current state and writes it back by
/// compare-and-swap, again on a lost race. `change` returns `Ok(false)` to
/// write nothing. Returns the state as written (or left).
pub async fn update<E: From<StoreError>>(
    store: &dyn ObjectStore,
    mut change: impl FnMut(&mut GcState) -> Result<bool, E>,
) -> Result<GcState, E> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut state, version) = load(store).await?;
        if !change(&mut state)? {
            return Ok(state);
        }
        let data = Bytes::from(serde_json::to_vec(&state).expect("gc state serializes"));
        let precondition = version.map_or(Precondition::Absent, Precondition::Matches);
        match store.put_if(STATE_KEY, data, precondition).await? {
            Conditional::Written(_) => return Ok(state),
            Conditional::PreconditionFailed => {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..50))).await
            }
        }
    }
    Err(StoreError::new(
        "put",
        store.uri(),
        STATE_KEY,
        ErrorKind::Transient,
        format!("{MAX_ATTEMPTS} compare-and-swap attempts lost to other writers"),
    )
    .into())
}
