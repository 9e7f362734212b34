//! `cairn image …`

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result};
use cairn_engine::catalog::{self, image::NewImage, ImageRecord, Made};
use cairn_engine::export::export_raw;
use cairn_engine::import::{import_raw as engine_import, ImportOptions};
use cairn_engine::manifest::{Manifest, ManifestKind};
use cairn_engine::ManifestId;
use serde::Serialize;

use crate::cli::{ImportRawArgs, RegisterArgs};
use crate::context::Context;
use crate::output::{bytes_bar, emit};
use indicatif::HumanBytes;

#[derive(Serialize)]
struct Imported {
    name: String,
    #[serde(flatten)]
    report: cairn_engine::import::ImportReport,
    seconds: f64,
    throughput_mib_s: f64,
}

/// Names the new image in the project and prints what `verb` did.
#[allow(clippy::too_many_arguments)]
pub(crate) fn name_and_report(
    ctx: &Context,
    store: &cairn_engine::chunkstore::ChunkStore,
    name: &str,
    report: cairn_engine::import::ImportReport,
    started: Instant,
    verb: &str,
    made: Made,
    parent: Option<ManifestId>,
) -> Result<()> {
    let id: ManifestId = report.id.parse()?;
    // Fault injector for the garbage-collection tests: the window between
    // storing the manifest and naming it, when nothing references it.
    crate::faults::pause_for_tests("CAIRN_FAULT_PAUSE_BEFORE_NAMING_MS");
    let new = NewImage {
        project: ctx.project.clone(),
        name: name.to_owned(),
        id,
        public: false,
        parent,
        made,
    };
    ctx.rt
        .block_on(catalog::image::create(store.remote().as_ref(), new))?;
    let seconds = started.elapsed().as_secs_f64();
    let out = Imported {
        name: name.to_owned(),
        throughput_mib_s: report.logical_bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        report,
        seconds,
    };
    emit(ctx.json, &out, || {
        let r = &out.report;
        format!(
            "{verb} {name}\n  id             {}\n  logical size   {} ({} bytes)\n  stored bytes   {}\n  new bytes      {}\n  chunks         {} of {} ({} zero, {} distinct, {} new)\n  dedup ratio    {:.2}\n  took           {:.2} s ({:.0} MiB/s)\n",
            r.id,
            HumanBytes(r.logical_bytes),
            r.logical_bytes,
            HumanBytes(r.stored_bytes),
            HumanBytes(r.new_bytes),
            r.chunks,
            HumanBytes(u64::from(r.chunk_size)),
            r.zero_chunks,
            r.distinct_chunks,
            r.new_chunks,
            r.dedup_ratio,
            out.seconds,
            out.throughput_mib_s,
        )
    })
}

