//! What one resume did, for the operator (`cairn mem serve` prints it).

use super::handshake::GuestRegion;
use super::session::{End, Session};
use super::stats::Counters;

/// What one resume did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ResumeReport {
    pub snapshot: String,
    pub vmm_pid: Option<i32>,
    /// Why the resume ended.
    pub end: Option<End>,
    pub regions: Vec<GuestRegion>,
    /// From accepting the connection to a checked handshake.
    pub handshake_us: f64,
    /// From the checked handshake to the first fault answered.
    pub first_fault_us: Option<f64>,
    pub faults: u64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub fault_max_us: f64,
    pub fault_bytes: u64,
    pub prefetch_bytes: u64,
    /// From the handshake to the last prefetch worker done.
    pub prefetch_ms: Option<f64>,
    /// Why prefetch stopped before the end of the working set (a worker
    /// failed or panicked, the working set could not be read).
    pub prefetch_stopped: Option<String>,
    pub working_set_bytes: u64,
    /// Why the recorded working set was not used at all.
    pub working_set_error: Option<String>,
    pub zero_bytes: u64,
    pub already_present: u64,
    /// Faults on working-set pages left to the prefetcher and woken once
    /// it had installed them.
    pub faults_waited_for_prefetch: u64,
    pub retried_busy: u64,
    pub removed_pages: u64,
    pub remote_bytes: u64,
    pub recorded_runs: Option<usize>,
    pub recorded_bytes: Option<u64>,
    pub seconds: f64,
}

impl Session<'_> {
    /// The report so far; the connection adds timing, end and recording.
    pub(super) fn report(&self) -> ResumeReport {
        let c = &self.counters;
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |d: Option<&std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        ResumeReport {
            snapshot: self.snapshot.id.to_hex(),
            vmm_pid: self.vmm.pid(),
            regions: self.regions.iter().map(|r| r.r).collect(),
            first_fault_us: ms(self.first_fault.get()).map(|m| m * 1e3),
            faults: Counters::get(&c.faults),
            fault_p50_us: h.quantile_us(0.5),
            fault_p99_us: h.quantile_us(0.99),
            fault_max_us: h.max_us(),
            fault_bytes: Counters::get(&c.fault_bytes),
            prefetch_bytes: Counters::get(&c.prefetch_bytes),
            prefetch_ms: ms(self.prefetch_done.get()),
            prefetch_stopped: self.prefetch_stopped.get().cloned(),
            working_set_bytes: self
                .snapshot
                .working_set
                .as_ref()
                .map_or(0, |w| w.set.bytes()),
            working_set_error: self.snapshot.working_set_error.clone(),
            zero_bytes: Counters::get(&c.zero_bytes),
            already_present: Counters::get(&c.already_present),
            faults_waited_for_prefetch: Counters::get(&c.faults_waited_for_prefetch),
            retried_busy: Counters::get(&c.retried_busy),
            removed_pages: Counters::get(&c.removed_pages),
            ..ResumeReport::default()
        }
    }
}
