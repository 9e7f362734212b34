//! `cairn disk serve`: an image plus a private overlay, served over
//! vhost-user-blk.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use cairn_engine::disk::Disk;
use cairn_engine::import::ImportOptions;
use cairn_engine::overlay::Overlay;
use cairn_engine::snapshot::snapshot_overlay;
use cairn_vmm_glue::blk::{serve as serve_blk, BlkBackend, DeviceConfig};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::image::{load, name_and_report};
use crate::cli::DiskServeArgs;
use crate::context::Context;
use crate::output::{bytes_bar, emit};
use cairn_engine::catalog::Made;

#[derive(Serialize)]
struct Ready<'a> {
    ready: bool,
    image: String,
    socket: &'a Path,
    overlay: &'a Path,
    logical_bytes: u64,
    queues: u16,
    read_only: bool,
    overlay_blocks: u64,
}

#[derive(Serialize)]
struct Stopped {
    stopped: bool,
    signal: i32,
    remote_bytes: u64,
    remote_gets: u64,
    chunks_fetched: u64,
    readahead_chunks: u64,
    /// Syncs of the overlay's files: a logged FLUSH syncs the flush log, a
    /// checkpoint the data file and the journal.
    overlay_syncs: OverlaySyncs,
}

#[derive(Serialize)]
struct OverlaySyncs {
    flush_log: u64,
    data: u64,
    journal: u64,
}

pub fn serve(ctx: &Context, args: &DiskServeArgs) -> Result<ExitCode> {
    let (image, socket, overlay_dir) = (
        args.image.as_str(),
        args.socket.as_path(),
        args.overlay.as_path(),
    );
    let (read_only, queues) = (args.read_only, args.queues);
    let poll = std::time::Duration::from_micros(args.poll_us);
    let (id, manifest) = load(ctx, image)?;
    let store = ctx.chunk_store()?;
    let overlay = Overlay::open_or_create(overlay_dir, &id, manifest.logical_size)
        .with_context(|| format!("opening overlay {}", overlay_dir.display()))?;
    let manifest = Arc::new(manifest);
    let disk = Disk::open(manifest.clone(), store.clone(), vec![overlay.clone()])
        .with_context(|| format!("opening the disk over {}", overlay_dir.display()))?;
    let disks = (0..queues).map(|_| disk.queue()).collect();
    let cfg = DeviceConfig {
        capacity_bytes: manifest.logical_size,
        read_only,
        queues,
        serial: format!("cairn-{}", id.short()),
        poll,
    };
    let backend = BlkBackend::new(cfg, disks);

    // SIGINT/SIGTERM: make every completed write durable, report, exit.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let (json, on_exit_overlay, on_exit_store) = (ctx.json, overlay.clone(), store.clone());
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let code = match on_exit_overlay.flush() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: flushing the overlay on exit failed: {e}");
                    1
                }
            };
            let s = on_exit_store.stats();
            let stopped = Stopped {
                stopped: true,
                signal,
                remote_bytes: s.remote_bytes.load(Ordering::Relaxed),
                remote_gets: s.remote_gets.load(Ordering::Relaxed),
                chunks_fetched: s.chunks_fetched.load(Ordering::Relaxed),
                readahead_chunks: s.readahead_chunks.load(Ordering::Relaxed),
                overlay_syncs: {
                    let o = on_exit_overlay.syncs();
                    OverlaySyncs {
                        flush_log: o.wal,
                        data: o.data,
                        journal: o.journal,
                    }
                },
            };
            let _ = emit(json, &stopped, || {
                let o = &stopped.overlay_syncs;
                format!(
                    "stopped: overlay flushed ({} flush-log syncs, {} checkpoints); fetched {} bytes in {} GETs from the store\n",
                    o.flush_log, o.data, stopped.remote_bytes, stopped.remote_gets
                )
            });
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
    });

    let ready = Ready {
        ready: true,
        image: id.to_hex(),
        socket,
        overlay: overlay_dir,
        logical_bytes: manifest.logical_size,
        queues,
        read_only,
        overlay_blocks: overlay.dirty_count(),
    };
    serve_blk(socket, backend, || {
        let _ = emit(json, &ready, || {
            format!(
                "ready: serving {} ({} bytes) on {} with {} queue(s); overlay {}\n",
                image,
                ready.logical_bytes,
                socket.display(),
                queues,
                overlay_dir.display()
            )
        });
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving vhost-user-blk on {}", socket.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `cairn disk snapshot`: folds a stopped overlay into a new image.
pub fn snapshot(ctx: &Context, overlay_dir: &Path, name: &str) -> Result<ExitCode> {
    cairn_engine::catalog::check_name(name)?;
    let overlay = Overlay::open(overlay_dir).with_context(|| {
        format!(
            "opening overlay {} (is `cairn disk serve` still using it? stop it first)",
            overlay_dir.display()
        )
    })?;
    let (base_id, base) = load(ctx, &overlay.meta().base)?;
    let store = ctx.chunk_store()?;
    let opts = ImportOptions::new(ctx.staging_dir());
    let bar = bytes_bar(base.logical_size, ctx.json, "snapshotting");
    let started = Instant::now();
    let (_, report) = snapshot_overlay(&store, Arc::new(base), &overlay, &opts, &|d| {
        bar.set_position(d)
    })
    .with_context(|| format!("snapshotting overlay {}", overlay_dir.display()))?;
    bar.finish_and_clear();
    let made = Made::new("disk-snapshot", Some(overlay_dir.display().to_string()));
    name_and_report(
        ctx,
        &store,
        name,
        report,
        started,
        "snapshot",
        made,
        Some(base_id),
    )?;
    Ok(ExitCode::SUCCESS)
}
