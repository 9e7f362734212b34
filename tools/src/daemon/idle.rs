//! Suspend on idle: a named sandbox created with an idle time-out that
//! sees no disk request for that long is suspended by the daemon (after a
//! configured hook, which may pause its VMM and have it write its memory
//! and state), and the next request for it resumes it: an API call naming
//! it, or a VMM connecting to its disk socket (a doorbell listens on the
//! socket's path meanwhile).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::host::{Host, MachineInput, SandboxView};

/// How often the sandboxes are checked for idling.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How long a sandbox whose idle suspend failed (its hook, say) runs on
/// before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A listener on a suspended sandbox's disk socket path: a VMM that
/// connects (it is turned away; QEMU with `reconnect` tries again) rings
/// for the sandbox to be resumed there.
pub struct Doorbell {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Doorbell {
    /// Listens on `path`; a connection sends `name` on `wake`.
    pub fn ring(path: &Path, name: &str, wake: Sender<String>) -> Result<Doorbell> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (halt, name) = (stop.clone(), name.to_owned());
        let thread = std::thread::Builder::new()
            .name("cairn-doorbell".into())
            .spawn(move || {
                while !halt.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok(_) => {
                            tracing::info!(sandbox = %name, "a VMM knocked on a sandbox suspended for idling: resuming it");
                            let _ = wake.send(name.clone());
                            return;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?;
        Ok(Doorbell {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops listening and frees the path (for the sandbox's disk server).
    pub fn silence(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the idle hook for `sandbox`: `sh -c HOOK` with the sandbox in its
/// environment. Its standard output, if any, is JSON naming the VMM's
/// memory and VM-state files (as `sandbox suspend` takes them); a failure
/// leaves the sandbox running.
fn run_hook(hook: &str, sandbox: &SandboxView) -> Result<MachineInput> {
    let out = Command::new("sh")
        .args(["-c", hook])
        .env(
            "CAIRN_SANDBOX",
            sandbox.name.as_deref().unwrap_or(&sandbox.id),
        )
        .env("CAIRN_PROJECT", &sandbox.project)
        .env("CAIRN_DISK_SOCKET", &sandbox.disk_socket)
        .envs(
            sandbox
                .memory_socket
                .iter()
                .map(|m| ("CAIRN_MEMORY_SOCKET", m)),
        )
        .output()
        .with_context(|| format!("running the idle hook `{hook}`"))?;
    if !out.status.success() {
        bail!(
            "the idle hook `{hook}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(MachineInput::default());
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the idle hook `{hook}` printed what is not JSON with memory and vm_state: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })
}

/// Suspends idle sandboxes and resumes those whose doorbell rang, until
/// the process ends.
pub fn watch(host: Arc<Host>, hook: Option<String>) -> Result<()> {
    let (wake_tx, wakes): (Sender<String>, Receiver<String>) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("cairn-idle".into())
        .spawn(move || {
            let mut failed: std::collections::HashMap<String, Instant> = Default::default();
            loop {
            while let Ok(name) = wakes.try_recv() {
                match host.wake(&name) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(sandbox = %name, error = %format!("{e:#}"), "cannot resume a sandbox suspended for idling; resume it by hand")
                    }
                }
            }
            failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
            for sb in host.idle_sandboxes() {
                let name = sb.name.clone().unwrap_or_default();
                if failed.contains_key(&name) {
                    continue;
                }
                let input = match &hook {
                    Some(h) => run_hook(h, &sb),
                    None => Ok(MachineInput::default()),
                };
                let dozed = input.and_then(|input| host.doze(&name, input, wake_tx.clone()));
                match dozed {
                    Ok(()) => tracing::info!(sandbox = %name, "suspended for idling"),
                    Err(e) => {
                        tracing::warn!(sandbox = %name, error = %format!("{e:#}"), retry_in_s = RETRY_AFTER.as_secs(), "cannot suspend an idle sandbox; it runs on");
                        failed.insert(name, Instant::now());
                    }
                }
            }
            std::thread::sleep(CHECK_EVERY);
            }
        })
        .context("starting the idle watcher")?;
    Ok(())
}
