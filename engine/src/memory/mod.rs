//! Memory images: guest memory as a VMM writes it, stored as chunks.
//!
//! A memory image is a [`Manifest`] of kind `Memory` over the bytes of a
//! VMM memory file (regions back to back, as Firecracker writes them).
//! Zero chunks are never stored; identical chunks are stored once, across
//! images too. Its layout metadata ([`MemLayout`]) names the page size,
//! the regions the file was written from and, for a diff snapshot, the
//! parent it was applied to. Beside an image the store may keep its
//! recorded working set ([`working_set`]): the pages a resume touched, in
//! order, packed back to back so the next resume loads them in one
//! sequential read. This module knows nothing of userfaultfd.

mod import;
pub mod working_set;

use std::sync::Arc;

pub use import::{import_memory, MemImportError};

use crate::cache::HotChunks;
use crate::chunkstore::{ChunkStore, ChunkStoreError};
use crate::id::{ChunkId, ManifestId};
use crate::le::{Reader, Truncated};
use crate::manifest::{Manifest, ManifestKind};

const LAYOUT_MAGIC: [u8; 4] = *b"CRML";
const LAYOUT_VERSION: u8 = 1;
/// Regions one layout may list.
pub const MAX_REGIONS: usize = 4096;

/// One region of guest memory within the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemRegion {
    /// Where the region starts in the memory file.
    pub offset: u64,
    pub size: u64,
    pub page_size: u64,
}

/// What a memory manifest's metadata says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemLayout {
    /// The base page size the file was written with.
    pub page_size: u32,
    pub regions: Vec<MemRegion>,
    /// The image a diff snapshot was applied to.
    pub parent: Option<ManifestId>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("manifest {0} is a disk image, not a memory image")]
    NotMemory(ManifestId),
    #[error("memory layout metadata is invalid: {0}")]
    Invalid(String),
}

impl MemLayout {
    /// One region over `size` bytes with `page_size` pages.
    pub fn single(size: u64, page_size: u32) -> MemLayout {
        MemLayout {
            page_size,
            regions: vec![MemRegion {
                offset: 0,
                size,
                page_size: u64::from(page_size),
            }],
            parent: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.regions.len() * 24);
        out.extend_from_slice(&LAYOUT_MAGIC);
        out.push(LAYOUT_VERSION);
        out.push(u8::from(self.parent.is_some()));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        out.extend_from_slice(self.parent.as_ref().map_or(&[0u8; 32], |p| p.as_bytes()));
        for r in &self.regions {
            for v in [r.offset, r.size, r.page_size] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes and checks the layout against an image of `size` bytes.
    pub fn decode(bytes: &[u8], size: u64) -> Result<MemLayout, LayoutError> {
        let bad = |m: &str| LayoutError::Invalid(m.to_owned());
        if bytes.len() < 48 || bytes[..4] != LAYOUT_MAGIC {
            return Err(bad("bad magic or too short"));
        }
        let truncated = |e: Truncated| bad(&e.to_string());
        let mut r = Reader::new(bytes);
        r.skip(LAYOUT_MAGIC.len()).map_err(truncated)?;
        let (version, flags) = (r.u8().map_err(truncated)?, r.u8().map_err(truncated)?);
        if version != LAYOUT_VERSION || flags > 1 || r.u16().map_err(truncated)? != 0 {
            return Err(bad("unknown version, flags or reserved bytes"));
        }
        let page_size = r.u32().map_err(truncated)?;
        let count = r.u32().map_err(truncated)? as usize;
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(bad("page size is not a power of two of at least 4 KiB"));
        }
        if count == 0 || count > MAX_REGIONS || bytes.len() != 48 + count * 24 {
            return Err(bad(
                "no regions, or a region count that does not match the length",
            ));
        }
        let parent_id: [u8; 32] = r.array().map_err(truncated)?;
        if flags == 0 && parent_id != [0; 32] {
            // One encoding per layout: the manifest's id covers these bytes.
            return Err(bad("a parent id without the parent flag"));
        }
        let parent = (flags == 1).then(|| ManifestId::from_bytes(parent_id));
        let mut regions = Vec::with_capacity(count);
        for _ in 0..count {
            regions.push(MemRegion {
                offset: r.u64().map_err(truncated)?,
                size: r.u64().map_err(truncated)?,
                page_size: r.u64().map_err(truncated)?,
            });
        }
        let mut end = 0u64;
        for r in &regions {
            let fits = r.offset == end
                && r.page_size.is_power_of_two()
                && r.page_size >= 4096
                && r.size % r.page_size == 0
                && r.offset.checked_add(r.size).is_some_and(|e| e <= size);
            if !fits {
                return Err(bad(
                    "regions are not back to back, page-aligned and within the image",
                ));
            }
            end += r.size;
        }
        Ok(MemLayout {
            page_size,
            regions,
            parent,
        })
    }

    /// The layout of a memory manifest.
    pub fn of(manifest: &Manifest) -> Result<MemLayout, LayoutError> {
        if manifest.kind != ManifestKind::Memory {
            return Err(LayoutError::NotMemory(manifest.id()));
        }
        MemLayout::decode(&manifest.meta, manifest.logical_size)
    }
}

/// What lies at an offset of a memory image, up to the end of its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes of zeros.
    Zero { len: u64 },
    /// `len` bytes at `at` within stored chunk `id`.
    Data { id: ChunkId, at: u64, len: u64 },
}

