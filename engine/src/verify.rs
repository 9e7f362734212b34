//! Store verification: is every chunk every manifest needs really there?
//!
//! The shallow pass checks that every index object parses and matches its
//! pack's size, every name resolves, every manifest hashes to its id, and
//! every chunk of every manifest is in some pack. The deep pass also reads
//! every pack and re-checks every frame's CRC and every chunk's BLAKE3.

use std::collections::HashSet;
use std::path::Path;

use crate::frame::{self, Verify};
use crate::gc::spill::{self, Spill, KEY};
use crate::id::{ChunkId, ManifestId, PackId};
use crate::layout;
use crate::manifest::Manifest;
use crate::objstore::{ObjectStore, StoreError};
use crate::pack::{self, PackIndex, FOOTER_LEN, INDEX_ENTRY_LEN};

/// Chunks named in a manifest's "in no pack" problem; the rest are counted.
const MISSING_SHOWN: usize = 3;

/// One thing found wrong, and where.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub object: String,
    pub what: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub packs: u64,
    pub manifests: u64,
    pub images: u64,
    pub chunk_refs_checked: u64,
    /// Chunks re-read and re-hashed (deep only).
    pub chunks_rehashed: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    fn problem(&mut self, object: impl Into<String>, what: impl Into<String>) {
        let p = Problem {
            object: object.into(),
            what: what.into(),
        };
        tracing::warn!(object = %p.object, "{}", p.what);
        self.problems.push(p);
    }
}

