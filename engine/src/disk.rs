//! The lazy disk: an image manifest seen through a private overlay.
//!
//! A read takes each block from the overlay if it holds it, else from the
//! image's chunk through the chunk store (local cache, then the remote
//! tier); zero chunks read as zeros without any I/O. Writes go to the
//! overlay in whole blocks; the edges of a write that is not block-aligned
//! are first filled from what the disk holds (read-modify-write).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::cache::HotChunks;
use crate::chunkstore::{ChunkStore, ChunkStoreError};
use crate::error::ErrorKind;
use crate::manifest::Manifest;
use crate::overlay::{Overlay, OverlayError, BLOCK};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{len} bytes at {offset} are outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Chunk(#[from] ChunkStoreError),
}

impl DiskError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DiskError::OutOfRange { .. } => ErrorKind::InvalidInput,
            DiskError::Overlay(e) => e.kind(),
            DiskError::Chunk(e) => e.kind(),
        }
    }
}

/// Read-ahead never looks further than this many chunks past a read.
pub const MAX_READAHEAD_CHUNKS: u64 = 32;

/// One queue's sequential-read detector. A read that continues where the
/// last one ended doubles the window (up to [`MAX_READAHEAD_CHUNKS`]); any
/// other read resets it. Chunks are fetched ahead, through the store's
/// read-ahead budget, once the reader is half-way through what was
/// fetched ahead last time.
#[derive(Default)]
struct ReadAhead {
    /// The chunk after the last read's end.
    next: AtomicU64,
    /// Chunks before this one were already asked for.
    ahead_until: AtomicU64,
    window: AtomicU64,
}

/// One queue's view of the disk. Cheap to make: one per I/O thread.
pub struct LazyDisk {
    manifest: Arc<Manifest>,
    store: ChunkStore,
    overlay: Arc<Overlay>,
    readahead: ReadAhead,
    /// This queue's recently read chunks: warm reads take no lock shared
    /// with other queues.
    hot: Mutex<HotChunks>,
    reads_ahead: bool,
}

impl LazyDisk {
    pub fn new(manifest: Arc<Manifest>, store: ChunkStore, overlay: Arc<Overlay>) -> LazyDisk {
        LazyDisk {
            manifest,
            store,
            overlay,
            readahead: ReadAhead::default(),
            hot: Mutex::new(HotChunks::default()),
            reads_ahead: true,
        }
    }

    /// This view without read-ahead, for a reader that knows exactly what
    /// it will read.
    pub fn without_read_ahead(mut self) -> LazyDisk {
        self.reads_ahead = false;
        self
    }

    pub fn size(&self) -> u64 {
        self.manifest.logical_size
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn overlay(&self) -> &Arc<Overlay> {
        &self.overlay
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        if self.reads_ahead && !buf.is_empty() {
            self.read_ahead(offset, buf.len() as u64);
        }
        let o = &self.overlay;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / BLOCK;
            // Extend over blocks of the same source (overlay or image).
            let dirty = o.is_dirty(block);
            let mut end_block = block + 1;
            let last_block = (offset + buf.len() as u64 - 1) / BLOCK;
            while end_block <= last_block && o.is_dirty(end_block) == dirty {
                end_block += 1;
            }
            let end = (end_block * BLOCK).min(offset + buf.len() as u64);
            let part = &mut buf[done..done + (end - pos) as usize];
            if dirty {
                self.read_overlay(pos, part)?;
            } else {
                self.read_image(pos, part)?;
            }
            done += part.len();
        }
        Ok(())
    }

