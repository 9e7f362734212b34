//! When a VMM last asked for anything (a disk request, a connection, a
//! page fault): the daemon suspends a sandbox that has been idle long
//! enough. Touching it is one clock read and one atomic store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Activity {
    born: Instant,
    /// Milliseconds from `born` to the last touch.
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            born: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Milliseconds since it was made.
    pub fn age_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Something happened now.
    pub fn touch(&self) {
        self.last_ms.fetch_max(self.age_ms(), Ordering::Relaxed);
    }

    /// How long since the last touch (or since it was made).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_counts_from_the_last_touch() {
        let a = Activity::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for() >= Duration::from_millis(30));
        a.touch();
        assert!(a.idle_for() < Duration::from_millis(30));
    }
}
