//! `cairn gc [--dry-run] [--grace D] [--rewrite-below S]`

use std::process::ExitCode;

use anyhow::Result;
use cairn_engine::gc::{self, GcOptions};
use indicatif::HumanBytes;

use crate::cli::GcArgs;
use crate::context::Context;
use crate::output::{emit, spinner};

pub fn gc(ctx: &Context, args: &GcArgs) -> Result<ExitCode> {
    let mut opts = GcOptions::new(
        ctx.host.clone(),
        ctx.cache_dir.join("staging-gc"),
        ctx.cache_dir.join("indexes"),
    );
    opts.grace = args.grace;
    opts.rewrite_below = args.rewrite_below;
    opts.dry_run = args.dry_run;
    opts.forget_hosts = args.forget_host.clone();
    opts.host_timeout = args.host_timeout;
    let bar = spinner(ctx.json, "collecting garbage");
    let report = ctx
        .rt
        .block_on(gc::run(ctx.remote.as_ref(), &opts, &|phase| {
            bar.set_message(phase.to_owned())
        }))?;
    bar.finish_and_clear();
    emit(ctx.json, &report, || {
        let r = &report;
        let would = if r.dry_run { "would be " } else { "" };
        let mut s = format!(
            "marked {} roots: {} manifests, {} chunks live; {} packs hold {} ({} of it live)\n",
            r.roots,
            r.live_manifests,
            r.live_chunks,
            r.packs,
            HumanBytes(r.pack_bytes),
            HumanBytes(r.live_bytes),
        );
        s += &format!(
            "{would}deleted: {} objects ({} packs), {} reclaimed\n",
            r.deleted,
            r.deleted_packs,
            HumanBytes(r.reclaimed_bytes)
        );
        s += &format!(
            "{would}condemned: {} objects, {} (deleted by a run at least {} from now)\n",
            r.condemned,
            HumanBytes(r.condemned_bytes),
            humantime::format_duration(std::time::Duration::from_secs(r.grace_secs))
        );
        if r.packs_rewritten > 0 {
            s += &format!(
                "{would}rewritten: {} sparse packs, {} of live frames copied\n",
                r.packs_rewritten,
                HumanBytes(r.bytes_copied)
            );
        }
        if r.waiting > 0 {
            s += &format!(
                "waiting out the grace period: {} objects, {}\n",
                r.waiting,
                HumanBytes(r.waiting_bytes)
            );
        }
        if r.uncondemned > 0 {
            s += &format!("referenced again, no longer condemned: {}\n", r.uncondemned);
        }
        for h in &r.forgotten_hosts {
            s += &format!("{would}forgotten: the roots of host {h}\n");
        }
        let now = cairn_engine::gc::state::now_secs();
        for h in &r.hosts {
            let age = now.saturating_sub(h.published);
            if age >= args.host_timeout.as_secs() {
                let when = if h.published == 0 {
                    "at an unknown time (an older build)".to_owned()
                } else {
                    format!(
                        "{} ago",
                        humantime::format_duration(std::time::Duration::from_secs(age))
                    )
                };
                s += &format!(
                    "host {} last published its roots {when} ({} manifests): if it is gone for good, `cairn gc --forget-host {}`\n",
                    h.host, h.manifests, h.host
                );
            }
        }
        if r.missing_manifests + r.missing_chunks > 0 {
            s += &format!(
                "warning: {} manifests and {} chunks that roots need are not in the store: run `cairn verify`\n",
                r.missing_manifests, r.missing_chunks
            );
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}
