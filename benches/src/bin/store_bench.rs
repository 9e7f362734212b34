//! The store benchmark: import throughput, memory, dedup and read latency,
//! each side by side with its named baseline in the same run.
//!
//! `benches/run-store-bench.sh` builds the fixture, starts the S3 server
//! and runs this; see the README's "Store benchmark" section.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use cairn_benches::{
    cairn_bin, machine_state, mean, median, mib_s, quantile, run_measured, warm_page_cache, Table,
};
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::import::{import_raw, ImportOptions};
use cairn_engine::manifest::Manifest;
use cairn_engine::objstore::{open_store, ObjectStore, StoreUri};
use clap::Parser;
use serde_json::{json, Value};

const DEFAULT_KIB: u32 = cairn_engine::import::DEFAULT_CHUNK_SIZE >> 10;

#[derive(Parser)]
struct Args {
    /// The disk image to import (fixtures/build-rootfs-image.sh makes one).
    #[arg(long, default_value = "fixtures/out/debian-rootfs.ext4")]
    image: PathBuf,
    /// Repetitions of each import timing.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Random 4 KiB reads, each in a different chunk.
    #[arg(long, default_value_t = 400)]
    reads: usize,
    /// Chunk sizes (KiB) to compare in a sweep, e.g. `64,128,256,1024`;
    /// no sweep unless given.
    #[arg(long, value_delimiter = ',')]
    sweep_kib: Vec<u32>,
    /// Run only these parts (import, memory, dedup, reads, cache; the sweep
    /// runs when --sweep-kib is given). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Work directory (default: a temporary directory).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.image.exists(),
        "{} does not exist: run fixtures/build-rootfs-image.sh",
        args.image.display()
    );
    let tmp = tempfile::tempdir_in(args.work.clone().unwrap_or_else(std::env::temp_dir))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results = serde_json::Map::new();
    results.insert(
        "command".into(),
        json!(std::env::args().collect::<Vec<_>>()),
    );
    results.insert("started".into(), json!(utc_now()));
    results.insert("cpus".into(), json!(cpus()));
    results.insert("zstd_version".into(), json!(zstd_version()));
    results.insert("machine_before".into(), machine_state());
    let size = std::fs::metadata(&args.image)?.len();
    results.insert("image".into(), json!(args.image.display().to_string()));
    results.insert("image_bytes".into(), json!(size));
    // fixtures/build-rootfs-image.sh records the image's checksum beside it.
    let mut sum = args.image.clone().into_os_string();
    sum.push(".sha256");
    if let Ok(text) = std::fs::read_to_string(&sum) {
        let hash = text.split_whitespace().next().unwrap_or_default();
        results.insert("image_sha256".into(), json!(hash));
    }
    println!(
        "store benchmark: {} ({:.2} GiB)",
        args.image.display(),
        size as f64 / (1u64 << 30) as f64
    );
    warm_page_cache(&args.image)?;

    let wanted = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    if wanted("import") {
        results.insert("import".into(), bench_import(&args, tmp.path(), size)?);
    }
    if wanted("memory") {
        results.insert("memory".into(), bench_memory(&args, tmp.path())?);
    }
    if wanted("dedup") {
        results.insert("dedup".into(), bench_dedup(&args, tmp.path())?);
    }
    let needs_s3 = wanted("reads") || wanted("cache") || !args.sweep_kib.is_empty();
    if !needs_s3 {
        return write_json(&args, results);
    }
    let remote = rt.block_on(s3_store())?;
    // The baseline for cold reads: the image as one object, read by range.
    rt.block_on(remote.put_file("raw/image", &args.image))?;
    if wanted("reads") {
        let chunk = cairn_engine::import::DEFAULT_CHUNK_SIZE;
        let reads = bench_reads(&rt, &remote, &args, tmp.path(), chunk)?;
        results.insert("reads".into(), reads);
    }
    if wanted("cache") {
        let bound = bench_cache_bound(&rt, &remote, &args, tmp.path())?;
        results.insert("cache_bound".into(), bound);
    }
    if !args.sweep_kib.is_empty() {
        results.insert(
            "chunk_size_sweep".into(),
            bench_sweep(&rt, &remote, &args, tmp.path(), size)?,
        );
    }
    write_json(&args, results)
}