pub fn import_raw(ctx: &Context, args: &ImportRawArgs) -> Result<ExitCode> {
    let (file, name) = (args.file.as_path(), args.name.as_str());
    catalog::check_name(name)?;
    let len = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    ctx.rt
        .block_on(ctx.remote.prepare())
        .with_context(|| format!("preparing {} for writing", ctx.remote.uri()))?;
    let store = ctx.chunk_store()?;
    let mut opts = ImportOptions::new(ctx.staging_dir());
    opts.chunk_size = args.chunk_size;
    opts.zstd_level = args.zstd_level;
    let bar = bytes_bar(len, ctx.json, "importing");
    let started = Instant::now();
    let (_, report) = engine_import(&store, file, &opts, &|done| bar.set_position(done))
        .with_context(|| format!("importing {} into {}", file.display(), store.remote().uri()))?;
    bar.finish_and_clear();
    let made = Made::new("import-raw", Some(file.display().to_string()));
    name_and_report(ctx, &store, name, report, started, "imported", made, None)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn load(ctx: &Context, image: &str) -> Result<(ManifestId, Manifest)> {
    let remote = ctx.remote.as_ref();
    let id = ctx
        .rt
        .block_on(catalog::resolve(remote, &ctx.project, image))?;
    let manifest = ctx.rt.block_on(catalog::load_manifest(remote, &id))?;
    Ok((id, manifest))
}

#[derive(Serialize)]
struct Exported {
    id: String,
    file: String,
    logical_bytes: u64,
    seconds: f64,
}

pub fn export(ctx: &Context, image: &str, file: &Path) -> Result<ExitCode> {
    let (id, manifest) = load(ctx, image)?;
    let store = ctx.chunk_store()?;
    let bar = bytes_bar(manifest.logical_size, ctx.json, "exporting");
    let started = Instant::now();
    export_raw(&store, &manifest, file, &|done| bar.set_position(done))
        .with_context(|| format!("exporting {image} to {}", file.display()))?;
    bar.finish_and_clear();
    let out = Exported {
        id: id.to_hex(),
        file: file.display().to_string(),
        logical_bytes: manifest.logical_size,
        seconds: started.elapsed().as_secs_f64(),
    };
    emit(ctx.json, &out, || {
        format!(
            "exported {image} ({}) to {} in {:.2} s\n",
            HumanBytes(out.logical_bytes),
            out.file,
            out.seconds
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Listed {
    name: String,
    #[serde(flatten)]
    record: Option<ImageRecord>,
    error: Option<String>,
}

pub fn ls(ctx: &Context) -> Result<ExitCode> {
    let remote = ctx.remote.as_ref();
    let rows: Vec<Listed> = ctx
        .rt
        .block_on(catalog::image::list(remote, &ctx.project))?
        .into_iter()
        .map(|(name, r)| match r {
            Ok(record) => Listed {
                name,
                record: Some(record),
                error: None,
            },
            Err(e) => Listed {
                name,
                record: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    emit(ctx.json, &rows, || {
        let mut s = format!(
            "{:<28} {:<14} {:>10} {:>10} {:<14} {:<14} {:<10}\n",
            "NAME", "ID", "SIZE", "UNIQUE", "PARENT", "MADE BY", "PROJECT"
        );
        for r in &rows {
            s += &match (&r.record, &r.error) {
                (Some(i), _) => format!(
                    "{:<28} {:<14} {:>10} {:>10} {:<14} {:<14} {:<10}\n",
                    r.name,
                    i.id.short(),
                    HumanBytes(i.size),
                    HumanBytes(i.unique_bytes),
                    i.parent.map_or("-".to_owned(), |p| p.short()),
                    i.made.how,
                    if i.public {
                        format!("{} (public)", i.project)
                    } else {
                        i.project.clone()
                    },
                ),
                (None, e) => format!("{:<28} {}\n", r.name, e.as_deref().unwrap_or("?")),
            };
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Described {
    id: String,
    /// The name's record, when described by name.
    record: Option<ImageRecord>,
    kind: &'static str,
    logical_bytes: u64,
    chunk_size: u32,
    chunks: usize,
    zero_chunks: usize,
    distinct_chunks: usize,
    stored_bytes: u64,
    missing_chunks: usize,
    /// An OCI image's config and source (`cairn image import`, `build`).
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<cairn_engine::oci::image::ImageMeta>,
}

pub fn describe(ctx: &Context, image: &str) -> Result<ExitCode> {
    let remote = ctx.remote.as_ref();
    let resolved = ctx
        .rt
        .block_on(catalog::image::resolve(remote, &ctx.project, image))?;
    let id = resolved.id;
    let record = match resolved.record {
        Some(r) => Some(r),
        None => ctx
            .rt
            .block_on(catalog::image::named(remote, &ctx.project, &id))?,
    };
    let m = ctx.rt.block_on(catalog::load_manifest(remote, &id))?;
    let store = ctx.chunk_store()?;
    let distinct = m.distinct_chunks();
    let (stored, missing) = store.with_pack_map(|map| {
        distinct
            .iter()
            .fold((0u64, 0usize), |(s, miss), c| match map.locate(c) {
                Some(l) => (s + u64::from(l.entry.frame_len), miss),
                None => (s, miss + 1),
            })
    });
    let oci = match cairn_engine::oci::image::ImageMeta::decode(&m.meta) {
        Some(meta) if m.kind == ManifestKind::Disk => Some(meta.map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let out = Described {
        image: oci,
        id: id.to_hex(),
        record,
        kind: match m.kind {
            ManifestKind::Disk => "disk",
            ManifestKind::Memory => "memory",
        },
        logical_bytes: m.logical_size,
        chunk_size: m.chunk_size,
        chunks: m.chunks.len(),
        zero_chunks: m.zero_chunks(),
        distinct_chunks: distinct.len(),
        stored_bytes: stored,
        missing_chunks: missing,
    };
    emit(ctx.json, &out, || {
        let mut s = format!("image {image}\n  id              {}\n", out.id);
        if let Some(r) = &out.record {
            s += &format!(
                "  name            {}\n  project         {}{}\n  unique bytes    {} ({} bytes)\n  parent          {}\n  made by         {}{}\n  created         {}\n",
                r.name,
                r.project,
                if r.public { " (public)" } else { "" },
                HumanBytes(r.unique_bytes),
                r.unique_bytes,
                r.parent.map_or("-".to_owned(), |p| p.to_hex()),
                r.made.how,
                r.made.from.as_deref().map(|f| format!(" from {f}")).unwrap_or_default(),
                if r.created.is_empty() { "-" } else { &r.created },
            );
            if let Some(d) = &r.made.dockerfile {
                s += &format!("  dockerfile      {} lines\n", d.lines().count());
            }
        }
        s += &format!(
            "  kind            {}\n  logical size    {} ({} bytes)\n  chunk size      {}\n  chunks          {} ({} zero, {} distinct)\n  stored bytes    {}\n  missing chunks  {}\n",
            out.kind,
            HumanBytes(out.logical_bytes),
            out.logical_bytes,
            HumanBytes(u64::from(out.chunk_size)),
            out.chunks,
            out.zero_chunks,
            out.distinct_chunks,
            HumanBytes(out.stored_bytes),
            out.missing_chunks
        );
        s + &out
            .image
            .as_ref()
            .map(super::oci::describe_lines)
            .unwrap_or_default()
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn rm(ctx: &Context, name: &str) -> Result<ExitCode> {
    let removed = ctx.rt.block_on(catalog::image::remove(
        ctx.remote.as_ref(),
        &ctx.project,
        name,
        &ctx.host,
    ))?;
    emit(ctx.json, &removed, || {
        format!(
            "removed image name {name} from project {} (image {}; its data goes at the next garbage collection)\n",
            removed.project,
            removed.id.short()
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The most of a Dockerfile kept with an image's record.
const MAX_DOCKERFILE: u64 = 16 << 10;

pub fn register(ctx: &Context, args: &RegisterArgs) -> Result<ExitCode> {
    let (uri, name, public) = (args.snapshot_uri.as_str(), args.name.as_str(), args.public);
    let dockerfile = match args.dockerfile.as_deref() {
        Some(p) => {
            let len = std::fs::metadata(p)
                .with_context(|| format!("cannot read --dockerfile {}", p.display()))?
                .len();
            if len > MAX_DOCKERFILE {
                anyhow::bail!(
                    "--dockerfile {} is {len} bytes; at most {MAX_DOCKERFILE} are kept with an image",
                    p.display()
                );
            }
            Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("--dockerfile {} is not UTF-8 text", p.display()))?,
            )
        }
        None => None,
    };
    let rec = ctx.rt.block_on(catalog::snapshot::register(
        ctx.remote.as_ref(),
        &ctx.project,
        uri,
        name,
        public,
        dockerfile,
    ))?;
    emit(ctx.json, &rec, || {
        format!(
            "registered {uri} as image {name} in project {}{} (image {}, {}, {} unique)\n",
            rec.project,
            if rec.public { ", public" } else { "" },
            rec.id.short(),
            HumanBytes(rec.size),
            HumanBytes(rec.unique_bytes)
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
