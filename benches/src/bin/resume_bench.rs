//! Resume benchmark: time from handshake to a guest's working set fully
//! touched, for a synthetic memory snapshot, served by
//!   (a) the memory file mmapped MAP_PRIVATE (Firecracker's File backend),
//!       with a cold and with a warm page cache;
//!   (b) an on-demand handler copying one 4 KiB page per fault from the
//!       file (the shape of Firecracker's example handler);
//!   (c) `cairn mem serve` on demand;
//!   (d) `cairn mem serve` with the recorded working set prefetched;
//! (c) and (d) from a warm local cache and from the S3 server alone.
//! The guest is this process: a VMM harness whose threads touch the
//! working set (scattered extents, a third of the pages written).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_benches::backends::{CairnStore, RssSampler};
use cairn_benches::{cairn_bin, warm_page_cache, Table};
use cairn_vmm_glue::uffd::harness::{synthetic_memory, RegionSpec, VmmHarness};
use cairn_vmm_glue::uffd::Histogram;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Guest memory size.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Working set, percent of memory.
    #[arg(long, default_value_t = 15)]
    ws_percent: u64,
    /// Guest threads (vCPUs) touching memory.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also serve from the S3 server alone (CAIRN_TEST_S3_ENDPOINT and AWS_* set).
    #[arg(long)]
    s3: bool,
    /// Fault run sizes (KiB) to sweep for cairn on demand.
    #[arg(long, value_delimiter = ',', default_value = "4,16,64,256")]
    sweep_kib: Vec<u64>,
    /// Prefetch worker counts to sweep for cairn with recorded prefetch.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    sweep_workers: Vec<u64>,
    #[arg(long, default_value = "target/bench/resume.json")]
    json_out: PathBuf,
    #[arg(long, default_value = "target/bench/resume.svg")]
    plot: PathBuf,
    /// Where the memory file and stores go.
    #[arg(long, default_value = "target/bench/resume-work")]
    work: PathBuf,
}

const PAGE: u64 = 4096;

/// The guest's touches: page offsets per thread, in order, and whether each writes.
struct Workload {
    per_thread: Vec<Vec<(u64, bool)>>,
    pages: u64,
}

/// A working set scattered the way a guest's is: extents of 1 to 64
/// pages (kernel text, page cache, heap) all over memory, visited in
/// random order; within an extent pages go in order; a third written.
fn workload(size: u64, percent: u64, threads: usize, seed: u64) -> Workload {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = size / PAGE;
    let want = total * percent / 100;
    let mut taken = std::collections::BTreeSet::new();
    let mut extents = Vec::new();
    while (taken.len() as u64) < want {
        let len = 1 + (rng.u64(0..6).pow(2) + rng.u64(0..28)).min(63);
        let start = rng.u64(0..total - len);
        let fresh: Vec<u64> = (start..start + len).filter(|p| taken.insert(*p)).collect();
        if !fresh.is_empty() {
            extents.push(fresh);
        }
    }
    rng.shuffle(&mut extents);
    let mut per_thread = vec![Vec::new(); threads];
    let mut n = 0u64;
    for (i, e) in extents.into_iter().enumerate() {
        for p in e {
            per_thread[i % threads].push((p * PAGE, rng.u8(..3) == 0));
            n += 1;
        }
    }
    Workload {
        per_thread,
        pages: n,
    }
}

/// What one run measured.
#[derive(Default, Clone)]
struct Run {
    name: String,
    seconds: f64,
    touch_p50_us: f64,
    touch_p99_us: f64,
    faults: u64,
    server_p50_us: Option<f64>,
    server_p99_us: Option<f64>,
    first_fault_us: Option<f64>,
    handshake_us: Option<f64>,
    server_rss_anon_kib: Option<u64>,
    server_hwm_kib: Option<u64>,
    prefetch_bytes: Option<u64>,
    /// When the prefetch worker had installed the whole working set.
    prefetch_ms: Option<f64>,
    /// (seconds since start, pages touched), sampled.
    curve: Vec<(f64, u64)>,
}

