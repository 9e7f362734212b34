//! `cairn image import REF`: OCI images into bootable cairn images.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context as _, Result};
use cairn_engine::catalog::{self, image::NewImage, Made};
use cairn_engine::import::ImportOptions;
use cairn_engine::oci::image::{ImageMeta, LayerRecord};
use cairn_engine::oci::layer::Limits;
use cairn_engine::oci::source::Platform;
use cairn_engine::oci::{OciOptions, OciProgress};
use cairn_engine::ManifestId;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::{BuildArgs, ImportArgs};
use crate::context::Context;
use crate::output::emit;
use indicatif::HumanBytes;

/// Names image `id` in the context's project; with `replace`, a private
/// name that names another image moves to this one.
fn name_image(ctx: &Context, name: &str, id: &str, made: Made, replace: bool) -> Result<()> {
    let id: ManifestId = id.parse()?;
    let new = NewImage {
        project: ctx.project.clone(),
        name: name.to_owned(),
        id,
        public: false,
        parent: None,
        made,
    };
    let remote = ctx.remote.as_ref();
    ctx.rt.block_on(async {
        if replace {
            catalog::image::create_or_move(remote, new).await
        } else {
            catalog::image::create(remote, new).await
        }
    })?;
    Ok(())
}

/// What `--json` prints.
#[derive(Serialize)]
struct Imported<'a> {
    id: String,
    name: &'a str,
    digest: &'a str,
    logical_bytes: u64,
    stored_bytes: u64,
    new_bytes: u64,
    new_chunks: u64,
    disk_used_bytes: u64,
    layers: &'a [LayerRecord],
    seconds: f64,
}