fn write_json(args: &Args, mut results: serde_json::Map<String, Value>) -> Result<()> {
    results.insert("machine_after".into(), machine_state());
    if let Some(p) = &args.json_out {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        let mut text = serde_json::to_string_pretty(&Value::Object(results))?;
        text.push('\n');
        std::fs::write(p, text)?;
        println!("\nfigures written to {}", p.display());
    }
    Ok(())
}

/// The time now, UTC, as `date` prints it (the JSON records when it ran).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn zstd_version() -> String {
    Command::new("zstd")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Median and spread of repeated measurements, with the samples.
fn spread(xs: &[f64]) -> Value {
    json!({
        "median": median(xs.to_vec()),
        "min": xs.iter().copied().fold(f64::INFINITY, f64::min),
        "max": xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "n": xs.len(),
        "samples": xs,
    })
}

/// Median and spread of many latencies (seconds in, microseconds out),
/// without the samples.
fn latency_stats_us(xs: &[f64]) -> Value {
    let us: Vec<f64> = xs.iter().map(|x| x * 1e6).collect();
    json!({
        "p50": median(us.clone()),
        "p99": quantile(us.clone(), 0.99),
        "mean": mean(&us),
        "min": us.iter().copied().fold(f64::INFINITY, f64::min),
        "max": us.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "n": us.len(),
    })
}

/// A figure with a target it can miss.
fn target(what: &str, value: f64, met: bool) -> Value {
    json!({
        "kind": "target",
        "what": what,
        "value": value,
        "result": if met { "met" } else { "missed" },
    })
}

/// A figure that cannot miss unless something is broken (e.g. what
/// fixed-size, content-addressed chunks give by construction): not a target.
fn sanity_check(what: &str, value: &Value, ok: bool) -> Value {
    json!({
        "kind": "sanity check",
        "what": what,
        "value": value,
        "result": if ok { "ok" } else { "FAILED" },
    })
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

fn import_name(image: &Path) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let safe: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("bench-{safe}")
}

fn cairn_import(store: &Path, image: &Path, chunk_kib: u32) -> Result<(f64, u64, Value)> {
    let mut cmd = Command::new(cairn_bin()?);
    cmd.arg("--store")
        .arg(format!("file://{}", store.display()))
        .arg("--cache-dir")
        .arg(store.join(".cache"))
        .args(["image", "import-raw"])
        .arg(image)
        // A name per file: the catalog refuses a taken name for another image.
        .args(["--name", &import_name(image), "--json", "--chunk-size"])
        .arg(format!("{chunk_kib}K"));
    let (took, rss, stdout) = run_measured(&mut cmd)?;
    let report: Value = serde_json::from_slice(&stdout).context("cairn --json output")?;
    Ok((took.as_secs_f64(), rss, report))
}

/// The import target: cairn's throughput against the multi-threaded zstd,
/// the like-for-like baseline (cairn compresses with all cores).
const IMPORT_TARGET: f64 = 0.80;

