//! The disk benchmark: `cairn disk serve` side by side with
//! `qemu-storage-daemon` exporting the same image as a raw file, both over
//! vhost-user-blk, in one run:
//!
//! - io: a libblkio client issues 4 KiB random reads at depth 1 and 32,
//!   128 KiB sequential reads and 4 KiB writes each followed by FLUSH
//!   (cairn with a warm cache; the raw file in the page cache);
//! - memory: cairn's peak RSS serving a 1 GiB image and a sparse 64 GiB one;
//! - boot: QEMU start to the guest's `/init` for cairn cold (chunks only in
//!   the S3 server), cairn warm, and qemu-storage-daemon.
//!
//! `benches/run-disk-bench.sh` installs what is needed and runs this; see
//! the README's "Disk benchmark" section.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn_benches::backends::{Backend, CairnStore, QsdTuning, Rss, RssSampler};
use cairn_benches::blk_client::{Client, Job, JobStats};
use cairn_benches::guest::{boot, Boot};
use cairn_benches::{cairn_bin, median, quantile, warm_page_cache, Table};
use clap::Parser;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Parser)]
struct Args {
    /// Size of the synthetic image for the io and memory parts (MiB).
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// Size of a second image for random reads with more distinct chunks
    /// than a server keeps mapped (16384; at 64 KiB chunks, 1 GiB), so
    /// that warm reads that need an open and a map are measured (MiB; 0
    /// skips it).
    #[arg(long, default_value_t = 1536)]
    beyond_mapped_mib: u64,
    /// Size of the sparse image for the memory part (GiB).
    #[arg(long, default_value_t = 64)]
    sparse_gib: u64,
    /// Seconds each io job runs per backend and round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of each io job and boot (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The guest fixture (fixtures/build-guest.sh prints its directory).
    #[arg(long, env = "CAIRN_GUEST_DIR", default_value = "fixtures/out/guest")]
    guest: PathBuf,
    /// A distribution's root file system for the laziness measurement:
    /// booted cold from the S3 server to a login shell, the share of its
    /// stored bytes read (fixtures/build-rootfs-image.sh builds it;
    /// skipped, with a note, if it is not there).
    #[arg(long, default_value = "fixtures/out/debian-rootfs.ext4")]
    debian_image: PathBuf,
    /// The S3 endpoint for the cold boot (tools/dev/s3-server.sh sets it).
    #[arg(long, env = "CAIRN_TEST_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Run only these parts (io, memory, boot). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only the io jobs whose names contain one of these words (e.g.
    /// `write`). Default: all.
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Work directory (default: a temporary directory).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Print every round of every io job, not only the medians.
    #[arg(long)]
    verbose: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(args.work.clone().unwrap_or_else(std::env::temp_dir))?;
    let bin = cairn_bin()?;
    let wanted = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    let mut results = serde_json::Map::new();
    if wanted("io") || wanted("memory") {
        let work = tmp.path().join("io");
        std::fs::create_dir_all(&work)?;
        results.insert(
            "io".into(),
            bench_io(&args, &bin, &work, wanted("io"), args.image_mib, false)?,
        );
    }
    if wanted("io") && args.beyond_mapped_mib > 0 {
        let work = tmp.path().join("beyond-mapped");
        std::fs::create_dir_all(&work)?;
        results.insert(
            "io_beyond_mapped".into(),
            bench_io(&args, &bin, &work, true, args.beyond_mapped_mib, true)?,
        );
    }
    if wanted("memory") {
        results.insert("memory".into(), bench_sparse(&args, &bin, tmp.path())?);
    }
    if wanted("boot") {
        results.insert("boot".into(), bench_boot(&args, &bin, tmp.path())?);
    }
    if let Some(out) = &args.json_out {
        std::fs::write(out, serde_json::to_vec_pretty(&Value::Object(results))?)?;
        println!("figures written to {}", out.display());
    }
    Ok(())
}

