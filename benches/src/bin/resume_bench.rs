//! Resume benchmark: time from handshake to a guest's working set fully
//! touched, for a synthetic memory snapshot, served by
//!   (a) the memory file mmapped MAP_PRIVATE (Firecracker's File backend),
//!       with a cold and with a warm page cache;
//!   (b) an on-demand handler copying one 4 KiB page per fault from the
//!       file (the shape of Firecracker's example handler);
//!   (c) `cairn mem serve` on demand;
//!   (d) `cairn mem serve` with the recorded working set prefetched;
//! (c) and (d) from a warm local cache (and, once each, from the S3 server
//! alone). Every backend runs `--rounds` times, interleaved (each round
//! runs them all, in an order rotated by one each round), and is reported
//! by its median with the spread (min-max) of its samples. The guest is
//! this process: a VMM harness whose threads touch the working set
//! (scattered extents, a third of the pages written).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_benches::backends::{CairnStore, RssSampler};
use cairn_benches::{cairn_bin, median, warm_page_cache, Table};
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
    /// Rounds: every backend runs once a round, interleaved with the others.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
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

/// The honest case for record-and-prefetch: the guest's working set on
/// this resume is not the recorded one. Its pages in runs of 16, the runs
/// in another order, and a fifth of them replaced by runs elsewhere (a
/// guest that touches other data, with the locality data has).
fn changed_workload(w: &Workload, size: u64, seed: u64) -> Workload {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = size / PAGE;
    let pages: Vec<(u64, bool)> = w.per_thread.iter().flatten().copied().collect();
    let mut taken: std::collections::HashSet<u64> = pages.iter().map(|p| p.0 / PAGE).collect();
    let mut runs: Vec<Vec<(u64, bool)>> = pages.chunks(16).map(<[_]>::to_vec).collect();
    for run in runs.iter_mut() {
        if rng.u8(..5) != 0 {
            continue;
        }
        let len = run.len() as u64;
        let start = loop {
            let start = rng.u64(0..total - len);
            if (start..start + len).all(|p| !taken.contains(&p)) {
                break start;
            }
        };
        taken.extend(start..start + len);
        for (i, page) in run.iter_mut().enumerate() {
            page.0 = (start + i as u64) * PAGE;
        }
    }
    rng.shuffle(&mut runs);
    let threads = w.per_thread.len();
    let mut per_thread = vec![Vec::new(); threads];
    for (i, run) in runs.into_iter().enumerate() {
        per_thread[i % threads].extend(run);
    }
    Workload {
        per_thread,
        pages: pages.len() as u64,
    }
}

/// Puts every file under `dir` into the page cache, or drops it from it.
fn cache_files_in_page_cache(dir: &Path, warm: bool) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            cache_files_in_page_cache(&path, warm)?;
        } else if warm {
            warm_page_cache(&path)?;
        } else {
            let f = File::open(&path)?;
            // SAFETY: advisory call on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    Ok(())
}

