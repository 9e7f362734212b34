//! Moving a running named sandbox's storage to another daemon that shares
//! the store: pre-copy rounds upload what it writes while it keeps
//! running, then a switch stops serving it here, uploads the last delta
//! (a suspend), and the other daemon takes it over in the catalog
//! (generation + 1, which fences this host) and serves it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::DaemonClient;
use super::host::{Host, MachineInput, Refusal};

/// Pre-copy stops once a round takes less than this: what the guest
/// writes during the last round is what the switch uploads.
const SHORT_ROUND: Duration = Duration::from_secs(1);

fn default_rounds() -> u32 {
    4
}

/// Where to move a sandbox, and how.
#[derive(Debug, Clone, Deserialize)]
pub struct MigrateRequest {
    /// The other daemon's API socket.
    pub to: PathBuf,
    /// Pre-copy rounds at most (0: switch at once).
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// The VMM's memory and state, taken with the last delta.
    #[serde(flatten)]
    pub machine: MachineInput,
}

/// One pre-copy round: a snapshot uploaded while the sandbox ran (removed
/// from the catalog once the switch's snapshot, which holds the whole
/// disk, is resumed elsewhere).
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub snapshot: String,
    /// Bytes written since the round before.
    pub bytes: u64,
    pub secs: f64,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub name: String,
    pub project: String,
    pub from_host: String,
    pub to_host: String,
    /// Its generation in the catalog, now the other host's.
    pub generation: u64,
    pub rounds: Vec<Round>,
    /// The switch's snapshot (what the other host resumed from) and the
    /// bytes it uploaded.
    pub snapshot: String,
    pub delta_bytes: u64,
    /// Stopping here, uploading the last delta, recording the suspend.
    pub switch_secs: f64,
    /// The other daemon's resume, as this one waited for it.
    pub resume_secs: f64,
    /// From this host's last served request (its disk server stopped) to
    /// the other's disk socket accepting its VMM.
    pub unserved_secs: f64,
    /// The sandbox as the other daemon serves it (its disk socket).
    pub sandbox: Value,
}

/// The other daemon's health: its store must be this one's, and it must
/// be another host.
fn check_target(host: &Host, target: &DaemonClient, to: &std::path::Path) -> Result<String> {
    let health = target
        .call(Method::GET, "/v1/health", None)
        .with_context(|| format!("asking the daemon on {} for its health", to.display()))?;
    let theirs = health["store"].as_str().unwrap_or_default();
    let ours = host.store().remote().uri();
    if theirs != ours {
        bail!(Refusal::BadRequest(format!(
            "the daemon on {} serves store {theirs}, not {ours}: a sandbox moves only between daemons sharing a store",
            to.display()
        )));
    }
    let them = health["host"].as_str().unwrap_or_default().to_owned();
    if them == host.host_id() {
        bail!(Refusal::BadRequest(format!(
            "the daemon on {} is this daemon",
            to.display()
        )));
    }
    Ok(them)
}

/// Moves named sandbox `key` to the daemon on `req.to`.
pub fn migrate(host: &Host, key: &str, req: MigrateRequest) -> Result<MigrationReport> {
    let view = host.get(key)?;
    let Some(name) = view.name.clone() else {
        bail!(Refusal::BadRequest(format!(
            "sandbox {} has no name: only a named sandbox (in the catalog) can move to another host",
            view.id
        )));
    };
    let target = DaemonClient::new(&req.to)?;
    let to_host = check_target(host, &target, &req.to)?;

    let mut rounds = Vec::new();
    while rounds.len() < req.max_rounds as usize && host.get(key)?.bytes_written > 0 {
        let started = Instant::now();
        let (snap, bytes) = host
            .precopy(key)
            .with_context(|| format!("pre-copy round {} of {name}", rounds.len() + 1))?;
        let secs = started.elapsed();
        tracing::info!(sandbox = %name, round = rounds.len() + 1, bytes, secs = secs.as_secs_f64(), "pre-copy round uploaded");
        rounds.push(Round {
            snapshot: snap.id,
            bytes,
            secs: secs.as_secs_f64(),
        });
        if secs < SHORT_ROUND {
            break;
        }
    }

    let switch_started = Instant::now();
    let switched = host
        .suspend_for_migration(key, req.machine)
        .with_context(|| format!("stopping {name} here and uploading its last delta"))?;
    let switch_secs = switch_started.elapsed().as_secs_f64();
    let resume_started = Instant::now();
    let resumed = target.call(
        Method::POST,
        &format!("/v1/sandboxes/{name}/resume"),
        Some(&json!({ "project": view.project, "queues": view.queues })),
    );
    let sandbox = match resumed {
        Ok(v) => v,
        Err(e) => {
            // Suspended, its data all stored: served here again, so that
            // a refusal there does not leave it unserved.
            let back = host.resume(&name, &view.project, view.queues);
            let here = match &back {
                Ok(v) => format!("it is served here again on {}", v.disk_socket.display()),
                Err(b) => format!("it could not be served here again either ({b:#}); it is suspended: resume it on any host"),
            };
            return Err(e.context(format!(
                "the daemon on {} did not resume {name}; {here}",
                req.to.display()
            )));
        }
    };
    let unserved = switched.stopped.elapsed();
    let generation = sandbox_generation(host, &view.project, &name)?;
    forget_rounds(host, &view.project, &rounds);
    Ok(MigrationReport {
        name,
        project: view.project,
        from_host: host.host_id().to_owned(),
        to_host,
        generation,
        rounds,
        snapshot: switched.record.snapshot.unwrap_or_default(),
        delta_bytes: switched.delta_bytes,
        switch_secs,
        resume_secs: resume_started.elapsed().as_secs_f64(),
        unserved_secs: unserved.as_secs_f64(),
        sandbox,
    })
}

/// Removes the pre-copy rounds' snapshots from the catalog: each was a
/// step towards the switch's, which holds the whole disk (their data goes
/// at the next garbage collection, unless shared). A failure is logged.
fn forget_rounds(host: &Host, project: &str, rounds: &[Round]) {
    let store = host.store();
    let remote = store.remote().clone();
    for r in rounds {
        let removed = store
            .runtime()
            .block_on(cairn_engine::catalog::snapshot::remove(
                remote.as_ref(),
                project,
                &r.snapshot,
                false,
                host.host_id(),
            ));
        if let Err(e) = removed {
            tracing::warn!(snapshot = %r.snapshot, error = %e, "cannot remove a pre-copy snapshot; remove it with `cairn snapshot rm`");
        }
    }
}

/// The catalog's generation of named sandbox `name`.
fn sandbox_generation(host: &Host, project: &str, name: &str) -> Result<u64> {
    let store = host.store();
    let remote = store.remote().clone();
    let rec = store
        .runtime()
        .block_on(cairn_engine::catalog::sandbox::get(
            remote.as_ref(),
            project,
            name,
        ))?
        .with_context(|| format!("sandbox {name} vanished from the catalog"))?;
    Ok(rec.record.generation)
}