/// A synthetic image of `size` bytes with no zero chunks and no two chunks
/// alike: 64 KiB stretches of random bytes and of compressible text,
/// alternating at random; every 4 KiB block starts with its offset, so
/// text stretches do not collapse into a few cached chunks.
fn make_image(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut rng = fastrand::Rng::with_seed(42);
    let text = b"cairn serves disks lazily from a content-addressed store. ";
    let mut buf = vec![0u8; 64 << 10];
    for at in (0..size).step_by(buf.len()) {
        if rng.bool() {
            rng.fill(&mut buf);
        } else {
            let skew = rng.usize(..text.len());
            for (i, b) in buf.iter_mut().enumerate() {
                *b = text[(i + skew) % text.len()];
            }
        }
        for (i, block) in buf.chunks_mut(4096).enumerate() {
            block[..8].copy_from_slice(&(at + 4096 * i as u64).to_le_bytes());
        }
        let n = (size - at).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], at)?;
    }
    Ok(())
}

/// Reads a few random blocks through `client` and compares them with `raw`.
fn check_bytes(client: &mut Client, raw: &Path, what: &str) -> Result<()> {
    let f = std::fs::File::open(raw)?;
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..64 {
        let off = rng.u64(..client.capacity() / 4096) * 4096;
        let mut want = vec![0u8; 4096];
        f.read_exact_at(&mut want, off)?;
        ensure!(
            client.read(off, 4096)? == want,
            "{what} returned wrong bytes at {off}"
        );
    }
    Ok(())
}