fn bench_import(args: &Args, work: &Path, size: u64) -> Result<Value> {
    println!(
        "\n== import throughput (page cache warm; median of {} runs, each tool once per run, order rotated)",
        args.runs
    );
    let image = args.image.display().to_string();
    // zstd also takes a level and a thread count from ZSTD_CLEVEL and
    // ZSTD_NBTHREADS: those are cleared below, so the command says it all.
    let zstd = |threads: &str| format!("zstd -1 {threads}-q -c '{image}' > /dev/null");
    let baselines: [(&str, &str, String); 3] = [
        ("b3sum", "b3sum (all cores)", format!("b3sum '{image}'")),
        ("zstd -1", "zstd -1 (one thread)", zstd("")),
        ("zstd -1 -T0", "zstd -1 -T0 (all cores)", zstd("-T0 ")),
    ];
    let mut secs: [Vec<f64>; 4] = Default::default();
    let mut ca_rss: Vec<u64> = vec![];
    let mut last = Value::Null;
    // What else the machine ran: each run's 1-minute load average as it starts.
    let mut load = vec![];
    for run in 0..args.runs {
        load.push(machine_state()["loadavg"].clone());
        for k in 0..4 {
            let tool = (run + k) % 4;
            if let Some((_, _, sh)) = baselines.get(tool) {
                let (t, _, _) = run_measured(
                    Command::new("sh")
                        .arg("-c")
                        .arg(sh)
                        .env_remove("ZSTD_NBTHREADS")
                        .env_remove("ZSTD_CLEVEL"),
                )?;
                secs[tool].push(t.as_secs_f64());
            } else {
                let store = work.join(format!("import-{run}"));
                let (t, rss, report) = cairn_import(&store, &args.image, DEFAULT_KIB)?;
                std::fs::remove_dir_all(&store)?;
                secs[3].push(t);
                ca_rss.push(rss);
                last = report;
            }
        }
    }
    let med: Vec<f64> = secs.iter().map(|xs| median(xs.clone())).collect();
    let (ca, ca_runs) = (med[3], &secs[3]);
    // cairn's throughput as a fraction of a baseline's: > 1 is faster.
    let vs = |i: usize| med[i] / ca;
    let per_run =
        |i: usize| -> Vec<f64> { secs[i].iter().zip(ca_runs).map(|(b, c)| b / c).collect() };
    let range = |xs: &[f64]| {
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2}-{hi:.2}")
    };
    let mut t = Table::new(&[
        "tool",
        "seconds",
        "(min-max)",
        "MiB/s",
        "cairn vs this (throughput)",
    ]);
    for (i, (_, label, _)) in baselines.iter().enumerate() {
        t.row(vec![
            (*label).into(),
            format!("{:.2}", med[i]),
            range(&secs[i]),
            format!("{:.0}", mib_s(size, med[i])),
            if i == 0 {
                String::new()
            } else {
                format!("{:.2}x (per run {})", vs(i), range(&per_run(i)))
            },
        ]);
    }
    t.row(vec![
        "cairn image import-raw".into(),
        format!("{ca:.2}"),
        range(ca_runs),
        format!("{:.0}", mib_s(size, ca)),
        String::new(),
    ]);
    t.print();
    let ratio = vs(2);
    let ok = ratio >= IMPORT_TARGET;
    let what =
        format!("cairn import-raw throughput >= {IMPORT_TARGET:.2}x of zstd -1 -T0 (all cores)");
    println!("  target: {what}: {ratio:.2}x, {}", met(ok));
    println!(
        "  stored {:.1} MiB of {:.1} MiB logical ({} chunks: {} zero, {} distinct)",
        last["stored_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        size as f64 / 1048576.0,
        last["chunks"],
        last["zero_chunks"],
        last["distinct_chunks"]
    );
    let mut tools = serde_json::Map::new();
    for (i, (name, label, sh)) in baselines.iter().enumerate() {
        tools.insert(
            (*name).into(),
            json!({
                "label": label, "command": sh, "seconds": spread(&secs[i]),
                "mib_s": mib_s(size, med[i]),
            }),
        );
    }
    tools.insert(
        "cairn image import-raw".into(),
        json!({
            "command": format!("cairn --store file://STORE --cache-dir STORE/.cache image import-raw '{image}' --name {} --json --chunk-size {DEFAULT_KIB}K", import_name(&args.image)),
            "seconds": spread(ca_runs), "mib_s": mib_s(size, ca),
            "peak_rss_kib": spread(&ca_rss.iter().map(|&r| r as f64).collect::<Vec<_>>()),
        }),
    );
    Ok(json!({
        "runs": args.runs,
        "loadavg_at_each_run": load,
        "b3sum_s": med[0], "zstd1_s": med[1], "zstd1_t0_s": med[2], "cairn_s": ca,
        "cairn_mib_s": mib_s(size, ca),
        "cairn_vs_zstd1": vs(1), "cairn_vs_zstd1_per_run": spread(&per_run(1)),
        "cairn_vs_zstd1_t0": ratio, "cairn_vs_zstd1_t0_per_run": spread(&per_run(2)),
        "ratio_note": "baseline median seconds / cairn median seconds: cairn's throughput as a fraction of the baseline's",
        "targets": [target(&what, ratio, ok)],
        "tools": tools,
        "cairn_peak_rss_kib": ca_rss.iter().max(),
        "report": last,
    }))
}

