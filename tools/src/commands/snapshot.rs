//! `cairn snapshot …`: the catalog's snapshot records.

use std::process::ExitCode;

use anyhow::Result;
use cairn_engine::catalog::{self, CatalogError, SnapshotRecord};
use serde::Serialize;

use crate::cli::SnapshotLsArgs;
use crate::context::Context;
use crate::output::emit;

#[derive(Serialize)]
struct Listed {
    snapshots: Vec<SnapshotRecord>,
    /// Pass as `--after` for the next page.
    next: Option<String>,
}

pub fn ls(ctx: &Context, args: &SnapshotLsArgs) -> Result<ExitCode> {
    let (limit, after) = (args.limit as usize, args.after.as_deref());
    let remote = ctx.remote.as_ref();
    let mut snapshots = Vec::new();
    let mut next = after.map(str::to_owned);
    // Pages of at most 1000 until `limit` or the end.
    loop {
        let want = (limit - snapshots.len()).min(cairn_engine::objstore::MAX_PAGE);
        let (ids, more) = ctx.rt.block_on(catalog::snapshot::list_page(
            remote,
            &ctx.project,
            next.as_deref(),
            want,
        ))?;
        for id in &ids {
            if let Some(s) = ctx
                .rt
                .block_on(catalog::snapshot::get(remote, &ctx.project, id))?
            {
                snapshots.push(s.record);
            }
        }
        next = more;
        if next.is_none() || snapshots.len() >= limit {
            break;
        }
    }
    let out = Listed { snapshots, next };
    emit(ctx.json, &out, || {
        let mut s = format!(
            "{:<32}  {:<10} {:<14} {:<26} {}\n",
            "ID", "STATE", "IMAGE", "CREATED", "URI / REASON"
        );
        for r in &out.snapshots {
            s += &format!(
                "{:<32}  {:<10} {:<14} {:<26} {}\n",
                r.id,
                r.state,
                r.image.map_or("-".to_owned(), |i| i.short()),
                r.created,
                r.uri.as_deref().or(r.reason.as_deref()).unwrap_or("-"),
            );
        }
        if let Some(n) = &out.next {
            s += &format!("(more: --after {n})\n");
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

fn not_found(ctx: &Context, id: &str) -> CatalogError {
    CatalogError::NoSuchSnapshot {
        id: id.to_owned(),
        project: ctx.project.clone(),
        store: ctx.remote.uri().to_owned(),
    }
}

pub fn describe(ctx: &Context, id: &str) -> Result<ExitCode> {
    let r = ctx
        .rt
        .block_on(catalog::snapshot::get(
            ctx.remote.as_ref(),
            &ctx.project,
            id,
        ))?
        .ok_or_else(|| not_found(ctx, id))?
        .record;
    emit(ctx.json, &r, || {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        format!(
            "snapshot {}\n  project   {}\n  state     {}{}\n  uri       {}\n  image     {}\n  parent    {}\n  sandbox   {}\n  disk      {}\n  memory    {}\n  vm state  {}\n  host      {}\n  created   {}\n  updated   {}\n",
            r.id,
            r.project,
            r.state,
            r.reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default(),
            opt(r.uri.clone()),
            opt(r.image.map(|i| i.to_hex())),
            opt(r.parent.clone()),
            opt(r.sandbox.clone()),
            opt(r.disk.map(|i| i.to_hex())),
            opt(r.memory.map(|i| i.to_hex())),
            opt(r.vm_state.clone()),
            r.host,
            r.created,
            r.updated,
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn rm(ctx: &Context, id: &str, force: bool) -> Result<ExitCode> {
    let r = ctx.rt.block_on(catalog::snapshot::remove(
        ctx.remote.as_ref(),
        &ctx.project,
        id,
        force,
        &ctx.host,
    ))?;
    emit(ctx.json, &r, || {
        format!(
            "removed snapshot {} ({}) from project {}; its data goes at the next garbage collection\n",
            r.id, r.state, r.project
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
