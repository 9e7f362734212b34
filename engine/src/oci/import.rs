//! The import pipeline: reference → layers applied → ext4 → chunk store.

use std::fs::File;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::error::OciError;
use super::ext4::{self, BuildOptions};
use super::image::{ConfigFile, ImageMeta, LayerRecord, SourceRecord, FORMAT};
use super::layer::{self, Applied, Compression, LayerInput, Limits, Spool, Totals};
use super::reference::ImageRef;
use super::source;
use super::tree::Tree;
use super::OciOptions;
use crate::chunkstore::ChunkStore;
use crate::import::{import_pieces, ImportOptions, ImportReport};
use crate::manifest::Manifest;

/// What an import is doing, for progress displays.
#[derive(Debug, Clone)]
pub enum OciProgress<'a> {
    /// The image is resolved: its layers and their compressed sizes.
    Resolved { layers: &'a [(String, Option<u64>)] },
    /// Layer `number` (1-based): `done` bytes of its blob read.
    Layer { number: usize, done: u64 },
    LayerDone {
        number: usize,
        entries: u64,
        bytes: u64,
    },
    /// The disk going into the store: `done` of `total` bytes.
    Disk { done: u64, total: u64 },
}

/// What an import made.
#[derive(Debug)]
pub struct OciImport {
    pub manifest: Manifest,
    pub report: ImportReport,
    pub meta: ImageMeta,
    /// The image's digest: its manifest's, else its config's.
    pub digest: String,
    /// The name the reference suggests.
    pub default_name: Option<String>,
    pub disk: DiskStats,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DiskStats {
    pub disk_bytes: u64,
    pub used_bytes: u64,
    pub inodes: u64,
}

/// A spool file in `dir`, unlinked at once: nothing is left behind,
/// whatever happens to the process.
fn spool_in(dir: &Path) -> Result<(Spool, PathBuf), OciError> {
    std::fs::create_dir_all(dir).map_err(|e| OciError::io("cannot create", dir, e))?;
    let path = dir.join(format!("{:016x}.spool", fastrand::u64(..)));
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| OciError::io("cannot create the content spool", &path, e))?;
    std::fs::remove_file(&path).map_err(|e| OciError::io("cannot unlink", &path, e))?;
    Ok((Spool::new(f), path))
}

/// Layers applied: the tree, the spool holding its file bytes, and what
/// each layer held.
pub struct Staged {
    pub tree: Tree,
    pub spool: File,
    pub spool_path: PathBuf,
    pub applied: Vec<Applied>,
}

/// Applies `layers` in order to a new tree.
pub fn import_layers<'a>(
    staging: &Path,
    layers: impl Iterator<Item = Result<LayerInput<'a>, OciError>>,
    limits: &Limits,
    progress: &(dyn Fn(OciProgress) + Sync),
) -> Result<Staged, OciError> {
    let (mut spool, spool_path) = spool_in(staging)?;
    let mut tree = Tree::new();
    tree.end_layer();
    let mut totals = Totals::default();
    let mut applied = Vec::new();
    for input in layers {
        let input = input?;
        let number = usize::from(input.number);
        let a = layer::apply(&mut tree, &mut spool, input, limits, &mut totals, &|done| {
            progress(OciProgress::Layer { number, done })
        })?;
        progress(OciProgress::LayerDone {
            number,
            entries: a.entries,
            bytes: a.bytes,
        });
        applied.push(a);
    }
    spool
        .flush()
        .map_err(|e| OciError::io("cannot write the content spool", &spool_path, e))?;
    let file = spool
        .finish()
        .map_err(|e| OciError::io("cannot write the content spool", &spool_path, e))?;
    Ok(Staged {
        tree,
        spool: file,
        spool_path,
        applied,
    })
}