/// Runs the workload against guest memory at `base` (file offsets map
/// to `base + offset`), from one thread per list; returns the run.
fn touch(base: usize, w: &Workload, name: &str) -> Run {
    let start = Instant::now();
    let results: Vec<(Histogram, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = w
            .per_thread
            .iter()
            .map(|list| {
                s.spawn(move || {
                    let mut h = Histogram::default();
                    let mut times = Vec::with_capacity(list.len());
                    for &(off, write) in list {
                        let p = (base + off as usize) as *mut u8;
                        let t = Instant::now();
                        if write {
                            // SAFETY: `p` is inside guest memory mapped
                            // for this run; the page server or the kernel
                            // fills it on first touch.
                            unsafe { p.write_volatile(p.read_volatile()) };
                        } else {
                            // SAFETY: as above.
                            unsafe { p.read_volatile() };
                        }
                        h.record(t.elapsed());
                        times.push(start.elapsed().as_secs_f64());
                    }
                    (h, times)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut all = Histogram::default();
    let mut times: Vec<f64> = Vec::new();
    for (h, t) in results {
        all.merge(&h);
        times.extend(t);
    }
    times.sort_by(f64::total_cmp);
    let step = (times.len() / 400).max(1);
    let curve = times
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == times.len() - 1)
        .map(|(i, t)| (*t, i as u64 + 1))
        .collect();
    Run {
        name: name.to_owned(),
        seconds,
        touch_p50_us: all.quantile_us(0.5),
        touch_p99_us: all.quantile_us(0.99),
        curve,
        ..Run::default()
    }
}

fn rusage_faults() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        (ru.ru_minflt + ru.ru_majflt) as u64
    }
}

fn drop_page_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    // SAFETY: advisory call on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    Ok(())
}

/// A private mapping of `size` bytes: of `file`, or anonymous guest memory.
fn map_private(file: Option<&File>, size: u64, prot: i32) -> Result<usize> {
    let (flags, fd) = match file {
        Some(f) => (libc::MAP_PRIVATE, f.as_raw_fd()),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        ),
    };
    // SAFETY: a fresh private mapping at an address the kernel picks; writes
    // (where allowed) go to private copies, never to the file.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size as usize, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    Ok(p as usize)
}

/// (a): the memory file mapped MAP_PRIVATE, touched directly.
fn run_mmap(file: &Path, size: u64, w: &Workload, cold: bool) -> Result<Run> {
    if cold {
        drop_page_cache(file)?;
    } else {
        warm_page_cache(file)?;
    }
    let f = File::open(file)?;
    let base =
        map_private(Some(&f), size, libc::PROT_READ | libc::PROT_WRITE)? as *mut libc::c_void;
    let before = rusage_faults();
    let name = if cold {
        "(a) mmap, cold page cache"
    } else {
        "(a) mmap, warm page cache"
    };
    let mut run = touch(base as usize, w, name);
    run.faults = rusage_faults() - before;
    // SAFETY: unmapping what we mapped above.
    unsafe { libc::munmap(base, size as usize) };
    Ok(run)
}

/// (b): a handler thread copying one 4 KiB page per fault from the file's
/// mapping (page cache warm), the shape of Firecracker's example handler.
fn run_4k_handler(file: &Path, size: u64, w: &Workload) -> Result<Run> {
    use userfaultfd::{Event, UffdBuilder};
    warm_page_cache(file)?;
    let f = File::open(file)?;
    let src = map_private(Some(&f), size, libc::PROT_READ)?;
    let guest = map_private(None, size, libc::PROT_READ | libc::PROT_WRITE)?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| anyhow::anyhow!("userfaultfd: {e}"))?;
    uffd.register(guest as *mut _, size as usize)
        .map_err(|e| anyhow::anyhow!("register: {e}"))?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut server = Histogram::default();
    let mut faults = 0u64;
    let run = std::thread::scope(|s| {
        let handler = s.spawn(|| {
            use rustix::event::{poll, PollFd, PollFlags};
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [PollFd::new(&uffd, PollFlags::IN)];
                let zero_ms = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 10_000_000,
                };
                if poll(&mut fds, Some(&zero_ms)).unwrap_or(0) == 0 {
                    continue;
                }
                if let Ok(Some(Event::Pagefault { addr, .. })) = uffd.read_event() {
                    let t = Instant::now();
                    let page = (addr as usize) & !(PAGE as usize - 1);
                    // SAFETY: copies one page of the file's mapping into
                    // the registered guest page that faulted.
                    let _ = unsafe {
                        uffd.copy(
                            (src + page - guest) as *const _,
                            page as *mut _,
                            PAGE as usize,
                            true,
                        )
                    };
                    server.record(t.elapsed());
                    faults += 1;
                }
            }
        });
        let run = touch(guest, w, "(b) 4 KiB-per-fault handler");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handler.join().unwrap();
        run
    });
    // SAFETY: unmapping what we mapped above.
    unsafe {
        libc::munmap(guest as *mut _, size as usize);
        libc::munmap(src as *mut _, size as usize);
    }
    Ok(Run {
        faults,
        server_p50_us: Some(server.quantile_us(0.5)),
        server_p99_us: Some(server.quantile_us(0.99)),
        ..run
    })
}

