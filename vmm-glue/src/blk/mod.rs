//! vhost-user-blk: serving a lazy disk to a VMM.

pub mod backend;
pub mod config;
pub mod exec;
pub mod poll;
pub mod request;

pub use backend::{serve, BlkBackend, BlkServer};
pub use config::{DeviceConfig, DEFAULT_POLL};
