//! The sandbox benchmark: a real `cairn daemon` (started here, on a
//! `file://` store in a temporary directory unless `--store` names
//! another) driven through its HTTP API on its Unix socket, each disk
//! written and read through its vhost-user-blk socket with libblkio.
//!
//! 1. Clone and fork latency and rate for sparse images of 1, 10 and
//!    100 GiB, 64 MiB written into the sandbox (and flushed) before each
//!    clone, against the usual qcow2 way (the running overlay becomes a
//!    backing file, two new overlays over it) and a full copy
//!    (`cp --sparse=always` of the raw image with the 64 MiB in it).
//! 2. Clones per second through the API, storage only (no VMM connected):
//!    N clones of one sandbox, sequentially and from several clients.
//! 3. Snapshot pause: the longest write a QD1 writer sees during
//!    `POST /v1/sandboxes/{id}/snapshot`, against its latency around a plain
//!    FLUSH, with 64 MiB written and not flushed.
//! 4. Suspend time against the bytes written, and resume time to the first
//!    4 KiB read served through the disk socket, of named sandboxes.
//!
//! 5. `--fleet 1,100,1000`, run on its own: the daemon's RSS, threads,
//!    open files and idle CPU with that many idle sandboxes, and the rate
//!    of create plus first served 4 KiB read through the API. While each
//!    step's sandboxes are created, `--fleet-guests` QEMU guests (the
//!    test guest, `CAIRN_GUEST_DIR`) boot from sandboxes of their own
//!    and power off; their boot times are reported beside.
//!
//! 6. `--migrate 64M,1G`, run on its own: a named sandbox with that much
//!    written moves to a second daemon on the same store while a client
//!    keeps writing 4 KiB a millisecond, with pre-copy (the default) and
//!    without (`max_rounds` 0: everything is uploaded in the switch, as a
//!    suspend and resume would): the time it is not served, as the daemon
//!    reports it and as the client sees it (its last write answered by
//!    the first daemon to its first answered by the second).
//!
//! 7. `--idle N`, run on its own: N named sandboxes with a 1 s idle
//!    time-out, each left idle until the daemon suspends it; then the time
//!    from a client's first try at its disk socket (which resumes it) to
//!    its first 4 KiB read served, against an explicit suspend and
//!    `POST .../resume` followed by the same read.
//!
//! 8. `--fairness 100`, run on its own: the p99 of a warm 4 KiB read
//!    (QD1, its chunks cached) on one sandbox, alone and while that many
//!    other sandboxes each read their own never-read part of an image
//!    sequentially, 64 KiB at a time (every chunk a cache miss).
//!
//! Nothing here asserts timings. `benches/run-sandbox-bench.sh` runs it;
//! see the README's "Sandbox benchmark".

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_benches::blk_client::Client;
use cairn_benches::guest::{boot, Boot};
use cairn_benches::{cairn_bin, machine_state, mean, median, quantile, Table};
use clap::Parser;
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Parser)]
struct Args {
    /// Image sizes for the clone and fork part (sparse: 1 MiB of data per
    /// GiB, or 1 MiB for a smaller image).
    #[arg(long, value_delimiter = ',', default_value = "1G,10G,100G")]
    sizes: Vec<String>,
    /// Bytes written into a sandbox before it is cloned or snapshotted.
    #[arg(long, default_value = "64M")]
    written: String,
    /// Timed clones, forks and qcow2 operations per image size.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Timed full copies per image size.
    #[arg(long, default_value_t = 3)]
    copy_samples: usize,
    /// Sandboxes made by one fork call (its rate per sandbox).
    #[arg(long, default_value_t = 100)]
    fork_batch: u32,
    /// Clones of one sandbox for the rate part.
    #[arg(long, default_value_t = 1000)]
    clones: usize,
    /// Concurrent API clients for the rate part's second run.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// The image size of parts 2-4.
    #[arg(long, default_value = "1G")]
    rate_size: String,
    /// Rounds of snapshot and of plain FLUSH for the pause part.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Bytes written before each suspend.
    #[arg(long, value_delimiter = ',', default_value = "0,64M,256M")]
    suspend_written: Vec<String>,
    /// Suspend and resume rounds per written size.
    #[arg(long, default_value_t = 3)]
    suspend_rounds: usize,
    /// Skip the qcow2 baseline (needs qemu-img and qemu-io: qemu-utils).
    #[arg(long)]
    no_qcow2: bool,
    /// The store (default: `file://` in the work directory). An S3 store
    /// takes its credentials from the environment.
    #[arg(long)]
    store: Option<String>,
    /// Where images, stores and state go (default: a temporary directory).
    #[arg(long)]
    work: Option<PathBuf>,
    #[arg(long, default_value = "target/bench/sandbox.json")]
    json_out: PathBuf,
    /// Run only part 5 (fleet) at these sandbox counts, e.g. 1,100,1000.
    #[arg(long, value_delimiter = ',')]
    fleet: Vec<usize>,
    /// QEMU guests that boot during each step of part 5 (0: none).
    #[arg(long, default_value_t = 2)]
    fleet_guests: usize,
    /// The test guest (fixtures/build-guest.sh): vmlinuz,
    /// initramfs.cpio.gz and rootfs.ext4.
    #[arg(long, env = "CAIRN_GUEST_DIR", default_value = "fixtures/out/guest")]
    guest: PathBuf,
    /// Run only part 6 (migration) with these sizes written, e.g. 64M,1G.
    #[arg(long, value_delimiter = ',')]
    migrate: Vec<String>,
    /// Migrations per size and mode in part 6.
    #[arg(long, default_value_t = 3)]
    migrate_rounds: usize,
    /// Run only part 7 (suspend on idle) with this many rounds.
    #[arg(long)]
    idle: Option<usize>,
    /// Run only part 8 (fairness) with this many cold readers.
    #[arg(long)]
    fairness: Option<usize>,
    /// Bytes each cold reader of part 8 has to itself.
    #[arg(long, default_value = "16M")]
    fairness_region: String,
    /// Seconds each phase of part 8 lasts.
    #[arg(long, default_value_t = 3.0)]
    fairness_secs: f64,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], KIB),
        Some((i, 'M' | 'm')) => (&s[..i], MIB),
        Some((i, 'G' | 'g')) => (&s[..i], GIB),
        Some((i, 'T' | 't')) => (&s[..i], GIB << 10),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("`{s}` is not a size (e.g. 64M, 10G)"))?
        * mult)
}

/// A fresh directory on a memory file system for the daemon's sockets:
/// under $XDG_RUNTIME_DIR, else /dev/shm, else the system's temporary
/// directory.
fn runtime_dir() -> Result<tempfile::TempDir> {
    let parent = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|d| d.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    Ok(tempfile::Builder::new()
        .prefix("cairn-bench-")
        .tempdir_in(parent)?)
}

