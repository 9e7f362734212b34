//! The daemon's Prometheus metrics (`/metrics`, OpenMetrics text): API
//! request latency by operation and outcome, and, read when scraped, the
//! sandboxes served, the cache's hits, misses, size and integrity
//! failures, and the bytes fetched from the store.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::host::Host;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    outcome: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Histogram>,
    sandboxes: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    remote_bytes: Counter,
    remote_gets: Counter,
    uploads_in_flight: Gauge,
    resumes: Counter,
    faults: Counter,
    first_fault: Histogram,
    fault_p99: Histogram,
    gc_runs: Counter,
    gc_reclaimed: Counter,
    gc_rewritten: Counter,
    gc_condemned: Gauge,
    migrations: Family<OutcomeLabels, Counter>,
    unserved: Histogram,
    migration_delta: Counter,
    idle: Family<EventLabels, Counter>,
    sandbox_reads: Family<SandboxReadLabels, Counter>,
    store_events: Family<EventLabels, Counter>,
    cache_bytes: Gauge,
    cache_capacity: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxReadLabels {
    /// Its name, else its id.
    sandbox: String,
    /// `local` (the host's cache or its own layers) or `store` (a fetch
    /// the read waited for).
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            // 100 µs to about 13 s.
            Histogram::new(exponential_buckets(1e-4, 2.0, 18))
        });
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("cairn")),
            requests,
            sandboxes: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            remote_bytes: Counter::default(),
            remote_gets: Counter::default(),
            uploads_in_flight: Gauge::default(),
            resumes: Counter::default(),
            faults: Counter::default(),
            // 10 µs to about 80 ms.
            first_fault: Histogram::new(exponential_buckets(1e-5, 2.0, 14)),
            fault_p99: Histogram::new(exponential_buckets(1e-5, 2.0, 14)),
            gc_runs: Counter::default(),
            gc_reclaimed: Counter::default(),
            gc_rewritten: Counter::default(),
            gc_condemned: Gauge::default(),
            migrations: Family::default(),
            // 1 ms to about 65 s.
            unserved: Histogram::new(exponential_buckets(1e-3, 2.0, 17)),
            migration_delta: Counter::default(),
            idle: Family::default(),
            sandbox_reads: Family::default(),
            store_events: Family::default(),
            cache_bytes: Gauge::default(),
            cache_capacity: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "api_request_seconds",
                "Time to answer an API request, by operation and outcome",
                m.requests.clone(),
            );
            r.register("sandboxes", "Sandboxes served", m.sandboxes.clone());
            r.register(
                "cache_hits",
                "Chunk reads served by the local cache",
                m.cache_hits.clone(),
            );
            r.register(
                "cache_misses",
                "Chunk reads the local cache did not hold",
                m.cache_misses.clone(),
            );
            r.register(
                "remote_fetched_bytes",
                "Bytes fetched from the store",
                m.remote_bytes.clone(),
            );
            r.register(
                "remote_gets",
                "Ranged GETs sent to the store",
                m.remote_gets.clone(),
            );
            r.register(
                "snapshot_uploads_in_flight",
                "Snapshots being folded and uploaded (the upload backlog)",
                m.uploads_in_flight.clone(),
            );
            r.register(
                "memory_resumes",
                "VMM resumes served by the page servers",
                m.resumes.clone(),
            );
            r.register(
                "memory_faults",
                "Page faults answered by the page servers",
                m.faults.clone(),
            );
            r.register(
                "memory_first_fault_seconds",
                "From a resume's handshake to its first fault answered",
                m.first_fault.clone(),
            );
            r.register(
                "memory_fault_p99_seconds",
                "Each resume's 99th percentile fault latency",
                m.fault_p99.clone(),
            );
            r.register(
                "gc_runs",
                "Garbage-collection runs finished on the store (any host)",
                m.gc_runs.clone(),
            );
            r.register(
                "gc_reclaimed_bytes",
                "Bytes garbage collection deleted from the store",
                m.gc_reclaimed.clone(),
            );
            r.register(
                "gc_packs_rewritten",
                "Sparse packs garbage collection rewrote",
                m.gc_rewritten.clone(),
            );
            r.register(
                "gc_condemned_objects",
                "Objects condemned, waiting out the grace period",
                m.gc_condemned.clone(),
            );
            r.register(
                "migrations",
                "Sandboxes moved from this daemon to another, by outcome",
                m.migrations.clone(),
            );
            r.register(
                "migration_unserved_seconds",
                "From this daemon's last served request of a migrating sandbox to the other daemon serving it",
                m.unserved.clone(),
            );
            r.register(
                "migration_delta_bytes",
                "Bytes the switches of migrations uploaded (written after the last pre-copy round)",
                m.migration_delta.clone(),
            );
            r.register(
                "idle",
                "Sandboxes suspended for idling (event suspend) and resumed at a request (event wake)",
                m.idle.clone(),
            );
            r.register(
                "sandbox_read_bytes",
                "Bytes each running sandbox's guest read, from the host's cache or its own layers (source local) or from the store (source store): its cache share is local / (local + store)",
                m.sandbox_reads.clone(),
            );
            r.register(
                "store_events",
                "What the chunk store and its cache met, by event: crc_failure (a cached chunk failed its check and was fetched again), digest_failure (fetched bytes did not match their id), fetch_error, lost_pack, eviction, vanished (a chunk another process evicted), open_failure, single_flight_wait, readahead_chunk, readahead_dropped",
                m.store_events.clone(),
            );
            r.register(
                "cache_bytes",
                "Bytes the local chunk cache holds",
                m.cache_bytes.clone(),
            );
            r.register(
                "cache_capacity_bytes",
                "The local chunk cache's capacity",
                m.cache_capacity.clone(),
            );
        }
        m
    }
}

