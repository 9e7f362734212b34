//! What one resume did: counts and a fault-latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A log-linear histogram of durations: 16 linear steps per power of two
/// of nanoseconds (about 6% resolution), fixed size whatever the count.
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_ns: u64,
}

const SUB: u64 = 16;

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: vec![0; 64 * SUB as usize],
            count: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn bucket(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let exp = 63 - u64::from(ns.leading_zeros());
        let sub = (ns >> (exp - 4)) & (SUB - 1);
        ((exp - 3) * SUB + sub) as usize
    }

    /// The smallest duration that falls in bucket `i` (what it reports).
    fn floor(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let exp = i / SUB + 3;
        (1 << exp) | ((i % SUB) << (exp - 4))
    }

    pub fn record(&mut self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.buckets[Self::bucket(ns)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::floor(i) as f64 / 1000.0;
            }
        }
        self.max_ns as f64 / 1000.0
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }
}

/// Counters shared by the fault loop and the prefetch worker.
#[derive(Default)]
pub struct Counters {
    pub faults: AtomicU64,
    /// Bytes installed by the fault loop (with data or zeros).
    pub fault_bytes: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    pub zero_bytes: AtomicU64,
    /// Copies that found the page already there (a race with the other side).
    pub already_present: AtomicU64,
    /// Copies that had to wait for the VMM's address space to settle (EAGAIN).
    pub retried_busy: AtomicU64,
    pub removed_pages: AtomicU64,
    /// Faults left to the prefetcher, which was about to install their page.
    pub faults_waited_for_prefetch: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_us(0.5);
        let p99 = h.quantile_us(0.99);
        assert!((470.0..=500.0).contains(&p50), "{p50}");
        assert!((930.0..=990.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max_us(), 1000.0);
        assert_eq!(Histogram::default().quantile_us(0.5), 0.0);
        for ns in [0u64, 15, 16, 17, 1000, 123_456_789] {
            let b = Histogram::bucket(ns);
            assert!(
                Histogram::floor(b) <= ns && ns - Histogram::floor(b) <= ns / 16,
                "{ns}"
            );
        }
    }
}
