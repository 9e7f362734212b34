//! One cached chunk on local disk: raw bytes plus a CRC per 4 KiB block.
//!
//! Hot data is kept decompressed and memory-mapped, so that a warm read is
//! one copy out of the page cache with no system call, and checked block by
//! block so that a 4 KiB read verifies 4 KiB, not the whole chunk. Layout
//! (`docs/formats/cache.md`): a 48-byte header, the CRC table, padding to a
//! 4 KiB boundary, then the chunk's bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

use crate::frame::MAX_CHUNK_LEN;
use crate::id::ChunkId;
use crate::le::{Reader, Truncated};

const MAGIC: [u8; 4] = *b"CRNC";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 48;
pub const BLOCK_SHIFT: u32 = 12;
pub const BLOCK: usize = 1 << BLOCK_SHIFT;

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("cached chunk {id}: I/O error")]
    Io {
        id: ChunkId,
        #[source]
        source: io::Error,
    },
    #[error("cached chunk {id}: CRC mismatch in 4 KiB block {block}")]
    Crc { id: ChunkId, block: usize },
    #[error("cached chunk {id}: read of {len} bytes at {offset} is outside its {raw_len} bytes")]
    OutOfRange {
        id: ChunkId,
        offset: u64,
        len: usize,
        raw_len: u32,
    },
    #[error("cached file is not a valid chunk: {0}")]
    Invalid(String),
}

fn data_offset(raw_len: u32) -> u64 {
    let table = raw_len.div_ceil(BLOCK as u32) as usize * 4;
    (HEADER_LEN + table).div_ceil(BLOCK) as u64 * BLOCK as u64
}

/// Bytes a cached chunk of `raw_len` bytes takes on disk.
pub fn file_len(raw_len: u32) -> u64 {
    data_offset(raw_len) + u64::from(raw_len)
}

/// Header, CRC table and padding for `raw`, ready to be followed by `raw`.
pub fn encode_header(id: ChunkId, raw: &[u8]) -> Vec<u8> {
    let raw_len = raw.len() as u32;
    let mut h = Vec::with_capacity(data_offset(raw_len) as usize);
    h.extend_from_slice(&MAGIC);
    h.push(VERSION);
    h.push(BLOCK_SHIFT as u8);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&raw_len.to_le_bytes());
    h.extend_from_slice(id.as_bytes());
    h.extend_from_slice(&[0; 4]); // header CRC, filled below
    for block in raw.chunks(BLOCK) {
        h.extend_from_slice(&crc32fast::hash(block).to_le_bytes());
    }
    let crc = header_crc(&h);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h.resize(data_offset(raw_len) as usize, 0);
    h
}

fn header_crc(h: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..44]);
    c.update(&h[HEADER_LEN..]);
    c.finalize()
}

/// An open (mapped) cached chunk; reads check each touched block's CRC.
#[derive(Debug)]
pub struct CachedChunk {
    id: ChunkId,
    map: Mmap,
    raw_len: u32,
    data_off: usize,
    crcs: Vec<u32>,
}

/// Maps a cache file read-only.
#[allow(unsafe_code)]
fn map_file(file: &File) -> io::Result<Mmap> {
    // SAFETY: cache files are written whole under a temporary name and
    // renamed into place; cairn never writes to or truncates a file once it
    // has that name, and eviction unlinks it, which leaves existing mappings
    // intact. The cache directory is private to cairn: a process that
    // truncated a file there behind its back could fault a reader (SIGBUS),
    // the same contract as any mapped file cache.
    unsafe { MmapOptions::new().populate().map(file) }
}

fn invalid(path: &Path, what: &str) -> EntryError {
    EntryError::Invalid(format!("{}: {what}", path.display()))
}

/// Checks the header of a chunk file of `len` bytes that should hold `id`;
/// its length of raw bytes.
fn check_header(head: &[u8], len: u64, id: ChunkId, path: &Path) -> Result<u32, EntryError> {
    let invalid = |m: &str| invalid(path, m);
    if head.len() < HEADER_LEN {
        return Err(invalid("too short"));
    }
    let mut r = Reader::new(head);
    let short = |_| invalid("too short");
    let magic: [u8; 4] = r.array().map_err(short)?;
    let (version, shift) = (r.u8().map_err(short)?, r.u8().map_err(short)?);
    if magic != MAGIC
        || version != VERSION
        || u32::from(shift) != BLOCK_SHIFT
        || r.u16().map_err(short)? != 0
    {
        return Err(invalid("bad magic, version, block size or reserved bytes"));
    }
    let raw_len = r.u32().map_err(short)?;
    if raw_len == 0 || raw_len > MAX_CHUNK_LEN {
        return Err(invalid("length out of range"));
    }
    if r.array::<32>().map_err(short)? != *id.as_bytes() {
        return Err(invalid("holds another chunk"));
    }
    if len != file_len(raw_len) {
        return Err(invalid("file length does not match the header"));
    }
    Ok(raw_len)
}

