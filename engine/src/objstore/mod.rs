//! Object stores: where packs, pack indexes, manifests and names live.
//!
//! One small async seam with two real implementations, a directory
//! (`file://`) and any S3-compatible service (`s3://`). Keys are mostly
//! content addresses, so puts are idempotent and "put if absent" is the
//! normal write. Retries, backoff and throttling are not in the backends:
//! they live once, in [`Resilient`], which wraps any of them.
//!
//! Two kinds of caller wait on a store. Import, upload and verification may
//! wait long (minutes for a multipart upload). A guest's read or a VM's
//! page fault may not: those go through [`ObjectStore::get_within`] with a
//! [`Deadline`], short per attempt and bounded in all, after which the
//! caller gets an error naming the store, its endpoint and the key.
//!
//! Mutable records (the catalog) use the conditional half of the seam: a
//! read that returns the object's [`Version`], a put with a
//! [`Precondition`] (absent, or still at a version) that either writes or
//! reports that the precondition failed, atomically between every writer
//! the backend serves (S3: `If-None-Match: *` and `If-Match` on the ETag;
//! `file://`: a lock per key shard, between the processes of one host),
//! and a listing by pages after a start key.

mod file;
mod resilient;
#[cfg(feature = "s3")]
mod s3;
mod uri;

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::ErrorKind;

pub use file::FileStore;
pub use resilient::{Limiter, Resilient, RetryPolicy};
#[cfg(feature = "s3")]
pub use s3::S3Store;
pub use uri::S3Options;
pub use uri::{open_store, StoreUri, UriError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed object-store operation: what, where, why, and how to classify it.
#[derive(Debug, thiserror::Error)]
pub struct StoreError {
    pub op: &'static str,
    pub store: String,
    pub key: String,
    pub kind: ErrorKind,
    /// The service asked us to slow down (503 SlowDown, 429).
    pub throttled: bool,
    pub detail: String,
    #[source]
    pub source: Option<BoxError>,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} `{}` in {}: {}",
            self.op, self.key, self.store, self.detail
        )
    }
}

impl StoreError {
    pub fn new(
        op: &'static str,
        store: &str,
        key: &str,
        kind: ErrorKind,
        detail: impl Into<String>,
    ) -> StoreError {
        StoreError {
            op,
            store: store.to_owned(),
            key: key.to_owned(),
            kind,
            throttled: false,
            detail: detail.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> StoreError {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// How a put treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Content-addressed objects: keep what is there.
    IfAbsent,
    /// Names and other mutable pointers.
    Overwrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExisted,
}

/// An object's version as its store names it: S3's ETag, a digest of the
/// bytes on `file://`. Opaque: only compared, and handed back to
/// [`ObjectStore::put_if`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object's bytes with the version they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub data: Bytes,
    pub version: Version,
}

/// What a conditional put requires of the key it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// No object has the key (a name is taken).
    Absent,
    /// The object is still at this version (compare-and-swap).
    Matches(Version),
}

/// What a conditional put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written; the object is now at this version.
    Written(Version),
    /// Not written: the precondition did not hold (the key exists, is
    /// missing, or is at another version).
    PreconditionFailed,
}

/// One page of a listing: keys in order, and whether more follow the last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub keys: Vec<String>,
    pub truncated: bool,
}

impl ListPage {
    /// Where the next page starts (after this key), if there is one.
    pub fn next_start_after(&self) -> Option<&str> {
        if self.truncated {
            self.keys.last().map(String::as_str)
        } else {
            None
        }
    }
}

/// The most keys one page may ask for (S3's own cap on a LIST).
pub const MAX_PAGE: usize = 1000;

/// How long a read someone is waiting on may take: each attempt, and all
/// attempts with the backoff between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub attempt: Duration,
    pub total: Duration,
}

impl Deadline {
    /// Lazy reads and page faults: a ranged GET of a chunk or two answers
    /// in well under a second on any working link; a guest's block layer
    /// gives up on a request after 30 s.
    pub const DATA_PATH: Deadline = Deadline {
        attempt: Duration::from_secs(3),
        total: Duration::from_secs(10),
    };

    /// The slowest link a read of many bytes is given time for.
    const MIN_BYTES_PER_SEC: u64 = 4 << 20;

    /// This deadline for a read of `bytes`: each attempt also gets the
    /// time to move them at [`Deadline::MIN_BYTES_PER_SEC`], and the total
    /// three times that (an 8 MiB read-ahead run is not cut off where a
    /// 64 KiB read would be).
    pub fn for_bytes(self, bytes: u64) -> Deadline {
        let moving = Duration::from_secs_f64(bytes as f64 / Self::MIN_BYTES_PER_SEC as f64);
        Deadline {
            attempt: self.attempt + moving,
            total: self.total + 3 * moving,
        }
    }
}

/// Runs `call` for at most `limit`; past it, a transient error saying so.
pub async fn bounded<T>(
    op: &'static str,
    store: &str,
    key: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(StoreError::new(
            op,
            store,
            key,
            ErrorKind::Transient,
            format!("no answer within {limit:?}"),
        ))
    })
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// The store's URI, for messages.
    fn uri(&self) -> &str;

    /// The object's bytes, or the `range` of them.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError>;

    /// As [`ObjectStore::get`], for a reader that is waiting (a guest's
    /// read, a VM's fault): bounded by `deadline`, then a transient error.
    /// [`Resilient`] bounds each attempt and retries within the total.
    async fn get_within(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        deadline: Deadline,
    ) -> Result<Bytes, StoreError> {
        bounded("get", self.uri(), key, deadline.total, self.get(key, range)).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError>;

    /// Puts a local file if absent, streaming it (multipart where the
    /// service has it) rather than holding it in memory.
    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError>;

    /// The object's size, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// Every key that starts with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// The object's bytes and version, or `None` if it does not exist.
    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Writes `data` only if `precondition` holds, atomically against every
    /// other conditional write of the key. After a transient failure the
    /// write may or may not have happened: a caller that retries and then
    /// sees [`Conditional::PreconditionFailed`] reads the key back to tell.
    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError>;

    /// Up to `limit` (at most [`MAX_PAGE`]) keys that start with `prefix`
    /// and sort after `start_after`, in order: one request on S3; on
    /// `file://` a walk of the directories the page's keys are in (see
    /// [`FileStore`] for which prefixes that holds under).
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError>;

    /// Deletes the object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Makes the store ready to be written (creates the bucket if missing).
    async fn prepare(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Keys are relative paths of `[A-Za-z0-9._-]` segments joined by `/`.
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{key}` is not a valid object key"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_deadline_grows_with_the_bytes_to_move() {
        let d = super::Deadline::DATA_PATH;
        assert_eq!(d.for_bytes(0), d);
        let big = d.for_bytes(8 << 20);
        assert_eq!(big.attempt, d.attempt + std::time::Duration::from_secs(2));
        assert_eq!(big.total, d.total + std::time::Duration::from_secs(6));
    }

    #[test]
    fn keys_are_checked() {
        assert!(super::check_key("packs/ab.pack").is_ok());
        for bad in ["", "/a", "a//b", "../x", "a/./b", "a b", "a/"] {
            assert!(super::check_key(bad).is_err(), "{bad}");
        }
    }
}
