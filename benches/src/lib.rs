//! Shared pieces of cairn's benchmarks: timing, statistics, tables, and
//! running other tools side by side with cairn.

pub mod backends;
pub mod blk_client;
pub mod guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Median of a non-empty sample.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) by nearest rank.
pub fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs[i]
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Wall time and peak RSS (KiB) of a command, via GNU time.
pub fn run_measured(cmd: &mut Command) -> Result<(Duration, u64, Vec<u8>)> {
    let rss_file = tempfile::NamedTempFile::new()?;
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(rss_file.path())
        .arg(&program)
        .args(&args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let started = Instant::now();
    let out = timed.output().with_context(|| {
        format!("running {program:?} under /usr/bin/time (Debian package `time`)")
    })?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "{program:?} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rss: u64 = std::fs::read_to_string(rss_file.path())?
        .lines()
        .last()
        .unwrap_or("0")
        .trim()
        .parse()
        .context("parsing /usr/bin/time output")?;
    Ok((took, rss, out.stdout))
}

/// The `cairn` binary next to this benchmark (same `target/` profile).
pub fn cairn_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CAIRN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe has a parent")?.join("cairn");
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build --release` first or set CAIRN_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// Reads a file once so that every tool then reads it from the page cache.
pub fn warm_page_cache(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

pub fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

/// A plain text table with a header row.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as Markdown (header, separator, rows).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (i, r) in self.rows.iter().enumerate() {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
            if i == 0 {
                out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
            }
        }
        out
    }

    pub fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(String::len)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
                .collect();
            println!("  {}", line.join("  ").trim_end());
        }
    }
}

/// The load average and the busiest processes: timings on a shared
/// machine mean little without them.
pub fn machine_state() -> serde_json::Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let top = std::process::Command::new("ps")
        .args(["-eo", "pcpu,etime,comm", "--sort=-pcpu"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(8)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    serde_json::json!({ "loadavg": load.trim(), "top": top })
}