/// Checks the header and CRC table at the start of a chunk file (`meta`,
/// at least the header and table); the raw length and the CRC table.
fn check_meta(
    meta: &[u8],
    len: u64,
    id: ChunkId,
    path: &Path,
) -> Result<(u32, Vec<u32>), EntryError> {
    let raw_len = check_header(meta, len, id, path)?;
    let nblocks = raw_len.div_ceil(BLOCK as u32) as usize;
    let short = |_: Truncated| invalid(path, "too short for its CRC table");
    let full = Reader::new(meta)
        .take(HEADER_LEN + nblocks * 4)
        .map_err(short)?;
    let mut r = Reader::new(full);
    r.skip(44).map_err(short)?;
    let stored = r.u32().map_err(short)?;
    if header_crc(full) != stored {
        return Err(invalid(path, "header CRC mismatch"));
    }
    let crcs = (0..nblocks)
        .map(|_| r.u32().map_err(short))
        .collect::<Result<_, _>>()?;
    Ok((raw_len, crcs))
}

/// Checks the header and CRC table of the chunk file at `path` without
/// mapping it (the data blocks are checked on each read); its length on
/// disk. For scans: cheap, and it leaves the page cache alone.
pub fn check_file(path: &Path, id: ChunkId) -> Result<u64, EntryError> {
    let io = |source| EntryError::Io { id, source };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = [0u8; HEADER_LEN];
    let n = file.read_at(&mut head, 0).map_err(io)?;
    let raw_len = check_header(&head[..n], len, id, path)?;
    let mut meta = vec![0u8; data_offset(raw_len) as usize];
    file.read_exact_at(&mut meta, 0).map_err(io)?;
    check_meta(&meta, len, id, path)?;
    Ok(len)
}

impl CachedChunk {
    /// Opens, maps and checks the header of the cached chunk at `path`,
    /// and sets its modification time to now: other processes sharing the
    /// cache take a file's mtime for when it was last used.
    pub fn open(path: &Path, id: ChunkId) -> Result<CachedChunk, EntryError> {
        let io = |source| EntryError::Io { id, source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_LEN as u64 {
            // Torn by a crash (mapping it would fail with EINVAL, which
            // would read as a passing fault, not as a bad file).
            return Err(invalid(path, "too short"));
        }
        let map = map_file(&file).map_err(io)?;
        let (raw_len, crcs) = check_meta(&map, len, id, path)?;
        // Advice only: a read-only cache directory still serves.
        let _ = file.set_modified(std::time::SystemTime::now());
        Ok(CachedChunk {
            id,
            map,
            raw_len,
            data_off: data_offset(raw_len) as usize,
            crcs,
        })
    }

    pub fn id(&self) -> ChunkId {
        self.id
    }

    pub fn len(&self) -> u32 {
        self.raw_len
    }

    pub fn is_empty(&self) -> bool {
        self.raw_len == 0
    }

    /// Reads `buf.len()` bytes at `offset` within the chunk, checking the
    /// CRC of every 4 KiB block the read touches.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), EntryError> {
        buf.copy_from_slice(self.slice_at(offset, buf.len())?);
        Ok(())
    }

    /// The `len` bytes at `offset` within the chunk, straight from the
    /// mapping, once the CRC of every 4 KiB block they touch checks out.
    pub fn slice_at(&self, offset: u64, len: usize) -> Result<&[u8], EntryError> {
        let end = offset + len as u64;
        if end > u64::from(self.raw_len) {
            return Err(EntryError::OutOfRange {
                id: self.id,
                offset,
                len,
                raw_len: self.raw_len,
            });
        }
        let data = &self.map[self.data_off..];
        if len == 0 {
            return Ok(&data[..0]);
        }
        let first = (offset >> BLOCK_SHIFT) as usize;
        let last = ((end - 1) >> BLOCK_SHIFT) as usize;
        for block in first..=last {
            let start = block << BLOCK_SHIFT;
            let stop = (start + BLOCK).min(self.raw_len as usize);
            self.check(block, &data[start..stop])?;
        }
        Ok(&data[offset as usize..end as usize])
    }

    fn check(&self, block: usize, bytes: &[u8]) -> Result<(), EntryError> {
        if crc32fast::hash(bytes) == self.crcs[block] {
            Ok(())
        } else {
            Err(EntryError::Crc { id: self.id, block })
        }
    }
}