/// `cairn --json` on `store`, its cache in `cache` (bounded at 8 GiB).
fn cairn_command(store: &str, cache: &Path) -> Result<Command> {
    let bin = cairn_bin()?;
    let mut c = CairnStore {
        bin: &bin,
        store,
        cache_dir: cache,
        cache_size: "8G",
    }
    .command();
    c.arg("--json");
    Ok(c)
}

/// A `cairn mem serve --once --json` process.
struct Server {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn start_server(store: &str, cache: &Path, socket: &Path, extra: &[&str]) -> Result<Server> {
    let mut child = cairn_command(store, cache)?
        .args([
            "mem",
            "serve",
            "snap",
            "--once",
            "--no-kill-vmm",
            "--socket",
        ])
        .arg(socket)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready: Value = serde_json::from_str(&lines.next().context("server exited")??)?;
    if ready["ready"] != true {
        bail!("unexpected first line {ready}");
    }
    Ok(Server { child, lines })
}

/// (c)/(d): cairn serving the snapshot to a harness in this process.
fn run_cairn(
    store: &str,
    cache: &Path,
    work: &Path,
    w: &Workload,
    size: u64,
    name: &str,
    extra: &[&str],
) -> Result<Run> {
    let socket = work.join("cairn.sock");
    let mut server = start_server(store, cache, &socket, extra)?;
    let rss = RssSampler::start(server.child.id());
    let mut vmm = VmmHarness::new(&[RegionSpec {
        size,
        page_size: PAGE,
    }])?;
    let base = {
        let json: Value = serde_json::from_str(&vmm.handshake_json())?;
        json[0]["base_host_virt_addr"].as_u64().context("base")? as usize
    };
    vmm.connect(&socket)?;
    let mut run = touch(base, w, name);
    let mem = rss.finish();
    vmm.disconnect();
    let report: Value = serde_json::from_str(&server.lines.next().context("no report")??)?;
    server.child.wait()?;
    let r = &report["resume"];
    run.faults = r["faults"].as_u64().unwrap_or(0);
    run.server_p50_us = r["fault_p50_us"].as_f64();
    run.server_p99_us = r["fault_p99_us"].as_f64();
    run.first_fault_us = r["first_fault_us"].as_f64();
    run.handshake_us = r["handshake_us"].as_f64();
    run.prefetch_bytes = r["prefetch_bytes"].as_u64();
    run.prefetch_ms = r["prefetch_ms"].as_f64();
    run.server_rss_anon_kib = Some(mem.peak_anon_kib);
    run.server_hwm_kib = Some(mem.hwm_kib);
    Ok(run)
}

fn cairn(store: &str, cache: &Path, args: &[&str]) -> Result<Value> {
    let out = cairn_command(store, cache)?.args(args).output()?;
    if !out.status.success() {
        bail!("cairn {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .find(|l| !l.is_empty())
            .unwrap_or(b"{}"),
    )?)
}

fn plot(runs: &[Run], ws_pages: u64, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = runs.iter().map(|r| r.seconds).fold(0.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Pages of the working set touched since the handshake",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0u64..ws_pages + ws_pages / 20)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("pages touched")
        .draw()?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(r.curve.iter().copied(), color))?
            .label(&r.name)
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = args.size_mib << 20;
    std::fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;
    let file = work.join("memory.snap");
    if std::fs::metadata(&file).map(|m| m.len()).ok() != Some(size) {
        eprintln!("writing a {} MiB synthetic memory file", args.size_mib);
        std::fs::write(&file, synthetic_memory(size, 42))?;
    }
    let w = workload(size, args.ws_percent, args.threads, 7);
    let ws_bytes = w.pages * PAGE;
    eprintln!(
        "working set: {} pages ({} MiB), {} threads",
        w.pages,
        ws_bytes >> 20,
        args.threads
    );

    // The embedded store, its cache warmed by an export.
    let fstore = format!("file://{}", work.join("store").display());
    let _ = std::fs::remove_dir_all(work.join("store"));
    let cache = work.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let file_s = file.to_str().context("utf-8 path")?;
    cairn(
        &fstore,
        &cache,
        &["mem", "import", file_s, "--name", "snap"],
    )?;
    cairn(
        &fstore,
        &cache,
        &[
            "mem",
            "export",
            "snap",
            work.join("export.tmp").to_str().unwrap(),
        ],
    )?;
    std::fs::remove_file(work.join("export.tmp"))?;

    let mut runs = vec![
        run_mmap(&file, size, &w, true)?,
        run_mmap(&file, size, &w, false)?,
        run_4k_handler(&file, size, &w)?,
    ];
    // Every warm-cache cairn run: the embedded store, its cache.
    let warm =
        |name: &str, extra: &[&str]| run_cairn(&fstore, &cache, &work, &w, size, name, extra);
    let mut sweep = Vec::new();
    for kib in &args.sweep_kib {
        let name = format!("(c) cairn on demand, {kib} KiB runs, warm cache");
        let r = warm(
            &name,
            &["--no-prefetch", "--fault-size", &format!("{kib}K")],
        )?;
        sweep.push((*kib, r));
    }
    let demand = warm("(c) cairn on demand, warm cache", &["--no-prefetch"])?;
    let record = warm("cairn recording resume", &["--record"])?;
    // The first prefetching resume brings the working set's own chunks
    // into the cache; the second is the warm one.
    warm("(d) warming", &[])?;
    let prefetch = warm("(d) cairn recorded prefetch, warm cache", &[])?;
    let mut worker_sweep = Vec::new();
    for n in &args.sweep_workers {
        let name = format!("(d) cairn recorded prefetch, {n} workers, warm cache");
        let r = warm(&name, &["--prefetch-workers", &n.to_string()])?;
        worker_sweep.push((*n, r));
    }
    runs.extend([demand, prefetch]);
    if args.s3 {
        let endpoint =
            std::env::var("CAIRN_TEST_S3_ENDPOINT").context("--s3 needs CAIRN_TEST_S3_ENDPOINT")?;
        let s3 = format!(
            "s3://resume-bench-{:08x}/m?endpoint={endpoint}",
            fastrand::u32(..)
        );
        let c = |n: &str| work.join(n);
        let _ = std::fs::remove_dir_all(c("s3-import"));
        cairn(
            &s3,
            &c("s3-import"),
            &["mem", "import", file_s, "--name", "snap"],
        )?;
        for d in ["s3-rec", "s3-demand", "s3-prefetch"] {
            let _ = std::fs::remove_dir_all(c(d));
        }
        run_cairn(
            &s3,
            &c("s3-rec"),
            &work,
            &w,
            size,
            "recording (S3)",
            &["--record"],
        )?;
        runs.push(run_cairn(
            &s3,
            &c("s3-demand"),
            &work,
            &w,
            size,
            "(c) cairn on demand, S3 only",
            &["--no-prefetch"],
        )?);
        runs.push(run_cairn(
            &s3,
            &c("s3-prefetch"),
            &work,
            &w,
            size,
            "(d) cairn recorded prefetch, S3 only",
            &[],
        )?);
    }

    let by: BTreeMap<&str, f64> = runs.iter().map(|r| (r.name.as_str(), r.seconds)).collect();
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "\n== resume: {} MiB memory, working set {} MiB ({} pages, {} threads, a third written)",
        args.size_mib,
        ws_bytes >> 20,
        w.pages,
        args.threads
    );
    let mut t = Table::new(&[
        "backend",
        "handshake to WS touched s",
        "faults",
        "touch p50 us",
        "touch p99 us",
        "fault p50 us",
        "fault p99 us",
        "server anon RSS MiB",
    ]);
    for r in &runs {
        t.row(vec![
            r.name.clone(),
            format!("{:.3}", r.seconds),
            r.faults.to_string(),
            format!("{:.1}", r.touch_p50_us),
            format!("{:.1}", r.touch_p99_us),
            opt(r.server_p50_us),
            opt(r.server_p99_us),
            r.server_rss_anon_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        ]);
    }
    t.print();
    let d = by["(d) cairn recorded prefetch, warm cache"];
    println!("\n  ratios (time to working set touched; > 1 means (d) is faster):");
    for base in [
        "(b) 4 KiB-per-fault handler",
        "(a) mmap, cold page cache",
        "(a) mmap, warm page cache",
        "(c) cairn on demand, warm cache",
    ] {
        println!("    {base:<40} / (d) = {:.2}x", by[base] / d);
    }
    println!("  targets: (b)/(d) >= 5x, (a cold)/(d) >= 2x; report (a warm)/(d)");
    println!("\n  fault run size sweep (cairn on demand, warm cache):");
    for (kib, r) in &sweep {
        println!(
            "    {kib:>4} KiB: {:.3} s, {} faults, fault p50 {} us",
            r.seconds,
            r.faults,
            opt(r.server_p50_us)
        );
    }
    println!("\n  prefetch worker sweep (cairn recorded prefetch, warm cache):");
    for (n, r) in &worker_sweep {
        println!(
            "    {n} worker(s): {:.3} s, {} faults, prefetch done at {} ms",
            r.seconds,
            r.faults,
            opt(r.prefetch_ms)
        );
    }
    // The target is for a warm local cache; S3-only resumes wait for GETs.
    let first = runs
        .iter()
        .filter(|r| r.name.contains("warm cache"))
        .filter_map(|r| r.first_fault_us)
        .fold(0.0, f64::max);
    println!(
        "\n  handshake to first fault answered, worst warm-cache cairn run: {first:.0} us (target < 1000)"
    );
    let anon = runs
        .iter()
        .filter_map(|r| r.server_rss_anon_kib)
        .max()
        .unwrap_or(0);
    let hwm = runs
        .iter()
        .filter_map(|r| r.server_hwm_kib)
        .max()
        .unwrap_or(0);
    println!("  page server peak anonymous RSS {:.1} MiB, VmHWM {:.1} MiB incl. mapped cache files (target < {} MiB)", anon as f64 / 1024.0, hwm as f64 / 1024.0, 64 + args.size_mib / 100);
    println!(
        "  recording resume: {:.3} s, {} faults",
        record.seconds, record.faults
    );