/// What one run measured.
#[derive(Default, Clone)]
struct Run {
    name: String,
    seconds: f64,
    touch_p50_us: f64,
    touch_p99_us: f64,
    /// The process's page faults (getrusage) for the mmap baselines, the
    /// faults the 4 KiB handler answered, or the page server's faults
    /// its loop answered.
    faults: u64,
    /// A page server's faults on working-set pages parked until its
    /// prefetcher had installed them (the guest waited on them too).
    faults_waited: Option<u64>,
    server_p50_us: Option<f64>,
    server_p99_us: Option<f64>,
    first_fault_us: Option<f64>,
    handshake_us: Option<f64>,
    server_rss_anon_kib: Option<u64>,
    server_hwm_kib: Option<u64>,
    /// CPU time the server spent from the handshake to the working set touched.
    server_cpu_ms: Option<f64>,
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
/// mapping (in the page cache).
fn run_4k_handler(file: &Path, size: u64, w: &Workload) -> Result<Run> {
    warm_page_cache(file)?;
    let f = File::open(file)?;
    let src = map_private(Some(&f), size, libc::PROT_READ)?;
    let run = run_handler(size, w, HANDLER, PAGE, |at, buf| {
        // SAFETY: `src` maps `size` bytes of the file, read-only, for as
        // long as this runs; `at + buf.len()` stays within it.
        let from =
            unsafe { std::slice::from_raw_parts((src + at as usize) as *const u8, buf.len()) };
        buf.copy_from_slice(from);
        Ok(())
    });
    // SAFETY: unmapping what we mapped above.
    unsafe { libc::munmap(src as *mut _, size as usize) };
    run
}

/// (e): the baseline for a resume from the remote tier alone: the raw
/// memory file as one object, each fault answered with a ranged GET of its
/// aligned `run` bytes (cairn's fault size) and one UFFDIO_COPY.
fn run_ranged_get_handler(
    rt: &tokio::runtime::Runtime,
    store: &dyn cairn_engine::objstore::ObjectStore,
    key: &str,
    size: u64,
    w: &Workload,
    run: u64,
) -> Result<Run> {
    run_handler(size, w, RANGED_GET, run, |at, buf| {
        let bytes = rt
            .block_on(store.get(key, Some(at..at + buf.len() as u64)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(bytes.len() == buf.len(), "short ranged GET at {at}");
        buf.copy_from_slice(&bytes);
        Ok(())
    })
}

/// A userfaultfd handler thread serving guest memory of `size` bytes in
/// aligned runs of `run` bytes, each filled by `fetch(offset, buf)` when
/// its first page faults, while the workload touches it.
fn run_handler(
    size: u64,
    w: &Workload,
    name: &str,
    run: u64,
    fetch: impl Fn(u64, &mut [u8]) -> Result<()> + Sync,
) -> Result<Run> {
    use userfaultfd::{Event, UffdBuilder};
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
    let mut failed = None;
    let touched = std::thread::scope(|s| {
        let handler = s.spawn(|| {
            use rustix::event::{poll, PollFd, PollFlags};
            let mut installed = vec![false; size.div_ceil(run) as usize];
            let mut buf = vec![0u8; run as usize];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [PollFd::new(&uffd, PollFlags::IN)];
                let ten_ms = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 10_000_000,
                };
                if poll(&mut fds, Some(&ten_ms)).unwrap_or(0) == 0 {
                    continue;
                }
                let Ok(Some(Event::Pagefault { addr, .. })) = uffd.read_event() else {
                    continue;
                };
                let t = Instant::now();
                let at = (addr as u64 - guest as u64) / run * run;
                let len = run.min(size - at) as usize;
                let slot = (at / run) as usize;
                if installed[slot] {
                    // Another thread's fault on the run already answered.
                    let _ = uffd.wake((guest + at as usize) as *mut _, len);
                    continue;
                }
                if let Err(e) = fetch(at, &mut buf[..len]) {
                    // Answered with zeros so the workload ends; the run fails.
                    failed.get_or_insert(e);
                    buf[..len].fill(0);
                }
                // SAFETY: copies `len` bytes of `buf` into the registered
                // guest run at `at`, none of whose pages is present yet.
                let _ = unsafe {
                    uffd.copy(
                        buf.as_ptr() as *const _,
                        (guest + at as usize) as *mut _,
                        len,
                        true,
                    )
                };
                installed[slot] = true;
                server.record(t.elapsed());
                faults += 1;
            }
        });
        let touched = touch(guest, w, name);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handler.join().unwrap();
        touched
    });
    // SAFETY: unmapping what we mapped above.
    unsafe { libc::munmap(guest as *mut _, size as usize) };
    if let Some(e) = failed {
        return Err(e.context(format!("{name}: a fault could not be answered")));
    }
    Ok(Run {
        faults,
        server_p50_us: Some(server.quantile_us(0.5)),
        server_p99_us: Some(server.quantile_us(0.99)),
        ..touched
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
    let cpu_before = cpu_ms(server.child.id())?;
    vmm.connect(&socket)?;
    let mut run = touch(base, w, name);
    run.server_cpu_ms = Some(cpu_ms(server.child.id())? - cpu_before);
    let mem = rss.finish();
    // The VMM is this process: hang up and stop the server, which reports.
    vmm.disconnect();
    // SAFETY: signals our own child, which has not been waited for yet.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let report: Value = serde_json::from_str(&server.lines.next().context("no report")??)?;
    server.child.wait()?;
    let r = &report["resume"];
    if let Some(why) = r["prefetch_stopped"].as_str() {
        eprintln!("warning: {name}: prefetch stopped early: {why}");
    }
    run.faults = r["faults"].as_u64().unwrap_or(0);
    run.faults_waited = r["faults_waited_for_prefetch"].as_u64();
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

/// User and system CPU time of process `pid` so far, every thread's.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1e3 / hz)
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

    // Recorded once, then the first prefetching resume brings the working
    // set's own chunks into the cache: every (d) run after it is warm.
    let warm =
        |name: &str, extra: &[&str]| run_cairn(&fstore, &cache, &work, &w, size, name, extra);
    let record = warm("cairn recording resume", &["--record"])?;
    warm("(d) warming", &[])?;

    let changed = changed_workload(&w, size, 8);
    let mut backends = vec![
        Backend::Mmap { cold: true },
        Backend::Mmap { cold: false },
        Backend::Handler4k,
        Backend::cairn(DEMAND, &["--no-prefetch"]),
        Backend::cairn(PREFETCH, &[]),
        Backend::cairn_with(DEMAND_COLD, &["--no-prefetch"], true, false),
        Backend::cairn_with(PREFETCH_COLD, &[], true, false),
        Backend::cairn_with(PREFETCH_CHANGED, &[], false, true),
    ];
    for kib in &args.sweep_kib {
        let name = format!("(c) cairn on demand, {kib} KiB runs, warm cache");
        let size = format!("{kib}K");
        backends.push(Backend::cairn(
            &name,
            &["--no-prefetch", "--fault-size", &size],
        ));
    }
    for n in &args.sweep_workers {
        let name = format!("(d) cairn recorded prefetch, {n} workers, warm cache");
        backends.push(Backend::cairn(
            &name,
            &["--prefetch-workers", &n.to_string()],
        ));
    }
    let mut samples: Vec<Vec<Run>> = vec![Vec::new(); backends.len()];
    for round in 0..args.rounds as usize {
        eprintln!("round {} of {}", round + 1, args.rounds);
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.rotate_left(round % backends.len());
        for i in order {
            let run = match &backends[i] {
                Backend::Mmap { cold } => run_mmap(&file, size, &w, *cold)?,
                Backend::Handler4k => run_4k_handler(&file, size, &w)?,
                Backend::Cairn {
                    name,
                    extra,
                    cold_pages,
                    changed: is_changed,
                } => {
                    // Warm rows run with the cache files in the page cache,
                    // as (a) warm has its file; cold ones without, as (a)
                    // cold, so that each pairs with its like.
                    cache_files_in_page_cache(&cache, !cold_pages)?;
                    if *cold_pages {
                        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                    }
                    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                    let wl = if *is_changed { &changed } else { &w };
                    run_cairn(&fstore, &cache, &work, wl, size, name, &extra)?
                }
            };
            samples[i].push(run);
        }
    }
    let summaries: Vec<Summary> = samples.into_iter().map(Summary::of).collect();

    let mut s3_runs = Vec::new();
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
        let s3_run = |cache: &str, name: &str, extra: &[&str]| {
            run_cairn(&s3, &c(cache), &work, &w, size, name, extra)
        };
        s3_run("s3-rec", "recording (S3)", &["--record"])?;
        s3_runs.push(s3_run(
            "s3-demand",
            "(c) cairn on demand, S3 only (1 sample)",
            &["--no-prefetch"],
        )?);
        s3_runs.push(s3_run(
            "s3-prefetch",
            "(d) cairn recorded prefetch, S3 only (1 sample)",
            &[],
        )?);
        // The same guest pages as ranged GETs of the raw memory file, one
        // object in the same bucket: what the remote tier alone gives
        // without cairn's chunks, frames, cache and prefetch.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let uri: cairn_engine::objstore::StoreUri = s3.parse()?;
        let store = rt.block_on(cairn_engine::objstore::open_store(&uri))?;
        rt.block_on(store.put_file("raw/memory", &file))?;
        s3_runs.push(run_ranged_get_handler(
            &rt,
            store.as_ref(),
            "raw/memory",
            size,
            &w,
            64 << 10,
        )?);
    }

    println!(
        "\n== resume: {} MiB memory, working set {} MiB ({} pages, {} threads, a third written), {} rounds",
        args.size_mib,
        ws_bytes >> 20,
        w.pages,
        args.threads,
        args.rounds
    );
    let mut t = Table::new(&[
        "backend",
        "handshake to WS touched s, median",
        "min-max s",
        "guest faults",
        "touch p50 us",
        "touch p99 us",
        "fault p50 us",
        "fault p99 us",
        "first fault us, median (max)",
        "server anon RSS MiB",
        "server CPU ms",
    ]);
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let s3_summaries: Vec<Summary> = s3_runs
        .iter()
        .map(|r| Summary::of(vec![r.clone()]))
        .collect();
    for s in summaries.iter().chain(&s3_summaries) {
        let r = s.median_run();
        t.row(vec![
            r.name.clone(),
            format!("{:.3}", s.median),
            format!("{:.3}-{:.3}", s.min, s.max),
            match r.faults_waited {
                Some(w) => format!("{} ({} + {w} waited)", r.faults + w, r.faults),
                None => r.faults.to_string(),
            },
            format!("{:.1}", r.touch_p50_us),
            format!("{:.1}", r.touch_p99_us),
            opt(r.server_p50_us),
            opt(r.server_p99_us),
            s.first_fault
                .map_or("-".into(), |(m, x)| format!("{m:.0} ({x:.0})")),
            s.runs
                .iter()
                .filter_map(|r| r.server_rss_anon_kib)
                .max()
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            opt(r.server_cpu_ms),
        ]);
    }
    t.print();
    println!(
        "  guest faults: for the mmap rows, the process's page faults (getrusage); for the \
         handlers (b) and (e), the faults they answered; for a page server, every userfaultfd fault: \
         those its loop answered plus those parked until the prefetcher installed the page"
    );
    let by = |name: &str| {
        summaries
            .iter()
            .find(|s| s.runs[0].name == name)
            .map(|s| s.median)
            .expect("a backend of every round")
    };
    let d = by(PREFETCH);
    println!("\n  ratios of medians (time to working set touched; > 1 means (d) is faster):");
    for base in [HANDLER, MMAP_COLD, MMAP_WARM, DEMAND] {
        println!("    {base:<40} / (d) = {:.2}x", by(base) / d);
    }
    let d_cold = by(PREFETCH_COLD);
    let d_changed = by(PREFETCH_CHANGED);
    println!("\n  like with like (> 1 means cairn is faster):");
    println!(
        "    (a) mmap, cold page cache / (d) cache files not in page cache = {:.2}x",
        by(MMAP_COLD) / d_cold
    );
    println!(
        "    (a) mmap, warm page cache / (d) warm cache (files in page cache) = {:.2}x",
        by(MMAP_WARM) / d
    );
    println!(
        "    (c) on demand, warm / (d) working set changed (order, a fifth of the pages) = {:.2}x; changed / recorded = {:.2}x",
        by(DEMAND) / d_changed,
        d_changed / d
    );
    let s3 = |prefix: &str| {
        s3_runs
            .iter()
            .find(|r| r.name.starts_with(prefix))
            .map(|r| r.seconds)
    };
    if let (Some(c), Some(d), Some(e)) = (s3("(c)"), s3("(d)"), s3("(e)")) {
        println!(
            "    from the S3 server alone, (e) ranged GETs of the raw memory / (c) cairn on demand = {:.2}x, / (d) cairn prefetch = {:.2}x",
            e / c,
            e / d
        );
    }
    let first_fault = summaries
        .iter()
        .filter(|s| s.runs[0].name.contains("warm cache"))
        .filter_map(|s| s.first_fault)
        .fold((0.0f64, 0.0f64), |(m, x), (a, b)| (m.max(a), x.max(b)));
    println!("\n  targets:");
    println!(
        "    (b)/(d) >= 5x: {:.2}x; (a cold)/(d, cache files not in page cache) >= 2x: {:.2}x; (d)/(a warm) <= 1.2x: {:.2}x",
        by(HANDLER) / d,
        by(MMAP_COLD) / d_cold,
        d / by(MMAP_WARM)
    );
    println!(
        "    handshake to first fault answered < 1000 us, warm cache: worst median {:.0} us, worst run {:.0} us",
        first_fault.0, first_fault.1
    );
    let anon = summaries
        .iter()
        .flat_map(|s| &s.runs)
        .filter_map(|r| r.server_rss_anon_kib)
        .max()
        .unwrap_or(0);
    let hwm = summaries
        .iter()
        .flat_map(|s| &s.runs)
        .filter_map(|r| r.server_hwm_kib)
        .max()
        .unwrap_or(0);
    println!("    page server peak anonymous RSS {:.1} MiB, VmHWM {:.1} MiB incl. mapped cache files (< {} MiB)", anon as f64 / 1024.0, hwm as f64 / 1024.0, 64 + args.size_mib / 100);
    println!(
        "  recording resume: {:.3} s, {} faults",
        record.seconds, record.faults
    );

    let median_runs: Vec<Run> = summaries
        .iter()
        .filter(|s| backends_in_plot(&s.runs[0].name))
        .map(|s| s.median_run().clone())
        .chain(s3_runs.iter().cloned())
        .collect();
    plot(&median_runs, w.pages, &args.plot)?;
    println!("  plot (median runs): {}", args.plot.display());
    let run_json = |r: &Run| {
        json!({"seconds": r.seconds, "faults": r.faults, "faults_waited_for_prefetch": r.faults_waited,
            "touch_p50_us": r.touch_p50_us, "touch_p99_us": r.touch_p99_us, "fault_p50_us": r.server_p50_us,
            "fault_p99_us": r.server_p99_us, "first_fault_us": r.first_fault_us, "handshake_us": r.handshake_us,
            "server_rss_anon_kib": r.server_rss_anon_kib, "server_hwm_kib": r.server_hwm_kib, "server_cpu_ms": r.server_cpu_ms,
            "prefetch_bytes": r.prefetch_bytes, "prefetch_ms": r.prefetch_ms})
    };
    let out = json!({
        "size_mib": args.size_mib, "ws_pages": w.pages, "threads": args.threads, "rounds": args.rounds,
        "backends": summaries.iter().chain(&s3_summaries).map(|s| json!({
            "name": s.runs[0].name, "median_s": s.median, "min_s": s.min, "max_s": s.max,
            "samples": s.runs.iter().map(run_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&out)?)?;
    Ok(())
}

const MMAP_COLD: &str = "(a) mmap, cold page cache";
const MMAP_WARM: &str = "(a) mmap, warm page cache";
const HANDLER: &str = "(b) 4 KiB-per-fault handler";
const RANGED_GET: &str =
    "(e) ranged GET of the raw memory object, 64 KiB a fault, S3 only (1 sample)";
const DEMAND: &str = "(c) cairn on demand, warm cache";
const PREFETCH: &str = "(d) cairn recorded prefetch, warm cache";
const DEMAND_COLD: &str = "(c) cairn on demand, cache files not in page cache";
const PREFETCH_COLD: &str = "(d) cairn recorded prefetch, cache files not in page cache";
const PREFETCH_CHANGED: &str = "(d) cairn prefetch, working set changed, warm cache";

/// The sweeps' variants stay out of the plot.
fn backends_in_plot(name: &str) -> bool {
    [
        MMAP_COLD,
        MMAP_WARM,
        HANDLER,
        DEMAND,
        PREFETCH,
        PREFETCH_COLD,
        PREFETCH_CHANGED,
    ]
    .contains(&name)
}

/// One way of serving the snapshot.
enum Backend {
    Mmap {
        cold: bool,
    },
    Handler4k,
    Cairn {
        name: String,
        extra: Vec<String>,
        /// The local cache's files dropped from the page cache first.
        cold_pages: bool,
        /// The guest touches [`changed_workload`], not the recorded one.
        changed: bool,
    },
}

impl Backend {
    fn cairn(name: &str, extra: &[&str]) -> Backend {
        Backend::cairn_with(name, extra, false, false)
    }

    fn cairn_with(name: &str, extra: &[&str], cold_pages: bool, changed: bool) -> Backend {
        Backend::Cairn {
            name: name.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            cold_pages,
            changed,
        }
    }
}

/// A backend's samples: the median and spread of its time, the first
/// fault's median and worst.
struct Summary {
    runs: Vec<Run>,
    median: f64,
    min: f64,
    max: f64,
    first_fault: Option<(f64, f64)>,
}

impl Summary {
    fn of(runs: Vec<Run>) -> Summary {
        let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
        let firsts: Vec<f64> = runs.iter().filter_map(|r| r.first_fault_us).collect();
        Summary {
            median: median(secs.clone()),
            min: secs.iter().copied().fold(f64::INFINITY, f64::min),
            max: secs.iter().copied().fold(0.0, f64::max),
            first_fault: (!firsts.is_empty()).then(|| {
                (
                    median(firsts.clone()),
                    firsts.iter().copied().fold(0.0, f64::max),
                )
            }),
            runs,
        }
    }

    /// The sample closest to the median (its other figures are shown).
    fn median_run(&self) -> &Run {
        self.runs
            .iter()
            .min_by(|a, b| {
                (a.seconds - self.median)
                    .abs()
                    .total_cmp(&(b.seconds - self.median).abs())
            })
            .expect("at least one sample")
    }
}