fn label(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

fn ms(secs: f64) -> String {
    if secs < 0.01 {
        format!("{:.2}", secs * 1e3)
    } else {
        format!("{:.1}", secs * 1e3)
    }
}

/// p50, p99, mean of a sample, in seconds.
fn stats(xs: &[f64]) -> Value {
    json!({
        "p50": median(xs.to_vec()),
        "p99": quantile(xs.to_vec(), 0.99),
        "mean": mean(xs),
        "min": quantile(xs.to_vec(), 0.0),
        "max": quantile(xs.to_vec(), 1.0),
        "n": xs.len(),
    })
}

// ---------------------------------------------------------------- the API

/// HTTP/1.1 over the daemon's Unix socket, one kept-alive connection.
struct Api {
    socket: PathBuf,
    conn: Option<(BufReader<UnixStream>, UnixStream)>,
}

impl Api {
    fn new(socket: &Path) -> Api {
        Api {
            socket: socket.to_owned(),
            conn: None,
        }
    }

    /// One request: the status and the JSON answer (null if empty).
    fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.socket)
                .with_context(|| format!("connecting to {}", self.socket.display()))?;
            self.conn = Some((BufReader::new(s.try_clone()?), s));
        }
        let (reader, writer) = self.conn.as_mut().expect("connected above");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: cairn\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body.as_bytes());
        writer.write_all(&req)?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let (mut len, mut chunked, mut close) = (0usize, false, false);
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse()?,
                "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
                "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut buf = Vec::new();
        if chunked {
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16)?;
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        } else {
            buf.resize(len, 0);
            reader.read_exact(&mut buf)?;
        }
        if close {
            self.conn = None;
        }
        let value = if buf.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&buf)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&buf).into_owned()))
        };
        Ok((status, value))
    }

    /// A request that must succeed: its JSON.
    fn ok(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, v) = self.call(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {v}");
        }
        Ok(v)
    }

    fn create(&mut self, image: &str, name: Option<&str>) -> Result<Value> {
        self.ok(
            "POST",
            "/v1/sandboxes",
            Some(&json!({ "image": image, "name": name })),
        )
    }

    fn clone_of(&mut self, key: &str) -> Result<Value> {
        self.ok(
            "POST",
            &format!("/v1/sandboxes/{key}/clone"),
            Some(&json!({})),
        )
    }

    fn remove(&mut self, key: &str) -> Result<()> {
        self.ok("DELETE", &format!("/v1/sandboxes/{key}"), None)
            .map(drop)
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_owned()
}

fn disk_socket(v: &Value) -> PathBuf {
    PathBuf::from(v["disk_socket"].as_str().unwrap_or_default())
}

// ---------------------------------------------------- the daemon and CLI

struct Env {
    dir: PathBuf,
    /// Where the daemon's sockets go: a memory file system, as a host's
    /// runtime directory (/run) is.
    runtime: tempfile::TempDir,
    store: String,
    cairn: PathBuf,
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: unnamed sandboxes are removed, named ones kept.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn cairn(&self) -> Command {
        let mut c = Command::new(&self.cairn);
        c.args(["--store", &self.store, "--cache-dir"])
            .arg(self.path("cache"));
        c
    }

