//! Store verification: is every chunk every manifest needs really there?
//!
//! The shallow pass checks that every index object parses and matches its
//! pack's size, every name resolves, every manifest hashes to its id, and
//! every chunk of every manifest is in some pack. The deep pass also reads
//! every pack and re-checks every frame's CRC and every chunk's BLAKE3.

use std::collections::HashSet;

use crate::frame::{self, Verify};
use crate::id::{ChunkId, ManifestId, PackId};
use crate::layout;
use crate::locate::PackMap;
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
/// everything found wrong is a [`Problem`] in the report.
pub async fn verify(
    store: &dyn ObjectStore,
    deep: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mut map = PackMap::default();
    let mut indexes = Vec::new();
    let mut lost = Vec::new();
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
                map.add(&index);
                indexes.push(index);
            }
            IndexCheck::Lost(index) => lost.push(index),
            IndexCheck::Bad(what) => report.problem(key, what),
        }
    }
    report.packs = indexes.len() as u64;
    for index in &lost {
        let orphans = index
            .entries
            .iter()
            .filter(|e| !map.contains(&e.id))
            .count();
        let what = if orphans == 0 {
            format!(
                "its pack {} is missing (lost); every chunk it held is in another pack, so nothing is unreadable: this index object can be deleted",
                layout::pack_key(&index.id)
            )
        } else {
            format!(
                "its pack {} is missing (lost): {orphans} of its {} chunks are in no other pack; import the images that use them again (the same file) to upload them again",
                layout::pack_key(&index.id),
                index.entries.len()
            )
        };
        report.problem(layout::pack_index_key(&index.id), what);
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
        let mut missing = Vec::new();
        for (i, chunk) in manifest.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            report.chunk_refs_checked += 1;
            match map.locate(chunk) {
                None => missing.push(format!("{i} ({chunk})")),
                Some(loc) if loc.entry.raw_len != manifest.chunk_len(i) => report.problem(
                    &key,
                    format!(
                        "chunk {i} ({chunk}) is {} bytes in its pack, the manifest needs {}",
                        loc.entry.raw_len,
                        manifest.chunk_len(i)
                    ),
                ),
                Some(_) => {}
            }
        }
        // One line per manifest: a lost pack takes hundreds of chunks.
        if !missing.is_empty() {
            let shown = missing.len().min(MISSING_SHOWN);
            let more = missing.len() - shown;
            report.problem(
                &key,
                format!(
                    "{} of its chunks are in no pack: chunk {}{}",
                    missing.len(),
                    missing[..shown].join(", chunk "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            );
        }
    }

    if deep {
        for index in &indexes {
            let key = layout::pack_key(&index.id);
            progress(&key);
            rehash_pack(store, &key, index, &mut report).await?;
        }
    }
    Ok(report)
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
