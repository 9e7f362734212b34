//! `sqlite-suite`: arguments → [`Config`] → [`run`] → report on stdout.

use std::path::PathBuf;

use anyhow::Result;
use cairn_sqlite_suite::{run, Config, Mode};
use clap::Parser;

/// SQLite workloads for sandbox disks: a port of sandbox-sqlite-bench
/// (modes default, fsync, large), a storage-bound mode and the reads of a
/// database shipped in the disk image.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, value_enum, default_value = "default")]
    mode: Mode,
    /// Directory of the database (created if missing; a previous run's
    /// database there is removed).
    #[arg(long)]
    dir: PathBuf,
    /// Storage and image modes: size of the bulk-inserted table, in MiB.
    #[arg(long, default_value_t = 192)]
    db_mib: u64,
    /// Before each operation: sync, drop the kernel's caches (needs root)
    /// and reopen the connection.
    #[arg(long)]
    cold: bool,
    /// Multiplies every row count and size.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Image mode: build the database in --dir (for a disk image) instead
    /// of reading it.
    #[arg(long)]
    prepare: bool,
    /// Print one line, `CAIRN-SQLITE {json}`, instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = Config {
        mode: args.mode,
        dir: args.dir,
        db_mib: args.db_mib,
        cold: args.cold,
        scale: args.scale,
        prepare: args.prepare,
    };
    let report = run(&config)?;
    if args.json {
        println!("{}", report.json_line()?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