    fn run(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = self.cairn().args(args).output()?;
        if !out.status.success() {
            bail!(
                "cairn {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    fn daemon(&self) -> Result<Daemon> {
        self.daemon_as("daemon", "state", "cache")
    }

    /// A daemon whose socket is `tag.sock`, log `tag.log`, with its own
    /// state directory and cache: another host on the store.
    fn daemon_as(&self, tag: &str, state: &str, cache: &str) -> Result<Daemon> {
        let socket = self.runtime.path().join(format!("{tag}.sock"));
        let log = std::fs::File::create(self.path(&format!("{tag}.log")))?;
        let mut child = Command::new(&self.cairn)
            .args(["--store", &self.store, "--cache-dir"])
            .arg(self.path(cache))
            .args(["--json", "daemon", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(self.path(state))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting cairn daemon")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("daemon stdout")?).read_line(&mut line)?;
        let ready: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "the daemon's ready line is not JSON: {line:?} (see {})",
                self.path(&format!("{tag}.log")).display()
            )
        })?;
        ensure!(ready["ready"] == true, "daemon not ready: {line}");
        Ok(Daemon { child, socket })
    }

    /// Waits for a snapshot's upload to end; fails unless completed.
    fn settled(&self, snap: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let out = self.run(&["--json", "snapshot", "describe", snap])?;
            let v: Value = serde_json::from_slice(&out)?;
            match v["state"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") => bail!("snapshot {snap} failed: {}", v["reason"]),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "snapshot {snap} not done in 600 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ------------------------------------------------------------ disk bytes

/// 1 MiB of bytes for `seed`: random, so nothing dedups or compresses away.
fn pattern(seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..MIB).map(|_| rng.u8(..)).collect()
}

/// A sparse raw image of `size` bytes: 1 MiB of data at the start of each
/// GiB (of a smaller image: at its start), holes elsewhere.
fn make_sparse_image(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut at = 0;
    while at < size {
        f.write_all_at(&pattern(at / GIB + 1000)[..MIB.min(size) as usize], at)?;
        at += GIB;
    }
    f.sync_all()?;
    Ok(())
}

/// A sparse image of `size` bytes (see [`make_sparse_image`]) imported
/// as image `name`.
fn import_sparse(env: &Env, name: &str, size: u64) -> Result<()> {
    let raw = env.path(&format!("{name}.raw"));
    make_sparse_image(&raw, size)?;
    env.run(&["image", "import-raw", "--name", name, raw.to_str().unwrap()])?;
    Ok(())
}

/// Writes `bytes` from offset 0 through the disk socket, 1 MiB at a time.
fn fill(c: &mut Client, bytes: u64, seed: u64) -> Result<()> {
    let mut buf = pattern(seed);
    let mut at = 0;
    while at < bytes {
        let n = MIB.min(bytes - at) as usize;
        buf[..8].copy_from_slice(&at.to_le_bytes());
        c.write(at, &buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail * s.f_frsize)
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn qemu_img_overlay(backing: &Path, fmt: &str, out: &Path) -> Result<()> {
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", fmt])
        .arg(out))
}

// ------------------------------------------------- part 1: clone and fork

struct Row {
    size: u64,
    what: &'static str,
    samples: Vec<f64>,
    /// Sandboxes each sample made (a batch fork's time is per sandbox).
    per: f64,
}

fn part_clone_fork(
    env: &Env,
    api: &mut Api,
    args: &Args,
    written: u64,
    images: &[(u64, String, PathBuf)],
) -> Result<(Vec<Row>, Value)> {
    let mut notes = Vec::new();
    // A completed snapshot per size to fork from, with `written` bytes in it.
    let mut snaps = Vec::new();
    for (s, (size, image, _)) in images.iter().enumerate() {
        eprintln!("part 1: {} image, the snapshot to fork from", label(*size));
        let sb = api.create(image, None)?;
        let mut c = Client::connect(&disk_socket(&sb))?;
        fill(&mut c, written.min(*size), 7 + s as u64)?;
        c.flush()?;
        let t = Instant::now();
        let snap = api.ok(
            "POST",
            &format!("/v1/sandboxes/{}/snapshot", id(&sb)),
            Some(&json!({})),
        )?;
        let snap = id(&snap);
        env.settled(&snap)?;
        notes.push(json!({ "size": size, "snapshot_upload_s": t.elapsed().as_secs_f64() }));
        drop(c);
        api.remove(&id(&sb))?;
        snaps.push(snap);
    }

    // Rounds: one sample of every size each, in an order that rotates, so
    // that whatever drifts on the machine during the run (page cache, the
    // file system's free-inode search) falls on every size alike.
    let n = images.len();
    let mut clone = vec![Vec::new(); n];
    let mut fork = vec![Vec::new(); n];
    let mut qclone = vec![Vec::new(); n];
    let mut qfork = vec![Vec::new(); n];
    for round in 0..args.samples {
        eprintln!("part 1: round {}/{}", round + 1, args.samples);
        for k in 0..n {
            let i = (round + k) % n;
            let (size, image, raw) = &images[i];
            let written = written.min(*size);
            // cairn clone: a fresh sandbox with `written` bytes in its live
            // layer, flushed; the clone timed through the API.
            let sb = api.create(image, None)?;
            let mut c = Client::connect(&disk_socket(&sb))?;
            fill(&mut c, written, round as u64)?;
            c.flush()?;
            let t = Instant::now();
            let cl = api.clone_of(&id(&sb))?;
            clone[i].push(t.elapsed().as_secs_f64());
            drop(c);
            api.remove(&id(&cl))?;
            api.remove(&id(&sb))?;
            // cairn fork (count 1) of the completed snapshot.
            let t = Instant::now();
            let made = api.ok(
                "POST",
                &format!("/v1/snapshots/{}/fork", snaps[i]),
                Some(&json!({})),
            )?;
            fork[i].push(t.elapsed().as_secs_f64());
            for v in made["sandboxes"].as_array().into_iter().flatten() {
                api.remove(&id(v))?;
            }
            if !args.no_qcow2 {
                let (c, f) = qcow2_sample(env, raw, *size, written)?;
                qclone[i].push(c);
                qfork[i].push(f);
            }
        }
    }

    let mut rows = Vec::new();
    for (i, (size, _, raw)) in images.iter().enumerate() {
        let size = *size;
        let written = written.min(size);
        eprintln!("part 1: {} image, batch fork and full copy", label(size));
        rows.push(Row {
            size,
            what: "cairn clone (API)",
            samples: std::mem::take(&mut clone[i]),
            per: 1.0,
        });
        rows.push(Row {
            size,
            what: "cairn fork (API, count 1)",
            samples: std::mem::take(&mut fork[i]),
            per: 1.0,
        });
        let t = Instant::now();
        let made = api.ok(
            "POST",
            &format!("/v1/snapshots/{}/fork", snaps[i]),
            Some(&json!({ "count": args.fork_batch })),
        )?;
        let batch = t.elapsed().as_secs_f64();
        for v in made["sandboxes"].as_array().into_iter().flatten() {
            api.remove(&id(v))?;
        }
        rows.push(Row {
            size,
            what: "cairn fork (API, count N), per sandbox",
            samples: vec![batch / f64::from(args.fork_batch)],
            per: f64::from(args.fork_batch),
        });
        if !args.no_qcow2 {
            rows.push(Row {
                size,
                what: "qcow2 clone: overlay -> backing, 2 new overlays",
                samples: std::mem::take(&mut qclone[i]),
                per: 1.0,
            });
            rows.push(Row {
                size,
                what: "qcow2 fork: 1 overlay over a frozen one",
                samples: std::mem::take(&mut qfork[i]),
                per: 1.0,
            });
        }
        let (cp, allocated) = full_copy_samples(env, raw, size, written, args.copy_samples)?;
        if let Some(cp) = cp {
            rows.push(Row {
                size,
                what: "full copy: cp --sparse=always + fsync",
                samples: cp,
                per: 1.0,
            });
        }
        notes.push(json!({ "size": size, "full_copy_allocated_bytes": allocated }));
    }
    Ok((rows, Value::Array(notes)))
}

/// One qcow2 clone and fork: the running disk is an overlay over the raw
/// image holding the written bytes; a clone renames it to a backing file
/// and makes two new overlays over it (the source's and the clone's),
/// both synced with their directory. A fork is one overlay over a frozen
/// one, synced. Returns (clone, fork) seconds.
fn qcow2_sample(env: &Env, raw: &Path, size: u64, written: u64) -> Result<(f64, f64)> {
    let dir = env.path(&format!("qcow2-{size}"));
    std::fs::create_dir_all(&dir)?;
    let run = dir.join("run.qcow2");
    let frozen = dir.join("frozen.qcow2");
    let other = dir.join("clone.qcow2");
    let forked = dir.join("fork.qcow2");
    qemu_img_overlay(raw, "raw", &run)?;
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0xa5 0 {written}"))
        .arg(&run))?;
    fsync(&run)?;
    let t = Instant::now();
    std::fs::rename(&run, &frozen)?;
    qemu_img_overlay(&frozen, "qcow2", &run)?;
    qemu_img_overlay(&frozen, "qcow2", &other)?;
    fsync(&run)?;
    fsync(&other)?;
    fsync(&dir)?;
    let clone = t.elapsed().as_secs_f64();
    let t = Instant::now();
    qemu_img_overlay(&frozen, "qcow2", &forked)?;
    fsync(&forked)?;
    fsync(&dir)?;
    let fork = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir)?;
    Ok((clone, fork))
}

/// Full copies of the raw image with the written bytes in it, by
/// `cp --sparse=always` and synced (none if the disk has no room).
/// Returns the samples and the copy's allocated bytes.
fn full_copy_samples(
    env: &Env,
    raw: &Path,
    size: u64,
    written: u64,
    samples: usize,
) -> Result<(Option<Vec<f64>>, u64)> {
    let full = env.path(&format!("full-{size}.raw"));
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(raw)
        .arg(&full))?;
    {
        let f = std::fs::OpenOptions::new().write(true).open(&full)?;
        let buf = pattern(99);
        let mut at = 0;
        while at < written {
            let n = MIB.min(written - at) as usize;
            f.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        f.sync_all()?;
    }
    let allocated = allocated(&full)?;
    let mut cp = None;
    if free_bytes(&env.dir)? > allocated + GIB {
        let copy = env.path("copy.raw");
        let mut times = Vec::new();
        for _ in 0..samples {
            let t = Instant::now();
            sh(Command::new("cp")
                .arg("--sparse=always")
                .arg(&full)
                .arg(&copy))?;
            fsync(&copy)?;
            times.push(t.elapsed().as_secs_f64());
            std::fs::remove_file(&copy)?;
        }
        cp = Some(times);
    } else {
        eprintln!("  no room for a full copy of {}", label(size));
    }
    std::fs::remove_file(&full)?;
    Ok((cp, allocated))
}

// ------------------------------------------------ part 2: clones a second

fn part_rate(api: &mut Api, socket: &Path, image: &str, args: &Args) -> Result<Value> {
    eprintln!("part 2: {} clones, sequential", args.clones);
    let src = api.create(image, None)?;
    let src_id = id(&src);
    let mut lat = Vec::with_capacity(args.clones);
    let mut made = Vec::with_capacity(args.clones);
    let t = Instant::now();
    for _ in 0..args.clones {
        let t = Instant::now();
        let cl = api.clone_of(&src_id)?;
        lat.push(t.elapsed().as_secs_f64());
        made.push(id(&cl));
    }
    let seq_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for m in &made {
        api.remove(m)?;
    }
    let rm_s = t.elapsed().as_secs_f64();
    api.remove(&src_id)?;
    let tenth = (args.clones / 10).max(1);
    let first = median(lat[..tenth].to_vec());
    let last = median(lat[lat.len() - tenth..].to_vec());

    eprintln!(
        "part 2: {} clones, {} concurrent clients",
        args.clones, args.clients
    );
    let src = api.create(image, None)?;
    let src_id = id(&src);
    let per = args.clones.div_ceil(args.clients);
    let t = Instant::now();
    let threads: Vec<_> = (0..args.clients)
        .map(|_| {
            let (socket, src_id) = (socket.to_owned(), src_id.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, Vec<String>)> {
                let mut api = Api::new(&socket);
                let (mut lat, mut made) = (Vec::new(), Vec::new());
                for _ in 0..per {
                    let t = Instant::now();
                    let cl = api.clone_of(&src_id)?;
                    lat.push(t.elapsed().as_secs_f64());
                    made.push(id(&cl));
                }
                Ok((lat, made))
            })
        })
        .collect();
    let (mut clat, mut cmade) = (Vec::new(), Vec::new());
    for th in threads {
        let (l, m) = th.join().expect("a client thread")?;
        clat.extend(l);
        cmade.extend(m);
    }
    let conc_s = t.elapsed().as_secs_f64();
    for m in &cmade {
        api.remove(m)?;
    }
    api.remove(&src_id)?;
    Ok(json!({
        "image": image,
        "clones": args.clones,
        "sequential": {
            "seconds": seq_s,
            "per_second": args.clones as f64 / seq_s,
            "latency_s": stats(&lat),
            "first_tenth_p50_s": first,
            "last_tenth_p50_s": last,
            "remove_per_second": args.clones as f64 / rm_s,
        },
        "concurrent": {
            "clients": args.clients,
            "clones": cmade.len(),
            "seconds": conc_s,
            "per_second": cmade.len() as f64 / conc_s,
            "latency_s": stats(&clat),
        },
    }))
}

// ----------------------------------------------- part 3: snapshot pause

enum Cmd {
    /// Writes this many bytes from offset 0, not flushed.
    Fill(u64, u64),
    /// QD1 4 KiB writes at random offsets until the flag is set; a FLUSH
    /// after the given time, if any.
    Window(Arc<AtomicBool>, Option<Duration>),
}

struct WindowOut {
    /// (issued, latency s) of each write.
    writes: Vec<(Instant, f64)>,
    flush: Option<f64>,
}

fn writer(socket: PathBuf, rx: mpsc::Receiver<Cmd>, tx: mpsc::Sender<Result<WindowOut>>) {
    let mut c = match Client::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let blocks = c.capacity() / 4096;
    let mut rng = fastrand::Rng::with_seed(3);
    let buf = vec![0x5au8; 4096];
    for cmd in rx {
        let out = (|| -> Result<WindowOut> {
            match cmd {
                Cmd::Fill(bytes, seed) => {
                    fill(&mut c, bytes, seed)?;
                    Ok(WindowOut {
                        writes: vec![],
                        flush: None,
                    })
                }
                Cmd::Window(stop, flush_at) => {
                    let start = Instant::now();
                    let mut out = WindowOut {
                        writes: vec![],
                        flush: None,
                    };
                    while !stop.load(Ordering::Acquire) {
                        if let Some(at) = flush_at {
                            if out.flush.is_none() && start.elapsed() >= at {
                                let t = Instant::now();
                                c.flush()?;
                                out.flush = Some(t.elapsed().as_secs_f64());
                            }
                        }
                        let t = Instant::now();
                        c.write(rng.u64(..blocks) * 4096, &buf)?;
                        out.writes.push((t, t.elapsed().as_secs_f64()));
                    }
                    Ok(out)
                }
            }
        })();
        if tx.send(out).is_err() {
            return;
        }
    }
}

fn part_pause(env: &Env, api: &mut Api, image: &str, written: u64, args: &Args) -> Result<Value> {
    eprintln!("part 3: snapshot pause, {} rounds", args.rounds);
    let sb = api.create(image, None)?;
    let (ctx, crx) = mpsc::channel();
    let (otx, orx) = mpsc::channel();
    let socket = disk_socket(&sb);
    let th = std::thread::spawn(move || writer(socket, crx, otx));
    let lead = Duration::from_millis(100);
    let (mut flush, mut pause, mut call, mut quiet) = (vec![], vec![], vec![], vec![]);
    for r in 0..args.rounds {
        for kind in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            ctx.send(Cmd::Fill(written, r as u64))?;
            orx.recv()??;
            let stop = Arc::new(AtomicBool::new(false));
            if kind == 0 {
                ctx.send(Cmd::Window(stop.clone(), Some(lead)))?;
                std::thread::sleep(lead * 3);
                stop.store(true, Ordering::Release);
                let out = orx.recv()??;
                flush.push(out.flush.context("no FLUSH in the window")?);
                quiet.extend(out.writes.iter().map(|w| w.1));
            } else {
                ctx.send(Cmd::Window(stop.clone(), None))?;
                std::thread::sleep(lead);
                let t0 = Instant::now();
                let snap = api.ok(
                    "POST",
                    &format!("/v1/sandboxes/{}/snapshot", id(&sb)),
                    Some(&json!({})),
                )?;
                let t1 = Instant::now();
                std::thread::sleep(lead);
                stop.store(true, Ordering::Release);
                let out = orx.recv()??;
                call.push((t1 - t0).as_secs_f64());
                // The longest write in flight at any time during the call.
                let worst = out
                    .writes
                    .iter()
                    .filter(|(at, l)| *at < t1 && *at + Duration::from_secs_f64(*l) > t0)
                    .map(|w| w.1)
                    .fold(0.0, f64::max);
                pause.push(worst);
                // The upload runs off the disk's path; wait for it so that
                // rounds do not overlap.
                env.settled(&id(&snap))?;
            }
        }
    }
    drop(ctx);
    th.join().expect("the writer thread");
    api.remove(&id(&sb))?;
    Ok(json!({
        "written": written,
        "flush_s": stats(&flush),
        "snapshot_pause_s": stats(&pause),
        "snapshot_call_s": stats(&call),
        "write_s": stats(&quiet),
    }))
}

