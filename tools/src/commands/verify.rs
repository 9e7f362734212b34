//! `cairn verify [--deep]`

use std::process::ExitCode;

use anyhow::Result;

use crate::context::Context;
use crate::output::{emit, spinner};

pub fn verify(ctx: &Context, deep: bool) -> Result<ExitCode> {
    let bar = spinner(
        ctx.json,
        if deep {
            "verifying (deep)"
        } else {
            "verifying"
        },
    );
    let report = ctx.rt.block_on(cairn_engine::verify::verify(
        ctx.remote.as_ref(),
        deep,
        &ctx.cache_dir,
        &|what| bar.set_message(what.to_owned()),
    ))?;
    bar.finish_and_clear();
    emit(ctx.json, &report, || {
        let mut s = format!(
            "{} packs, {} manifests, {} images, {} chunk references checked",
            report.packs, report.manifests, report.images, report.chunk_refs_checked
        );
        if deep {
            s += &format!(
                ", {} chunks re-hashed ({} bytes read)",
                report.chunks_rehashed, report.bytes_read
            );
        }
        s += "\n";
        if report.problems.is_empty() {
            s += "ok: no problems found\n";
        } else {
            s += &format!("{} problems:\n", report.problems.len());
            for p in &report.problems {
                s += &format!("  {}: {}\n", p.object, p.what);
            }
        }
        s
    })?;
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_PROBLEMS)
    })
}