    /// Feeds the sequential-read detector with a read of `len` bytes at
    /// `offset` and asks for chunks ahead when a stream is found.
    fn read_ahead(&self, offset: u64, len: u64) {
        let ra = &self.readahead;
        let cs = u64::from(self.manifest.chunk_size);
        let (first, end) = (offset / cs, (offset + len).div_ceil(cs));
        let sequential = {
            let next = ra.next.swap(end, Ordering::Relaxed);
            first + 1 == next || first == next
        };
        if !sequential {
            ra.window.store(0, Ordering::Relaxed);
            ra.ahead_until.store(end, Ordering::Relaxed);
            return;
        }
        let window = (ra.window.load(Ordering::Relaxed) * 2).clamp(2, MAX_READAHEAD_CHUNKS);
        let ahead = ra.ahead_until.load(Ordering::Relaxed).max(end);
        // Half of what was asked for is still ahead: nothing to do yet.
        if ahead >= end + window / 2 {
            return;
        }
        let until = (end + window).min(self.manifest.chunks.len() as u64);
        let ids: Vec<_> = (ahead..until)
            .filter(|&c| {
                // A chunk the overlay covers whole is never read from the image.
                let o = &self.overlay;
                !o.blocks_in(c * cs, (c + 1) * cs).all(|b| o.is_dirty(b))
            })
            .filter_map(|c| self.manifest.chunks[c as usize])
            .collect();
        if self.store.read_ahead(&ids, cs) {
            ra.window.store(window, Ordering::Relaxed);
            ra.ahead_until.store(until, Ordering::Relaxed);
        }
    }

    fn read_overlay(&self, pos: u64, part: &mut [u8]) -> Result<(), DiskError> {
        let first = pos / BLOCK;
        let skip = (pos % BLOCK) as usize;
        if skip == 0 && (part.len() as u64).is_multiple_of(BLOCK) {
            return Ok(self.overlay.read_blocks(first, part)?);
        }
        let span = (skip + part.len()).div_ceil(BLOCK as usize) * BLOCK as usize;
        let span = span.min((self.size() - first * BLOCK) as usize);
        let mut tmp = vec![0u8; span];
        self.overlay.read_blocks(first, &mut tmp)?;
        part.copy_from_slice(&tmp[skip..skip + part.len()]);
        Ok(())
    }

    /// Reads from the image, chunk by chunk.
    fn read_image(&self, pos: u64, part: &mut [u8]) -> Result<(), DiskError> {
        let cs = u64::from(self.manifest.chunk_size);
        let mut done = 0usize;
        while done < part.len() {
            let at = pos + done as u64;
            let index = (at / cs) as usize;
            let within = at % cs;
            let n = ((cs - within) as usize).min(part.len() - done);
            let out = &mut part[done..done + n];
            match self.manifest.chunks[index] {
                Some(id) => {
                    let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
                    self.store.read_hot(&mut hot, &id, within, out)?;
                }
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(BLOCK) && (end.is_multiple_of(BLOCK) || end == self.size()) {
            return Ok(self.overlay.write_blocks(offset / BLOCK, data)?);
        }
        // Widen to whole blocks, filling the edges from the disk.
        let first = offset / BLOCK;
        let span_end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(self.size());
        let mut span = vec![0u8; (span_end - first * BLOCK) as usize];
        self.read(first * BLOCK, &mut span)?;
        let skip = (offset - first * BLOCK) as usize;
        span[skip..skip + data.len()].copy_from_slice(data);
        Ok(self.overlay.write_blocks(first, &span)?)
    }

    /// Makes `len` bytes at `offset` read as zeros (WRITE_ZEROES, DISCARD).
    /// Whole blocks are punched out of the overlay; partial edges are
    /// written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check(offset, len)?;
        let end = offset + len;
        let first_whole = offset.div_ceil(BLOCK);
        let end_whole = if end == self.size() {
            end.div_ceil(BLOCK)
        } else {
            end / BLOCK
        };
        if first_whole >= end_whole {
            return self.write(offset, &vec![0u8; len as usize]);
        }
        let head = first_whole * BLOCK - offset;
        if head > 0 {
            self.write(offset, &vec![0u8; head as usize])?;
        }
        self.overlay
            .zero_blocks(first_whole, end_whole - first_whole)?;
        let tail_start = (end_whole * BLOCK).min(end);
        if tail_start < end {
            self.write(tail_start, &vec![0u8; (end - tail_start) as usize])?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        Ok(self.overlay.flush()?)
    }
}
