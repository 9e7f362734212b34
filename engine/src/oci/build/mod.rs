//! `cairn image build`: a Dockerfile into a cairn image.
//!
//! Every step that changes files produces an OCI layer (a tar) kept in a
//! local build cache, content-addressed, and the image is those layers
//! imported like any OCI image (so a rebuild that changes only its last
//! step shares every block of the earlier layers). Each step is cached by
//! (parent step, instruction with its variables substituted, build args,
//! hash of the files it copies): a rebuild with nothing changed runs
//! nothing, and a changed step reruns only itself and what follows. RUN
//! steps execute in a [`sandbox::Sandbox`] over the build's root file
//! system written to the host ([`rootfs`]), and what they changed is read
//! back as the step's layer.
//!
//! Cache layout (`<cache>/build/`): `blobs/<sha256>` layer tars,
//! `steps/<key>.json` a step's layer (or none), `images/<key>` the
//! manifest id of a finished image.

mod context;
pub mod dockerfile;
mod rootfs;
pub mod sandbox;
mod user;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::digest::{Digest, Verify};
use super::error::OciError;
use super::image::{ConfigFile, ImageMeta, LayerRecord, RunConfig, SourceRecord, FORMAT};
use super::import::{build_disk, import_layers, Staged};
use super::layer::{self, Compression, LayerInput, Spool, Totals};
use super::reference::ImageRef;
use super::{source, OciOptions, OciProgress};
use crate::chunkstore::ChunkStore;
use crate::import::ImportReport;
use crate::manifest::Manifest;
use dockerfile::substitute;
use sandbox::{Run, Sandbox};

/// What `cairn image build` was asked to do.
pub struct BuildRequest<'a> {
    pub dockerfile: PathBuf,
    pub context: PathBuf,
    pub build_args: BTreeMap<String, String>,
    /// The build cache's directory.
    pub cache: PathBuf,
    pub oci: OciOptions,
    pub sandbox: &'a dyn Sandbox,
    /// The catalog project whose image names FROM resolves.
    pub project: &'a str,
}

/// What a build did.
#[derive(Debug)]
pub struct Built {
    pub manifest_id: String,
    /// `None` when the finished image came from the cache.
    pub report: Option<ImportReport>,
    pub manifest: Option<Manifest>,
    pub steps: usize,
    /// Steps that ran (not answered by the cache).
    pub steps_run: usize,
    pub notes: Vec<String>,
}

/// A layer in the build cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct CachedLayer {
    /// The blob's sha256 (its file name in `blobs/`).
    blob: String,
    media_type: String,
    diff_id: String,
    size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepRecord {
    layer: Option<CachedLayer>,
}

