//! vhost-user-blk: serving a lazy disk to a VMM. Every socket of the
//! process is served by one pool of threads, as many as there are cores
//! ([`reactor`]); [`session`] answers the protocol's control messages
//! (parsed by the `vhost` crate), [`backend`] the queues.

pub mod backend;
mod cold;
pub mod config;
pub mod exec;
pub mod poll;
mod pressure;
mod reactor;
pub mod request;
mod server;
mod session;

pub use backend::{BlkBackend, ReadCounts};

/// Locks `m`, also after a panic while it was held (the state it guards
/// stays consistent between statements).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use config::{DeviceConfig, DEFAULT_POLL};
pub use server::{pool_threads, serve, BlkServer};
