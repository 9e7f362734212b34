//! Suspend on idle: a named sandbox created with an idle time-out that
//! sees no disk request for that long is suspended by the daemon (after a
//! configured hook, which may pause its VMM and have it write its memory
//! and state), and the next request for it resumes it: an API call naming
//! it, or a VMM connecting to its disk socket (a doorbell listens on the
//! socket's path meanwhile).

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::Path;
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

/// A listener on a suspended sandbox's disk socket path. A VMM that
/// connects rings for the sandbox to be resumed; its connection waits in
/// the listener's backlog (not accepted: QEMU 7.2 gives up on a
/// vhost-user backend that closes on it before the device starts), and
/// the resumed sandbox's disk server takes the listener over and accepts
/// it.
pub struct Doorbell {
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Doorbell {
    /// Listens on `path`; a connection waiting sends `name` on `wake`.
    pub fn ring(path: &Path, name: &str, wake: Sender<String>) -> Result<Doorbell> {
        let _ = std::fs::remove_file(path);
        let listener = Arc::new(
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (halt, name, watched) = (stop.clone(), name.to_owned(), listener.clone());
        let thread = std::thread::Builder::new()
            .name("cairn-doorbell".into())
            .spawn(move || {
                use rustix::event::{poll, PollFd, PollFlags, Timespec};
                let wait = Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                while !halt.load(Ordering::Acquire) {
                    let mut fds = [PollFd::new(&*watched, PollFlags::IN)];
                    if matches!(poll(&mut fds, Some(&wait)), Ok(n) if n > 0) {
                        tracing::info!(sandbox = %name, "a VMM knocked on a sandbox suspended for idling: resuming it");
                        let _ = wake.send(name.clone());
                        return;
                    }
                }
            })?;
        Ok(Doorbell {
            listener,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops watching; the listener, with any VMM waiting in its backlog,
    /// for the sandbox's disk server.
    pub fn take_listener(mut self) -> Result<UnixListener> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Arc::try_unwrap(self.listener)
            .map_err(|_| anyhow::anyhow!("the doorbell's listener is still shared"))
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

/// Rings the doorbells of the sandboxes suspended for idling before the
/// daemon last stopped, then suspends idle sandboxes and resumes those
/// whose doorbell rang, on a thread of its own until the process ends.
/// Returns how many doorbells rang again.
pub fn watch(host: Arc<Host>, hook: Option<String>) -> Result<usize> {
    let (wake_tx, wakes) = std::sync::mpsc::channel();
    let rung = host
        .ring_doorbells_again(&wake_tx)
        .context("ringing the doorbells of the sandboxes suspended for idling")?;
    std::thread::Builder::new()
        .name("cairn-idle".into())
        .spawn(move || watch_loop(&host, hook.as_deref(), &wake_tx, &wakes))
        .context("starting the idle watcher")?;
    Ok(rung)
}

fn watch_loop(host: &Host, hook: Option<&str>, wake_tx: &Sender<String>, wakes: &Receiver<String>) {
    let mut failed: HashMap<String, Instant> = HashMap::new();
    let mut checked: Option<Instant> = None;
    loop {
        // A doorbell is answered at once; idle sandboxes are looked for
        // every CHECK_EVERY.
        let until_check =
            checked.map_or(Duration::ZERO, |c| CHECK_EVERY.saturating_sub(c.elapsed()));
        if let Ok(name) = wakes.recv_timeout(until_check) {
            if let Err(e) = host.wake(&name) {
                tracing::error!(sandbox = %name, error = %format!("{e:#}"), "cannot resume a sandbox suspended for idling; resume it by hand");
            }
        }
        if checked.is_some_and(|c| c.elapsed() < CHECK_EVERY) {
            continue;
        }
        checked = Some(Instant::now());
        failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
        for sb in host.idle_sandboxes() {
            let name = sb.name.clone().unwrap_or_default();
            if failed.contains_key(&name) {
                continue;
            }
            let input = match hook {
                Some(h) => run_hook(h, &sb),
                None => Ok(MachineInput::default()),
            };
            match input.and_then(|input| host.doze(&name, input, wake_tx.clone())) {
                Ok(()) => tracing::info!(sandbox = %name, "suspended for idling"),
                Err(e) => {
                    tracing::warn!(sandbox = %name, error = %format!("{e:#}"), retry_in_s = RETRY_AFTER.as_secs(), "cannot suspend an idle sandbox; it runs on");
                    failed.insert(name, Instant::now());
                }
            }
        }
    }
}