/// A stage as it goes.
#[derive(Clone)]
struct Stage {
    name: Option<String>,
    layers: Vec<CachedLayer>,
    config: RunConfig,
    key: String,
    /// ARG and ENV values for substitution.
    vars: BTreeMap<String, String>,
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

struct Cache {
    dir: PathBuf,
}

impl Cache {
    fn path(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    fn blob(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join(hex)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, sub: &str) -> Option<T> {
        let bytes = std::fs::read(self.path(sub)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, sub: &str, bytes: &[u8]) -> Result<(), OciError> {
        let p = self.path(sub);
        let dir = p.parent().expect("cache paths have parents");
        std::fs::create_dir_all(dir).map_err(|e| OciError::io("cannot create", dir, e))?;
        let tmp = p.with_extension(format!("tmp{:08x}", fastrand::u32(..)));
        std::fs::write(&tmp, bytes).map_err(|e| OciError::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| OciError::io("cannot write", &p, e))
    }

    /// A layer tar written at `tmp`: hashed and moved into `blobs/`.
    fn adopt(&self, tmp: &Path) -> Result<CachedLayer, OciError> {
        let f = File::open(tmp).map_err(|e| OciError::io("cannot read", tmp, e))?;
        let (d, size) = Verify::new(f, u64::MAX)
            .finish()
            .map_err(|e| OciError::io("cannot read", tmp, e))?;
        let dest = self.blob(d.hex());
        std::fs::rename(tmp, &dest).map_err(|e| OciError::io("cannot write", &dest, e))?;
        Ok(CachedLayer {
            blob: d.hex().to_owned(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            diff_id: d.to_string(),
            size,
        })
    }

    fn temp(&self) -> Result<(PathBuf, File), OciError> {
        let dir = self.dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(|e| OciError::io("cannot create", &dir, e))?;
        let p = dir.join(format!("tmp-{:016x}", fastrand::u64(..)));
        let f = File::create(&p).map_err(|e| OciError::io("cannot create", &p, e))?;
        Ok((p, f))
    }
}

fn inputs<'a>(
    cache: &'a Cache,
    layers: &'a [CachedLayer],
) -> impl Iterator<Item = Result<LayerInput<'static>, OciError>> + 'a {
    layers.iter().enumerate().map(move |(i, l)| {
        let p = cache.blob(&l.blob);
        let f = File::open(&p).map_err(|e| OciError::io("cannot open cached layer", &p, e))?;
        Ok(LayerInput {
            number: i as u16 + 1,
            name: format!("sha256:{}", l.blob),
            digest: Some(format!("sha256:{}", l.blob).parse()?),
            size: Some(l.size),
            compression: Compression::of_media_type(&l.media_type)?,
            diff_id: Some(l.diff_id.parse()?),
            blob: Box::new(f),
        })
    })
}

/// Pulls `reference`'s layers into the cache; the base stage.
fn pull_base(
    cache: &Cache,
    reference: &str,
    opts: &OciOptions,
) -> Result<(Vec<CachedLayer>, RunConfig, String), OciError> {
    let r = ImageRef::parse(reference)?;
    let mut src = source::open(&r, opts)?;
    let resolved = src.resolve(&opts.platform)?;
    let cfg: ConfigFile = serde_json::from_slice(&resolved.config)
        .map_err(|e| OciError::Invalid(format!("the config of {reference} does not parse: {e}")))?;
    let diff_ids = cfg.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != resolved.layers.len() {
        return Err(OciError::Invalid(format!(
            "{reference}: config and manifest disagree on the layers"
        )));
    }
    let mut layers = Vec::new();
    for (l, diff_id) in resolved.layers.iter().zip(diff_ids) {
        let diff_id: Digest = diff_id.parse()?;
        // Archives name no blob digest: their layers are the uncompressed tars.
        let want = l.digest.clone().unwrap_or_else(|| diff_id.clone());
        let dest = cache.blob(want.hex());
        if !dest.exists() {
            let (tmp, mut f) = cache.temp()?;
            let mut v = Verify::new(src.open(l)?, l.size.unwrap_or(u64::MAX));
            std::io::copy(&mut v, &mut f)
                .map_err(|e| OciError::io("cannot cache layer", &tmp, e))?;
            let (got, _) = v
                .finish()
                .map_err(|e| OciError::io("cannot cache layer", &tmp, e))?;
            if got != want {
                let _ = std::fs::remove_file(&tmp);
                return Err(OciError::Digest {
                    what: format!("layer {} of {reference}", l.name),
                    expected: want.to_string(),
                    actual: got.to_string(),
                });
            }
            std::fs::rename(&tmp, &dest).map_err(|e| OciError::io("cannot write", &dest, e))?;
        }
        layers.push(CachedLayer {
            blob: want.hex().to_owned(),
            media_type: if l.media_type.is_empty() {
                "application/vnd.oci.image.layer.v1.tar".into()
            } else {
                l.media_type.clone()
            },
            diff_id: diff_id.to_string(),
            size: std::fs::metadata(&dest)
                .map_err(|e| OciError::io("cannot read", &dest, e))?
                .len(),
        });
    }
    Ok((
        layers,
        cfg.config.unwrap_or_default(),
        resolved.config_digest.to_string(),
    ))
}

/// A stage's tree, built from its layers (for RUN and COPY --from).
fn stage_tree(
    cache: &Cache,
    layers: &[CachedLayer],
    opts: &OciOptions,
) -> Result<Staged, OciError> {
    import_layers(
        &opts.import.staging_dir,
        inputs(cache, layers),
        &opts.limits,
        &|_| {},
    )
}

fn env_list(c: &RunConfig) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    env
}

fn set_env(c: &mut RunConfig, k: &str, v: &str) {
    let env = c.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.split_once('=').map_or(e != k, |(ek, _)| ek != k));
    env.push(format!("{k}={v}"));
}

fn parse_chown(s: Option<&str>, line: usize) -> Result<Option<(u32, u32)>, OciError> {
    let Some(s) = s else { return Ok(None) };
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok(Some((u, g))),
        _ => Err(OciError::Build(format!(
            "Dockerfile line {line}: --chown={s}: give numeric UID:GID"
        ))),
    }
}

