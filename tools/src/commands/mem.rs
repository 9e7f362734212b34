//! `cairn mem …`: memory snapshots.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cairn_engine::import::ImportOptions;
use cairn_engine::memory::{import_memory, MemLayout};
use cairn_vmm_glue::uffd::{
    self, DisplayChain, End, ResumeReport, ServeConfig, ServedSnapshot, Stop,
};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::image::{load, name_and_report};
use crate::cli::{MemImportArgs, MemServeArgs};
use crate::context::Context;
use crate::output::{bytes_bar, emit};
use cairn_engine::catalog::Made;
use indicatif::HumanBytes;

pub fn import(ctx: &Context, args: &MemImportArgs) -> Result<ExitCode> {
    let (file, name, page_size) = (args.file.as_path(), args.name.as_str(), args.page_size);
    cairn_engine::catalog::check_name(name)?;
    let len = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if len % page_size != 0 {
        bail!(
            "{} is {len} bytes, not a whole number of {page_size}-byte pages: is it a memory file?",
            file.display()
        );
    }
    ctx.rt
        .block_on(ctx.remote.prepare())
        .with_context(|| format!("preparing {} for writing", ctx.remote.uri()))?;
    let store = ctx.chunk_store()?;
    let mut layout = MemLayout::single(len, page_size as u32);
    let parent = match args.parent.as_deref() {
        Some(p) => {
            let (id, m) = load(ctx, p)?;
            layout.parent = Some(id);
            Some(Arc::new(m))
        }
        None => None,
    };
    let mut opts = ImportOptions::new(ctx.staging_dir());
    opts.chunk_size = args.chunk_size;
    let bar = bytes_bar(len, ctx.json, "importing memory");
    let started = Instant::now();
    let (_, report) = import_memory(&store, file, &layout, parent, &opts, &|d| {
        bar.set_position(d)
    })
    .with_context(|| format!("importing memory file {}", file.display()))?;
    bar.finish_and_clear();
    name_and_report(
        ctx,
        &store,
        name,
        report,
        started,
        "imported memory snapshot",
        Made::new("mem-import", Some(file.display().to_string())),
        layout.parent,
    )?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Ready<'a> {
    ready: bool,
    snapshot: String,
    socket: &'a Path,
    memory_bytes: u64,
    working_set_bytes: u64,
    /// Why a recorded working set is not used (missing or corrupt).
    working_set_error: Option<&'a str>,
    prefetch: bool,
    record: bool,
    fault_bytes: u64,
}

#[derive(Serialize)]
struct Resumed<'a> {
    resume: &'a ResumeReport,
}

pub fn serve(ctx: &Context, args: &MemServeArgs) -> Result<ExitCode> {
    let (snapshot, socket) = (args.snapshot.as_str(), args.socket.as_path());
    let (id, _) = load(ctx, snapshot)?;
    let store = ctx.chunk_store()?;
    let served = ServedSnapshot::open(&store, id)
        .map_err(|e| anyhow::anyhow!("{}", DisplayChain(&e)))
        .with_context(|| format!("opening memory snapshot {snapshot}"))?;
    let fault_bytes = match (args.fault_size, args.record) {
        (Some(bytes), _) => bytes,
        // Recording wants every first touch, in order: one page a fault.
        (None, true) => 4096,
        (None, false) => uffd::DEFAULT_FAULT_BYTES,
    };
    let cfg = ServeConfig {
        fault_bytes,
        prefetch: !args.no_prefetch && !args.record,
        prefetch_rate: args.prefetch_rate,
        prefetch_workers: usize::from(args.prefetch_workers),
        record: args.record.then(|| ImportOptions::new(ctx.staging_dir())),
        kill_vmm: !args.no_kill_vmm,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        ..ServeConfig::default()
    };
    // SIGINT/SIGTERM: end the resume under way (with its report), exit.
    let stop = Stop::new().context("creating the stop signal")?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let on_signal = stop.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            on_signal.request();
        }
    });
    let ready = Ready {
        ready: true,
        snapshot: id.to_hex(),
        socket,
        memory_bytes: served.image.size(),
        working_set_bytes: served.working_set.as_ref().map_or(0, |w| w.set.bytes()),
        working_set_error: served.working_set_error.as_deref(),
        prefetch: cfg.prefetch,
        record: args.record,
        fault_bytes,
    };
    let json = ctx.json;
    let mut failed = false;
    uffd::serve(
        socket,
        &served,
        &cfg,
        &stop,
        || {
            let _ = emit(json, &ready, || {
                format!(
                    "ready: serving memory snapshot {snapshot} ({}, working set {}) on {}\n",
                    HumanBytes(ready.memory_bytes),
                    HumanBytes(ready.working_set_bytes),
                    socket.display()
                )
            });
        },
        |outcome| {
            match outcome {
                Ok(r) => {
                    let _ = emit(json, &Resumed { resume: &r }, || resume_text(&r));
                }
                Err(e) => {
                    eprintln!("error: resume of {snapshot} failed: {}", DisplayChain(&e));
                    failed = true;
                }
            }
            !args.once
        },
    )
    .with_context(|| format!("serving on {}", socket.display()))?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn resume_text(r: &ResumeReport) -> String {
    let mut s = format!(
        "resume of {} by pid {}: {} regions, {:.2} s, ended: {}\n  handshake       {:.0} us; first fault answered {} after it\n  faults          {} (p50 {:.1} us, p99 {:.1} us, max {:.1} us), {} installed on demand\n",
        &r.snapshot[..12],
        r.vmm_pid.map_or("?".into(), |p| p.to_string()),
        r.regions.len(),
        r.seconds,
        match r.end {
            Some(End::VmmExited) => "the VMM exited",
            Some(End::AddressSpaceGone) => "the VMM's memory is gone",
            Some(End::Stopped) => "stopped",
            None => "?",
        },
        r.handshake_us,
        r.first_fault_us.map_or("never".into(), |u| format!("{u:.0} us")),
        r.faults,
        r.fault_p50_us,
        r.fault_p99_us,
        r.fault_max_us,
        HumanBytes(r.fault_bytes),
    );
    if r.working_set_bytes > 0 {
        s += &format!(
            "  prefetch        {} of a {} working set{}\n",
            HumanBytes(r.prefetch_bytes),
            HumanBytes(r.working_set_bytes),
            r.prefetch_ms.map_or(String::new(), |ms| format!(
                ", done {ms:.0} ms after the handshake"
            ))
        );
    }
    if let Some(why) = &r.prefetch_stopped {
        s += &format!("  prefetch stopped early: {why}\n");
    }
    if let Some(why) = &r.working_set_error {
        s += &format!("  working set not used: {why}\n");
    }
    s += &format!(
        "  zero bytes      {}; races {}; faults left to the prefetch {}; busy retries {}; removed pages {}\n  from the store  {}\n",
        HumanBytes(r.zero_bytes),
        r.already_present,
        r.faults_waited_for_prefetch,
        r.retried_busy,
        r.removed_pages,
        HumanBytes(r.remote_bytes)
    );
    if let (Some(runs), Some(bytes)) = (r.recorded_runs, r.recorded_bytes) {
        s += &format!(
            "  recorded        {} in {runs} runs as the working set\n",
            HumanBytes(bytes)
        );
    }
    s
}
