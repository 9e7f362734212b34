//! `sqlite-bench` (also `cairn bench sqlite`): the SQLite suite
//! (benches/sqlite-suite) in a QEMU (TCG) guest whose root disk is served
//! by cairn from the remote tier alone (cold), cairn from its local cache
//! (warm), qemu-storage-daemon over vhost-user-blk on a raw file and QEMU's
//! own virtio-blk on a raw file; and on the host, on ext4 over a loop
//! device, as the no-VM reference. Every sample starts from the same root
//! filesystem image; the runs of one repetition are interleaved so that
//! drift on a noisy machine hits every backend alike. Prints medians with
//! ratios to qemu-storage-daemon, writes JSON and one SVG plot per mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_benches::backends::{Backend, CairnStore};
use cairn_benches::guest::{self, Disk, Launch};
use cairn_benches::{cairn_bin, median, Table};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Way {
    /// cairn, every chunk from the remote tier (an empty local cache).
    CairnCold,
    /// cairn, every chunk in the local cache.
    CairnWarm,
    /// qemu-storage-daemon over vhost-user-blk on a raw file.
    Qsd,
    /// QEMU's built-in virtio-blk on a raw file.
    VirtioBlk,
    /// No VM: the program on the host, on ext4 over a loop device.
    Host,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::CairnCold => "cairn cold",
            Way::CairnWarm => "cairn warm",
            Way::Qsd => "qemu-storage-daemon",
            Way::VirtioBlk => "QEMU virtio-blk",
            Way::Host => "host ext4 (loop)",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "The SQLite suite in a guest on each way of serving its disk")]
struct Args {
    /// Modes of the suite: default, fsync, large (the public benchmark's)
    /// and storage (ours; always run cold: caches dropped before each test).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default,fsync,large,storage"
    )]
    modes: Vec<String>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cairn-cold,cairn-warm,qsd,virtio-blk,host"
    )]
    ways: Vec<Way>,
    /// Samples per mode and way; the tables show medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Multiplies the suite's row counts (1 = the published sizes).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Storage mode's database size, MiB (more than the guest's page cache).
    #[arg(long, default_value_t = 192)]
    db_mib: u64,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    guest_mem_mib: u64,
    /// The guest fixture (fixtures/build-sqlite-guest.sh builds it when
    /// this is not given).
    #[arg(long, env = "CAIRN_SQLITE_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// cairn's remote tier (default: a file:// store under --work).
    #[arg(long)]
    store: Option<String>,
    #[arg(long, default_value = "target/bench/sqlite-work")]
    work: PathBuf,
    #[arg(long, default_value = "target/bench/sqlite.json")]
    json_out: PathBuf,
    /// Where the plots (sqlite-MODE.svg) go.
    #[arg(long, default_value = "target/bench")]
    plot_dir: PathBuf,
    /// Longest one guest run may take, seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

/// One run of the suite.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    mode: String,
    way: Way,
    rep: usize,
    /// The suite's own report (`CAIRN-SQLITE` line).
    report: Value,
    /// From start (QEMU or the program) to its exit.
    wall_s: f64,
    /// The guest's view of its disk's cache (`write back` means it sends
    /// FLUSH; `write through` means the device offered none, and its
    /// fsyncs cost nothing: not comparable).
    write_cache: Option<String>,
}

impl Sample {
    fn total(&self) -> f64 {
        self.report["total_seconds"].as_f64().unwrap_or(f64::NAN)
    }

    fn ops(&self) -> impl Iterator<Item = (&str, f64, bool)> {
        self.report["operations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|op| {
                (
                    op["name"].as_str().unwrap_or("?"),
                    op["seconds"].as_f64().unwrap_or(f64::NAN),
                    op["fsync_heavy"].as_bool().unwrap_or(false),
                )
            })
    }

    fn fsync_heavy(&self) -> f64 {
        // + 0.0: an empty sum is -0.0.
        self.ops().filter(|o| o.2).map(|o| o.1).sum::<f64>() + 0.0
    }
}

/// What one run gave.
struct Outcome {
    report: Value,
    wall_s: f64,
    write_cache: Option<String>,
}

/// What every run shares.
struct Bench {
    args: Args,
    guest_dir: PathBuf,
    rootfs: PathBuf,
    work: PathBuf,
    store: String,
    bin: PathBuf,
}

const IMAGE: &str = "sqlite-root";

impl Bench {
    fn cairn<'a>(&'a self, cache: &'a Path) -> CairnStore<'a> {
        CairnStore {
            bin: &self.bin,
            store: &self.store,
            cache_dir: cache,
            cache_size: "4G",
        }
    }