/// A sparse file of `logical` bytes holding `image` at 0 and at the middle.
fn make_sparse_copy(image: &Path, out: &Path, logical: u64) -> Result<()> {
    let src = std::fs::File::open(image)?;
    let dst = std::fs::File::create(out)?;
    dst.set_len(logical)?;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 4 << 20];
    for base in [0, logical / 2] {
        let mut off = 0;
        while off < len {
            let n = buf.len().min((len - off) as usize);
            src.read_exact_at(&mut buf[..n], off)?;
            if !buf[..n].iter().all(|&b| b == 0) {
                dst.write_all_at(&buf[..n], base + off)?;
            }
            off += n as u64;
        }
    }
    Ok(())
}

fn bench_memory(args: &Args, work: &Path) -> Result<Value> {
    println!("\n== import memory (peak RSS of the cairn process)");
    let (_, rss1, _) = cairn_import(&work.join("mem1"), &args.image, DEFAULT_KIB)?;
    let sparse = work.join("sparse-8g.raw");
    make_sparse_copy(&args.image, &sparse, 8 << 30)?;
    let (t8, rss8, _) = cairn_import(&work.join("mem8"), &sparse, DEFAULT_KIB)?;
    std::fs::remove_file(&sparse)?;
    let bound = 256 * 1024;
    let (ok1, ok8) = (rss1 < bound, rss8 < bound);
    let flat = rss8 as f64 / rss1 as f64;
    let mut t = Table::new(&["image", "peak RSS", "target"]);
    t.row(vec![
        "1 GiB ext4".into(),
        format!("{:.1} MiB", rss1 as f64 / 1024.0),
        format!("< 256 MiB: {}", met(ok1)),
    ]);
    t.row(vec![
        format!("8 GiB sparse ({t8:.1} s)"),
        format!("{:.1} MiB", rss8 as f64 / 1024.0),
        format!("< 256 MiB: {}; flat: {flat:.2}x the 1 GiB figure", met(ok8)),
    ]);
    t.print();
    Ok(json!({
        "rss_1g_kib": rss1, "rss_8g_sparse_kib": rss8, "rss_8g_vs_1g": flat,
        "import_8g_sparse_s": t8,
        "targets": [
            target("peak RSS importing the 1 GiB image < 256 MiB (KiB)", rss1 as f64, ok1),
            target("peak RSS importing the 8 GiB sparse image < 256 MiB (KiB)", rss8 as f64, ok8),
        ],
    }))
}

fn bench_dedup(args: &Args, work: &Path) -> Result<Value> {
    println!("\n== dedup");
    let store = work.join("dedup");
    cairn_import(&store, &args.image, DEFAULT_KIB)?;
    let (_, _, again) = cairn_import(&store, &args.image, DEFAULT_KIB)?;
    // 100 scattered 4 KiB blocks changed, seeded.
    let changed = work.join("changed.raw");
    std::fs::copy(&args.image, &changed)?;
    let f = std::fs::OpenOptions::new().write(true).open(&changed)?;
    let blocks = std::fs::metadata(&changed)?.len() / 4096;
    let mut rng = fastrand::Rng::with_seed(42);
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < 100 {
        picked.insert(rng.u64(..blocks));
    }
    for b in &picked {
        let block: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
        f.write_all_at(&block, b * 4096)?;
    }
    drop(f);
    let (_, _, ch) = cairn_import(&store, &changed, DEFAULT_KIB)?;
    std::fs::remove_file(&changed)?;
    std::fs::remove_dir_all(&store)?;
    // Neither can miss unless something is broken: the same bytes give the
    // same chunk ids, and with fixed-size chunks each changed 4 KiB block
    // lies in exactly one chunk.
    let same_ok = again["new_bytes"].as_u64() == Some(0);
    let changed_ok = ch["new_chunks"].as_u64().is_some_and(|n| n <= 100);
    let ok = |b: bool| if b { "ok" } else { "FAILED" };
    let mut t = Table::new(&[
        "import",
        "new bytes",
        "new chunks",
        "sanity check (not a target)",
    ]);
    t.row(vec![
        "same image again".into(),
        again["new_bytes"].to_string(),
        again["new_chunks"].to_string(),
        format!("0 new bytes: {}", ok(same_ok)),
    ]);
    t.row(vec![
        "100 scattered 4 KiB blocks changed".into(),
        ch["new_bytes"].to_string(),
        ch["new_chunks"].to_string(),
        format!("<= 100 new chunks: {}", ok(changed_ok)),
    ]);
    t.print();
    println!("  (sanity checks: content addressing gives a re-import 0 new bytes, and fixed-size chunks put 100 changed blocks in at most 100 chunks)");
    Ok(json!({
        "reimport_new_bytes": again["new_bytes"], "changed_100_new_chunks": ch["new_chunks"],
        "changed_100_new_bytes": ch["new_bytes"],
        "sanity_checks": [
            sanity_check("re-importing the same image stores 0 new bytes", &again["new_bytes"], same_ok),
            sanity_check("100 scattered 4 KiB blocks changed give <= 100 new chunks", &ch["new_chunks"], changed_ok),
        ],
    }))
}

