//! `sqlite-bench` (also `cairn bench sqlite`): the SQLite suite
//! (benches/sqlite-suite) in a QEMU (TCG) guest whose root disk is served
//! by cairn from the remote tier alone (cold), cairn from its local cache
//! (warm), qemu-storage-daemon over vhost-user-blk on a raw file and QEMU's
//! own virtio-blk on a raw file; and on the host, on ext4 over a loop
//! device, as the no-VM reference. Every sample starts from the same root
//! filesystem image; the runs of one repetition are interleaved, in an
//! order that rotates with every repetition, so that drift on a noisy
//! machine hits every backend alike. Prints per mode the median seconds of
//! each way and, for each of cairn's ways against each baseline, the median
//! of the per-repetition ratios with their spread (min-max); writes the
//! same tables as Markdown, the samples and summaries as JSON, and one SVG
//! plot per mode, all from the same runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_benches::backends::{Backend, CairnStore};
use cairn_benches::guest::{self, Disk, Launch};
use cairn_benches::{cairn_bin, machine_state, median, Table};
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
    /// Modes of the suite: default, fsync, large (the public benchmark's),
    /// storage (ours; always run cold: caches dropped before each test) and
    /// image (ours: cold reads of the database built into the guest's root
    /// filesystem).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default,fsync,large,storage,image"
    )]
    modes: Vec<String>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cairn-cold,cairn-warm,qsd,virtio-blk,host"
    )]
    ways: Vec<Way>,
    /// Samples per mode and way (default: 5 for default and fsync, 3 for
    /// the longer modes); the tables show medians.
    #[arg(long)]
    repeat: Option<usize>,
    /// Multiplies the suite's row counts (1 = the published sizes).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Storage mode's database size, MiB (more than the guest's page cache).
    #[arg(long, default_value_t = 192)]
    db_mib: u64,
    /// Guest memory, MiB (the same for every mode).
    #[arg(long, default_value_t = 192)]
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
    /// The samples and summaries; the Markdown tables go beside it (.md).
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

    /// Samples of `mode` per way.
    fn repeats(&self, mode: &str) -> usize {
        self.args
            .repeat
            .unwrap_or(if ["default", "fsync"].contains(&mode) {
                5
            } else {
                3
            })
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
            let dir = if mode == "image" {
                "data/image"
            } else {
                "data/sq"
            };
            cmd.args(["--mode", mode, "--json", "--scale"])
                .arg(self.args.scale.to_string())
                .arg("--db-mib")
                .arg(self.args.db_mib.to_string())
                .arg("--dir")
                .arg(mnt.join(dir))
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

/// One row of a mode's table: an operation, the fsync-heavy ones, or all.
#[derive(Clone, Debug)]
enum Row {
    Op { name: String, fsync_heavy: bool },
    FsyncHeavy,
    Total,
}

impl Row {
    fn label(&self) -> String {
        match self {
            Row::Op { name, fsync_heavy } => {
                format!("{name}{}", if *fsync_heavy { " (fsync)" } else { "" })
            }
            Row::FsyncHeavy => "fsync-heavy ops".into(),
            Row::Total => "TOTAL".into(),
        }
    }

    fn of(&self, s: &Sample) -> f64 {
        match self {
            Row::Op { name, .. } => s.ops().find(|o| o.0 == name).map_or(f64::NAN, |o| o.1),
            Row::FsyncHeavy => s.fsync_heavy(),
            Row::Total => s.total(),
        }
    }
}

/// The median of some values and their range.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    fn of(xs: Vec<f64>) -> Option<Spread> {
        let xs: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
        if xs.is_empty() {
            return None;
        }
        Some(Spread {
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: xs.len(),
            median: median(xs),
        })
    }

    /// `1.02x (0.97-1.10)` for a ratio.
    fn ratio_cell(&self) -> String {
        format!("{:.2}x ({:.2}-{:.2})", self.median, self.min, self.max)
    }
}

/// The baselines cairn's ratios are given against.
const BASELINES: [Way; 2] = [Way::Qsd, Way::VirtioBlk];