fn kib_str(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The io jobs on an image of `image_mib`, cairn against each
/// qemu-storage-daemon setup; `reads_only` for the image beyond what a
/// server keeps mapped (random reads, where that shows).
fn bench_io(
    args: &Args,
    bin: &Path,
    work: &Path,
    run_jobs: bool,
    image_mib: u64,
    reads_only: bool,
) -> Result<Value> {
    let size = image_mib * MIB;
    let raw = work.join("disk.raw");
    make_image(&raw, size)?;
    let cache_dir = work.join("io-cache");
    let store = format!("file://{}", work.join("store").display());
    let cairn = CairnStore {
        bin,
        store: &store,
        cache_dir: &cache_dir,
        cache_size: "4G",
    };
    cairn.import(&raw, "bench")?;
    println!(
        "disk benchmark: {} MiB synthetic image; {} s per job, {} rounds",
        image_mib, args.seconds, args.rounds
    );

    let server = cairn.serve("bench", &work.join("io-overlay"), &work.join("cairn.sock"))?;
    let rss = RssSampler::start(server.pid());
    let mut c = Client::connect(&server.socket)?;
    ensure!(c.capacity() == size, "cairn reports {} bytes", c.capacity());
    let t = Instant::now();
    c.read_all()?;
    let fill_s = t.elapsed().as_secs_f64();
    check_bytes(&mut c, &raw, "cairn")?;

    // The baseline as it comes and tuned as a user would; each on its own
    // copy of the image (qemu-storage-daemon locks its file).
    let mut baselines = Vec::new();
    for (i, tuning) in [
        QsdTuning::Default,
        QsdTuning::IoUring,
        QsdTuning::NativeDirect,
    ]
    .into_iter()
    .enumerate()
    {
        let qsd_raw = work.join(format!("qsd-{i}.raw"));
        std::fs::copy(&raw, &qsd_raw)?;
        std::fs::File::open(&qsd_raw)?.sync_all()?;
        warm_page_cache(&qsd_raw)?;
        let qsd = Backend::qemu_storage_daemon_tuned(
            &qsd_raw,
            &work.join(format!("qsd-{i}.sock")),
            tuning,
        )?;
        let mut q = Client::connect(&qsd.socket)?;
        check_bytes(&mut q, &raw, tuning.label())?;
        baselines.push((tuning, qsd, q));
    }
    println!(
        "  warmed cairn's cache: {} MiB from the file:// store in {fill_s:.2} s",
        image_mib
    );

    let jobs = [
        ("4K random read QD1", Job::RandRead { bs: 4096, depth: 1 }),
        (
            "4K random read QD32",
            Job::RandRead {
                bs: 4096,
                depth: 32,
            },
        ),
        ("128K sequential read QD1", Job::SeqRead { bs: 128 << 10 }),
        (
            "4K random write QD32",
            Job::RandWrite {
                bs: 4096,
                depth: 32,
            },
        ),
        ("4K write + FLUSH QD1", Job::WriteFlush { bs: 4096 }),
    ];
    let mut out = Vec::new();
    if run_jobs {
        let mut table = Table::new(&[
            "job",
            "cairn IOPS",
            "qsd default IOPS",
            "best qsd IOPS",
            "best qsd",
            "vs default",
            "vs best",
            "cairn p50 µs",
            "best qsd p50 µs",
            "cairn p99 µs",
            "best qsd p99 µs",
        ]);
        let chosen = jobs.into_iter().filter(|(name, _)| {
            (!reads_only || name.contains("random read"))
                && (args.jobs.is_empty() || args.jobs.iter().any(|w| name.contains(w.as_str())))
        });
        for (name, job) in chosen {
            // Runs by backend: cairn first, then each baseline.
            let n = 1 + baselines.len();
            let mut runs: Vec<Vec<JobStats>> = (0..n).map(|_| Vec::new()).collect();
            for round in 0..args.rounds {
                // The order rotates every round, so drift hits all alike.
                for k in 0..n {
                    let b = (k + round) % n;
                    let client = match b {
                        0 => &mut c,
                        _ => &mut baselines[b - 1].2,
                    };
                    runs[b].push(client.run(job, args.seconds)?);
                }
            }
            let sums: Vec<Summary> = runs.iter().map(|r| summarize(r)).collect();
            if args.verbose {
                for (b, r) in runs.iter().enumerate() {
                    let who = if b == 0 {
                        "cairn"
                    } else {
                        baselines[b - 1].0.label()
                    };
                    for (round, m) in r.iter().enumerate() {
                        println!(
                            "  {name} round {round}: {who} {:.0} IOPS (p50 {:.0} µs, p99 {:.0} µs)",
                            m.iops(),
                            quantile(m.lat_us.clone(), 0.5),
                            quantile(m.lat_us.clone(), 0.99)
                        );
                    }
                }
            }
            let best = (1..n)
                .max_by(|&x, &y| sums[x].iops.total_cmp(&sums[y].iops))
                .expect("baselines");
            let (a, d, b) = (&sums[0], &sums[1], &sums[best]);
            table.row(vec![
                name.into(),
                format!("{:.0}", a.iops),
                format!("{:.0}", d.iops),
                format!("{:.0}", b.iops),
                baselines[best - 1].0.label().into(),
                format!("{:.2}x", a.iops / d.iops),
                format!("{:.2}x", a.iops / b.iops),
                format!("{:.0}", a.p50_us),
                format!("{:.0}", b.p50_us),
                format!("{:.0}", a.p99_us),
                format!("{:.0}", b.p99_us),
            ]);
            let baseline_json: serde_json::Map<String, Value> = (1..n)
                .map(|i| (baselines[i - 1].0.label().to_owned(), json!(sums[i])))
                .collect();
            out.push(json!({
                "job": name,
                "cairn": a,
                "qemu_storage_daemon": d,
                "baselines": baseline_json,
                "best_baseline": baselines[best - 1].0.label(),
                "iops_ratio": a.iops / d.iops,
                "iops_ratio_vs_best": a.iops / b.iops,
                "p50_ratio": a.p50_us / d.p50_us,
                "p50_ratio_vs_best": a.p50_us / b.p50_us,
            }));
        }
        println!(
            "\nvhost-user-blk, libblkio client, {image_mib} MiB image{} (IOPS and p50 are medians over rounds; ratios are cairn's IOPS over the baseline's; best qsd is the qemu-storage-daemon setup with the most IOPS on that job):",
            if reads_only {
                ", more distinct chunks than a server keeps mapped"
            } else {
                ""
            }
        );
        table.print();
    }
    drop(baselines);
    drop(c);
    let mem = rss.finish();
    let stopped = server.stop()?.unwrap_or_default();
    let syncs = &stopped["overlay_syncs"];
    println!(
        "  cairn overlay syncs over the io run: {} of the flush log (logged FLUSHes), {} checkpoints",
        syncs["flush_log"], syncs["data"]
    );
    println!(
        "  cairn disk serve memory over the io run ({} MiB image): peak anonymous {}, VmHWM {} (includes mapped cache pages)",
        image_mib,
        kib_str(mem.peak_anon_kib),
        kib_str(mem.hwm_kib)
    );
    Ok(
        json!({ "image_mib": image_mib, "cache_fill_s": fill_s, "jobs": out, "rss": mem, "overlay_syncs": syncs }),
    )
}

#[derive(serde::Serialize)]
struct Summary {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    mib_s: f64,
}

fn summarize(runs: &[JobStats]) -> Summary {
    let all: Vec<f64> = runs.iter().flat_map(|r| r.lat_us.iter().copied()).collect();
    Summary {
        iops: median(runs.iter().map(JobStats::iops).collect()),
        p50_us: median(
            runs.iter()
                .map(|r| quantile(r.lat_us.clone(), 0.5))
                .collect(),
        ),
        p99_us: quantile(all, 0.99),
        mib_s: median(
            runs.iter()
                .map(|r| r.bytes as f64 / MIB as f64 / r.secs)
                .collect(),
        ),
    }
}

/// Laziness where it matters: a Debian 12 root file system (not a test
/// guest that reads most of itself) imported into a fresh bucket, served
/// cold (an empty cache: every byte from the S3 server) and booted to a
/// login shell; the share of its stored bytes the boot fetched.
fn debian_boot(
    args: &Args,
    bin: &Path,
    work: &Path,
    endpoint: &str,
    socket: &Path,
) -> Result<Value> {
    let store = format!(
        "s3://bench-debian-{:08x}/d?endpoint={endpoint}",
        fastrand::u32(..)
    );
    let import_cache = work.join("debian-import-cache");
    let importer = CairnStore {
        bin,
        store: &store,
        cache_dir: &import_cache,
        cache_size: "2G",
    };
    importer.import(&args.debian_image, "debian")?;
    let stored = importer.stored_bytes("debian")?;
    let logical = std::fs::metadata(&args.debian_image)?.len();
    let cold_cache = work.join("debian-cold-cache");
    let cairn = CairnStore {
        cache_dir: &cold_cache,
        ..importer
    };
    let server = cairn.serve("debian", &work.join("debian-overlay"), socket)?;
    let launch = cairn_benches::guest::Launch {
        guest_dir: &args.guest,
        disk: cairn_benches::guest::Disk::VhostUser(socket),
        memory_mib: 512,
        append: "cairn.shell".into(),
        timeout: Duration::from_secs(300),
    };
    let console = cairn_benches::guest::run(&launch)?;
    let stopped = server.stop()?.unwrap_or_default();
    let fetched = stopped["remote_bytes"].as_u64().unwrap_or(0);
    let share = fetched as f64 / stored as f64;
    println!(
        "\nDebian 12 root file system ({}: {} MiB logical, {:.1} MiB stored), cold from the S3 server to a login shell: {:.2} s to the shell, fetched {:.1} MiB = {:.1}% of its stored bytes (target at most 10%: {})",
        args.debian_image.display(),
        logical / MIB,
        stored as f64 / MIB as f64,
        console.boot.to_init_s,
        fetched as f64 / MIB as f64,
        share * 100.0,
        if share <= 0.10 { "met" } else { "missed" }
    );
    Ok(json!({
        "image": args.debian_image,
        "logical_bytes": logical,
        "stored_bytes": stored,
        "fetched_bytes": fetched,
        "fetched_fraction_of_stored": share,
        "to_shell_s": console.boot.to_init_s,
    }))
}

/// Memory serving a sparse image: random reads over all of it, every data
/// stretch read, writes scattered over all of it.
fn bench_sparse(args: &Args, bin: &Path, work: &Path) -> Result<Value> {
    let size = args.sparse_gib * GIB;
    let raw = work.join("sparse.raw");
    let f = std::fs::File::create(&raw)?;
    f.set_len(size)?;
    let mut rng = fastrand::Rng::with_seed(3);
    let mut data = vec![0u8; MIB as usize];
    for gib in 0..args.sparse_gib {
        rng.fill(&mut data);
        f.write_all_at(&data, gib * GIB + rng.u64(..GIB - MIB))?;
    }
    drop(f);
    let cache_dir = work.join("sparse-cache");
    let store = format!("file://{}", work.join("store").display());
    let cairn = CairnStore {
        bin,
        store: &store,
        cache_dir: &cache_dir,
        cache_size: "1G",
    };
    let t = Instant::now();
    cairn.import(&raw, "sparse")?;
    let import_s = t.elapsed().as_secs_f64();
    let server = cairn.serve(
        "sparse",
        &work.join("sparse-overlay"),
        &work.join("sparse.sock"),
    )?;
    let rss = RssSampler::start(server.pid());
    let mut c = Client::connect(&server.socket)?;
    check_bytes(&mut c, &raw, "cairn (sparse)")?;
    c.run(
        Job::RandRead {
            bs: 4096,
            depth: 32,
        },
        args.seconds,
    )?;
    c.run(Job::WriteFlush { bs: 4096 }, args.seconds)?;
    c.run(
        Job::RandRead {
            bs: 128 << 10,
            depth: 8,
        },
        args.seconds,
    )?;
    drop(c);
    let mem: Rss = rss.finish();
    server.stop()?;
    println!(
        "  cairn disk serve memory, {} GiB sparse image ({} MiB of data, imported in {import_s:.1} s): peak anonymous {}, VmHWM {}",
        args.sparse_gib,
        args.sparse_gib,
        kib_str(mem.peak_anon_kib),
        kib_str(mem.hwm_kib)
    );
    Ok(json!({ "sparse_gib": args.sparse_gib, "import_s": import_s, "rss": mem }))
}

fn bench_boot(args: &Args, bin: &Path, work: &Path) -> Result<Value> {
    let rootfs = args.guest.join("rootfs.ext4");
    ensure!(
        rootfs.exists(),
        "{} missing: run fixtures/build-guest.sh (benches/run-disk-bench.sh does)",
        rootfs.display()
    );
    let endpoint = args
        .s3_endpoint
        .as_deref()
        .context("the boot part needs the S3 server: start tools/dev/s3-server.sh")?;
    let store = format!(
        "s3://bench-boot-{:08x}/guest?endpoint={endpoint}",
        fastrand::u32(..)
    );
    let import_cache = work.join("boot-import-cache");
    CairnStore {
        bin,
        store: &store,
        cache_dir: &import_cache,
        cache_size: "1G",
    }
    .import(&rootfs, "guest")?;
    let stored = CairnStore {
        bin,
        store: &store,
        cache_dir: &import_cache,
        cache_size: "1G",
    }
    .stored_bytes("guest")?;
    let image = std::fs::metadata(&rootfs)?.len();
    let qsd_raw = work.join("boot-qsd.raw");
    std::fs::copy(&rootfs, &qsd_raw)?;
    warm_page_cache(&qsd_raw)?;
    let socket = work.join("boot.sock");

    let (mut cold, mut warm, mut qsd, mut fetched) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let cache_dir = work.join(format!("boot-cache-{round}"));
        let cairn = CairnStore {
            bin,
            store: &store,
            cache_dir: &cache_dir,
            cache_size: "1G",
        };
        let boot_cairn = |tag: &str| -> Result<(Boot, u64)> {
            let overlay = work.join(format!("boot-overlay-{round}-{tag}"));
            let server = cairn.serve("guest", &overlay, &socket)?;
            let b = boot(&args.guest, &socket, "boot")?;
            let stopped = server.stop()?.unwrap_or_default();
            Ok((b, stopped["remote_bytes"].as_u64().unwrap_or(0)))
        };
        let (b, bytes) = boot_cairn("cold")?;
        cold.push(b);
        fetched.push(bytes);
        let (b, bytes) = boot_cairn("warm")?;
        if bytes > 0 {
            // A boot does not read exactly the same blocks twice (timing
            // moves what the kernel reads ahead): say so, it is not an error.
            println!(
                "  boot round {}: the warm boot fetched {bytes} bytes the cold one had not read",
                round + 1
            );
        }
        warm.push(b);
        let server = Backend::qemu_storage_daemon(&qsd_raw, &socket)?;
        qsd.push(boot(&args.guest, &socket, "boot")?);
        server.stop()?;
        println!(
            "  boot round {}: cold {:.2} s, warm {:.2} s, qsd {:.2} s to /init",
            round + 1,
            cold[round].to_init_s,
            warm[round].to_init_s,
            qsd[round].to_init_s
        );
    }
    let med = |v: &[Boot], f: fn(&Boot) -> f64| median(v.iter().map(f).collect());
    let reference = med(&qsd, |b| b.to_init_s);
    let mut table = Table::new(&[
        "backend",
        "QEMU start to /init",
        "ratio to qsd",
        "guest uptime at /init",
        "to power-off",
    ]);
    let mut out = serde_json::Map::new();
    for (name, v) in [
        ("cairn cold (S3 only)", &cold),
        ("cairn warm (local cache)", &warm),
        ("qemu-storage-daemon (raw file)", &qsd),
    ] {
        let to_init = med(v, |b| b.to_init_s);
        table.row(vec![
            name.into(),
            format!("{to_init:.2} s"),
            format!("{:.2}x", to_init / reference),
            format!("{:.2} s", med(v, |b| b.guest_uptime_s)),
            format!("{:.2} s", med(v, |b| b.total_s)),
        ]);
        out.insert(
            name.into(),
            json!({ "to_init_s": to_init, "ratio": to_init / reference, "total_s": med(v, |b| b.total_s) }),
        );
    }
    // Laziness is a share of what the store holds of the image (frames,
    // compressed; zero chunks not stored), not of its logical size.
    let bytes = median(fetched.iter().map(|&b| b as f64).collect());
    println!(
        "\nboot (median of {} rounds; cold boots fetched {:.1} MiB from S3: {:.1}% of the {:.1} MiB the store holds of the image, {:.1}% of its {} MiB logical size):",
        args.rounds,
        bytes / MIB as f64,
        bytes * 100.0 / stored as f64,
        stored as f64 / MIB as f64,
        bytes * 100.0 / image as f64,
        image / MIB
    );
    table.print();
    if args.debian_image.exists() {
        out.insert(
            "debian".into(),
            debian_boot(args, bin, work, endpoint, &socket)?,
        );
    } else {
        println!(
            "  (the Debian boot is skipped: no {}; fixtures/build-rootfs-image.sh builds it)",
            args.debian_image.display()
        );
    }
    out.insert("fetched_bytes".into(), json!(bytes));
    out.insert("stored_bytes".into(), json!(stored));
    out.insert("logical_bytes".into(), json!(image));
    out.insert(
        "fetched_fraction_of_stored".into(),
        json!(bytes / stored as f64),
    );
    Ok(Value::Object(out))
}