// ---------------------------------------- part 4: suspend and resume

fn part_suspend(api: &mut Api, image: &str, sizes: &[u64], args: &Args) -> Result<Value> {
    let mut out = Vec::new();
    for (i, &w) in sizes.iter().enumerate() {
        eprintln!("part 4: suspend and resume, {} written", label(w));
        let (mut suspend, mut resume_api, mut first_read) = (vec![], vec![], vec![]);
        for r in 0..args.suspend_rounds {
            let name = format!("bench-suspend-{i}-{r}-{:08x}", fastrand::u32(..));
            let sb = api.create(image, Some(&name))?;
            let mut c = Client::connect(&disk_socket(&sb))?;
            fill(&mut c, w, 40 + r as u64)?;
            c.flush()?;
            drop(c);
            let t = Instant::now();
            api.ok(
                "POST",
                &format!("/v1/sandboxes/{name}/suspend"),
                Some(&json!({})),
            )?;
            suspend.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let v = api.ok(
                "POST",
                &format!("/v1/sandboxes/{name}/resume"),
                Some(&json!({})),
            )?;
            resume_api.push(t.elapsed().as_secs_f64());
            let mut c = Client::connect(&disk_socket(&v))?;
            let got = c.read(0, 4096)?;
            first_read.push(t.elapsed().as_secs_f64());
            if w >= 4096 {
                let mut want = pattern(40 + r as u64);
                want[..8].copy_from_slice(&0u64.to_le_bytes());
                ensure!(got == want[..4096], "the resumed disk reads other bytes");
            }
            drop(c);
            api.remove(&name)?;
        }
        out.push(json!({
            "written": w,
            "suspend_s": stats(&suspend),
            "resume_api_s": stats(&resume_api),
            "resume_to_first_read_s": stats(&first_read),
        }));
    }
    Ok(Value::Array(out))
}

// ----------------------------------------------------------------- main

// ------------------------------------------------------- part 5: fleet

/// What a process uses, from /proc.
struct Usage {
    rss: u64,
    /// Resident memory not backed by files (the cache's mapped chunk
    /// files are not in it).
    rss_anon: u64,
    threads: u64,
    files: u64,
    cpu_s: f64,
}

fn process_usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: utime and stime are
    // the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Usage {
        rss: field("VmRSS:") * KIB,
        rss_anon: field("RssAnon:") * KIB,
        threads: field("Threads:"),
        files,
        cpu_s: ticks.iter().sum::<f64>() / hz,
    })
}