    plot(&runs, w.pages, &args.plot)?;
    println!("  plot: {}", args.plot.display());
    let out = json!({
        "size_mib": args.size_mib, "ws_pages": w.pages, "threads": args.threads,
        "runs": runs.iter().map(|r| json!({"name": r.name, "seconds": r.seconds, "faults": r.faults,
            "touch_p50_us": r.touch_p50_us, "touch_p99_us": r.touch_p99_us, "fault_p50_us": r.server_p50_us,
            "fault_p99_us": r.server_p99_us, "first_fault_us": r.first_fault_us, "handshake_us": r.handshake_us,
            "server_rss_anon_kib": r.server_rss_anon_kib, "server_hwm_kib": r.server_hwm_kib, "prefetch_bytes": r.prefetch_bytes, "prefetch_ms": r.prefetch_ms})).collect::<Vec<_>>(),
        "sweep": sweep.iter().map(|(k, r)| json!({"fault_kib": k, "seconds": r.seconds, "faults": r.faults})).collect::<Vec<_>>(),
        "worker_sweep": worker_sweep.iter().map(|(n, r)| json!({"workers": n, "seconds": r.seconds, "faults": r.faults, "prefetch_ms": r.prefetch_ms})).collect::<Vec<_>>(),
    });
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&out)?)?;
    Ok(())
}