/// A memory image read through the chunk store: the page source of the
/// page server. Cheap to clone.
#[derive(Clone)]
pub struct MemoryImage {
    manifest: Arc<Manifest>,
    store: ChunkStore,
}

impl MemoryImage {
    pub fn new(manifest: Arc<Manifest>, store: ChunkStore) -> MemoryImage {
        MemoryImage { manifest, store }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    pub fn size(&self) -> u64 {
        self.manifest.logical_size
    }

    /// The segment at `offset`, at most `max` bytes, never past its chunk.
    /// `offset` must be inside the image.
    pub fn segment(&self, offset: u64, max: u64) -> Segment {
        let cs = u64::from(self.manifest.chunk_size);
        let index = (offset / cs) as usize;
        let at = offset % cs;
        let len = (u64::from(self.manifest.chunk_len(index)) - at).min(max);
        match self.manifest.chunks[index] {
            None => Segment::Zero { len },
            Some(id) => Segment::Data { id, at, len },
        }
    }

    /// Whether `[offset, offset + len)` is all zero chunks.
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        let cs = u64::from(self.manifest.chunk_size);
        let (first, last) = (offset / cs, (offset + len).div_ceil(cs));
        self.manifest.chunks[first as usize..last as usize]
            .iter()
            .all(Option::is_none)
    }

    /// Runs `f` on the bytes of a data segment, in place (see
    /// [`ChunkStore::with_slice`]).
    pub fn with_segment<T>(
        &self,
        hot: &mut HotChunks,
        id: &ChunkId,
        at: u64,
        len: u64,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, ChunkStoreError> {
        self.store.with_slice(Some(hot), id, at, len as usize, f)
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`, across chunks.
    pub fn read(
        &self,
        hot: &mut HotChunks,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkStoreError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            match self.segment(offset + done as u64, rest.len() as u64) {
                Segment::Zero { len } => {
                    rest[..len as usize].fill(0);
                    done += len as usize;
                }
                Segment::Data { id, at, len } => {
                    let dst = &mut rest[..len as usize];
                    self.with_segment(hot, &id, at, len, |s| dst.copy_from_slice(s))?;
                    done += len as usize;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_layout_round_trips(
            regions in proptest::collection::vec((12u32..=21, 1u64..64), 1..20),
            parent in proptest::option::of(any::<[u8; 32]>()),
            page_shift in 12u32..=21,
            slack in 0u64..(1 << 20),
        ) {
            let mut offset = 0;
            let regions: Vec<MemRegion> = regions
                .into_iter()
                .map(|(shift, pages)| {
                    let r = MemRegion { offset, size: pages << shift, page_size: 1 << shift };
                    offset += r.size;
                    r
                })
                .collect();
            let layout = MemLayout {
                page_size: 1 << page_shift,
                regions,
                parent: parent.map(ManifestId::from_bytes),
            };
            let bytes = layout.encode();
            prop_assert_eq!(MemLayout::decode(&bytes, offset + slack).unwrap(), layout);
            if offset > 0 {
                prop_assert!(MemLayout::decode(&bytes, offset - 1).is_err(), "past the image");
            }
        }

        #[test]
        fn any_bytes_decode_to_an_error_or_their_own_encoding(
            mut bytes in proptest::collection::vec(any::<u8>(), 48..200),
            regions in 0usize..6,
            flags in 0u8..3,
            size in any::<u64>(),
        ) {
            // A header that may pass, over arbitrary regions and parent.
            bytes[..4].copy_from_slice(&LAYOUT_MAGIC);
            bytes[4] = LAYOUT_VERSION;
            bytes[5] = flags;
            bytes[6..8].fill(0);
            bytes[8..12].copy_from_slice(&4096u32.to_le_bytes());
            bytes[12..16].copy_from_slice(&(regions as u32).to_le_bytes());
            bytes.resize(48 + regions * 24, 0);
            if let Ok(layout) = MemLayout::decode(&bytes, size) {
                prop_assert_eq!(layout.encode(), bytes);
            }
        }
    }

    #[test]
    fn layout_round_trips_and_rejects_bad_regions() {
        let mut l = MemLayout::single(1 << 30, 4096);
        l.parent = Some(ManifestId::of(b"parent"));
        assert_eq!(MemLayout::decode(&l.encode(), 1 << 30).unwrap(), l);
        assert!(
            MemLayout::decode(&l.encode(), 1 << 20).is_err(),
            "region past the image"
        );
        let mut gap = MemLayout::single(1 << 20, 4096);
        gap.regions[0].offset = 4096;
        assert!(MemLayout::decode(&gap.encode(), 1 << 30).is_err());
        let mut odd = MemLayout::single(3 << 20, 4096);
        odd.regions[0].page_size = 2 << 20;
        odd.regions[0].size = (3 << 20) + 4096;
        assert!(
            MemLayout::decode(&odd.encode(), 4 << 20).is_err(),
            "unaligned"
        );
        assert!(MemLayout::decode(&l.encode()[..40], 1 << 30).is_err());
    }
}