/// Runs the build: every stage, the final one stored as an image (unnamed).
pub fn build(
    store: &ChunkStore,
    req: &BuildRequest<'_>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Built, OciError> {
    let text = std::fs::read_to_string(&req.dockerfile)
        .map_err(|e| OciError::io("cannot read the Dockerfile", &req.dockerfile, e))?;
    let instructions = dockerfile::parse(&text)?;
    let cache = Cache {
        dir: req.cache.join("build"),
    };
    let ignore = context::Ignore::load(&req.context)?;
    let mut notes = Vec::new();
    let mut global_args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut cur: Option<Stage> = None;
    let mut steps = 0usize;
    let mut steps_run = 0usize;
    // The live root file system of the current stage, and its tree.
    let mut live: Option<(tempfile_dir::Dir, Staged)> = None;

    for ins in &instructions {
        let line = ins.line;
        let bad = |m: String| OciError::Build(format!("Dockerfile line {line}: {m}"));
        if ins.cmd == "FROM" {
            if let Some(s) = cur.take() {
                stages.push(s);
            }
            live = None;
            if ins.args.contains('$') {
                return Err(bad(format!(
                    "FROM {}: variables in FROM are not supported; write the image reference out",
                    ins.args
                )));
            }
            let w = dockerfile::words(&ins.args);
            let (image, name) = match w.as_slice() {
                [i] => (i.clone(), None),
                [i, as_, n] if as_.eq_ignore_ascii_case("as") => (i.clone(), Some(n.clone())),
                _ => return Err(bad(format!("FROM {}: expected IMAGE [AS NAME]", ins.args))),
            };
            progress(&format!("FROM {image}"));
            let mut vars = global_args.clone();
            let stage = if image == "scratch" {
                Stage {
                    name,
                    layers: Vec::new(),
                    config: RunConfig::default(),
                    key: key_of(&["scratch"]),
                    vars,
                }
            } else if let Some(prev) = stages
                .iter()
                .find(|s| s.name.as_deref() == Some(image.as_str()))
            {
                Stage {
                    name,
                    vars,
                    ..prev.clone()
                }
            } else {
                let reference = base_reference(store, &image, req)?;
                let (layers, config, digest) = pull_base(&cache, &reference, &req.oci)?;
                for (k, v) in env_list(&config) {
                    vars.insert(k, v);
                }
                Stage {
                    name,
                    layers,
                    config,
                    key: key_of(&["FROM", &digest]),
                    vars,
                }
            };
            cur = Some(stage);
            continue;
        }
        if ins.cmd == "ARG" && cur.is_none() {
            for (k, v) in dockerfile::pairs(&ins.args) {
                let v = req.build_args.get(&k).cloned().unwrap_or(v);
                global_args.insert(k, v);
            }
            continue;
        }
        let Some(st) = cur.as_mut() else {
            return Err(bad(format!("{} before any FROM", ins.cmd)));
        };
        steps += 1;
        let args = if matches!(
            ins.cmd.as_str(),
            "RUN" | "CMD" | "ENTRYPOINT" | "SHELL" | "HEALTHCHECK"
        ) {
            ins.args.clone()
        } else {
            substitute(&ins.args, &st.vars)
        };
        let build_args: Vec<String> = st.vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut step_key = key_of(&[
            &st.key,
            &ins.cmd,
            &format!("{:?}", ins.flags),
            &args,
            &build_args.join("\n"),
        ]);
        let c = &mut st.config;
        match ins.cmd.as_str() {
            "ENV" => {
                for (k, v) in dockerfile::pairs(&args) {
                    set_env(c, &k, &v);
                    st.vars.insert(k, v);
                }
            }
            "ARG" => {
                for (k, v) in dockerfile::pairs(&args) {
                    let v = req
                        .build_args
                        .get(&k)
                        .cloned()
                        .or_else(|| global_args.get(&k).cloned())
                        .unwrap_or(v);
                    st.vars.insert(k, v);
                }
            }
            "LABEL" => {
                for (k, v) in dockerfile::pairs(&args) {
                    c.labels.get_or_insert_with(Default::default).insert(k, v);
                }
            }
            "WORKDIR" => {
                let base = c.working_dir.clone().unwrap_or_else(|| "/".into());
                let w = if args.starts_with('/') {
                    args.clone()
                } else {
                    format!("{}/{args}", base.trim_end_matches('/'))
                };
                c.working_dir = Some(w);
            }
            "USER" => c.user = Some(args.clone()),
            "EXPOSE" => {
                for p in dockerfile::words(&args) {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    c.exposed_ports
                        .get_or_insert_with(Default::default)
                        .insert(p, serde_json::json!({}));
                }
            }
            "VOLUME" => {
                let vols = ins.json().unwrap_or_else(|| dockerfile::words(&args));
                for v in vols {
                    c.volumes
                        .get_or_insert_with(Default::default)
                        .insert(v, serde_json::json!({}));
                }
            }
            "STOPSIGNAL" => c.stop_signal = Some(args.clone()),
            "SHELL" => {
                c.shell = Some(
                    ins.json()
                        .ok_or_else(|| bad("SHELL takes the JSON form".into()))?,
                )
            }
            "ENTRYPOINT" | "CMD" => {
                let v = ins.json().unwrap_or_else(|| {
                    let mut sh = c
                        .shell
                        .clone()
                        .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
                    sh.push(args.clone());
                    sh
                });
                if ins.cmd == "CMD" {
                    c.cmd = Some(v);
                } else {
                    c.entrypoint = Some(v);
                    c.cmd = None;
                }
            }
            "HEALTHCHECK" => c.healthcheck = Some(serde_json::json!({ "Test": args })),
            "ONBUILD" => notes.push(format!(
                "line {line}: ONBUILD is ignored (it applies to builds FROM this image)"
            )),
            "MAINTAINER" => {}
            "RUN" => {
                if let Some(rec) = cache.read_json::<StepRecord>(&format!("steps/{step_key}.json"))
                {
                    if rec
                        .layer
                        .as_ref()
                        .is_none_or(|l| cache.blob(&l.blob).exists())
                    {
                        progress(&format!("RUN {} (cached)", ins.args));
                        st.layers.extend(rec.layer);
                        live = None;
                        st.key = step_key;
                        continue;
                    }
                }
                progress(&format!("RUN {}", ins.args));
                steps_run += 1;
                let argv = ins.json().unwrap_or_else(|| {
                    let mut sh = c
                        .shell
                        .clone()
                        .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
                    sh.push(ins.args.clone());
                    sh
                });
                if live.is_none() {
                    let staged = stage_tree(&cache, &st.layers, &req.oci)?;
                    let dir = tempfile_dir::Dir::new(&req.oci.import.staging_dir)?;
                    rootfs::materialize(&staged.tree, &staged.spool, dir.path())?;
                    live = Some((dir, staged));
                }
                let (dir, staged) = live.as_mut().expect("set above");
                let workdir = c.working_dir.clone().unwrap_or_else(|| "/".into());
                ensure_dir(dir.path(), &workdir)?;
                // USER is resolved now, against the root as this step sees
                // it (an earlier step may have added the user), as Docker does.
                let spec = c.user.clone().unwrap_or_default();
                let who = user::resolve(
                    &spec,
                    &rootfs::read_text(dir.path(), "etc/passwd")?,
                    &rootfs::read_text(dir.path(), "etc/group")?,
                )
                .map_err(|e| bad(format!("RUN as USER {spec}: {e}")))?;
                let mut env = env_list(c);
                if !env.iter().any(|(k, _)| k == "HOME") {
                    env.push(("HOME".into(), who.home.clone()));
                }
                req.sandbox
                    .run(&Run {
                        root: dir.path(),
                        argv: &argv,
                        env: &env,
                        workdir: &workdir,
                        user: &who.id,
                    })
                    .map_err(|e| match e {
                        OciError::Build(m) => bad(m),
                        e => e,
                    })?;
                let (tmp, mut f) = cache.temp()?;
                let n = rootfs::diff(&staged.tree, dir.path(), &mut f)?;
                drop(f);
                let layer = if n == 0 {
                    let _ = std::fs::remove_file(&tmp);
                    None
                } else {
                    let l = cache.adopt(&tmp)?;
                    apply_to(staged, &cache, &l, st.layers.len() + 1, &req.oci)?;
                    Some(l)
                };
                let rec = StepRecord {
                    layer: layer.clone(),
                };
                cache.write(
                    &format!("steps/{step_key}.json"),
                    &serde_json::to_vec(&rec).expect("plain data"),
                )?;
                st.layers.extend(layer);
                st.key = step_key;
                continue;
            }
            "COPY" | "ADD" => {
                let unpack = ins.cmd == "ADD";
                let chown = parse_chown(ins.flag("chown"), line)?;
                let mut parts = ins.json().unwrap_or_else(|| dockerfile::words(&args));
                if parts.len() < 2 {
                    return Err(bad(format!("{} needs a source and a destination", ins.cmd)));
                }
                let dest_raw = parts.pop().expect("two or more");
                if unpack && parts.iter().any(|p| p.contains("://")) {
                    return Err(bad(
                        "ADD from a URL is not supported; download it in a RUN step".into(),
                    ));
                }
                let dest = if dest_raw.starts_with('/') {
                    dest_raw.clone()
                } else {
                    format!(
                        "{}/{dest_raw}",
                        c.working_dir
                            .clone()
                            .unwrap_or_else(|| "/".into())
                            .trim_end_matches('/')
                    )
                };
                let (tmp, f) = cache.temp()?;
                let mut w = context::LayerWriter::new(f);
                match ins.flag("from") {
                    Some(from) => {
                        let src_stage = stages
                            .iter()
                            .enumerate()
                            .find(|(i, s)| s.name.as_deref() == Some(from) || i.to_string() == from)
                            .map(|(_, s)| s.clone());
                        let layers = match src_stage {
                            Some(s) => s.layers,
                            None => {
                                let reference = base_reference(store, from, req)?;
                                pull_base(&cache, &reference, &req.oci)?.0
                            }
                        };
                        let staged = stage_tree(&cache, &layers, &req.oci)?;
                        let dest_is_dir = dest_raw.ends_with('/') || parts.len() > 1;
                        for p in &parts {
                            context::add_from_tree(
                                &mut w,
                                &staged.tree,
                                &staged.spool,
                                p,
                                &dest,
                                dest_is_dir,
                                chown,
                            )?;
                        }
                    }
                    None => context::add_from_context(
                        &mut w,
                        &req.context,
                        &ignore,
                        &parts,
                        &dest,
                        chown,
                        unpack,
                    )?,
                }
                let files = w
                    .finish()
                    .map_err(|e| OciError::io("cannot write a layer", &tmp, e))?;
                step_key = key_of(&[&step_key, &files]);
                let rec = match cache.read_json::<StepRecord>(&format!("steps/{step_key}.json")) {
                    Some(rec)
                        if rec
                            .layer
                            .as_ref()
                            .is_none_or(|l| cache.blob(&l.blob).exists()) =>
                    {
                        progress(&format!("{} {} (cached)", ins.cmd, ins.args));
                        let _ = std::fs::remove_file(&tmp);
                        rec
                    }
                    _ => {
                        progress(&format!("{} {}", ins.cmd, ins.args));
                        steps_run += 1;
                        let rec = StepRecord {
                            layer: Some(cache.adopt(&tmp)?),
                        };
                        cache.write(
                            &format!("steps/{step_key}.json"),
                            &serde_json::to_vec(&rec).expect("plain data"),
                        )?;
                        rec
                    }
                };
                st.layers.extend(rec.layer);
                live = None;
            }
            other => return Err(bad(format!("unknown instruction {other}"))),
        }
        st.key = step_key;
    }
    let Some(last) = cur else {
        return Err(OciError::Build("the Dockerfile has no FROM".into()));
    };

    // The image: from the cache when this exact build was stored before.
    let image_key = key_of(&[&last.key, "image", &text]);
    if let Some(id) = cache.read_json::<String>(&format!("images/{image_key}.json")) {
        if let Ok(mid) = id.parse() {
            // Unless garbage collection has condemned it: its chunks may
            // be on their way out, so the image is stored again instead.
            let remote = store.remote().as_ref();
            let exists = store.runtime().block_on(async {
                crate::catalog::load_manifest(remote, &mid).await.is_ok()
                    && !crate::gc::guard::is_condemned(remote, &crate::layout::manifest_key(&mid))
                        .await
                        .unwrap_or(true)
            });
            if exists {
                return Ok(Built {
                    manifest_id: id,
                    report: None,
                    manifest: None,
                    steps,
                    steps_run,
                    notes,
                });
            }
        }
    }
    progress("storing the image");
    let staged = stage_tree(&cache, &last.layers, &req.oci)?;
    let config_json = serde_json::to_vec(&last.config).expect("plain data");
    let meta = ImageMeta {
        format: FORMAT.into(),
        config: last.config.clone(),
        created: None,
        source: SourceRecord {
            reference: format!("build:{}", req.context.display()),
            manifest_digest: None,
            config_digest: Digest::of(&[config_json.as_slice(), last.key.as_bytes()].concat())
                .to_string(),
            platform: req.oci.platform.to_string(),
            layers: last
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: format!("sha256:{}", l.blob),
                    diff_id: Some(l.diff_id.clone()),
                    size: l.size,
                    media_type: l.media_type.clone(),
                })
                .collect(),
        },
        dockerfile: Some(text.clone()),
    };
    let (manifest, report, _) = build_disk(
        store,
        &staged,
        &meta,
        req.oci.disk_size,
        &req.oci.import,
        &|p: OciProgress| {
            if let OciProgress::Disk { done, total } = p {
                if done == total {
                    progress("image stored");
                }
            }
        },
    )?;
    cache.write(
        &format!("images/{image_key}.json"),
        &serde_json::to_vec(&report.id).expect("a string"),
    )?;
    Ok(Built {
        manifest_id: report.id.clone(),
        report: Some(report),
        manifest: Some(manifest),
        steps,
        steps_run,
        notes,
    })
}

