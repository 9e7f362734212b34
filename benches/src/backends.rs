//! The vhost-user-blk backends a benchmark compares, run as child
//! processes: `cairn disk serve` and `qemu-storage-daemon` on a raw file.
//! Also a sampler of a process's resident memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A running backend listening on `socket`.
pub struct Backend {
    child: Child,
    pub socket: PathBuf,
    stdout: Option<BufReader<ChildStdout>>,
}

/// How `cairn` reaches its store and cache.
/// How a qemu-storage-daemon baseline is set up: as it comes, or tuned as
/// a user would (an iothread, and io_uring, or Linux AIO with O_DIRECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QsdTuning {
    Default,
    IoUring,
    NativeDirect,
}

impl QsdTuning {
    pub fn label(self) -> &'static str {
        match self {
            QsdTuning::Default => "qsd default",
            QsdTuning::IoUring => "qsd io_uring+iothread",
            QsdTuning::NativeDirect => "qsd native+O_DIRECT+iothread",
        }
    }
}

pub struct CairnStore<'a> {
    pub bin: &'a Path,
    pub store: &'a str,
    pub cache_dir: &'a Path,
    pub cache_size: &'a str,
}

impl CairnStore<'_> {
    /// A `cairn` command with the store flags set.
    pub fn command(&self) -> Command {
        let mut c = Command::new(self.bin);
        c.args(["--store", self.store, "--cache-dir"])
            .arg(self.cache_dir)
            .args(["--cache-size", self.cache_size]);
        c
    }

    /// Imports the raw file `raw` as `name`; its JSON report.
    pub fn import(&self, raw: &Path, name: &str) -> Result<Value> {
        let out = self
            .command()
            .args(["--json", "image", "import-raw", "--name", name])
            .arg(raw)
            .output()?;
        if !out.status.success() {
            bail!(
                "importing {}: {}",
                raw.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The bytes the store holds of image `name` (its distinct chunks'
    /// frames, compressed; zero chunks are not stored).
    pub fn stored_bytes(&self, name: &str) -> Result<u64> {
        let out = self
            .command()
            .args(["--json", "image", "describe", name])
            .output()?;
        if !out.status.success() {
            bail!(
                "describing {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v["stored_bytes"]
            .as_u64()
            .with_context(|| format!("no stored_bytes in {v}"))
    }

    /// Starts `cairn disk serve IMAGE` and waits until it is ready.
    pub fn serve(&self, image: &str, overlay: &Path, socket: &Path) -> Result<Backend> {
        let _ = std::fs::remove_file(socket);
        let mut child = self
            .command()
            .args(["--json", "disk", "serve", image, "--socket"])
            .arg(socket)
            .arg("--overlay")
            .arg(overlay)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting cairn disk serve")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains("\"ready\":true") {
            let _ = child.kill();
            bail!("cairn disk serve did not get ready: {line:?}");
        }
        Ok(Backend {
            child,
            socket: socket.to_owned(),
            stdout: Some(stdout),
        })
    }
}

impl Backend {
    /// Starts `qemu-storage-daemon` exporting the raw file `raw` (writable,
    /// through the page cache, one queue) and waits for its socket.
    pub fn qemu_storage_daemon(raw: &Path, socket: &Path) -> Result<Backend> {
        Backend::qemu_storage_daemon_tuned(raw, socket, QsdTuning::Default)
    }

    /// qemu-storage-daemon exporting `raw` as tuned by `tuning`.
    pub fn qemu_storage_daemon_tuned(
        raw: &Path,
        socket: &Path,
        tuning: QsdTuning,
    ) -> Result<Backend> {
        let _ = std::fs::remove_file(socket);
        let (file_opts, iothread) = match tuning {
            QsdTuning::Default => ("", false),
            QsdTuning::IoUring => (",aio=io_uring", true),
            QsdTuning::NativeDirect => (",aio=native,cache.direct=on", true),
        };
        let mut cmd = Command::new("qemu-storage-daemon");
        if iothread {
            cmd.args(["--object", "iothread,id=io0"]);
        }
        let child = cmd
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}{file_opts}",
                raw.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1{}",
                socket.display(),
                if iothread { ",iothread=io0" } else { "" }
            ))
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (Debian package qemu-system-common)")?;
        let mut b = Backend {
            child,
            socket: socket.to_owned(),
            stdout: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(st) = b.child.try_wait()? {
                bail!("qemu-storage-daemon exited with {st}");
            }
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(b)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; what cairn printed on its way out (JSON), if it
    /// is cairn.
    pub fn stop(mut self) -> Result<Option<Value>> {
        // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        let Some(out) = self.stdout.as_mut() else {
            return Ok(None);
        };
        let mut line = String::new();
        out.read_line(&mut line)?;
        Ok(serde_json::from_str(&line).ok())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from /proc (KiB).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rss {
    /// Peak anonymous memory seen while sampling: the process's own heap
    /// and stacks, not the page cache.
    pub peak_anon_kib: u64,
    /// The kernel's high-water mark of all resident pages, including
    /// file pages the process maps (such as cache files).
    pub hwm_kib: u64,
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's memory every 20 ms until stopped.
pub struct RssSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_field(pid, "RssAnon:").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { pid, stop, thread }
    }

    /// Stops sampling (call while the process still runs).
    pub fn finish(self) -> Rss {
        let hwm = status_field(self.pid, "VmHWM:").unwrap_or(0);
        let last = status_field(self.pid, "RssAnon:").unwrap_or(0);
        self.stop.store(true, Ordering::Relaxed);
        let peak = self.thread.join().unwrap_or(0);
        Rss {
            peak_anon_kib: peak.max(last),
            hwm_kib: hwm,
        }
    }
}
