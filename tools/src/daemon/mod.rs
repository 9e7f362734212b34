//! `cairn daemon`: one process per host serving every sandbox's disk, with
//! a local HTTP+JSON API on a Unix socket (`docs/api/openapi.yaml`) and
//! Prometheus metrics.
//!
//! What runs here is host state: the state directory records every
//! sandbox's layers, so a restarted daemon (also after kill -9) serves
//! them again, losing no flushed write.

mod api;
mod claims;
pub mod client;
mod dozing;
mod gc_roots;
mod host;
mod idle;
mod layers;
mod metrics;
mod migrate;
mod pages;
mod sandbox;
mod uploads;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::context::Context;
use crate::output::emit;
use host::Host;

/// Where a daemon listens and keeps its state.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// Where the sandboxes' disk and memory sockets go.
    pub socket_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// Kill a VMM whose memory stops being served mid-resume.
    pub kill_vmm: bool,
    /// How long a snapshot upload is tried again while the store does not
    /// answer, before the snapshot is marked failed.
    pub upload_timeout: std::time::Duration,
    /// Run before a sandbox is suspended for idling.
    pub idle_hook: Option<String>,
}

/// The daemon's socket when none is given: under the user's runtime
/// directory, else its data directory.
pub fn default_socket() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CAIRN_DAEMON") {
        return Ok(PathBuf::from(d));
    }
    match dirs::runtime_dir().or_else(dirs::data_dir) {
        Some(d) => Ok(d.join("cairn").join("daemon.sock")),
        None => bail!("no user runtime or data directory is known here: pass --socket"),
    }
}

/// The sandboxes' sockets when no directory is given: beside the API's,
/// in `SOCKET.d`.
pub fn default_socket_dir(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".d");
    PathBuf::from(name)
}

pub fn default_state_dir() -> Result<PathBuf> {
    match dirs::data_dir() {
        Some(d) => Ok(d.join("cairn").join("daemon")),
        None => bail!("no user data directory is known here: pass --state-dir"),
    }
}

#[derive(Serialize)]
struct Ready<'a> {
    ready: bool,
    socket: &'a Path,
    socket_dir: &'a Path,
    state_dir: &'a Path,
    store: &'a str,
    recovered: usize,
    /// Snapshot uploads a crash interrupted, taken up again.
    uploads_resumed: usize,
    /// Sandboxes suspended for idling whose doorbells ring again.
    dozing: usize,
    metrics_addr: Option<SocketAddr>,
}

/// Takes the state directory's lock for as long as the daemon runs.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.try_lock().is_err() {
        bail!(
            "another daemon uses the state directory {} (stop it, or pass another --state-dir)",
            dir.display()
        );
    }
    Ok(file)
}

/// Removes a stale socket file; refuses if a daemon answers on it.
fn claim_socket(socket: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "a daemon already listens on {} (use it, or pass another --socket)",
            socket.display()
        );
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the stale socket {}", socket.display()))
        }
        _ => Ok(()),
    }
}

pub fn run(ctx: &Context, cfg: DaemonConfig) -> Result<ExitCode> {
    let _lock = lock_state_dir(&cfg.state_dir)?;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    claim_socket(&cfg.socket)?;
    let store = ctx.chunk_store()?;
    let metrics = Arc::new(metrics::Metrics::default());
    let pages = {
        let m = metrics.clone();
        pages::PageConfig {
            kill_vmm: cfg.kill_vmm,
            on_resume: Arc::new(move |r| m.observe_resume(r)),
        }
    };
    let host = Arc::new(Host::new(
        &cfg.state_dir,
        &cfg.socket_dir,
        store,
        pages,
        cfg.upload_timeout,
    )?);
    let (recovered, uploads_resumed) = host.recover().context("recovering the sandboxes")?;
    let dozing = idle::watch(host.clone(), cfg.idle_hook.clone())?;
    let api = api::Api {
        host: host.clone(),
        metrics,
    };
    let served = ctx.rt.block_on(async {
        let published = gc_roots::publish_now(&host).await;
        tokio::spawn(gc_roots::publish_changes(host.clone(), published));
        let listener = tokio::net::UnixListener::bind(&cfg.socket)
            .with_context(|| format!("listening on {}", cfg.socket.display()))?;
        if let Some(addr) = cfg.metrics_addr {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} for metrics"))?;
            let only_metrics = api::router(api.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, only_metrics).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        let ready = Ready {
            ready: true,
            socket: &cfg.socket,
            socket_dir: &cfg.socket_dir,
            state_dir: &cfg.state_dir,
            store: host.store().remote().uri(),
            recovered,
            uploads_resumed,
            dozing,
            metrics_addr: cfg.metrics_addr,
        };
        emit(ctx.json, &ready, || {
            format!(
                "ready: daemon on {} (state {}, {} sandbox(es) recovered, {} upload(s) resumed, {} dozing)\n",
                cfg.socket.display(),
                cfg.state_dir.display(),
                recovered,
                uploads_resumed,
                dozing
            )
        })?;
        let _ = std::io::stdout().flush();
        axum::serve(listener, api::router(api))
            .with_graceful_shutdown(stop_signal())
            .await
            .context("serving the API")
    });
    host.shutdown();
    let _ = std::fs::remove_file(&cfg.socket);
    served?;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: serving no more requests");
}