/// Checks the whole store. Only failures to reach the store are errors;
/// everything found wrong is a [`Problem`] in the report. The chunk
/// references and the packs' entries are sorted on disk under `scratch`
/// and joined there, so memory does not grow with the number of chunks.
pub async fn verify(
    store: &dyn ObjectStore,
    deep: bool,
    scratch: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<VerifyReport, StoreError> {
    let dir = spill::scratch_dir(scratch, "verify-").map_err(|e| scratch_error(scratch, e))?;
    let spilled = |e| scratch_error(dir.path(), e);
    let mut report = VerifyReport::default();
    // Chunk id + raw length, of every good pack's entries.
    let mut held = Spill::<HELD_LEN>::new(dir.path(), "held");
    // Chunk id + lost pack number, of every lost pack's entries.
    let mut orphaned = Spill::<LOST_LEN>::new(dir.path(), "lost");
    let mut good: Vec<(String, PackId)> = Vec::new();
    let mut lost: Vec<(PackId, usize)> = Vec::new();
    let keys = store.list(layout::PACKS).await?;
    let key_set: HashSet<&str> = keys.iter().map(String::as_str).collect();
    for key in &keys {
        if let Some(pack_id) = key
            .strip_prefix(layout::PACKS)
            .and_then(|k| k.strip_suffix(".pack"))
        {
            if !key_set.contains(format!("{}{pack_id}.idx", layout::PACKS).as_str()) {
                report.problem(key, "pack has no index object: its upload was interrupted; rerun the import that wrote it");
            }
            continue;
        }
        let Some(pack) = layout::pack_of_index_key(key) else {
            report.problem(key, "unexpected object under packs/");
            continue;
        };
        progress(key);
        match check_index(store, key, pack).await? {
            IndexCheck::Good(index) => {
                for e in &index.entries {
                    held.push(record(&e.id, &[e.raw_len])).map_err(spilled)?;
                }
                good.push((key.clone(), pack));
            }
            IndexCheck::Lost(index) => {
                let n = lost.len() as u32;
                for e in &index.entries {
                    orphaned.push(record(&e.id, &[n])).map_err(spilled)?;
                }
                lost.push((index.id, index.entries.len()));
            }
            IndexCheck::Bad(what) => report.problem(key, what),
        }
    }
    report.packs = good.len() as u64;
    let held = held.finish().map_err(spilled)?;
    let mut orphans = vec![0usize; lost.len()];
    spill::join(
        &orphaned.finish().map_err(spilled)?,
        &held,
        |entries, copies| {
            if copies.is_empty() {
                for e in entries {
                    orphans[field(e, 0) as usize] += 1;
                }
            }
        },
    )
    .map_err(spilled)?;
    for ((pack, entries), orphans) in lost.iter().zip(orphans) {
        let what = if orphans == 0 {
            format!(
                "its pack {} is missing (lost); every chunk it held is in another pack, so nothing is unreadable: this index object can be deleted",
                layout::pack_key(pack)
            )
        } else {
            format!(
                "its pack {} is missing (lost): {orphans} of its {entries} chunks are in no other pack; import the images that use them again (the same file) to upload them again",
                layout::pack_key(pack),
            )
        };
        report.problem(layout::pack_index_key(pack), what);
    }

    for (key, id) in crate::catalog::image::every_name(store)
        .await
        .map_err(catalog_store_error)?
    {
        report.images += 1;
        if let Err(e) = id {
            report.problem(key, e.to_string());
        }
    }

    // Every chunk reference of every manifest: chunk id, manifest number,
    // chunk index, length needed.
    let mut refs = Spill::<REF_LEN>::new(dir.path(), "refs");
    let mut manifests: Vec<ManifestCheck> = Vec::new();
    for key in store.list(layout::MANIFESTS).await? {
        progress(&key);
        report.manifests += 1;
        let Some(id) = key
            .strip_prefix(layout::MANIFESTS)
            .and_then(|h| h.parse::<ManifestId>().ok())
        else {
            report.problem(
                &key,
                "object under manifests/ is not named by a manifest id",
            );
            continue;
        };
        let bytes = store.get(&key, None).await?;
        let manifest = match Manifest::decode_verified(&bytes, id) {
            Ok(m) => m,
            Err(e) => {
                report.problem(&key, e.to_string());
                continue;
            }
        };
        let n = manifests.len() as u32;
        for (i, chunk) in manifest.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            report.chunk_refs_checked += 1;
            let rec = record(chunk, &[n, i as u32, manifest.chunk_len(i)]);
            refs.push(rec).map_err(spilled)?;
        }
        manifests.push(ManifestCheck {
            key,
            ..ManifestCheck::default()
        });
    }
    spill::join(&refs.finish().map_err(spilled)?, &held, |uses, copies| {
        for r in uses {
            let (m, i, need) = (field(r, 0), field(r, 1), field(r, 2));
            let chunk = ChunkId::from_bytes(r[..KEY].try_into().expect("a chunk id"));
            let check = &mut manifests[m as usize];
            match copies.first() {
                None => check.missing(i, chunk),
                Some(_) if copies.iter().any(|c| field(c, 0) == need) => {}
                Some(c) => check.wrong_size.push((
                    i,
                    format!(
                        "chunk {i} ({chunk}) is {} bytes in its pack, the manifest needs {need}",
                        field(c, 0)
                    ),
                )),
            }
        }
    })
    .map_err(spilled)?;
    for check in manifests {
        check.report(&mut report);
    }

    if deep {
        for (key, pack) in &good {
            let Ok(IndexCheck::Good(index)) = check_index(store, key, *pack).await else {
                report.problem(key, "changed while it was verified: verify again");
                continue;
            };
            let key = layout::pack_key(&index.id);
            progress(&key);
            rehash_pack(store, &key, &index, &mut report).await?;
        }
    }
    Ok(report)
}

const HELD_LEN: usize = KEY + 4;
const LOST_LEN: usize = KEY + 4;
const REF_LEN: usize = KEY + 12;

/// A record: a chunk id, then big-endian `u32` fields.
fn record<const N: usize>(id: &ChunkId, fields: &[u32]) -> [u8; N] {
    let mut r = [0u8; N];
    r[..KEY].copy_from_slice(id.as_bytes());
    for (n, f) in fields.iter().enumerate() {
        r[KEY + 4 * n..KEY + 4 * n + 4].copy_from_slice(&f.to_be_bytes());
    }
    r
}

/// Field `n` of a [`record`].
fn field<const N: usize>(r: &[u8; N], n: usize) -> u32 {
    u32::from_be_bytes(r[KEY + 4 * n..KEY + 4 * n + 4].try_into().expect("4 bytes"))
}

fn scratch_error(dir: &Path, e: std::io::Error) -> StoreError {
    StoreError::new(
        "verify",
        "",
        &dir.display().to_string(),
        crate::ErrorKind::Io,
        format!("the scratch directory: {e}"),
    )
}

/// What was found wrong with one manifest's chunk references.
#[derive(Default)]
struct ManifestCheck {
    key: String,
    missing: u64,
    /// The first few missing, by chunk index.
    shown: Vec<(u32, ChunkId)>,
    wrong_size: Vec<(u32, String)>,
}