/// The guests booting during a fleet step: each on a sandbox of its own
/// from the `guest` image, until it powers off.
fn boot_guests(
    api: &mut Api,
    guest_dir: &Path,
    n: usize,
) -> Result<Vec<(String, std::thread::JoinHandle<Result<Boot>>)>> {
    (0..n)
        .map(|_| {
            let v = api.create(GUEST_IMAGE, None)?;
            let (dir, socket) = (guest_dir.to_owned(), disk_socket(&v));
            let boot = std::thread::spawn(move || boot(&dir, &socket, "boot"));
            Ok((id(&v), boot))
        })
        .collect()
}

/// The image the fleet's guests boot from.
const GUEST_IMAGE: &str = "guest";

fn part_fleet(
    api: &mut Api,
    daemon: &Daemon,
    image: &str,
    counts: &[usize],
    guests: Option<(&Path, usize)>,
) -> Result<Value> {
    let pid = daemon.child.id();
    let u = process_usage(pid)?;
    let mut rows = vec![json!({
        "sandboxes": 0,
        "rss_bytes": u.rss,
        "rss_anon_bytes": u.rss_anon,
        "threads": u.threads,
        "open_files": u.files,
    })];
    let mut made: Vec<String> = Vec::new();
    for &n in counts {
        eprintln!("part 5: {n} sandboxes");
        let booting = match guests {
            Some((dir, k)) => boot_guests(api, dir, k)?,
            None => Vec::new(),
        };
        let t = Instant::now();
        let from = made.len();
        while made.len() < n {
            let v = api.create(image, None)?;
            // The first served read, then the client goes: an idle sandbox.
            let mut c = Client::connect(&disk_socket(&v))?;
            c.read(0, 4096)?;
            made.push(id(&v));
        }
        let took = t.elapsed().as_secs_f64();
        let mut boots = Vec::new();
        for (sandbox, b) in booting {
            let boot = b.join().expect("a guest's thread")?;
            boots.push(json!({"to_init_s": boot.to_init_s, "total_s": boot.total_s}));
            made.push(sandbox);
        }
        // Idle: no client, no request; what does the daemon cost?
        std::thread::sleep(Duration::from_secs(1));
        let cpu0 = process_usage(pid)?.cpu_s;
        std::thread::sleep(Duration::from_secs(5));
        let u = process_usage(pid)?;
        rows.push(json!({
            "sandboxes": made.len(),
            "rss_bytes": u.rss,
            "rss_anon_bytes": u.rss_anon,
            "threads": u.threads,
            "open_files": u.files,
            "idle_cpu_share": (u.cpu_s - cpu0) / 5.0,
            "created": n.saturating_sub(from),
            "create_and_first_read_per_second": n.saturating_sub(from) as f64 / took,
            "guests_booted": boots,
        }));
    }
    for m in &made {
        api.remove(m)?;
    }
    Ok(Value::Array(rows))
}