    fn spec(&self, mode: &str) -> String {
        let cold = if mode == "storage" { "cold" } else { "warm" };
        format!(
            "cairn.sqlite={mode}:{}:{}:{cold}",
            self.args.scale, self.args.db_mib
        )
    }

    fn boot(&self, disk: Disk<'_>, mode: &str) -> Result<Outcome> {
        let console = guest::run(&Launch {
            guest_dir: &self.guest_dir,
            disk,
            memory_mib: self.args.guest_mem_mib,
            append: self.spec(mode),
            timeout: Duration::from_secs(self.args.timeout),
        })?;
        let report = console
            .lines
            .iter()
            .find_map(|l| l.split_once("CAIRN-SQLITE ").map(|(_, j)| j))
            .context("the guest printed no CAIRN-SQLITE line")?;
        let write_cache = console
            .lines
            .iter()
            .find_map(|l| l.split_once("CAIRN-INIT").map(|(_, rest)| rest))
            .and_then(|rest| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix("cache="))
            })
            .map(|c| c.replace('_', " "));
        Ok(Outcome {
            report: serde_json::from_str(report)?,
            wall_s: console.boot.total_s,
            write_cache,
        })
    }

    /// A fresh copy of the root filesystem image, synced: otherwise the
    /// copy's dirty pages would be written back under the guest's first
    /// FLUSH, a cost no baseline disk has.
    fn fresh_raw(&self) -> Result<PathBuf> {
        let raw = self.work.join("disk.raw");
        let _ = std::fs::remove_file(&raw);
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.rootfs)
            .arg(&raw))?;
        std::fs::File::open(&raw)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", raw.display()))?;
        Ok(raw)
    }

    fn sample(&self, way: Way, mode: &str) -> Result<Outcome> {
        let socket = self.work.join("blk.sock");
        let overlay = self.work.join("overlay");
        let _ = std::fs::remove_dir_all(&overlay);
        match way {
            Way::CairnCold | Way::CairnWarm => {
                let cache = if way == Way::CairnCold {
                    let c = self.work.join("cache-cold");
                    let _ = std::fs::remove_dir_all(&c);
                    c
                } else {
                    self.work.join("cache-warm")
                };
                let server = self.cairn(&cache).serve(IMAGE, &overlay, &socket)?;
                let out = self.boot(Disk::VhostUser(&socket), mode);
                server.stop()?;
                out
            }
            Way::Qsd => {
                let raw = self.fresh_raw()?;
                let _server = Backend::qemu_storage_daemon(&raw, &socket)?;
                self.boot(Disk::VhostUser(&socket), mode)
            }
            Way::VirtioBlk => {
                let raw = self.fresh_raw()?;
                self.boot(Disk::VirtioBlk(&raw), mode)
            }
            Way::Host => self.on_host(mode),
        }
    }

    /// The program on the host, on the same ext4 image over a loop device.
    fn on_host(&self, mode: &str) -> Result<Outcome> {
        let raw = self.fresh_raw()?;
        let dev = String::from_utf8(
            run(Command::new("losetup").args(["--find", "--show"]).arg(&raw))
                .context("the host reference needs root for losetup and mount")?,
        )?
        .trim()
        .to_owned();
        let mnt = self.work.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let result = (|| {
            run(Command::new("mount").args(["-t", "ext4", &dev]).arg(&mnt))?;
            let started = Instant::now();
            let mut cmd = Command::new(self.guest_dir.join("sqlite-suite"));
            cmd.args(["--mode", mode, "--json", "--scale"])
                .arg(self.args.scale.to_string())
                .arg("--db-mib")
                .arg(self.args.db_mib.to_string())
                .arg("--dir")
                .arg(mnt.join("data/sq"))
                .env("TMPDIR", mnt.join("data"));
            if mode == "storage" {
                cmd.arg("--cold");
            }
            let out = run(&mut cmd);
            let wall = started.elapsed().as_secs_f64();
            let _ = run(Command::new("umount").arg(&mnt));
            let out = String::from_utf8(out?)?;
            let json = out
                .split_once("CAIRN-SQLITE ")
                .context("sqlite-suite printed no CAIRN-SQLITE line")?
                .1;
            Ok(Outcome {
                report: serde_json::from_str(json.trim())?,
                wall_s: wall,
                write_cache: None,
            })
        })();
        let _ = run(Command::new("losetup").args(["-d", &dev]));
        result
    }
}

