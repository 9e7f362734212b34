//! Adaptive polling of a queue that has just drained, as QEMU's
//! `poll-max-ns` does: a driver that sends its next request soon after a
//! completion (a synchronous reader, depth 1) finds the worker still
//! watching the ring instead of asleep in `epoll_wait`, which on a VM host
//! costs a wakeup of tens of microseconds per request. A queue that stays
//! idle longer than the bound polls not at all, so idle disks cost no CPU.
//!
//! Polling only pays on a host with a core to spare. On a busy one the
//! spinning thread is preempted (the scheduler counts the spin as work
//! and hands the core to others), and the request it was watching for
//! waits a whole slice: measured beside 100 streams on 2 cores, a warm
//! read's p99 was 130 µs polling and 55-76 µs not. So no queue polls
//! while the host is busy ([`super::pressure`]).

use std::time::{Duration, Instant};

/// The first window a queue that came back quickly gets.
const START: Duration = Duration::from_micros(4);

/// How long a worker watches its ring after it drains.
#[derive(Debug)]
pub struct Poller {
    max: Duration,
    window: Duration,
    idle_since: Option<Instant>,
    /// Polls even on a busy host (for tests that time the window).
    #[cfg(test)]
    ignore_pressure: bool,
}

impl Poller {
    /// A poller whose window never exceeds `max` (zero: never poll).
    pub fn new(max: Duration) -> Poller {
        Poller {
            max,
            window: Duration::ZERO,
            idle_since: None,
            #[cfg(test)]
            ignore_pressure: false,
        }
    }

    /// The queue was kicked at `now` after sleeping: a sleep within the
    /// bound widens the window (doubling up to the bound), a longer one
    /// closes it.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let slept = now.saturating_duration_since(since);
        self.window = if slept > self.max {
            Duration::ZERO
        } else {
            // Not `clamp`: the bound may be below START (or zero).
            (self.window * 2).max(START).min(self.max)
        };
    }

    /// The queue went to sleep at `now` (polling found nothing).
    pub fn slept(&mut self, now: Instant) {
        self.idle_since = Some(now);
    }

    /// How long to watch the ring now.
    pub fn window(&self) -> Duration {
        self.window.min(self.max)
    }

    /// Watches for `ready` to say true, for at most the window (none
    /// while the host is busy, see the module's doc); says whether it
    /// did.
    pub fn watch<E>(&self, mut ready: impl FnMut() -> Result<bool, E>) -> Result<bool, E> {
        let window = self.window();
        let start = Instant::now();
        if window.is_zero() || self.host_busy(start) {
            return Ok(false);
        }
        loop {
            if ready()? {
                return Ok(true);
            }
            if start.elapsed() >= window {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    fn host_busy(&self, now: Instant) -> bool {
        #[cfg(test)]
        if self.ignore_pressure {
            return false;
        }
        super::pressure::host_busy(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    fn after(p: &mut Poller, sleep_us: u64) -> Duration {
        let t = Instant::now();
        p.slept(t);
        p.woke(t + Duration::from_micros(sleep_us));
        p.window()
    }

    #[test]
    fn short_sleeps_widen_the_window_up_to_the_bound_and_a_long_one_closes_it() {
        let mut p = Poller::new(MAX);
        assert_eq!(p.window(), Duration::ZERO, "no polling before any wakeup");
        assert_eq!(after(&mut p, 20), START);
        assert_eq!(after(&mut p, 20), START * 2);
        for _ in 0..10 {
            after(&mut p, 20);
        }
        assert_eq!(p.window(), MAX);
        assert_eq!(
            after(&mut p, 51),
            Duration::ZERO,
            "an idle queue stops polling"
        );
        assert_eq!(after(&mut p, 10), START);
    }

    #[test]
    fn a_bound_below_the_first_window_is_the_window() {
        let mut p = Poller::new(Duration::from_micros(1));
        assert_eq!(after(&mut p, 1), Duration::from_micros(1));
    }

    #[test]
    fn a_zero_bound_never_polls() {
        let mut p = Poller::new(Duration::ZERO);
        assert_eq!(after(&mut p, 0), Duration::ZERO);
        let mut asked = 0;
        assert!(!p
            .watch(|| -> Result<bool, ()> {
                asked += 1;
                Ok(true)
            })
            .unwrap());
        assert_eq!(asked, 0);
    }

    #[test]
    fn watching_stops_when_ready_or_when_the_window_ends() {
        let mut p = Poller::new(MAX);
        // A loaded test machine must not close the window.
        p.ignore_pressure = true;
        after(&mut p, 1);
        // Ready at the first look (a later look could come after the
        // window on a loaded machine).
        let mut n = 0;
        assert!(p
            .watch(|| -> Result<bool, ()> {
                n += 1;
                Ok(true)
            })
            .unwrap());
        assert_eq!(n, 1);
        let t = Instant::now();
        assert!(!p.watch(|| -> Result<bool, ()> { Ok(false) }).unwrap());
        assert!(t.elapsed() >= p.window());
        assert_eq!(p.watch(|| Err("gone")), Err("gone"));
    }
}