fn print_fleet(fleet: &Value) {
    println!("\n== 5. a fleet of idle sandboxes on one daemon");
    let mut t = Table::new(&[
        "sandboxes",
        "daemon RSS MiB",
        "anon MiB",
        "anon KiB per added sandbox",
        "threads",
        "open files",
        "idle CPU",
        "create + first read /s",
        "guests' boot s",
    ]);
    let rows = fleet.as_array().cloned().unwrap_or_default();
    let num = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    for w in rows.windows(2) {
        let (prev, r) = (&w[0], &w[1]);
        let added = (num(r, "sandboxes") - num(prev, "sandboxes")).max(1.0);
        let grew = num(r, "rss_anon_bytes") - num(prev, "rss_anon_bytes");
        t.row(vec![
            r["sandboxes"].to_string(),
            format!("{:.1}", num(r, "rss_bytes") / MIB as f64),
            format!("{:.1}", num(r, "rss_anon_bytes") / MIB as f64),
            format!("{:.0}", grew / added / KIB as f64),
            r["threads"].to_string(),
            r["open_files"].to_string(),
            format!(
                "{:.2}%",
                r["idle_cpu_share"].as_f64().unwrap_or(0.0) * 100.0
            ),
            format!(
                "{:.0}",
                r["create_and_first_read_per_second"]
                    .as_f64()
                    .unwrap_or(0.0)
            ),
            r["guests_booted"]
                .as_array()
                .map(|boots| {
                    boots
                        .iter()
                        .map(|b| format!("{:.1}", b["total_s"].as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
        ]);
    }
    t.print();
    println!("  guests boot (QEMU start to power-off) while the step's sandboxes are created; they count among the sandboxes");
    println!("  RSS includes the chunk cache's mapped files; anon does not");
    println!("  targets: <= 1024 KiB per idle sandbox, >= 500 creates + first reads /s, threads bounded by the cores");
}

// --------------------------------------------------- part 6: migration

/// What the writing client saw of a migration.
struct ClientSide {
    /// From its last write answered by the first daemon to its first
    /// answered by the second.
    gap_s: f64,
    writes: u64,
}

/// A client writing 4 KiB a millisecond at random into `[at, at + len)`
/// until `stop`; when its daemon stops answering, it waits for the next
/// daemon's disk socket on `next`, connects there and writes on.
fn keep_writing(
    mut c: Client,
    at: u64,
    len: u64,
    next: mpsc::Receiver<PathBuf>,
    stop: Arc<AtomicBool>,
) -> Result<ClientSide> {
    let mut rng = fastrand::Rng::with_seed(6);
    let buf = pattern(66);
    let (mut last_ok, mut gap, mut writes) = (Instant::now(), None, 0);
    while !stop.load(Ordering::Acquire) {
        let off = at + rng.u64(..len / 4096) * 4096;
        c.submit_write(off, &buf[..4096]);
        while !c.completed_within(Duration::from_millis(2))? {
            // Unanswered: cut off, or slow. A cut-off client moves on
            // once the next daemon serves the disk.
            if let Ok(socket) = next.try_recv() {
                c = loop {
                    match Client::connect(&socket) {
                        Ok(n) => break n,
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                };
                c.write(off, &buf[..4096])?;
                gap = Some(last_ok.elapsed().as_secs_f64());
                break;
            }
        }
        last_ok = Instant::now();
        writes += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(ClientSide {
        gap_s: gap.context("the client was never cut off")?,
        writes,
    })
}

/// One migration of a named sandbox with `written` bytes from daemon `a`
/// to the daemon on `to`, pre-copy rounds at most `max_rounds`, while a
/// client writes past `written`; checks the bytes on the other side.
fn migrate_once(
    a: &mut Api,
    b: &mut Api,
    to: &Path,
    image: &str,
    written: u64,
    max_rounds: u32,
    seed: u64,
) -> Result<Value> {
    let name = format!("bench-migrate-{seed}-{:08x}", fastrand::u32(..));
    let sb = a.create(image, Some(&name))?;
    let mut c = Client::connect(&disk_socket(&sb))?;
    // Every MiB its own random bytes: nothing the store already holds,
    // nothing that compresses, as a guest's fresh data.
    let mib = |at: u64| pattern((seed << 20) | (at / MIB));
    let mut at = 0;
    while at < written {
        let n = MIB.min(written - at) as usize;
        c.write(at, &mib(at)[..n])?;
        at += n as u64;
    }
    c.flush()?;
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || keep_writing(c, written, 64 * MIB, rx, stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let report = a.ok(
        "POST",
        &format!("/v1/sandboxes/{name}/migrate"),
        Some(&json!({ "to": to, "max_rounds": max_rounds })),
    )?;
    let call_s = t.elapsed().as_secs_f64();
    tx.send(disk_socket(&report["sandbox"]))?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let seen = writer.join().expect("the writing client")?;
    let mut c = Client::connect(&disk_socket(&report["sandbox"]))?;
    for at in [0, written.saturating_sub(MIB)] {
        let n = MIB.min(written) as usize;
        ensure!(
            c.read(at, n)? == mib(at)[..n],
            "the migrated disk reads other bytes at {at}"
        );
    }
    drop(c);
    b.remove(&name)?;
    let rounds = report["rounds"].as_array().cloned().unwrap_or_default();
    Ok(json!({
        "written": written,
        "max_rounds": max_rounds,
        "rounds": rounds.len(),
        "precopy_bytes": rounds.iter().filter_map(|r| r["bytes"].as_u64()).sum::<u64>(),
        "delta_bytes": report["delta_bytes"],
        "switch_s": report["switch_secs"],
        "unserved_s": report["unserved_secs"],
        "client_gap_s": seen.gap_s,
        "client_writes": seen.writes,
        "call_s": call_s,
    }))
}

fn part_migrate(env: &Env, image: &str, sizes: &[u64], rounds: usize) -> Result<Value> {
    let a = env.daemon_as("daemon-a", "state-a", "cache-a")?;
    let b = env.daemon_as("daemon-b", "state-b", "cache-b")?;
    let (mut api_a, mut api_b) = (Api::new(&a.socket), Api::new(&b.socket));
    let mut out = Vec::new();
    let mut seed = 60;
    for &w in sizes {
        for (mode, max_rounds) in [("pre-copy", 4), ("stop-and-copy", 0)] {
            eprintln!("part 6: migration, {} written, {mode}", label(w));
            let mut runs = Vec::new();
            for r in 0..rounds {
                // Alternate the direction: each run starts where the last
                // one's daemon is idle again.
                let (from, to, sock) = if r % 2 == 0 {
                    (&mut api_a, &mut api_b, &b.socket)
                } else {
                    (&mut api_b, &mut api_a, &a.socket)
                };
                seed += 1;
                runs.push(migrate_once(from, to, sock, image, w, max_rounds, seed)?);
            }
            let pick =
                |k: &str| -> Vec<f64> { runs.iter().filter_map(|v| v[k].as_f64()).collect() };
            out.push(json!({
                "written": w,
                "mode": mode,
                "unserved_s": stats(&pick("unserved_s")),
                "client_gap_s": stats(&pick("client_gap_s")),
                "switch_s": stats(&pick("switch_s")),
                "delta_bytes": stats(&pick("delta_bytes")),
                "precopy_bytes": stats(&pick("precopy_bytes")),
                "runs": runs,
            }));
        }
    }
    Ok(Value::Array(out))
}

fn print_migrate(rows: &Value) {
    println!("\n== 6. migration to a second daemon on the store, a client writing 4 KiB/ms");
    let mut t = Table::new(&[
        "written",
        "mode",
        "pre-copied MiB",
        "last delta MiB",
        "unserved ms (daemon)",
        "unserved ms (client)",
        "vs stop-and-copy",
    ]);
    let rows = rows.as_array().cloned().unwrap_or_default();
    let med = |r: &Value, k: &str| r[k]["p50"].as_f64().unwrap_or(0.0);
    for r in &rows {
        let base = rows
            .iter()
            .find(|o| o["written"] == r["written"] && o["mode"] == "stop-and-copy")
            .map_or(0.0, |o| med(o, "client_gap_s"));
        t.row(vec![
            label(r["written"].as_u64().unwrap_or(0)),
            r["mode"].as_str().unwrap_or("-").to_owned(),
            format!("{:.1}", med(r, "precopy_bytes") / MIB as f64),
            format!("{:.2}", med(r, "delta_bytes") / MIB as f64),
            ms(med(r, "unserved_s")),
            ms(med(r, "client_gap_s")),
            format!("{:.2}x", med(r, "client_gap_s") / base),
        ]);
    }
    t.print();
    println!(
        "  medians; target: unserved < 1 s plus the upload of what was written in the last second"
    );
}

// ------------------------------------------------ part 7: suspend on idle

/// Whether the daemon serves a sandbox named `name` now.
fn served(api: &mut Api, name: &str) -> Result<bool> {
    let all = api.ok("GET", "/v1/sandboxes", None)?;
    Ok(all["sandboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["name"] == name))
}

fn part_idle(api: &mut Api, image: &str, rounds: usize) -> Result<Value> {
    let (mut doorbell, mut explicit) = (vec![], vec![]);
    let want = pattern(70);
    for r in 0..rounds {
        eprintln!("part 7: suspend on idle, round {}", r + 1);
        let name = format!("bench-idle-{r}-{:08x}", fastrand::u32(..));
        let sb = api.ok(
            "POST",
            "/v1/sandboxes",
            Some(&json!({ "image": image, "name": name, "idle_suspend_ms": 1000 })),
        )?;
        let socket = disk_socket(&sb);
        let mut c = Client::connect(&socket)?;
        c.write(0, &want[..4096])?;
        c.flush()?;
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(60);
        while served(api, &name)? {
            ensure!(Instant::now() < deadline, "{name} never idled out");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Woken by a client at its socket.
        let t = Instant::now();
        let mut c = loop {
            match Client::connect(&socket) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        ensure!(
            c.read(0, 4096)? == want[..4096],
            "{name} woke with other bytes"
        );
        doorbell.push(t.elapsed().as_secs_f64());
        drop(c);
        // The same by hand: suspend, resume through the API, read.
        api.ok(
            "POST",
            &format!("/v1/sandboxes/{name}/suspend"),
            Some(&json!({})),
        )?;
        let t = Instant::now();
        let v = api.ok(
            "POST",
            &format!("/v1/sandboxes/{name}/resume"),
            Some(&json!({})),
        )?;
        let mut c = Client::connect(&disk_socket(&v))?;
        ensure!(
            c.read(0, 4096)? == want[..4096],
            "{name} resumed with other bytes"
        );
        explicit.push(t.elapsed().as_secs_f64());
        drop(c);
        api.remove(&name)?;
    }
    Ok(json!({
        "doorbell_to_first_read_s": stats(&doorbell),
        "api_resume_to_first_read_s": stats(&explicit),
    }))
}

fn print_idle(v: &Value) {
    println!(
        "\n== 7. suspend on idle: a suspended sandbox's next request to its first read served"
    );
    let p50 = |k: &str| v[k]["p50"].as_f64().unwrap_or(0.0);
    let mut t = Table::new(&["woken by", "median", "p99", "vs API resume"]);
    for (label_, k) in [
        ("a client at its disk socket", "doorbell_to_first_read_s"),
        ("POST resume (baseline)", "api_resume_to_first_read_s"),
    ] {
        t.row(vec![
            label_.to_owned(),
            ms(p50(k)),
            ms(v[k]["p99"].as_f64().unwrap_or(0.0)),
            format!("{:.2}x", p50(k) / p50("api_resume_to_first_read_s")),
        ]);
    }
    t.print();
}

// ------------------------------------------------------ part 8: fairness

/// QD1 4 KiB reads at random in the first `span` bytes for `secs`: each
/// one's latency in seconds.
fn warm_reads(c: &mut Client, span: u64, secs: f64) -> Result<Vec<f64>> {
    let mut rng = fastrand::Rng::with_seed(8);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    while Instant::now() < until {
        let off = rng.u64(..span / 4096) * 4096;
        let t = Instant::now();
        c.read(off, 4096)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok(lat)
}

fn part_fairness(
    api: &mut Api,
    image: &str,
    readers: usize,
    region: u64,
    secs: f64,
) -> Result<Value> {
    const WARM_SPAN: u64 = 4 * MIB;
    let warm = api.create(image, None)?;
    let mut w = Client::connect(&disk_socket(&warm))?;
    // Its span read once: every later read hits the cache.
    for at in (0..WARM_SPAN).step_by(MIB as usize) {
        w.read(at, MIB as usize)?;
    }
    // A disk that read cold counts as streaming for a second after (its
    // turns then go to the pool's stream threads): measure it warm.
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!("part 8: warm reads alone");
    let alone = warm_reads(&mut w, WARM_SPAN, secs)?;
    eprintln!("part 8: warm reads beside {readers} cold sequential readers");
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..readers {
        let sb = api.create(image, None)?;
        let mut c = Client::connect(&disk_socket(&sb))?;
        let (stop, start) = (stop.clone(), WARM_SPAN + i as u64 * region);
        threads.push(std::thread::spawn(move || -> Result<u64> {
            let mut at = 0;
            while !stop.load(Ordering::Acquire) && at < region {
                c.read(start + at, (64 * KIB) as usize)?;
                at += 64 * KIB;
            }
            Ok(at)
        }));
    }
    let t = Instant::now();
    let loaded = warm_reads(&mut w, WARM_SPAN, secs)?;
    let took = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let mut cold_bytes = 0;
    for th in threads {
        cold_bytes += th.join().expect("a cold reader")?;
    }
    drop(w);
    let p99 = |xs: &[f64]| quantile(xs.to_vec(), 0.99);
    Ok(json!({
        "readers": readers,
        "warm_alone_s": stats(&alone),
        "warm_loaded_s": stats(&loaded),
        "p99_ratio": p99(&loaded) / p99(&alone),
        "cold_bytes": cold_bytes,
        "cold_mib_per_s": cold_bytes as f64 / MIB as f64 / took,
    }))
}

fn print_fairness(v: &Value) {
    println!(
        "\n== 8. fairness: a warm 4 KiB read beside {} cold sequential readers ({:.0} MiB/s cold)",
        v["readers"],
        v["cold_mib_per_s"].as_f64().unwrap_or(0.0)
    );
    let mut t = Table::new(&["warm reads", "median µs", "p99 µs", "reads"]);
    let us = |x: &Value| format!("{:.1}", x.as_f64().unwrap_or(0.0) * 1e6);
    for (label_, k) in [
        ("alone", "warm_alone_s"),
        ("beside the cold readers", "warm_loaded_s"),
    ] {
        t.row(vec![
            label_.to_owned(),
            us(&v[k]["p50"]),
            us(&v[k]["p99"]),
            v[k]["n"].to_string(),
        ]);
    }
    t.print();
    println!(
        "  p99 loaded / alone: {:.2}x (target: at most 2x)",
        v["p99_ratio"].as_f64().unwrap_or(0.0)
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let written = parse_size(&args.written)?;
    let sizes: Vec<u64> = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<_>>()?;
    let rate_size = parse_size(&args.rate_size)?;
    let suspend_sizes: Vec<u64> = args
        .suspend_written
        .iter()
        .map(|s| parse_size(s).map(|w| w.min(rate_size)))
        .collect::<Result<_>>()?;
    let tmp;
    let dir = match &args.work {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let env = Env {
        store: args
            .store
            .clone()
            .unwrap_or_else(|| format!("file://{}", dir.join("store").display())),
        dir,
        runtime: runtime_dir()?,
        cairn: cairn_bin()?,
    };
    let before = machine_state();
    let started = Instant::now();
    // Parts run on their own: one part, one report.
    let own: Option<(&str, Value)> = if let Some(readers) = args.fairness {
        let region = parse_size(&args.fairness_region)?;
        // Every MiB its own random bytes: each reader's chunks are its own.
        let raw = env.path("fairness.raw");
        let size = 4 * MIB + readers as u64 * region;
        {
            let f = std::fs::File::create(&raw)?;
            for at in (0..size).step_by(MIB as usize) {
                f.write_all_at(&pattern(at / MIB + 80_000), at)?;
            }
        }
        env.run(&[
            "image",
            "import-raw",
            "--name",
            "fairness",
            raw.to_str().unwrap(),
        ])?;
        let daemon = env.daemon()?;
        let v = part_fairness(
            &mut Api::new(&daemon.socket),
            "fairness",
            readers,
            region,
            args.fairness_secs,
        )?;
        drop(daemon);
        print_fairness(&v);
        Some(("fairness", v))
    } else if let Some(rounds) = args.idle {
        import_sparse(&env, "idle", GIB)?;
        let daemon = env.daemon()?;
        let idle = part_idle(&mut Api::new(&daemon.socket), "idle", rounds)?;
        drop(daemon);
        print_idle(&idle);
        Some(("idle", idle))
    } else if !args.migrate.is_empty() {
        let sizes: Vec<u64> = args
            .migrate
            .iter()
            .map(|s| parse_size(s))
            .collect::<Result<_>>()?;
        let top = sizes.iter().copied().max().unwrap_or(0);
        import_sparse(&env, "migrate", (top + 64 * MIB).div_ceil(GIB) * GIB + GIB)?;
        let rows = part_migrate(&env, "migrate", &sizes, args.migrate_rounds)?;
        print_migrate(&rows);
        Some(("migrate", rows))
    } else if !args.fleet.is_empty() {
        import_sparse(&env, "fleet", GIB)?;
        let guests = (args.fleet_guests > 0).then_some((args.guest.as_path(), args.fleet_guests));
        if guests.is_some() {
            let rootfs = args.guest.join("rootfs.ext4");
            ensure!(
                rootfs.exists(),
                "{} is missing: build the test guest (fixtures/build-guest.sh) and set CAIRN_GUEST_DIR, or pass --fleet-guests 0",
                rootfs.display()
            );
            env.run(&[
                "image",
                "import-raw",
                "--name",
                GUEST_IMAGE,
                rootfs.to_str().unwrap(),
            ])?;
        }
        let daemon = env.daemon()?;
        let fleet = part_fleet(
            &mut Api::new(&daemon.socket),
            &daemon,
            "fleet",
            &args.fleet,
            guests,
        )?;
        drop(daemon);
        print_fleet(&fleet);
        Some(("fleet", fleet))
    } else {
        None
    };
    if let Some((key, value)) = own {
        let mut report = json!({
            "command": std::env::args().collect::<Vec<_>>(),
            "store": env.store,
            "machine_before": before,
            "machine_after": machine_state(),
        });
        report[key] = value;
        if let Some(d) = args.json_out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&args.json_out, serde_json::to_vec_pretty(&report)?)?;
        println!("  JSON: {}", args.json_out.display());
        return Ok(());
    }

    // Images: one sparse raw file per size, imported (holes skipped).
    let mut images = Vec::new();
    let mut imports = Vec::new();
    let mut all: Vec<u64> = sizes.clone();
    if !all.contains(&rate_size) {
        all.push(rate_size);
    }
    for &size in &all {
        let raw = env.path(&format!("base-{size}.raw"));
        make_sparse_image(&raw, size)?;
        let name = format!("bench-{}", size / MIB);
        let t = Instant::now();
        env.run(&[
            "image",
            "import-raw",
            "--name",
            &name,
            raw.to_str().unwrap(),
        ])?;
        imports.push(json!({ "size": size, "import_s": t.elapsed().as_secs_f64() }));
        images.push((size, name, raw));
    }
    let rate_image = images
        .iter()
        .find(|i| i.0 == rate_size)
        .map(|i| i.1.clone())
        .expect("imported above");

    let daemon = env.daemon()?;
    let mut api = Api::new(&daemon.socket);
    let part1_images: Vec<_> = images
        .iter()
        .filter(|i| sizes.contains(&i.0))
        .cloned()
        .collect();
    let (rows, notes) = part_clone_fork(&env, &mut api, &args, written, &part1_images)?;
    let rate = part_rate(&mut api, &daemon.socket, &rate_image, &args)?;
    let pause = part_pause(&env, &mut api, &rate_image, written.min(rate_size), &args)?;
    let suspend = part_suspend(&mut api, &rate_image, &suspend_sizes, &args)?;
    let metrics = api
        .call("GET", "/metrics", None)
        .map(|(_, v)| v)
        .unwrap_or(Value::Null);
    drop(daemon);
    let after = machine_state();

    // ---------------------------------------------------------- report
    println!(
        "\n== 1. clone and fork, {} written (and flushed) before each; {} samples, full copy {}",
        label(written),
        args.samples,
        args.copy_samples
    );
    let mut t1 = Table::new(&[
        "image",
        "operation",
        "p50 ms",
        "p99 ms",
        "per s",
        "vs cairn (p50)",
    ]);
    let p50 = |r: &Row| median(r.samples.clone());
    for r in &rows {
        let cairn = rows
            .iter()
            .find(|c| {
                c.size == r.size
                    && c.what
                        == if r.what.contains("fork") {
                            "cairn fork (API, count 1)"
                        } else {
                            "cairn clone (API)"
                        }
            })
            .map(p50);
        let ratio = match cairn {
            Some(c) if !r.what.starts_with("cairn") => format!("{:.1}x", p50(r) / c),
            _ => String::new(),
        };
        let (p, q) = if r.per > 1.0 {
            (ms(p50(r)), "-".to_owned())
        } else {
            (ms(p50(r)), ms(quantile(r.samples.clone(), 0.99)))
        };
        t1.row(vec![
            label(r.size),
            r.what.to_owned(),
            p,
            q,
            format!("{:.0}", 1.0 / mean(&r.samples)),
            ratio,
        ]);
    }
    t1.print();
    for what in ["cairn clone (API)", "cairn fork (API, count 1)"] {
        let of: Vec<&Row> = rows.iter().filter(|r| r.what == what).collect();
        if of.len() > 1 {
            println!(
                "  {what}: p50 at {} / at {} = {:.2}x",
                label(of[of.len() - 1].size),
                label(of[0].size),
                p50(of[of.len() - 1]) / p50(of[0])
            );
        }
    }

    let s = &rate["sequential"];
    let c = &rate["concurrent"];
    println!(
        "\n== 2. clones per second through the API, storage only (no VMM), {} image",
        label(rate_size)
    );
    let mut t2 = Table::new(&["run", "clones", "per s", "p50 ms", "p99 ms", "target"]);
    t2.row(vec![
        "sequential, 1 client".into(),
        s["latency_s"]["n"].to_string(),
        format!("{:.0}", s["per_second"].as_f64().unwrap_or(0.0)),
        ms(s["latency_s"]["p50"].as_f64().unwrap_or(0.0)),
        ms(s["latency_s"]["p99"].as_f64().unwrap_or(0.0)),
        ">= 1000/s".into(),
    ]);
    t2.row(vec![
        format!("{} concurrent clients", args.clients),
        c["clones"].to_string(),
        format!("{:.0}", c["per_second"].as_f64().unwrap_or(0.0)),
        ms(c["latency_s"]["p50"].as_f64().unwrap_or(0.0)),
        ms(c["latency_s"]["p99"].as_f64().unwrap_or(0.0)),
        ">= 1000/s".into(),
    ]);
    t2.print();
    println!(
        "  sequential: first tenth p50 {} ms, last tenth p50 {} ms; removes {:.0}/s",
        ms(s["first_tenth_p50_s"].as_f64().unwrap_or(0.0)),
        ms(s["last_tenth_p50_s"].as_f64().unwrap_or(0.0)),
        s["remove_per_second"].as_f64().unwrap_or(0.0)
    );

    println!(
        "\n== 3. snapshot pause seen by a QD1 4 KiB writer, {} written (not flushed) before each, {} rounds",
        label(written.min(rate_size)),
        args.rounds
    );
    let f = |k: &str, q: &str| pause[k][q].as_f64().unwrap_or(0.0);
    let mut t3 = Table::new(&["what", "p50 ms", "max ms", "vs FLUSH (p50)"]);
    t3.row(vec![
        "plain FLUSH (the writer waits for it)".into(),
        ms(f("flush_s", "p50")),
        ms(f("flush_s", "max")),
        "1.0x".into(),
    ]);
    t3.row(vec![
        "snapshot: longest write during the call".into(),
        ms(f("snapshot_pause_s", "p50")),
        ms(f("snapshot_pause_s", "max")),
        format!("{:.2}x", f("snapshot_pause_s", "p50") / f("flush_s", "p50")),
    ]);
    t3.row(vec![
        "snapshot API call".into(),
        ms(f("snapshot_call_s", "p50")),
        ms(f("snapshot_call_s", "max")),
        format!("{:.2}x", f("snapshot_call_s", "p50") / f("flush_s", "p50")),
    ]);
    t3.row(vec![
        "a 4 KiB write outside FLUSH windows".into(),
        ms(f("write_s", "p50")),
        ms(f("write_s", "max")),
        String::new(),
    ]);
    t3.print();

    println!(
        "\n== 4. suspend and resume of a named sandbox, {} image, {} rounds",
        label(rate_size),
        args.suspend_rounds
    );
    let mut t4 = Table::new(&[
        "written",
        "suspend p50 ms",
        "max",
        "vs 0 written",
        "resume API p50 ms",
        "resume to first 4K read p50 ms",
        "max",
        "target",
    ]);
    let arr = suspend.as_array().cloned().unwrap_or_default();
    let zero = arr
        .first()
        .map(|v| v["suspend_s"]["p50"].as_f64().unwrap_or(0.0));
    for v in &arr {
        let g = |k: &str, q: &str| v[k][q].as_f64().unwrap_or(0.0);
        t4.row(vec![
            label(v["written"].as_u64().unwrap_or(0)),
            ms(g("suspend_s", "p50")),
            ms(g("suspend_s", "max")),
            zero.map(|z| format!("{:.1}x", g("suspend_s", "p50") / z))
                .unwrap_or_default(),
            ms(g("resume_api_s", "p50")),
            ms(g("resume_to_first_read_s", "p50")),
            ms(g("resume_to_first_read_s", "max")),
            "< 50 ms".into(),
        ]);
    }
    t4.print();
    println!(
        "\n  {:.0} s in all; load average before {}, after {}",
        started.elapsed().as_secs_f64(),
        before["loadavg"],
        after["loadavg"]
    );

    let report = json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "store": env.store,
        "written": written,
        "machine_before": before,
        "machine_after": after,
        "imports": imports,
        "clone_fork": rows.iter().map(|r| json!({
            "size": r.size,
            "operation": r.what,
            "sandboxes_per_sample": r.per,
            "seconds": stats(&r.samples),
            "samples": r.samples,
        })).collect::<Vec<_>>(),
        "clone_fork_notes": notes,
        "rate": rate,
        "pause": pause,
        "suspend_resume": suspend,
        "daemon_metrics": metrics,
        "total_s": started.elapsed().as_secs_f64(),
    });
    if let Some(d) = args.json_out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&report)?)?;
    println!("  JSON: {}", args.json_out.display());
    Ok(())
}
