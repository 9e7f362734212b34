//! The lazy disk: an image seen through a stack of overlay layers.
//!
//! The top layer is live (it takes the writes); the ones under it are
//! frozen: read-only states of the disk kept for snapshots and clones. A
//! read takes each block from the topmost layer that holds it, found in
//! one lookup in a flattened [`block_map`], else from the image's chunk
//! through the chunk store (local cache, then the remote tier); zero
//! chunks read as zeros without any I/O. Writes go to the live layer in
//! whole blocks; the edges of a write that is not block-aligned are first
//! filled from what the disk holds (read-modify-write).
//!
//! Freezing the live layer ([`Disk::freeze`]) is a FLUSH and a swap:
//! constant time whatever the disk's size or the bytes written, and
//! crash-consistent at the instant of the call (every write completed
//! before it is in the frozen layer, none issued after). A disk opened
//! over frozen layers (a clone, a fork) builds its map from theirs. When
//! the bottom layers have been folded into a new image, [`Disk::rebase`]
//! drops them.

mod block_map;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::cache::HotChunks;
use crate::chunkstore::{ChunkStore, ChunkStoreError, ReadAhead as ReadAheadOutcome};
use crate::error::ErrorKind;
use crate::manifest::Manifest;
use crate::overlay::{Overlay, OverlayError, BLOCK};
use block_map::BlockMap;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{len} bytes at {offset} are outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("layer {layer} is {found} bytes, the disk {wanted}")]
    LayerSize {
        layer: String,
        found: u64,
        wanted: u64,
    },
    #[error("a disk needs at least one layer (the live one)")]
    NoLayers,
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Chunk(#[from] ChunkStoreError),
}

impl DiskError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DiskError::OutOfRange { .. } | DiskError::LayerSize { .. } | DiskError::NoLayers => {
                ErrorKind::InvalidInput
            }
            DiskError::Overlay(e) => e.kind(),
            DiskError::Chunk(e) => e.kind(),
        }
    }
}

/// Read-ahead never looks further than this many chunks past a read.
pub const MAX_READAHEAD_CHUNKS: u64 = 32;

/// The image and the layers over it.
struct Stack {
    base: Arc<Manifest>,
    /// Bottom to top; the last one is live.
    layers: Vec<Arc<Overlay>>,
    /// The map number of `layers[0]`; map numbers below it (and 0) mean
    /// the image (layers folded into it by a rebase were dropped).
    first: u32,
}

impl Stack {
    fn live(&self) -> &Arc<Overlay> {
        self.layers.last().expect("a stack has a live layer")
    }

    fn live_number(&self) -> u32 {
        self.first + self.layers.len() as u32 - 1
    }

    /// The layer map number `n` names, or `None` for the image.
    fn layer(&self, n: u32) -> Option<&Arc<Overlay>> {
        n.checked_sub(self.first)
            .and_then(|i| self.layers.get(i as usize))
    }
}

/// One disk, shared by every queue that serves it.
pub struct Disk {
    store: ChunkStore,
    size: u64,
    /// Swapped whole by a freeze or a rebase; a read works on the stack it
    /// took, however long it waits for the store.
    stack: RwLock<Arc<Stack>>,
    /// Writes hold it shared while they write; a freeze holds it alone.
    writing: RwLock<()>,
    map: BlockMap,
}

impl Disk {
    /// A disk over image `base` and `layers` (bottom to top; the last is
    /// live and takes the writes). The map is built from what each layer
    /// holds: no bigger a job than the layers' dirty maps.
    pub fn open(
        base: Arc<Manifest>,
        store: ChunkStore,
        layers: Vec<Arc<Overlay>>,
    ) -> Result<Arc<Disk>, DiskError> {
        if layers.is_empty() {
            return Err(DiskError::NoLayers);
        }
        let size = base.logical_size;
        let map = BlockMap::new(size.div_ceil(BLOCK));
        for (i, layer) in layers.iter().enumerate() {
            if layer.meta().logical_size != size {
                return Err(DiskError::LayerSize {
                    layer: layer.dir().display().to_string(),
                    found: layer.meta().logical_size,
                    wanted: size,
                });
            }
            for b in layer.dirty_blocks() {
                map.set(b, i as u32 + 1);
            }
        }
        Ok(Arc::new(Disk {
            store,
            size,
            stack: RwLock::new(Arc::new(Stack {
                base,
                layers,
                first: 1,
            })),
            writing: RwLock::new(()),
            map,
        }))
    }

