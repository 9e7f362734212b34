//! Fault injectors for the tests, named as such: a pause at a point a test
//! needs to reach while something is under way.

/// Sleeps for the milliseconds in environment variable `var`, if it is set
/// to a number; does nothing otherwise.
pub fn pause_for_tests(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