/// An OCI reference for FROM/COPY --from: one with a scheme as it is; a
/// cairn image name as the source it was imported from; else a registry.
fn base_reference(
    store: &ChunkStore,
    image: &str,
    req: &BuildRequest<'_>,
) -> Result<String, OciError> {
    if image.contains("://") || image.starts_with("oci:") || image.starts_with("docker-archive:") {
        return Ok(image.to_owned());
    }
    if crate::catalog::check_name(image).is_ok() {
        let remote = store.remote().as_ref();
        if let Ok(id) =
            store
                .runtime()
                .block_on(crate::catalog::resolve(remote, req.project, image))
        {
            let m = store
                .runtime()
                .block_on(crate::catalog::load_manifest(remote, &id))
                .map_err(|e| OciError::Build(format!("FROM {image}: {e}")))?;
            return match ImageMeta::decode(&m.meta) {
                Some(Ok(meta)) if !meta.source.reference.starts_with("build:") => Ok(meta.source.reference),
                _ => Err(OciError::Build(format!(
                    "FROM {image}: that cairn image was not imported from an OCI image, so its layers are unknown; build FROM the reference it came from"
                ))),
            };
        }
    }
    let _ = req;
    Ok(format!("docker://{image}"))
}

/// Applies a new cached layer to a live stage's tree (kept in step with
/// its root file system for the next RUN's comparison).
fn apply_to(
    staged: &mut Staged,
    cache: &Cache,
    l: &CachedLayer,
    number: usize,
    opts: &OciOptions,
) -> Result<(), OciError> {
    let spool_file = staged
        .spool
        .try_clone()
        .map_err(|e| OciError::io("cannot reopen", &staged.spool_path, e))?;
    let mut spool = Spool::resume(spool_file)
        .map_err(|e| OciError::io("cannot reopen", &staged.spool_path, e))?;
    let p = cache.blob(&l.blob);
    let f = File::open(&p).map_err(|e| OciError::io("cannot open", &p, e))?;
    layer::apply(
        &mut staged.tree,
        &mut spool,
        LayerInput {
            number: number as u16,
            name: l.diff_id.clone(),
            digest: None,
            size: Some(l.size),
            compression: Compression::None,
            diff_id: Some(l.diff_id.parse()?),
            blob: Box::new(f) as Box<dyn Read + Send>,
        },
        &opts.limits,
        &mut Totals::default(),
        &|_| {},
    )?;
    spool
        .flush()
        .map_err(|e| OciError::io("cannot write", &staged.spool_path, e))
}

/// Creates `path` (absolute) and its parents in the build root, safely.
fn ensure_dir(root: &Path, path: &str) -> Result<(), OciError> {
    rootfs::mkdir_all(root, path).map_err(|e| {
        OciError::io(
            "cannot create WORKDIR",
            root.join(path.trim_start_matches('/')),
            e,
        )
    })
}

/// A temporary directory, removed when dropped.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    use crate::oci::error::OciError;

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(parent: &Path) -> Result<Dir, OciError> {
            let p = parent.join(format!("build-root-{:016x}", fastrand::u64(..)));
            std::fs::create_dir_all(&p).map_err(|e| OciError::io("cannot create", &p, e))?;
            Ok(Dir(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