/// Moves a counter up to `total` (counters only go up).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl Metrics {
    pub fn observe_request(&self, op: &'static str, took: Duration, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.requests
            .get_or_create(&RequestLabels { op, outcome })
            .observe(took.as_secs_f64());
    }

    /// A page server's resume, when it ends.
    pub fn observe_resume(&self, r: &cairn_vmm_glue::uffd::ResumeReport) {
        self.resumes.inc();
        self.faults.inc_by(r.faults);
        if let Some(us) = r.first_fault_us {
            self.first_fault.observe(us / 1e6);
        }
        if r.faults > 0 {
            self.fault_p99.observe(r.fault_p99_us / 1e6);
        }
    }

    /// A migration out of this daemon: its report, or None if it failed.
    pub fn observe_migration(&self, report: Option<&super::migrate::MigrationReport>) {
        let outcome = if report.is_some() { "ok" } else { "error" };
        self.migrations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(r) = report {
            self.unserved.observe(r.unserved_secs);
            self.migration_delta.inc_by(r.delta_bytes);
        }
    }

    /// The store's garbage-collection totals, as read from `gc/state`.
    pub fn observe_gc(&self, s: &cairn_engine::gc::state::GcState) {
        catch_up(&self.gc_runs, s.runs);
        catch_up(&self.gc_reclaimed, s.reclaimed_bytes);
        catch_up(&self.gc_rewritten, s.packs_rewritten);
        self.gc_condemned
            .set((s.condemned.len() + s.deleting.len()) as i64);
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self, host: &Host) -> String {
        let sandboxes = host.list();
        self.sandboxes.set(sandboxes.len() as i64);
        // Running sandboxes only, counted since each was started here.
        self.sandbox_reads.clear();
        for v in &sandboxes {
            let sandbox = v.name.clone().unwrap_or_else(|| v.id.clone());
            for (source, n) in [("local", v.read_local_bytes), ("store", v.read_store_bytes)] {
                self.sandbox_reads
                    .get_or_create(&SandboxReadLabels {
                        sandbox: sandbox.clone(),
                        source,
                    })
                    .inc_by(n);
            }
        }
        self.uploads_in_flight.set(host.uploads_in_flight() as i64);
        let (suspends, wakes) = host.idle_counts();
        for (event, n) in [("suspend", suspends), ("wake", wakes)] {
            catch_up(&self.idle.get_or_create(&EventLabels { event }), n);
        }
        let store = host.store();
        let cache = store.cache().stats();
        catch_up(&self.cache_hits, cache.hits.load(Ordering::Relaxed));
        catch_up(&self.cache_misses, cache.misses.load(Ordering::Relaxed));
        let fetch = store.stats();
        catch_up(
            &self.remote_bytes,
            fetch.remote_bytes.load(Ordering::Relaxed),
        );
        catch_up(&self.remote_gets, fetch.remote_gets.load(Ordering::Relaxed));
        for (event, n) in [
            ("crc_failure", &cache.crc_failures),
            ("digest_failure", &fetch.digest_failures),
            ("fetch_error", &fetch.fetch_errors),
            ("lost_pack", &fetch.lost_packs),
            ("eviction", &cache.evictions),
            ("vanished", &cache.vanished),
            ("open_failure", &cache.open_failures),
            ("single_flight_wait", &fetch.single_flight_waits),
            ("readahead_chunk", &fetch.readahead_chunks),
            ("readahead_dropped", &fetch.readahead_dropped),
        ] {
            catch_up(
                &self.store_events.get_or_create(&EventLabels { event }),
                n.load(Ordering::Relaxed),
            );
        }
        self.cache_bytes
            .set(i64::try_from(store.cache().used_bytes()).unwrap_or(i64::MAX));
        self.cache_capacity
            .set(i64::try_from(store.cache().capacity()).unwrap_or(i64::MAX));
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = encode(&mut out, &registry) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}
