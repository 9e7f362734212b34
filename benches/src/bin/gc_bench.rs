//! The garbage-collection scale benchmark: `cairn gc` and `cairn verify`
//! on synthetic `file://` stores of growing size (by default 100,000
//! chunks under 1,000 snapshots, then 1,000,000 under 10,000), with their
//! wall time and peak RSS side by side. The baseline is the same commands
//! on the store ten times smaller: a ratio of 1 means memory flat in the
//! size of the store, 10 means linear.
//!
//! Each store: 4 KiB chunks (distinct, compressible, so the store stays
//! small on disk) in packs of 10,000 frames; every snapshot completed in
//! the catalog with a disk manifest of its own chunks; a tenth more chunks
//! under manifests nothing references, for the collector to find.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_benches::{machine_state, Table};
use cairn_engine::catalog::snapshot::{self, Completion, NewSnapshot};
use cairn_engine::frame::FrameEncoder;
use cairn_engine::manifest::{Manifest, ManifestKind};
use cairn_engine::objstore::{FileStore, ObjectStore};
use cairn_engine::pack::PackWriter;
use cairn_engine::{layout, ChunkId, ManifestId};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Store sizes, in live chunks.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    chunks: Vec<usize>,
    /// Live chunks per snapshot.
    #[arg(long, default_value_t = 100)]
    per_snapshot: usize,
    /// Where the stores are built (deleted afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value = "target/bench/gc.json")]
    json_out: PathBuf,
}

const CHUNK: usize = 4096;
const PACK_FRAMES: usize = 10_000;

/// Chunk `i`: zeros but for its number, so every chunk is distinct.
fn chunk(i: usize) -> Vec<u8> {
    let mut raw = vec![0u8; CHUNK];
    raw[..8].copy_from_slice(&(i as u64).to_le_bytes());
    raw[CHUNK / 2..CHUNK / 2 + 8].copy_from_slice(&(i as u64).to_le_bytes());
    raw
}

/// Writes chunks `range` into packs straight into the store directory.
fn write_packs(root: &Path, range: std::ops::Range<usize>) -> Result<Vec<ChunkId>> {
    let staging = root.join(".bench-staging");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(root.join("packs"))?;
    let mut enc = FrameEncoder::new(1)?;
    let mut ids = Vec::with_capacity(range.len());
    let starts: Vec<usize> = range.clone().step_by(PACK_FRAMES).collect();
    for start in starts {
        let path = staging.join("pack.partial");
        let mut w = PackWriter::create(&path)?;
        for i in start..(start + PACK_FRAMES).min(range.end) {
            let raw = chunk(i);
            let id = ChunkId::of(&raw);
            w.append(&enc.encode(id, &raw))?;
            ids.push(id);
        }
        let index = w.finish()?;
        std::fs::rename(&path, root.join(layout::pack_key(&index.id)))?;
        std::fs::write(
            root.join(layout::pack_index_key(&index.id)),
            index.encode_tail(),
        )?;
    }
    Ok(ids)
}

fn write_manifest(root: &Path, chunks: &[ChunkId]) -> Result<ManifestId> {
    let m = Manifest {
        kind: ManifestKind::Disk,
        logical_size: (chunks.len() * CHUNK) as u64,
        chunk_size: CHUNK as u32,
        chunks: chunks.iter().copied().map(Some).collect(),
        meta: Vec::new(),
    };
    let bytes = m.encode();
    let id = ManifestId::of(&bytes);
    std::fs::create_dir_all(root.join("manifests"))?;
    std::fs::write(root.join(layout::manifest_key(&id)), bytes)?;
    Ok(id)
}

/// A store of `live` chunks under `live / per` completed snapshots and a
/// tenth more under unreferenced manifests.
fn build(root: &Path, live: usize, per: usize, rt: &tokio::runtime::Runtime) -> Result<usize> {
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::open(root)?);
    let ids = write_packs(root, 0..live + live / 10)?;
    for dead in ids[live..].chunks(per) {
        write_manifest(root, dead)?;
    }
    let disks: Vec<ManifestId> = ids[..live]
        .chunks(per)
        .map(|c| write_manifest(root, c))
        .collect::<Result<_>>()?;
    let snapshots = disks.len();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for disk in disks {
            if tasks.len() >= 32 {
                tasks.join_next().await.expect("a task")??;
            }
            let store = store.clone();
            tasks.spawn(async move {
                let new = NewSnapshot {
                    project: "bench".into(),
                    parent: None,
                    image: None,
                    sandbox: None,
                    host: "bench".into(),
                };
                let s = snapshot::create(store.as_ref(), new).await?;
                snapshot::start_upload(store.as_ref(), "bench", &s.id, "bench").await?;
                let done = Completion {
                    disk,
                    memory: None,
                    vm_state: None,
                };
                snapshot::complete(store.as_ref(), "bench", &s.id, done).await?;
                anyhow::Ok(())
            });
        }
        while let Some(t) = tasks.join_next().await {
            t??;
        }
        anyhow::Ok(())
    })?;
    Ok(snapshots)
}