/// Bars on a terminal: one per layer, then the disk.
struct Bars {
    multi: MultiProgress,
    layers: Mutex<Vec<ProgressBar>>,
    disk: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new(json: bool) -> Bars {
        let target = if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            layers: Mutex::new(Vec::new()),
            disk: Mutex::new(None),
        }
    }

    fn bar(&self, len: Option<u64>, msg: String) -> ProgressBar {
        let b = self.multi.add(ProgressBar::new(len.unwrap_or(0)));
        b.set_style(
            ProgressStyle::with_template(
                "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message(msg);
        b
    }

    fn update(&self, p: OciProgress) {
        let mut layers = self.layers.lock().expect("progress lock");
        match p {
            OciProgress::Resolved { layers: ls } => {
                for (i, (name, size)) in ls.iter().enumerate() {
                    let short: String = name.chars().take(19).collect();
                    layers.push(self.bar(*size, format!("layer {}/{} {short}", i + 1, ls.len())));
                }
            }
            OciProgress::Layer { number, done } => {
                if let Some(b) = layers.get(number - 1) {
                    b.set_position(done);
                }
            }
            OciProgress::LayerDone { number, .. } => {
                if let Some(b) = layers.get(number - 1) {
                    b.finish();
                }
            }
            OciProgress::Disk { done, total } => {
                let mut disk = self.disk.lock().expect("progress lock");
                disk.get_or_insert_with(|| self.bar(Some(total), "root disk".into()))
                    .set_position(done);
            }
        }
    }

    fn clear(&self) {
        let _ = self.multi.clear();
    }
}

pub fn import(ctx: &Context, args: &ImportArgs) -> Result<ExitCode> {
    let reference = args.reference.as_str();
    if let Some(n) = &args.name {
        catalog::check_name(n)?;
    }
    let disk_size = args.disk_size;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    ctx.rt
        .block_on(ctx.remote.prepare())
        .with_context(|| format!("preparing {} for writing", ctx.remote.uri()))?;
    let store = ctx.chunk_store()?;
    let mut import = ImportOptions::new(ctx.staging_dir());
    import.chunk_size = args.chunk_size;
    let opts = OciOptions {
        platform,
        disk_size,
        insecure: args.insecure,
        docker_config: None,
        limits: Limits::default(),
        import,
        runtime: ctx.rt.handle().clone(),
    };
    let started = Instant::now();
    let bars = Bars::new(ctx.json);
    let result = cairn_engine::oci::import(&store, reference, &opts, &|p| bars.update(p));
    bars.clear();
    let imp = result.with_context(|| format!("importing {reference}"))?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            let n = imp.default_name.clone().unwrap_or_default();
            catalog::check_name(&n)
                .with_context(|| format!("no image name follows from {reference}: pass --name"))?;
            n
        }
    };
    name_image(
        ctx,
        &name,
        &imp.report.id,
        Made::new("oci-import", Some(reference.to_owned())),
        args.replace,
    )?;
    let out = Imported {
        id: imp.report.id.clone(),
        name: &name,
        digest: &imp.digest,
        logical_bytes: imp.report.logical_bytes,
        stored_bytes: imp.report.stored_bytes,
        new_bytes: imp.report.new_bytes,
        new_chunks: imp.report.new_chunks,
        disk_used_bytes: imp.disk.used_bytes,
        layers: &imp.meta.source.layers,
        seconds: started.elapsed().as_secs_f64(),
    };
    emit(ctx.json, &out, || {
        format!(
            "imported {reference} as {name}\n  id             {}\n  digest         {}\n  layers         {}\n  disk           {} ({} used)\n  stored bytes   {}\n  new bytes      {}\n  took           {:.2} s\n",
            out.id,
            out.digest,
            out.layers.len(),
            HumanBytes(out.logical_bytes),
            HumanBytes(out.disk_used_bytes),
            HumanBytes(out.stored_bytes),
            HumanBytes(out.new_bytes),
            out.seconds
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct BuiltOut<'a> {
    id: &'a str,
    name: &'a str,
    steps: usize,
    steps_run: usize,
    cached: bool,
    new_bytes: u64,
    notes: &'a [String],
    seconds: f64,
}

pub fn build(ctx: &Context, args: &BuildArgs) -> Result<ExitCode> {
    use std::path::{Path, PathBuf};
    let (context, dockerfile) = match (&args.dir, &args.file) {
        (Some(d), Some(f)) => (d.clone(), f.clone()),
        (Some(d), None) => (d.clone(), d.join("Dockerfile")),
        (None, Some(f)) => (
            f.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            f.clone(),
        ),
        (None, None) => (PathBuf::from("."), PathBuf::from("Dockerfile")),
    };
    let context = context
        .canonicalize()
        .with_context(|| format!("the build context {}", context.display()))?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => context
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    catalog::check_name(&name).with_context(|| {
        format!(
            "no image name follows from {}: pass --name",
            context.display()
        )
    })?;
    let mut build_args = std::collections::BTreeMap::new();
    for kv in &args.build_args {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--build-arg {kv}: expected K=V"))?;
        build_args.insert(k.to_owned(), v.to_owned());
    }
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    ctx.rt
        .block_on(ctx.remote.prepare())
        .with_context(|| format!("preparing {} for writing", ctx.remote.uri()))?;
    let store = ctx.chunk_store()?;
    let staging = ctx.staging_dir();
    std::fs::create_dir_all(&staging)?;
    let resolv = staging.join("resolv.conf");
    let have_resolv = std::fs::copy("/etc/resolv.conf", &resolv).is_ok();
    let sandbox = cairn_engine::oci::build::sandbox::Bubblewrap {
        resolv_conf: have_resolv.then_some(resolv),
    };
    let made = Made::new("oci-build", Some(context.display().to_string()));
    let req = cairn_engine::oci::build::BuildRequest {
        dockerfile,
        context,
        build_args,
        cache: ctx.cache_dir.clone(),
        oci: OciOptions {
            platform,
            disk_size: None,
            insecure: args.insecure,
            docker_config: None,
            limits: Limits::default(),
            import: ImportOptions::new(staging),
            runtime: ctx.rt.handle().clone(),
        },
        sandbox: &sandbox,
        project: &ctx.project,
    };
    let started = Instant::now();
    let json = ctx.json;
    let built = cairn_engine::oci::build::build(&store, &req, &|step| {
        if !json {
            eprintln!("==> {step}");
        }
    })
    .context("building")?;
    name_image(ctx, &name, &built.manifest_id, made, args.replace)?;
    let out = BuiltOut {
        id: &built.manifest_id,
        name: &name,
        steps: built.steps,
        steps_run: built.steps_run,
        cached: built.report.is_none(),
        new_bytes: built.report.as_ref().map_or(0, |r| r.new_bytes),
        notes: &built.notes,
        seconds: started.elapsed().as_secs_f64(),
    };
    emit(ctx.json, &out, || {
        let mut s = String::new();
        for n in out.notes {
            s += &format!("note: {n}\n");
        }
        s + &format!(
            "built {name}\n  id             {}\n  steps          {} ({} run, the rest from the cache)\n  new bytes      {}\n  took           {:.2} s\n",
            out.id,
            out.steps,
            out.steps_run,
            HumanBytes(out.new_bytes),
            out.seconds
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `describe`'s lines for an image's OCI config and source.
pub fn describe_lines(meta: &ImageMeta) -> String {
    let c = &meta.config;
    let list = |v: &Option<Vec<String>>| {
        v.as_ref().map_or_else(String::new, |v| {
            serde_json::to_string(v).unwrap_or_default()
        })
    };
    let mut s = String::new();
    s += &format!("  source          {}\n", meta.source.reference);
    if let Some(d) = &meta.source.manifest_digest {
        s += &format!("  digest          {d}\n");
    }
    s += &format!("  config digest   {}\n", meta.source.config_digest);
    s += &format!("  platform        {}\n", meta.source.platform);
    for l in &meta.source.layers {
        s += &format!("  layer           {} ({})\n", l.digest, HumanBytes(l.size));
    }
    s += &format!("  entrypoint      {}\n", list(&c.entrypoint));
    s += &format!("  cmd             {}\n", list(&c.cmd));
    s += &format!("  env             {}\n", list(&c.env));
    s += &format!(
        "  workdir         {}\n",
        c.working_dir.as_deref().unwrap_or("")
    );
    s += &format!("  user            {}\n", c.user.as_deref().unwrap_or(""));
    if let Some(labels) = &c.labels {
        for (k, v) in labels {
            s += &format!("  label           {k}={v}\n");
        }
    }
    if meta.dockerfile.is_some() {
        s += "  dockerfile      stored (see --json)\n";
    }
    s
}