/// Runs a command; its stdout, or an error with what it printed.
fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Per mode and way: median seconds of every op, of the fsync-heavy ops
/// and of the total.
#[derive(Debug, Default, Serialize)]
struct Medians {
    ops: BTreeMap<String, f64>,
    fsync_heavy: f64,
    total: f64,
    samples: usize,
}

fn medians(samples: &[&Sample]) -> Medians {
    let mut ops: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for (name, secs, _) in s.ops() {
            ops.entry(name.to_owned()).or_default().push(secs);
        }
    }
    Medians {
        ops: ops.into_iter().map(|(k, v)| (k, median(v))).collect(),
        fsync_heavy: median(samples.iter().map(|s| s.fsync_heavy()).collect()),
        total: median(samples.iter().map(|s| s.total()).collect()),
        samples: samples.len(),
    }
}

fn ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && x.is_finite() => format!("{:.2}x", x / b),
        _ => "-".into(),
    }
}

/// The baselines cairn's ratios are given against.
const BASELINES: [Way; 2] = [Way::Qsd, Way::VirtioBlk];

fn print_mode(mode: &str, ways: &[Way], by_way: &BTreeMap<Way, Medians>, first: &Sample) {
    println!(
        "\n== {mode}: median seconds ({} samples each)",
        first_count(by_way)
    );
    let pairs: Vec<(Way, Way)> = [Way::CairnWarm, Way::CairnCold]
        .into_iter()
        .flat_map(|c| BASELINES.map(|b| (c, b)))
        .filter(|(c, b)| ways.contains(c) && ways.contains(b))
        .collect();
    let short = |w: Way| match w {
        Way::Qsd => "qsd",
        Way::VirtioBlk => "virtio-blk",
        other => other.name(),
    };
    let mut header = vec!["operation".to_string()];
    header.extend(ways.iter().map(|w| w.name().to_string()));
    header.extend(
        pairs
            .iter()
            .map(|&(c, b)| format!("{} / {}", c.name(), short(b))),
    );
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(&header);
    let mut row = |label: String, get: &dyn Fn(&Medians) -> f64| {
        let mut cells = vec![label];
        cells.extend(ways.iter().map(|w| format!("{:.3}", get(&by_way[w]))));
        for &(c, b) in &pairs {
            cells.push(ratio(get(&by_way[&c]), Some(get(&by_way[&b]))));
        }
        t.row(cells);
    };
    for (name, _, heavy) in first.ops() {
        let label = format!("{name}{}", if heavy { " (fsync)" } else { "" });
        row(label, &|m: &Medians| {
            m.ops.get(name).copied().unwrap_or(f64::NAN)
        });
    }
    row("fsync-heavy ops".into(), &|m: &Medians| m.fsync_heavy);
    row("TOTAL".into(), &|m: &Medians| m.total);
    t.print();
}

/// Says which guests saw a write-through disk: they send no FLUSH, so
/// their fsyncs are not durable and their fsync-bound times are not a
/// like-for-like baseline.
fn print_write_caches(samples: &[Sample], ways: &[Way]) {
    for &w in ways {
        let seen: std::collections::BTreeSet<&str> = samples
            .iter()
            .filter(|s| s.way == w)
            .filter_map(|s| s.write_cache.as_deref())
            .collect();
        if seen.contains("write through") {
            println!(
                "  note: the guest on {} saw a write-through disk: it sends no FLUSH, so its fsyncs are not durable",
                w.name()
            );
        }
    }
}

fn first_count(by_way: &BTreeMap<Way, Medians>) -> usize {
    by_way.values().map(|m| m.samples).min().unwrap_or(0)
}

/// Bars of the median total and fsync-heavy seconds per way.
fn plot(mode: &str, ways: &[Way], by_way: &BTreeMap<Way, Medians>, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = by_way.values().map(|m| m.total).fold(0.0, f64::max) * 1.15;
    let n = ways.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("SQLite suite, {mode} mode: median seconds (lower is better)"),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..ymax.max(1e-3))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(ways.len())
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            ways.get(i).map_or(String::new(), |w| w.name().to_string())
        })
        .y_desc("seconds")
        .draw()?;
    let total = RGBColor(70, 110, 170);
    let fsync = RGBColor(220, 120, 50);
    for (i, w) in ways.iter().enumerate() {
        let m = &by_way[w];
        let x = i as f64;
        chart.draw_series([
            Rectangle::new([(x + 0.15, 0.0), (x + 0.5, m.total)], total.filled()),
            Rectangle::new([(x + 0.5, 0.0), (x + 0.85, m.fsync_heavy)], fsync.filled()),
        ])?;
        chart.draw_series([Text::new(
            format!("{:.2}", m.total),
            (x + 0.18, m.total + ymax * 0.02),
            ("sans-serif", 14),
        )])?;
    }
    chart
        .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], total.filled())])?
        .label("total")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], total.filled()));
    chart
        .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], fsync.filled())])?
        .label("fsync-heavy operations")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fsync.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_owned()
}