async fn s3_store() -> Result<Arc<dyn ObjectStore>> {
    let endpoint = std::env::var("CAIRN_TEST_S3_ENDPOINT")
        .context("the read benchmark needs the S3 server: run benches/run-store-bench.sh, or eval \"$(tools/dev/s3-server.sh start)\"")?;
    let uri: StoreUri = format!(
        "s3://cairn-bench-{:08x}/b?endpoint={endpoint}",
        fastrand::u32(..)
    )
    .parse()?;
    let store = open_store(&uri).await?;
    store.prepare().await?;
    Ok(store)
}

/// Imports `image` into `remote` (in-process) with the given chunk size.
fn import_into(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    image: &Path,
    work: &Path,
    chunk: u32,
) -> Result<(Manifest, u64)> {
    let store = open_chunks(
        rt,
        remote,
        &work.join(format!("import-cache-{chunk}")),
        1 << 30,
    )?;
    let mut opts = ImportOptions::new(work.join("staging"));
    opts.chunk_size = chunk;
    let (m, r) = import_raw(&store, image, &opts, &|_| {})?;
    Ok((m, r.stored_bytes))
}

fn open_chunks(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    dir: &Path,
    cap: u64,
) -> Result<ChunkStore> {
    Ok(rt.block_on(ChunkStore::open(
        remote.clone(),
        ChunkStoreConfig::new(dir.to_owned(), cap),
    ))?)
}

/// One random 4 KiB-aligned offset in each of `n` distinct stored chunks.
fn pick_offsets(m: &Manifest, n: usize, seed: u64) -> Vec<(usize, u64)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seen = std::collections::HashSet::new();
    let mut stored: Vec<usize> = (0..m.chunks.len())
        .filter(|&i| m.chunks[i].is_some_and(|id| seen.insert(id)))
        .filter(|&i| m.chunk_len(i) == m.chunk_size)
        .collect();
    rng.shuffle(&mut stored);
    stored.truncate(n);
    stored
        .into_iter()
        .map(|i| (i, rng.u64(..u64::from(m.chunk_size) / 4096) * 4096))
        .collect()
}

