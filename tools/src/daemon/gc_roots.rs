//! Publishes what this host's sandboxes stand on, for the collector
//! (`cairn_engine::gc::hosts`): at start, then within a second of each
//! change.

use std::sync::Arc;
use std::time::Duration;

use cairn_engine::gc::hosts::{self, HostRoots};

use super::host::Host;

/// How often the roots are compared with those last published.
const TICK: Duration = Duration::from_secs(1);

/// Publishes once; a failure is logged and retried by [`publish_changes`].
pub async fn publish_now(host: &Host) -> Option<HostRoots> {
    let roots = host.gc_roots();
    match hosts::publish(host.store().remote().as_ref(), &roots).await {
        Ok(()) => Some(roots),
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish this host's roots for garbage collection; trying again");
            None
        }
    }
}

/// Runs for the daemon's life: publishes the roots whenever they differ
/// from those last published.
pub async fn publish_changes(host: Arc<Host>, mut last: Option<HostRoots>) {
    loop {
        tokio::time::sleep(TICK).await;
        if last.as_ref() != Some(&host.gc_roots()) {
            if let Some(now) = publish_now(&host).await {
                last = Some(now);
            }
        }
    }
}