    /// One queue's view of the disk.
    pub fn queue(self: &Arc<Self>) -> LazyDisk {
        LazyDisk {
            disk: self.clone(),
            readahead: ReadAhead::default(),
            hot: Mutex::new(HotChunks::default()),
            reads_ahead: true,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// The image under the layers.
    pub fn base(&self) -> Arc<Manifest> {
        self.read_stack().base.clone()
    }

    /// The layers, bottom to top (the last is live).
    pub fn layers(&self) -> Vec<Arc<Overlay>> {
        self.read_stack().layers.clone()
    }

    /// Memory the block map takes (it grows with what was written).
    pub fn map_bytes(&self) -> usize {
        self.map.bytes()
    }

    /// The live layer.
    pub fn live(&self) -> Arc<Overlay> {
        self.read_stack().live().clone()
    }

    fn read_stack(&self) -> Arc<Stack> {
        self.stack.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_stack(&self, stack: Stack) {
        *self.stack.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(stack);
    }

    /// Freezes the live layer and makes `next` (a new, empty overlay) the
    /// live one: every write completed before the call is in the frozen
    /// layer, none issued after. The live layer is flushed first while
    /// writes go on, then again with writes held, which leaves that pause
    /// only what was written meanwhile: at most one FLUSH, and usually a
    /// much smaller one. Returns the frozen layers, bottom to top.
    pub fn freeze(&self, next: Arc<Overlay>) -> Result<Vec<Arc<Overlay>>, DiskError> {
        if next.meta().logical_size != self.size {
            return Err(DiskError::LayerSize {
                layer: next.dir().display().to_string(),
                found: next.meta().logical_size,
                wanted: self.size,
            });
        }
        self.read_stack().live().flush()?;
        let _writes = self.writing.write().unwrap_or_else(|p| p.into_inner());
        let stack = self.read_stack();
        stack.live().freeze()?;
        for b in next.dirty_blocks() {
            self.map.set(b, stack.live_number() + 1);
        }
        let frozen = stack.layers.clone();
        let mut layers = frozen.clone();
        layers.push(next);
        self.set_stack(Stack {
            base: stack.base.clone(),
            layers,
            first: stack.first,
        });
        Ok(frozen)
    }

    /// The frozen layers (bottom to top) if the live layer holds nothing:
    /// then they and the image are the disk as it is at this instant, and a
    /// clone can stand on them without a freeze. `None` if the live layer
    /// holds a block. Writes are kept out while it looks.
    pub fn frozen_if_clean(&self) -> Option<Vec<Arc<Overlay>>> {
        let _writes = self.writing.write().unwrap_or_else(|p| p.into_inner());
        let stack = self.read_stack();
        (stack.live().dirty_count() == 0).then(|| stack.layers[..stack.layers.len() - 1].to_vec())
    }

    /// Puts image `base` under the layers in place of the bottom ones it
    /// was folded from (`folded`, bottom to top, which must be the stack's
    /// bottom layers, frozen): they are dropped, and blocks only they held
    /// now read from `base`. Returns false (and changes nothing) if
    /// `folded` is not the bottom of the stack.
    pub fn rebase(&self, base: Arc<Manifest>, folded: &[Arc<Overlay>]) -> bool {
        // Alone with the stack: a freeze cannot slip in between.
        let _writes = self.writing.write().unwrap_or_else(|p| p.into_inner());
        let stack = self.read_stack();
        let bottom = stack.layers.len() > folded.len()
            && folded
                .iter()
                .zip(&stack.layers)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !bottom || base.logical_size != self.size {
            return false;
        }
        self.set_stack(Stack {
            base,
            layers: stack.layers[folded.len()..].to_vec(),
            first: stack.first + folded.len() as u32,
        });
        true
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        let live = self.live();
        Ok(live.flush()?)
    }
}

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
    /// Fetches were started since [`LazyDisk::took_fetches_ahead`].
    fetched: AtomicBool,
}

/// One queue's view of a disk. Cheap to make: one per I/O thread.
pub struct LazyDisk {
    disk: Arc<Disk>,
    readahead: ReadAhead,
    /// This queue's recently read chunks: warm reads take no lock shared
    /// with other queues.
    hot: Mutex<HotChunks>,
    reads_ahead: bool,
}

impl LazyDisk {
    /// A one-layer disk: image `manifest` under `overlay`, one queue.
    pub fn new(
        manifest: Arc<Manifest>,
        store: ChunkStore,
        overlay: Arc<Overlay>,
    ) -> Result<LazyDisk, DiskError> {
        Ok(Disk::open(manifest, store, vec![overlay])?.queue())
    }

    /// This view without read-ahead, for a reader that knows exactly what
    /// it will read.
    pub fn without_read_ahead(mut self) -> LazyDisk {
        self.reads_ahead = false;
        self
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Whether this view's read-ahead started fetches since the last call.
    pub fn took_fetches_ahead(&self) -> bool {
        self.readahead.fetched.swap(false, Ordering::Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.disk.size
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
        let stack = self.disk.read_stack();
        if self.reads_ahead && !buf.is_empty() {
            self.read_ahead(&stack, offset, buf.len() as u64);
        }
        let map = &self.disk.map;
        let last_block = (offset + buf.len() as u64).saturating_sub(1) / BLOCK;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / BLOCK;
            // Extend over blocks of the same source (one layer, or the image).
            let layer = stack.layer(map.get(block));
            let mut end_block = block + 1;
            while end_block <= last_block && same(stack.layer(map.get(end_block)), layer) {
                end_block += 1;
            }
            let end = (end_block * BLOCK).min(offset + buf.len() as u64);
            let part = &mut buf[done..done + (end - pos) as usize];
            match layer {
                Some(layer) => self.read_layer(layer, pos, part)?,
                None => self.read_image(&stack.base, pos, part)?,
            }
            done += part.len();
        }
        Ok(())
    }

    /// Whether reading `len` bytes at `offset` would wait for a fetch:
    /// an image chunk in the range that the layers do not cover whole is
    /// neither among this view's hot chunks nor in the cache. A guess (the
    /// cache may change before the read), for a scheduler that keeps slow
    /// reads away from the threads that serve fast ones.
    pub fn would_fetch(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.check(offset, len).is_err() {
            return false;
        }
        let stack = self.disk.read_stack();
        let base = &stack.base;
        let cs = u64::from(base.chunk_size);
        let end = offset + len;
        let hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        (offset / cs..end.div_ceil(cs)).any(|c| {
            let Some(id) = base.chunks.get(c as usize).copied().flatten() else {
                return false;
            };
            let covered = self.layers_cover(&stack, (c * cs).max(offset)..((c + 1) * cs).min(end));
            !covered && !hot.holds(&id) && !self.disk.store.cache().contains(&id)
        })
    }

    /// Whether the layers hold every block of the byte range `bytes`: then
    /// it is never read from the image.
    fn layers_cover(&self, stack: &Stack, bytes: std::ops::Range<u64>) -> bool {
        let map = &self.disk.map;
        (bytes.start / BLOCK..bytes.end.div_ceil(BLOCK)).all(|b| stack.layer(map.get(b)).is_some())
    }

    /// Feeds the sequential-read detector with a read of `len` bytes at
    /// `offset` and asks for chunks ahead when a stream is found.
    fn read_ahead(&self, stack: &Stack, offset: u64, len: u64) {
        let ra = &self.readahead;
        let base = &stack.base;
        let cs = u64::from(base.chunk_size);
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
        let until = (end + window).min(base.chunks.len() as u64);
        let ids: Vec<_> = (ahead..until)
            .filter(|&c| !self.layers_cover(stack, c * cs..((c + 1) * cs).min(self.size())))
            .filter_map(|c| base.chunks[c as usize])
            .collect();
        let outcome = self.disk.store.read_ahead(&ids, cs);
        if outcome != ReadAheadOutcome::Dropped {
            ra.window.store(window, Ordering::Relaxed);
            ra.ahead_until.store(until, Ordering::Relaxed);
        }
        if outcome == ReadAheadOutcome::Fetching {
            ra.fetched.store(true, Ordering::Relaxed);
        }
    }

    fn read_layer(&self, layer: &Overlay, pos: u64, part: &mut [u8]) -> Result<(), DiskError> {
        let first = pos / BLOCK;
        let skip = (pos % BLOCK) as usize;
        if skip == 0 && (part.len() as u64).is_multiple_of(BLOCK) {
            return Ok(layer.read_blocks(first, part)?);
        }
        let span = (skip + part.len()).div_ceil(BLOCK as usize) * BLOCK as usize;
        let span = span.min((self.size() - first * BLOCK) as usize);
        let mut tmp = vec![0u8; span];
        layer.read_blocks(first, &mut tmp)?;
        part.copy_from_slice(&tmp[skip..skip + part.len()]);
        Ok(())
    }

    /// Reads from the image, chunk by chunk.
    fn read_image(&self, base: &Manifest, pos: u64, part: &mut [u8]) -> Result<(), DiskError> {
        let cs = u64::from(base.chunk_size);
        let mut done = 0usize;
        while done < part.len() {
            let at = pos + done as u64;
            let index = (at / cs) as usize;
            let within = at % cs;
            let n = ((cs - within) as usize).min(part.len() - done);
            let out = &mut part[done..done + n];
            match base.chunks[index] {
                Some(id) => {
                    let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
                    self.disk.store.read_hot(&mut hot, &id, within, out)?;
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
            return self.write_blocks(offset / BLOCK, data);
        }
        // Widen to whole blocks, filling the edges from the disk.
        let first = offset / BLOCK;
        let span_end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(self.size());
        let mut span = vec![0u8; (span_end - first * BLOCK) as usize];
        self.read(first * BLOCK, &mut span)?;
        let skip = (offset - first * BLOCK) as usize;
        span[skip..skip + data.len()].copy_from_slice(data);
        self.write_blocks(first, &span)
    }

    /// Writes whole blocks into the live layer and points the map at it.
    fn write_blocks(&self, first: u64, data: &[u8]) -> Result<(), DiskError> {
        let _writing = self.disk.writing.read().unwrap_or_else(|p| p.into_inner());
        let stack = self.disk.read_stack();
        stack.live().write_blocks(first, data)?;
        let n = stack.live_number();
        for b in first..first + (data.len() as u64).div_ceil(BLOCK) {
            self.disk.map.set(b, n);
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros (WRITE_ZEROES, DISCARD).
    /// Whole blocks are punched out of the live layer; partial edges are
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
        {
            let _writing = self.disk.writing.read().unwrap_or_else(|p| p.into_inner());
            let stack = self.disk.read_stack();
            stack
                .live()
                .zero_blocks(first_whole, end_whole - first_whole)?;
            let n = stack.live_number();
            for b in first_whole..end_whole {
                self.disk.map.set(b, n);
            }
        }
        let tail_start = (end_whole * BLOCK).min(end);
        if tail_start < end {
            self.write(tail_start, &vec![0u8; (end - tail_start) as usize])?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.disk.flush()
    }
}

/// Whether two sources are the same (both the image, or one layer).
fn same(a: Option<&Arc<Overlay>>, b: Option<&Arc<Overlay>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}