fn bench_reads(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    args: &Args,
    work: &Path,
    chunk: u32,
) -> Result<Value> {
    println!("\n== random 4 KiB reads, S3 server on loopback ({} reads, each in another chunk; chunk size {} KiB)", args.reads, chunk / 1024);
    let (m, _) = import_into(rt, remote, &args.image, work, chunk)?;
    let r = read_latencies(rt, remote, &m, &args.image, work, args.reads)?;
    let mut t = Table::new(&["path", "p50 us", "p99 us", "mean us", "ratio (mean)"]);
    let us = |x: f64| format!("{:.1}", x * 1e6);
    let row = |t: &mut Table, name: &str, xs: &[f64], base: Option<&[f64]>, bound: Option<f64>| {
        let ratio = base.map_or(String::new(), |b| {
            let r = mean(xs) / mean(b);
            match bound {
                Some(x) => format!("{r:.2}x (target <= {x}x: {})", met(r <= x)),
                None => format!("{r:.2}x"),
            }
        });
        t.row(vec![
            name.into(),
            us(median(xs.to_vec())),
            us(quantile(xs.to_vec(), 0.99)),
            us(mean(xs)),
            ratio,
        ]);
    };
    let (cold_bound, warm_bound) = (1.2, 1.5);
    row(
        &mut t,
        "ranged GET of a raw image object",
        &r.get,
        None,
        None,
    );
    row(
        &mut t,
        "  (ranged GET of the chunk's whole frame)",
        &r.frame_get,
        Some(&r.get),
        None,
    );
    row(
        &mut t,
        "cairn cold (miss: GET frame, verify, cache)",
        &r.cold,
        Some(&r.get),
        Some(cold_bound),
    );
    row(
        &mut t,
        "pread of the raw file (page cache)",
        &r.pread,
        None,
        None,
    );
    row(
        &mut t,
        "cairn warm (local cache)",
        &r.warm,
        Some(&r.pread),
        Some(warm_bound),
    );
    t.print();
    let cold_ratio = mean(&r.cold) / mean(&r.get);
    let warm_ratio = mean(&r.warm) / mean(&r.pread);
    Ok(json!({
        "chunk_size": chunk,
        "get_mean_us": mean(&r.get) * 1e6, "frame_get_mean_us": mean(&r.frame_get) * 1e6, "cold_mean_us": mean(&r.cold) * 1e6,
        "cold_ratio": cold_ratio,
        "pread_mean_us": mean(&r.pread) * 1e6, "warm_mean_us": mean(&r.warm) * 1e6,
        "warm_ratio": warm_ratio,
        "latency_us": {
            "get": latency_stats_us(&r.get), "frame_get": latency_stats_us(&r.frame_get),
            "cold": latency_stats_us(&r.cold), "pread": latency_stats_us(&r.pread),
            "warm": latency_stats_us(&r.warm),
        },
        "targets": [
            target(&format!("cairn cold 4 KiB read <= {cold_bound}x a ranged GET of the raw image (mean)"), cold_ratio, cold_ratio <= cold_bound),
            target(&format!("cairn warm 4 KiB read <= {warm_bound}x a pread of the raw file (mean)"), warm_ratio, warm_ratio <= warm_bound),
        ],
    }))
}

struct Latencies {
    get: Vec<f64>,
    /// GET of the whole stored frame: what a miss must transfer.
    frame_get: Vec<f64>,
    cold: Vec<f64>,
    pread: Vec<f64>,
    warm: Vec<f64>,
}