fn main() -> Result<()> {
    let args = Args::parse();
    for m in &args.modes {
        if !["default", "fsync", "large", "storage"].contains(&m.as_str()) {
            bail!("unknown mode {m:?}: the modes are default, fsync, large and storage");
        }
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let guest_dir = match &args.guest_dir {
        Some(d) => d.clone(),
        None => {
            eprintln!("building the guest fixture (fixtures/build-sqlite-guest.sh)");
            let out = run(&mut Command::new(
                repo_root().join("fixtures/build-sqlite-guest.sh"),
            ))?;
            PathBuf::from(String::from_utf8(out)?.trim())
        }
    };
    let rootfs = guest_dir.join("sqlite-rootfs.ext4");
    if !rootfs.exists() {
        bail!(
            "{} is missing: run fixtures/build-sqlite-guest.sh",
            rootfs.display()
        );
    }
    std::fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| format!("file://{}", work.join("store").display()));
    let bench = Bench {
        guest_dir,
        rootfs,
        store,
        bin: cairn_bin()?,
        work,
        args,
    };
    // The image, once; the warm cache filled by reading it whole.
    let warm = bench.work.join("cache-warm");
    let cairn = bench.cairn(&warm);
    let imported = cairn.import(&bench.rootfs, IMAGE)?;
    eprintln!(
        "root filesystem imported into {}: {} bytes stored",
        bench.store, imported["stored_bytes"]
    );
    let export = bench.work.join("export.tmp");
    run(cairn
        .command()
        .args(["image", "export", IMAGE])
        .arg(&export))?;
    std::fs::remove_file(&export)?;

    let a = &bench.args;
    let mut samples: Vec<Sample> = Vec::new();
    for rep in 0..a.repeat {
        for mode in &a.modes {
            // The ways' order rotates with every repetition, so that no way
            // always runs first (cold machine) or after a given other one.
            let n = a.ways.len();
            for way in (0..n).map(|k| a.ways[(k + rep) % n]) {
                let t = Instant::now();
                let Outcome {
                    report,
                    wall_s,
                    write_cache,
                } = bench.sample(way, mode).with_context(|| {
                    format!("{mode} mode on {} (sample {})", way.name(), rep + 1)
                })?;
                eprintln!(
                    "  [{}/{}] {mode:<8} {:<20} total {:.3} s (run {:.1} s, disk cache {})",
                    rep + 1,
                    a.repeat,
                    way.name(),
                    report["total_seconds"].as_f64().unwrap_or(f64::NAN),
                    t.elapsed().as_secs_f64(),
                    write_cache.as_deref().unwrap_or("host")
                );
                samples.push(Sample {
                    mode: mode.clone(),
                    way,
                    rep,
                    report,
                    wall_s,
                    write_cache,
                });
            }
        }
    }

    let mut summary = BTreeMap::new();
    std::fs::create_dir_all(&a.plot_dir)?;
    for mode in &a.modes {
        let by_way: BTreeMap<Way, Medians> = a
            .ways
            .iter()
            .map(|&w| {
                let of: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| &s.mode == mode && s.way == w)
                    .collect();
                (w, medians(&of))
            })
            .collect();
        let first = samples
            .iter()
            .find(|s| &s.mode == mode)
            .expect("one sample");
        print_mode(mode, &a.ways, &by_way, first);
        print_write_caches(&samples, &a.ways);
        let svg = a.plot_dir.join(format!("sqlite-{mode}.svg"));
        plot(mode, &a.ways, &by_way, &svg)?;
        println!("  plot: {}", svg.display());
        summary.insert(mode.clone(), by_way);
    }
    if let Some(dir) = a.json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "scale": a.scale,
        "db_mib": a.db_mib,
        "guest_mem_mib": a.guest_mem_mib,
        "repeat": a.repeat,
        "store": bench.store,
        "medians": summary,
        "samples": samples,
    });
    std::fs::write(&a.json_out, serde_json::to_vec_pretty(&json)?)?;
    println!("  JSON: {}", a.json_out.display());
    Ok(())
}
