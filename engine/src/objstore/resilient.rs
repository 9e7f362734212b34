//! The one place retry, backoff and throttling policy lives.
//!
//! [`Resilient`] wraps any object store. Transient failures are retried
//! with jittered exponential backoff. Every request also takes a permit
//! from an AIMD [`Limiter`]: when the service says "slow down", the number
//! of requests allowed in flight is halved; each success then adds only
//! 1/limit, so concurrency climbs back slowly (one more request per
//! round of `limit` successes) and a throttled bucket is not hammered.

use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{
    bounded, Conditional, Deadline, ListPage, ObjectStore, Precondition, PutMode, PutOutcome,
    StoreError, Versioned,
};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter exponential backoff before retry number `attempt` (1-based).
    fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        cap.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

struct LimiterState {
    limit: f64,
    /// Permits in circulation: held by requests or free in the semaphore.
    issued: usize,
    last_cut: Option<Instant>,
    throttle_events: u64,
}

/// Additive-increase, multiplicative-decrease cap on requests in flight.
///
/// Waiters queue in FIFO order (a tokio semaphore), so a request sent back
/// by throttling is not starved by newer ones. The limit moves by
/// retiring permits as they come back, or issuing new ones.
pub struct Limiter {
    permits: Semaphore,
    state: Mutex<LimiterState>,
    max: f64,
}

/// Throttling refusals closer together than this are one burst: one cut.
const CUT_WINDOW: Duration = Duration::from_millis(100);

impl Limiter {
    pub fn new(initial: usize, max: usize) -> Limiter {
        let initial = initial.clamp(1, max.max(1));
        Limiter {
            permits: Semaphore::new(initial),
            state: Mutex::new(LimiterState {
                limit: initial as f64,
                issued: initial,
                last_cut: None,
                throttle_events: 0,
            }),
            max: max.max(1) as f64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests currently allowed in flight.
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    /// How many times the limit was cut.
    pub fn throttle_events(&self) -> u64 {
        self.lock().throttle_events
    }

    async fn acquire(&self) -> Permit<'_> {
        self.permits
            .acquire()
            .await
            .expect("the limiter's semaphore is never closed")
            .forget();
        Permit { limiter: self }
    }

    fn release(&self, outcome: Outcome) {
        let mut s = self.lock();
        match outcome {
            Outcome::Success => s.limit = (s.limit + 1.0 / s.limit).min(self.max),
            Outcome::Throttled => {
                let now = Instant::now();
                if s.last_cut
                    .is_none_or(|t| now.duration_since(t) > CUT_WINDOW)
                {
                    s.limit = (s.limit / 2.0).max(1.0);
                    s.last_cut = Some(now);
                    s.throttle_events += 1;
                    tracing::warn!(
                        limit = s.limit,
                        "object store is throttling; cutting request concurrency"
                    );
                }
            }
            Outcome::Other => {}
        }
        let target = s.limit.floor() as usize;
        if s.issued > target {
            // Retire this permit.
            s.issued -= 1;
        } else {
            let grow = target - s.issued;
            s.issued = target;
            self.permits.add_permits(1 + grow);
        }
    }
}

enum Outcome {
    Success,
    Throttled,
    Other,
}

struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Permit<'_> {
    fn finish(self, outcome: Outcome) {
        self.limiter.release(outcome);
        std::mem::forget(self);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // A cancelled request still gives its slot back.
        self.limiter.release(Outcome::Other);
    }
}

/// Any object store, with retries, backoff and adaptive concurrency.
pub struct Resilient {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    limiter: Limiter,
}

