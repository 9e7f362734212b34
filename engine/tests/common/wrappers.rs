//! Object-store wrappers for the catalog's tests: one that counts the
//! requests each operation makes, and a fault injector that loses the
//! answer to a conditional write it did make.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_engine::objstore::{
    Conditional, ListPage, ObjectStore, Precondition, PutMode, PutOutcome, StoreError, Versioned,
};
use cairn_engine::ErrorKind;

/// Requests by kind, as S3 would bill them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Requests {
    pub get: usize,
    pub put: usize,
    pub list: usize,
    pub head: usize,
    pub delete: usize,
}

/// Counts every request that reaches the store it wraps.
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counts: Mutex<Requests>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> CountingStore {
        CountingStore {
            inner,
            counts: Mutex::new(Requests::default()),
        }
    }

    /// The requests made since the last call.
    pub fn take(&self) -> Requests {
        std::mem::take(&mut *self.counts.lock().unwrap())
    }

    fn count(&self, f: impl FnOnce(&mut Requests)) {
        f(&mut self.counts.lock().unwrap())
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        self.count(|c| c.get += 1);
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.count(|c| c.put += 1);
        self.inner.put(key, data, mode).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError> {
        self.count(|c| c.put += 1);
        self.inner.put_file(key, path).await
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.count(|c| c.head += 1);
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.count(|c| c.list += 1);
        self.inner.list(prefix).await
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.count(|c| c.get += 1);
        self.inner.get_versioned(key).await
    }
    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        self.count(|c| c.put += 1);
        self.inner.put_if(key, data, precondition).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.count(|c| c.list += 1);
        self.inner.list_page(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count(|c| c.delete += 1);
        self.inner.delete(key).await
    }
}

/// Fault injector: makes each of the first `lose` conditional writes it
/// forwards, then answers them with a transient error, as a timeout after
/// the server acted does. A real server cannot be made to lose an answer
/// on demand.
pub struct LostAnswerStore {
    inner: Arc<dyn ObjectStore>,
    lose: AtomicUsize,
}

impl LostAnswerStore {
    pub fn new(inner: Arc<dyn ObjectStore>, lose: usize) -> LostAnswerStore {
        LostAnswerStore {
            inner,
            lose: AtomicUsize::new(lose),
        }
    }
}

#[async_trait]
impl ObjectStore for LostAnswerStore {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.inner.put(key, data, mode).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError> {
        self.inner.put_file(key, path).await
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get_versioned(key).await
    }
    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        let answer = self.inner.put_if(key, data, precondition).await?;
        let lost = self
            .lose
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost && matches!(answer, Conditional::Written(_)) {
            return Err(StoreError::new(
                "put",
                self.uri(),
                key,
                ErrorKind::Transient,
                "fault injector: the answer was lost",
            ));
        }
        Ok(answer)
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.inner.list_page(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}
