//! Whether the host's CPUs are contended: the share of recent time in
//! which some runnable thread waited for a core, from the kernel's
//! pressure stall information (`/proc/pressure/cpu`, the `some` line's
//! cumulative `total` in microseconds). Each thread samples it at most
//! every [`SAMPLE_EVERY`], so asking costs a clock read.
//!
//! Without PSI (a kernel built without it, or booted with `psi=0`) the
//! host never counts as busy.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often a thread reads the pressure file.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Above this share of time with a thread waiting for a core, the host
/// is busy. Measured on 2 cores: 10-21% with one disk served at depth 1,
/// 93-99% beside 100 streams.
pub const BUSY_SHARE: f64 = 0.5;

const PSI_CPU: &str = "/proc/pressure/cpu";

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// Microseconds of stall since boot; None without PSI.
    total_us: Option<u64>,
    busy: bool,
}

thread_local! {
    static LAST: Cell<Option<Sample>> = const { Cell::new(None) };
}

/// Whether the host was busy over the calling thread's last sampling
/// interval (see the module's doc).
pub fn host_busy(now: Instant) -> bool {
    LAST.with(|last| {
        let prev = last.get();
        if let Some(p) = prev {
            if p.total_us.is_none() || now.saturating_duration_since(p.at) < SAMPLE_EVERY {
                return p.busy;
            }
        }
        let total_us = std::fs::read_to_string(PSI_CPU)
            .ok()
            .and_then(|text| some_total_us(&text));
        let busy = match (prev.and_then(|p| p.total_us.map(|t| (p.at, t))), total_us) {
            (Some((at, before)), Some(after)) => {
                stalled_share(before, after, now.saturating_duration_since(at)) > BUSY_SHARE
            }
            _ => false,
        };
        if busy != prev.is_some_and(|p| p.busy) {
            tracing::debug!(
                busy,
                "host CPU pressure changed: queues poll only when not busy"
            );
        }
        last.set(Some(Sample {
            at: now,
            total_us,
            busy,
        }));
        busy
    })
}

/// The `some` line's `total=` from a PSI file.
fn some_total_us(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The share of `elapsed` spent stalled, from two `total`s.
fn stalled_share(before_us: u64, after_us: u64, elapsed: Duration) -> f64 {
    let wall = elapsed.as_micros() as f64;
    if wall <= 0.0 {
        return 0.0;
    }
    after_us.saturating_sub(before_us) as f64 / wall
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_some_total_and_turns_two_into_a_share() {
        let text = "some avg10=14.51 avg60=19.25 avg300=9.45 total=3528994666\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total_us(text), Some(3_528_994_666));
        assert_eq!(some_total_us("full total=3\n"), None);
        assert_eq!(some_total_us("some avg10=1 total=x\n"), None);
        let share = stalled_share(1_000, 16_000, Duration::from_millis(20));
        assert!((share - 0.75).abs() < 1e-9, "{share}");
        assert_eq!(stalled_share(5, 3, Duration::from_millis(20)), 0.0);
        assert_eq!(stalled_share(0, 3, Duration::ZERO), 0.0);
    }

    #[test]
    fn a_thread_reads_the_file_at_most_once_per_interval() {
        let t = Instant::now();
        host_busy(t);
        let first = LAST.with(|l| l.get()).expect("sampled");
        host_busy(t + SAMPLE_EVERY / 2);
        let same = LAST.with(|l| l.get()).expect("sampled");
        assert_eq!(first.at, same.at, "no second read within the interval");
        if std::path::Path::new(PSI_CPU).exists() {
            assert!(first.total_us.is_some(), "PSI is there and parses");
            host_busy(t + SAMPLE_EVERY);
            let next = LAST.with(|l| l.get()).expect("sampled");
            assert_eq!(next.at, t + SAMPLE_EVERY, "read again after the interval");
        }
    }
}