impl Resilient {
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        policy: RetryPolicy,
        max_concurrency: usize,
    ) -> Resilient {
        Resilient {
            inner,
            policy,
            limiter: Limiter::new(max_concurrency.div_ceil(2).max(1), max_concurrency),
        }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Runs `call` until it succeeds, fails for good or runs out of
    /// attempts; with a deadline, each attempt is cut at `attempt` and no
    /// retry starts that the backoff would push past `total`.
    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        deadline: Option<Deadline>,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let permit = self.limiter.acquire().await;
            let result = match deadline {
                Some(d) => {
                    let left = d.total.saturating_sub(started.elapsed());
                    bounded(op, self.uri(), key, d.attempt.min(left), call()).await
                }
                None => call().await,
            };
            match result {
                Ok(v) => {
                    permit.finish(Outcome::Success);
                    return Ok(v);
                }
                Err(e) => {
                    permit.finish(if e.throttled {
                        Outcome::Throttled
                    } else {
                        Outcome::Other
                    });
                    let delay = self.policy.delay(attempt);
                    let out_of_time =
                        deadline.is_some_and(|d| started.elapsed() + delay >= d.total);
                    if !e.kind.is_transient() || attempt >= self.policy.max_attempts || out_of_time
                    {
                        if attempt == 1 && !out_of_time {
                            return Err(e);
                        }
                        let why = match deadline {
                            Some(d) if out_of_time => format!(
                                "gave up after {attempt} attempts in {:.1?}: a read a guest or a VM waits on gets {:?} in all",
                                started.elapsed(),
                                d.total
                            ),
                            _ => format!("gave up after {attempt} attempts"),
                        };
                        return Err(StoreError {
                            detail: format!("{} ({why})", e.detail),
                            ..e
                        });
                    }
                    tracing::debug!(op = e.op, key = %e.key, attempt, ?delay, error = %e.detail, "retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for Resilient {
    fn uri(&self) -> &str {
        self.inner.uri()
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        self.run("get", key, None, || self.inner.get(key, range.clone()))
            .await
    }

    async fn get_within(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        deadline: Deadline,
    ) -> Result<Bytes, StoreError> {
        // The outer bound also covers waiting for a request slot.
        let call = self.run("get", key, Some(deadline), || {
            self.inner.get(key, range.clone())
        });
        bounded("get", self.uri(), key, deadline.total, call).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.run("put", key, None, || self.inner.put(key, data.clone(), mode))
            .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError> {
        self.run("put", key, None, || self.inner.put_file(key, path))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.run("head", key, None, || self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.run("list", prefix, None, || self.inner.list(prefix))
            .await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.run("get", key, None, || self.inner.get_versioned(key))
            .await
    }

    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        self.run("put", key, None, || {
            self.inner.put_if(key, data.clone(), precondition.clone())
        })
        .await
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.run("list", prefix, None, || {
            self.inner.list_page(prefix, start_after, limit)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run("delete", key, None, || self.inner.delete(key))
            .await
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        self.run("prepare", "", None, || self.inner.prepare()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake store for fault injection only: it answers SlowDown whenever
    /// more than `capacity` requests are in flight (a real server cannot be
    /// made to throttle on demand), and fails the first `flaky` requests.
    struct ThrottlingFake {
        capacity: usize,
        in_flight: AtomicUsize,
        peak: AtomicUsize,
        throttled: AtomicUsize,
        flaky: AtomicUsize,
        calls: AtomicUsize,
    }

    impl ThrottlingFake {
        fn new(capacity: usize, flaky: usize) -> Arc<ThrottlingFake> {
            Arc::new(ThrottlingFake {
                capacity,
                in_flight: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                throttled: AtomicUsize::new(0),
                flaky: AtomicUsize::new(flaky),
                calls: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl ObjectStore for ThrottlingFake {
        fn uri(&self) -> &str {
            "fake://throttling"
        }
        async fn get(&self, key: &str, _: Option<Range<u64>>) -> Result<Bytes, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self
                .flaky
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::new(
                    "get",
                    "fake",
                    key,
                    ErrorKind::Transient,
                    "503",
                ));
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if now > self.capacity {
                self.throttled.fetch_add(1, Ordering::SeqCst);
                let mut e = StoreError::new("get", "fake", key, ErrorKind::Transient, "SlowDown");
                e.throttled = true;
                return Err(e);
            }
            Ok(Bytes::from_static(b"ok"))
        }
        async fn put(&self, _: &str, _: Bytes, _: PutMode) -> Result<PutOutcome, StoreError> {
            unimplemented!()
        }
        async fn put_file(&self, _: &str, _: &Path) -> Result<PutOutcome, StoreError> {
            unimplemented!()
        }
        async fn head(&self, _: &str) -> Result<Option<u64>, StoreError> {
            unimplemented!()
        }
        async fn list(&self, _: &str) -> Result<Vec<String>, StoreError> {
            unimplemented!()
        }
        async fn get_versioned(&self, _: &str) -> Result<Option<Versioned>, StoreError> {
            unimplemented!()
        }
        async fn put_if(
            &self,
            _: &str,
            _: Bytes,
            _: Precondition,
        ) -> Result<Conditional, StoreError> {
            unimplemented!()
        }
        async fn list_page(
            &self,
            _: &str,
            _: Option<&str>,
            _: usize,
        ) -> Result<ListPage, StoreError> {
            unimplemented!()
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            Err(StoreError::new(
                "delete",
                "fake",
                key,
                ErrorKind::PermissionDenied,
                "403",
            ))
        }
    }

    fn fast_policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 30,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throttling_cuts_concurrency_and_every_request_completes() {
        let fake = ThrottlingFake::new(3, 0);
        let store = Arc::new(Resilient::new(fake.clone(), fast_policy(), 32));
        assert_eq!(store.limiter().limit(), 16);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move { s.get(&format!("k{i}"), None).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(&t.await.unwrap().unwrap()[..], b"ok");
        }
        assert!(fake.throttled.load(Ordering::SeqCst) > 0);
        assert!(store.limiter().throttle_events() >= 1);
        // Without the limiter, 200 spawned requests would all be in flight.
        assert!(fake.peak.load(Ordering::SeqCst) <= 16);
    }

    #[test]
    fn increase_is_slow_and_decrease_is_fast() {
        let l = Limiter::new(8, 64);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            l.acquire().await.finish(Outcome::Throttled);
            assert_eq!(l.limit(), 4);
            for _ in 0..4 {
                l.acquire().await.finish(Outcome::Success);
            }
            // Four successes at limit 4 add about one.
            assert_eq!(l.limit(), 4);
            l.acquire().await.finish(Outcome::Success);
            assert_eq!(l.limit(), 5);
        });
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_permanent_ones_are_not() {
        let fake = ThrottlingFake::new(100, 3);
        let store = Resilient::new(fake.clone(), fast_policy(), 4);
        assert_eq!(&store.get("k", None).await.unwrap()[..], b"ok");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 4);
        let err = store.delete("k").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);

        let fake = ThrottlingFake::new(100, 1000);
        let policy = RetryPolicy {
            max_attempts: 3,
            ..fast_policy()
        };
        let err = Resilient::new(fake.clone(), policy, 4)
            .get("k", None)
            .await
            .unwrap_err();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
        assert!(
            err.to_string().contains("gave up after 3 attempts"),
            "{err}"
        );
    }
}