/// Cold and warm 4 KiB reads through cairn, each interleaved with its
/// baseline so both see the same machine noise.
fn read_latencies(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    m: &Manifest,
    image: &Path,
    work: &Path,
    reads: usize,
) -> Result<Latencies> {
    let offsets = pick_offsets(m, reads, 7);
    let cache = work.join(format!("read-cache-{}", m.chunk_size));
    let _ = std::fs::remove_dir_all(&cache);
    let store = open_chunks(rt, remote, &cache, 4 << 30)?;
    let raw = std::fs::File::open(image)?;
    let mut l = Latencies {
        get: vec![],
        frame_get: vec![],
        cold: vec![],
        pread: vec![],
        warm: vec![],
    };
    let mut buf = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    for (n, &(i, off)) in offsets.iter().enumerate() {
        let abs = i as u64 * u64::from(m.chunk_size) + off;
        let id = m.chunks[i].expect("picked stored chunks");
        let get = || -> Result<f64> {
            let t = Instant::now();
            let b = rt.block_on(remote.get("raw/image", Some(abs..abs + 4096)))?;
            let e = t.elapsed().as_secs_f64();
            ensure!(b.len() == 4096);
            Ok(e)
        };
        if n % 2 == 0 {
            l.get.push(get()?);
        }
        let loc = store.locate(&id).context("the chunk is in a pack")?;
        let key = cairn_engine::layout::pack_key(&loc.pack);
        let t = Instant::now();
        rt.block_on(remote.get(&key, Some(loc.entry.offset..loc.entry.end())))?;
        l.frame_get.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        store.read(&id, off, &mut buf)?;
        l.cold.push(t.elapsed().as_secs_f64());
        if n % 2 == 1 {
            l.get.push(get()?);
        }
        raw.read_exact_at(&mut want, abs)?;
        if buf != want {
            bail!("cairn returned wrong bytes for chunk {i} at {off}");
        }
    }
    for _ in 0..20 {
        for &(i, off) in &offsets {
            let abs = i as u64 * u64::from(m.chunk_size) + off;
            let id = m.chunks[i].expect("picked stored chunks");
            let t = Instant::now();
            raw.read_exact_at(&mut want, abs)?;
            l.pread.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            store.read(&id, off, &mut buf)?;
            l.warm.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(l)
}

fn bench_cache_bound(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    args: &Args,
    work: &Path,
) -> Result<Value> {
    let cap = cairn_engine::cache::MIN_CAPACITY;
    // The image in the store (already there if the reads part ran: then
    // nothing new is stored), then its chunks read through a cache far
    // smaller than they are, checking the bytes on disk as we go.
    let (m, _) = import_into(
        rt,
        remote,
        &args.image,
        work,
        cairn_engine::import::DEFAULT_CHUNK_SIZE,
    )?;
    let store = open_chunks(rt, remote, &work.join("bound-cache"), cap)?;
    let mut max_seen = 0u64;
    let mut reads = 0u64;
    let mut buf = vec![0u8; 4096];
    for id in m.distinct_chunks().iter().take(1500) {
        store.read(id, 0, &mut buf)?;
        reads += 1;
        if reads.is_multiple_of(50) {
            max_seen = max_seen.max(store.cache().bytes_on_disk()?);
        }
    }
    max_seen = max_seen.max(store.cache().bytes_on_disk()?);
    println!(
        "\n== cache bound: {} chunk reads through a {} MiB cache; most on disk seen {:.1} MiB ({})",
        reads,
        cap >> 20,
        max_seen as f64 / 1048576.0,
        if max_seen <= cap {
            "within the bound"
        } else {
            "OVER THE BOUND"
        }
    );
    Ok(json!({
        "capacity": cap, "max_on_disk": max_seen, "reads": reads,
        "within_bound": max_seen <= cap,
    }))
}

fn bench_sweep(
    rt: &tokio::runtime::Runtime,
    remote: &Arc<dyn ObjectStore>,
    args: &Args,
    work: &Path,
    size: u64,
) -> Result<Value> {
    println!(
        "\n== chunk size sweep (import via the CLI into file://; reads via S3 as above, {} reads)",
        args.reads / 2
    );
    let mut t = Table::new(&[
        "chunk",
        "import MiB/s",
        "stored MiB",
        "manifest KiB",
        "cold read us",
        "frame GET vs GET",
        "cold vs frame GET",
        "cold vs GET",
        "warm vs pread",
    ]);
    let mut rows = Vec::new();
    for &kib in &args.sweep_kib {
        let store = work.join(format!("sweep-{kib}"));
        let (secs, _, report) = cairn_import(&store, &args.image, kib)?;
        std::fs::remove_dir_all(&store)?;
        let (m, _) = import_into(rt, remote, &args.image, work, kib << 10)?;
        let l = read_latencies(rt, remote, &m, &args.image, work, args.reads / 2)?;
        let stored = report["stored_bytes"].as_u64().unwrap_or(0);
        t.row(vec![
            format!("{kib} KiB"),
            format!("{:.0}", mib_s(size, secs)),
            format!("{:.1}", stored as f64 / 1048576.0),
            format!("{:.0}", m.encode().len() as f64 / 1024.0),
            format!("{:.0}", mean(&l.cold) * 1e6),
            format!("{:.2}x", mean(&l.frame_get) / mean(&l.get)),
            format!("{:.2}x", mean(&l.cold) / mean(&l.frame_get)),
            format!("{:.2}x", mean(&l.cold) / mean(&l.get)),
            format!("{:.2}x", mean(&l.warm) / mean(&l.pread)),
        ]);
        rows.push(json!({
            "chunk_kib": kib, "import_mib_s": mib_s(size, secs), "stored_bytes": stored,
            "manifest_bytes": m.encode().len(),
            "cold_mean_us": mean(&l.cold) * 1e6, "cold_ratio": mean(&l.cold) / mean(&l.get),
            "cold_vs_frame_get": mean(&l.cold) / mean(&l.frame_get),
            "warm_ratio": mean(&l.warm) / mean(&l.pread),
        }));
    }
    t.print();
    Ok(Value::Array(rows))
}