/// The file system's identity, from the image's: same image, same UUID.
fn identity(seed: &str) -> ([u8; 16], [u8; 16]) {
    let h = Sha256::digest(format!("cairn ext4 {seed}").as_bytes());
    let mut uuid = [0u8; 16];
    let mut hash_seed = [0u8; 16];
    uuid.copy_from_slice(&h[..16]);
    hash_seed.copy_from_slice(&h[16..]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // a version 4 UUID in form
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    (uuid, hash_seed)
}

/// Lays `tree` out as ext4 and stores it with `meta`.
pub fn build_disk(
    store: &ChunkStore,
    staged: &Staged,
    meta: &ImageMeta,
    disk_size: Option<u64>,
    import: &ImportOptions,
    progress: &(dyn Fn(OciProgress) + Sync),
) -> Result<(Manifest, ImportReport, DiskStats), OciError> {
    let (uuid, hash_seed) = identity(&meta.source.config_digest);
    let mut volume_name = [0u8; 16];
    volume_name[..5].copy_from_slice(b"cairn");
    let disk = ext4::build(
        &staged.tree,
        &BuildOptions {
            uuid,
            hash_seed,
            time: 0,
            volume_name,
            align: u64::from(import.chunk_size),
            size: disk_size,
        },
    )
    .map_err(OciError::Disk)?;
    let mut opts = import.clone();
    opts.meta = meta.encode();
    let total = disk.size;
    let (manifest, report) = import_pieces(
        store,
        disk.pieces(
            &staged.spool,
            &staged.spool_path,
            u64::from(import.chunk_size),
        ),
        total,
        &opts,
        &|done| progress(OciProgress::Disk { done, total }),
    )?;
    let stats = DiskStats {
        disk_bytes: disk.size,
        used_bytes: disk.used_blocks * ext4::BLOCK,
        inodes: disk.inodes,
    };
    Ok((manifest, report, stats))
}

/// Imports the image `reference` names into `store` (unnamed).
pub fn import(
    store: &ChunkStore,
    reference: &str,
    opts: &OciOptions,
    progress: &(dyn Fn(OciProgress) + Sync),
) -> Result<OciImport, OciError> {
    let r = ImageRef::parse(reference)?;
    let mut src = source::open(&r, opts)?;
    let resolved = src.resolve(&opts.platform)?;
    let cfg: ConfigFile = serde_json::from_slice(&resolved.config)
        .map_err(|e| OciError::Invalid(format!("the image config does not parse: {e}")))?;
    let diff_ids: Vec<Digest> = cfg
        .rootfs
        .as_ref()
        .map(|r| {
            r.diff_ids
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    if diff_ids.len() != resolved.layers.len() {
        return Err(OciError::Invalid(format!(
            "the image config lists {} layers (rootfs.diff_ids), its manifest {}",
            diff_ids.len(),
            resolved.layers.len()
        )));
    }
    if resolved.layers.len() > usize::from(u16::MAX) - 1 {
        return Err(OciError::Invalid("more layers than cairn applies".into()));
    }
    let names: Vec<(String, Option<u64>)> = resolved
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.size))
        .collect();
    progress(OciProgress::Resolved { layers: &names });
    let compressions = resolved
        .layers
        .iter()
        .map(|l| Compression::of_media_type(&l.media_type))
        .collect::<Result<Vec<_>, _>>()?;
    let mut i = 0usize;
    let layers = std::iter::from_fn(|| {
        let l = resolved.layers.get(i)?;
        let number = i as u16 + 1;
        let compression = compressions[i];
        let diff_id = diff_ids[i].clone();
        i += 1;
        Some(src.open(l).map(|blob| LayerInput {
            number,
            name: l.name.clone(),
            digest: l.digest.clone(),
            size: l.size,
            compression,
            diff_id: Some(diff_id),
            blob,
        }))
    });
    let staged = import_layers(&opts.import.staging_dir, layers, &opts.limits, progress)?;
    let platform = match &cfg.variant {
        Some(v) => format!("{}/{}/{v}", cfg.os, cfg.architecture),
        None => format!("{}/{}", cfg.os, cfg.architecture),
    };
    let meta = ImageMeta {
        format: FORMAT.into(),
        config: cfg.config.clone().unwrap_or_default(),
        created: cfg.created.clone(),
        source: SourceRecord {
            reference: reference.to_owned(),
            manifest_digest: resolved.manifest_digest.as_ref().map(Digest::to_string),
            config_digest: resolved.config_digest.to_string(),
            platform,
            layers: resolved
                .layers
                .iter()
                .zip(&staged.applied)
                .zip(&diff_ids)
                .map(|((l, a), d)| LayerRecord {
                    digest: l.name.clone(),
                    diff_id: Some(d.to_string()),
                    size: a.compressed_bytes,
                    media_type: l.media_type.clone(),
                })
                .collect(),
        },
        dockerfile: None,
    };
    let (manifest, report, disk) = build_disk(
        store,
        &staged,
        &meta,
        opts.disk_size,
        &opts.import,
        progress,
    )?;
    Ok(OciImport {
        manifest,
        report,
        digest: meta
            .source
            .manifest_digest
            .clone()
            .unwrap_or_else(|| meta.source.config_digest.clone()),
        meta,
        default_name: resolved.suggested_name.or_else(|| r.default_name()),
        disk,
    })
}
