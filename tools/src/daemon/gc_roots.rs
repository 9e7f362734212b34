//! Publishes what this host's sandboxes stand on, for the collector
//! (`cairn_engine::gc::hosts`): at start, then within a second of each
//! change, and every [`hosts::HEARTBEAT`] even without one (so that a
//! stopped host can be told by its roots' age).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::gc::hosts::{self, HostRoots};

use super::host::Host;

/// How often the roots are compared with those last published.
const TICK: Duration = Duration::from_secs(1);

/// This host's roots, read on a blocking thread: the host's lock may be
/// held by a thread that itself waits on the runtime (a catalog write
/// under the lock), so a runtime worker must never wait for it.
async fn current(host: &Arc<Host>) -> Option<HostRoots> {
    let host = host.clone();
    tokio::task::spawn_blocking(move || host.gc_roots())
        .await
        .ok()
}

async fn publish(host: &Host, roots: HostRoots) -> Option<HostRoots> {
    match hosts::publish(host.store().remote().as_ref(), &roots).await {
        Ok(()) => Some(roots),
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish this host's roots for garbage collection; trying again");
            None
        }
    }
}

/// Publishes once; a failure is logged and retried by [`publish_changes`].
pub async fn publish_now(host: &Arc<Host>) -> Option<HostRoots> {
    publish(host, current(host).await?).await
}

/// Runs for the daemon's life: publishes the roots whenever they differ
/// from those last published, or those are a heartbeat old.
pub async fn publish_changes(host: Arc<Host>, mut last: Option<HostRoots>) {
    let mut last_at = Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(now) = current(&host).await else {
            continue;
        };
        if last.as_ref() != Some(&now) || last_at.elapsed() >= hosts::HEARTBEAT {
            if let Some(published) = publish(&host, now).await {
                last = Some(published);
                last_at = Instant::now();
            }
        }
    }
}