/// Runs `cairn ARGS` on the store: wall seconds, peak RSS in bytes, and
/// its JSON output. The peak is the child's `VmHWM`, read every 2 ms
/// until it exits: `wait4`'s `ru_maxrss` would count this benchmark's own
/// memory, which a child inherits across fork and exec.
fn measured(cairn: &Path, root: &Path, args: &[&str]) -> Result<(f64, u64, serde_json::Value)> {
    let started = Instant::now();
    let mut child = Command::new(cairn)
        .arg("--store")
        .arg(format!("file://{}", root.display()))
        .arg("--cache-dir")
        .arg(root.join(".cache"))
        .arg("--json")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cairn.display()))?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        }) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let seconds = started.elapsed().as_secs_f64();
    let out = reader.join().expect("the stdout reader")?;
    if !status.success() {
        bail!("cairn {args:?} failed: {out}");
    }
    let json = serde_json::from_str(out.trim())
        .with_context(|| format!("cairn {args:?} printed {out}"))?;
    Ok((seconds, peak_kib * 1024, json))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cairn = std::env::current_exe()?.with_file_name("cairn");
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut table = Table::new(&[
        "live chunks",
        "snapshots",
        "build s",
        "gc --dry-run s",
        "gc --dry-run RSS MiB",
        "gc s",
        "gc RSS MiB",
        "verify s",
        "verify RSS MiB",
        "condemned",
    ]);
    let mut rows = Vec::new();
    for &live in &args.chunks {
        let dir = tempfile::Builder::new()
            .prefix("cairn-gc-bench-")
            .tempdir_in(&base)?;
        let root = dir.path().join("store");
        let t = Instant::now();
        let snapshots = build(&root, live, args.per_snapshot, &rt)?;
        let build_s = t.elapsed().as_secs_f64();
        let (dry_s, dry_rss, dry) = measured(&cairn, &root, &["gc", "--dry-run"])?;
        let (gc_s, gc_rss, gc) = measured(&cairn, &root, &["gc", "--grace", "1h"])?;
        let (verify_s, verify_rss, verify) = measured(&cairn, &root, &["verify"])?;
        if gc["live_chunks"] != live as u64
            || !verify["problems"].as_array().is_some_and(Vec::is_empty)
        {
            bail!("unexpected results: gc {gc}, verify {verify}");
        }
        let mib = |b: u64| format!("{:.1}", b as f64 / f64::from(1 << 20));
        table.row(vec![
            live.to_string(),
            snapshots.to_string(),
            format!("{build_s:.1}"),
            format!("{dry_s:.2}"),
            mib(dry_rss),
            format!("{gc_s:.2}"),
            mib(gc_rss),
            format!("{verify_s:.2}"),
            mib(verify_rss),
            gc["condemned"].to_string(),
        ]);
        rows.push(serde_json::json!({
            "live_chunks": live, "snapshots": snapshots, "build_seconds": build_s,
            "gc_dry_run": {"seconds": dry_s, "peak_rss_bytes": dry_rss, "report": dry},
            "gc": {"seconds": gc_s, "peak_rss_bytes": gc_rss, "report": gc},
            "verify": {"seconds": verify_s, "peak_rss_bytes": verify_rss},
        }));
    }
    println!("{}", table.markdown());
    if let [small, .., large] = &rows[..] {
        let ratio = |what: &str, field: &str| {
            large[what][field].as_f64().unwrap_or(0.0) / small[what][field].as_f64().unwrap_or(1.0)
        };
        let size = large["live_chunks"].as_f64().unwrap_or(0.0)
            / small["live_chunks"].as_f64().unwrap_or(1.0);
        println!(
            "store {size:.0}x larger: gc peak RSS {:.2}x, verify peak RSS {:.2}x, gc time {:.2}x, verify time {:.2}x (1x is flat, {size:.0}x linear)",
            ratio("gc", "peak_rss_bytes"),
            ratio("verify", "peak_rss_bytes"),
            ratio("gc", "seconds"),
            ratio("verify", "seconds"),
        );
    }
    let record = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "rows": rows,
        "machine": machine_state(),
    });
    if let Some(parent) = args.json_out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&record)?)?;
    Ok(())
}