/// A mode's results: per row, each way's seconds and each pair's ratio.
#[derive(Debug, Serialize)]
struct ModeSummary {
    /// Row label → way → seconds over the samples.
    seconds: BTreeMap<String, BTreeMap<Way, Spread>>,
    /// "cairn warm / qsd" → row label → the ratios of the repetitions
    /// (each repetition's cairn sample over its baseline sample).
    ratios: BTreeMap<String, BTreeMap<String, Spread>>,
    /// The rows in table order.
    #[serde(skip)]
    rows: Vec<Row>,
    #[serde(skip)]
    pairs: Vec<(Way, Way)>,
}

fn short(w: Way) -> &'static str {
    match w {
        Way::Qsd => "qsd",
        Way::VirtioBlk => "virtio-blk",
        other => other.name(),
    }
}

fn pair_name(c: Way, b: Way) -> String {
    format!("{} / {}", c.name(), short(b))
}

fn summarize(samples: &[&Sample], ways: &[Way]) -> ModeSummary {
    let mut rows: Vec<Row> = samples
        .first()
        .map(|s| {
            s.ops()
                .map(|(name, _, fsync_heavy)| Row::Op {
                    name: name.to_owned(),
                    fsync_heavy,
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.iter().any(|r| {
        matches!(
            r,
            Row::Op {
                fsync_heavy: true,
                ..
            }
        )
    }) {
        rows.push(Row::FsyncHeavy);
    }
    rows.push(Row::Total);
    let pairs: Vec<(Way, Way)> = [Way::CairnWarm, Way::CairnCold]
        .into_iter()
        .flat_map(|c| BASELINES.map(|b| (c, b)))
        .filter(|(c, b)| ways.contains(c) && ways.contains(b))
        .collect();
    let of_way = |w: Way| samples.iter().filter(move |s| s.way == w);
    let mut seconds = BTreeMap::new();
    let mut ratios: BTreeMap<String, BTreeMap<String, Spread>> = BTreeMap::new();
    for row in &rows {
        let per_way = ways
            .iter()
            .filter_map(|&w| Some((w, Spread::of(of_way(w).map(|s| row.of(s)).collect())?)))
            .collect();
        seconds.insert(row.label(), per_way);
        for &(c, b) in &pairs {
            // Samples of one repetition ran back to back: pair them.
            let per_rep = of_way(c)
                .filter_map(|cs| {
                    let bs = of_way(b).find(|bs| bs.rep == cs.rep)?;
                    Some(row.of(cs) / row.of(bs))
                })
                .collect();
            if let Some(spread) = Spread::of(per_rep) {
                ratios
                    .entry(pair_name(c, b))
                    .or_default()
                    .insert(row.label(), spread);
            }
        }
    }
    ModeSummary {
        seconds,
        ratios,
        rows,
        pairs,
    }
}

impl ModeSummary {
    fn median(&self, row: &Row, way: Way) -> f64 {
        self.seconds
            .get(&row.label())
            .and_then(|m| m.get(&way))
            .map_or(f64::NAN, |s| s.median)
    }

    fn table(&self, ways: &[Way]) -> Table {
        let mut header = vec!["operation".to_string()];
        header.extend(ways.iter().map(|w| w.name().to_string()));
        header.extend(self.pairs.iter().map(|&(c, b)| pair_name(c, b)));
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut t = Table::new(&header);
        for row in &self.rows {
            let label = row.label();
            let mut cells = vec![label.clone()];
            cells.extend(ways.iter().map(|&w| format!("{:.3}", self.median(row, w))));
            for &(c, b) in &self.pairs {
                cells.push(
                    self.ratios
                        .get(&pair_name(c, b))
                        .and_then(|r| r.get(&label))
                        .map_or("-".into(), Spread::ratio_cell),
                );
            }
            t.row(cells);
        }
        t
    }
}

/// Says which guests saw a write-through disk: they send no FLUSH, so
/// their fsyncs are not durable and their fsync-bound times are not a
/// like-for-like baseline.
fn print_write_caches(samples: &[&Sample], ways: &[Way]) {
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

/// Bars of the median total and fsync-heavy seconds per way, with the
/// range of the totals as a whisker.
fn plot(mode: &str, ways: &[Way], summary: &ModeSummary, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let totals = &summary.seconds[&Row::Total.label()];
    let fsync = summary.seconds.get(&Row::FsyncHeavy.label());
    let ymax = totals.values().map(|s| s.max).fold(0.0, f64::max) * 1.15;
    let n = ways.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("SQLite suite, {mode} mode: median seconds, range of totals (lower is better)"),
            ("sans-serif", 20),
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
    let total_color = RGBColor(70, 110, 170);
    let fsync_color = RGBColor(220, 120, 50);
    for (i, w) in ways.iter().enumerate() {
        let Some(t) = totals.get(w) else { continue };
        let x = i as f64;
        chart.draw_series([
            Rectangle::new([(x + 0.15, 0.0), (x + 0.5, t.median)], total_color.filled()),
            Rectangle::new([(x + 0.31, t.min), (x + 0.34, t.max)], BLACK.filled()),
        ])?;
        if let Some(f) = fsync.and_then(|f| f.get(w)) {
            chart.draw_series([Rectangle::new(
                [(x + 0.5, 0.0), (x + 0.85, f.median)],
                fsync_color.filled(),
            )])?;
        }
        chart.draw_series([Text::new(
            format!("{:.2}", t.median),
            (x + 0.18, t.max + ymax * 0.02),
            ("sans-serif", 14),
        )])?;
    }
    chart
        .draw_series([Rectangle::new(
            [(0.0, 0.0), (0.0, 0.0)],
            total_color.filled(),
        )])?
        .label("total")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], total_color.filled()));
    if fsync.is_some() {
        chart
            .draw_series([Rectangle::new(
                [(0.0, 0.0), (0.0, 0.0)],
                fsync_color.filled(),
            )])?
            .label("fsync-heavy operations")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], fsync_color.filled())
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

const MODES: [&str; 5] = ["default", "fsync", "large", "storage", "image"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_owned()
}

fn main() -> Result<()> {
    let args = Args::parse();
    for m in &args.modes {
        if !MODES.contains(&m.as_str()) {
            bail!("unknown mode {m:?}: the modes are {}", MODES.join(", "));
        }
    }
    if args.repeat == Some(0) {
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
    let most = a.modes.iter().map(|m| bench.repeats(m)).max().unwrap_or(1);
    let mut samples: Vec<Sample> = Vec::new();
    for rep in 0..most {
        for mode in a.modes.iter().filter(|m| rep < bench.repeats(m)) {
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
                    bench.repeats(mode),
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
    let mut markdown = format!(
        "SQLite suite, guest of {} MiB, scale {}, storage database {} MiB, store {}\n",
        a.guest_mem_mib, a.scale, a.db_mib, bench.store
    );
    std::fs::create_dir_all(&a.plot_dir)?;
    for mode in &a.modes {
        let of_mode: Vec<&Sample> = samples.iter().filter(|s| &s.mode == mode).collect();
        let sum = summarize(&of_mode, &a.ways);
        let title = format!(
            "{mode}: median seconds ({} samples each); ratios: median of the per-repetition ratios (min-max)",
            bench.repeats(mode)
        );
        println!("\n== {title}");
        let table = sum.table(&a.ways);
        table.print();
        markdown.push_str(&format!("\n### {title}\n\n{}", table.markdown()));
        print_write_caches(&of_mode, &a.ways);
        let svg = a.plot_dir.join(format!("sqlite-{mode}.svg"));
        plot(mode, &a.ways, &sum, &svg)?;
        println!("  plot: {}", svg.display());
        summary.insert(mode.clone(), sum);
    }
    if let Some(dir) = a.json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "scale": a.scale,
        "db_mib": a.db_mib,
        "guest_mem_mib": a.guest_mem_mib,
        "repeats": a.modes.iter().map(|m| (m.clone(), bench.repeats(m))).collect::<BTreeMap<_, _>>(),
        "store": bench.store,
        "machine": machine_state(),
        "summary": summary,
        "samples": samples,
    });
    std::fs::write(&a.json_out, serde_json::to_vec_pretty(&json)?)?;
    let md = a.json_out.with_extension("md");
    std::fs::write(&md, markdown)?;
    println!(
        "  JSON: {}\n  tables: {}",
        a.json_out.display(),
        md.display()
    );
    Ok(())
}