impl ManifestCheck {
    fn missing(&mut self, index: u32, chunk: ChunkId) {
        self.missing += 1;
        self.shown.push((index, chunk));
        if self.shown.len() > MISSING_SHOWN {
            self.shown.sort_unstable();
            self.shown.truncate(MISSING_SHOWN);
        }
    }

    /// Its problems, in chunk order; the missing ones on one line (a lost
    /// pack takes hundreds of chunks).
    fn report(mut self, report: &mut VerifyReport) {
        self.wrong_size.sort_unstable();
        for (_, what) in self.wrong_size {
            report.problem(&self.key, what);
        }
        if self.missing == 0 {
            return;
        }
        self.shown.sort_unstable();
        let shown: Vec<String> = self
            .shown
            .iter()
            .map(|(i, c)| format!("{i} ({c})"))
            .collect();
        let more = self.missing - shown.len() as u64;
        report.problem(
            &self.key,
            format!(
                "{} of its chunks are in no pack: chunk {}{}",
                self.missing,
                shown.join(", chunk "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        );
    }
}

fn catalog_store_error(e: crate::catalog::CatalogError) -> StoreError {
    match e {
        crate::catalog::CatalogError::Store(s) => s,
        other => StoreError::new("list", "", layout::CATALOG, other.kind(), other.to_string()),
    }
}

/// What an index object and its pack turned out to be.
enum IndexCheck {
    Good(PackIndex),
    /// The index is sound but its pack object is missing.
    Lost(PackIndex),
    Bad(String),
}

/// Loads index object `key` and checks it against its pack's size. The
/// error is the store failing; a problem found is in the [`IndexCheck`].
async fn check_index(
    store: &dyn ObjectStore,
    key: &str,
    pack: PackId,
) -> Result<IndexCheck, StoreError> {
    let bytes = store.get(key, None).await?;
    let index = match PackIndex::decode_tail(&bytes) {
        Ok(i) => i,
        Err(e) => return Ok(IndexCheck::Bad(format!("index object does not parse: {e}"))),
    };
    if index.id != pack {
        return Ok(IndexCheck::Bad(format!(
            "index object describes pack {}",
            index.id
        )));
    }
    let want = index.index_offset() + (index.entries.len() * INDEX_ENTRY_LEN + FOOTER_LEN) as u64;
    match store.head(&layout::pack_key(&pack)).await? {
        None => Ok(IndexCheck::Lost(index)),
        Some(len) if len != want => Ok(IndexCheck::Bad(format!(
            "its pack is {len} bytes, the index says {want}"
        ))),
        Some(_) => Ok(IndexCheck::Good(index)),
    }
}

const DEEP_READ_BYTES: u64 = 8 << 20;

async fn rehash_pack(
    store: &dyn ObjectStore,
    key: &str,
    index: &PackIndex,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let mut run: Vec<pack::IndexEntry> = Vec::new();
    let entries = index.entries.iter().copied();
    for e in entries.map(Some).chain(std::iter::once(None)) {
        let flush = match (&e, run.first()) {
            (None, Some(_)) => true,
            (Some(e), Some(first)) => e.end() - first.offset > DEEP_READ_BYTES,
            _ => false,
        };
        if flush {
            let (start, end) = (run[0].offset, run[run.len() - 1].end());
            let bytes = store.get(key, Some(start..end)).await?;
            report.bytes_read += bytes.len() as u64;
            let batch = std::mem::take(&mut run);
            let bad: Vec<(ChunkId, String)> = tokio::task::spawn_blocking(move || {
                pack::frames_of_run(&batch, &bytes)
                    .filter_map(|(e, f)| {
                        let f = f?;
                        frame::decode_chunk(f, e.id, Verify::Digest)
                            .err()
                            .map(|err| (e.id, err.to_string()))
                    })
                    .collect()
            })
            .await
            .map_err(|e| {
                StoreError::new(
                    "verify",
                    store.uri(),
                    key,
                    crate::ErrorKind::Io,
                    e.to_string(),
                )
            })?;
            for (chunk, what) in bad {
                report.problem(key, format!("chunk {chunk}: {what}"));
            }
        }
        if let Some(e) = e {
            report.chunks_rehashed += 1;
            run.push(e);
        }
    }
    Ok(())
}
