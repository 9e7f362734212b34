//! A built disk as regions of bytes, and the two ways out: chunk-sized
//! pieces for the importer (whole chunks of zeros never materialised) or a
//! sparse file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::BLOCK;
use crate::import::{ImportError, Piece};

/// Bytes of one region: encoded metadata, or file content in the spool.
#[derive(Debug)]
pub enum Src {
    Bytes(Vec<u8>),
    Spool { offset: u64, len: u64 },
}

/// Bytes starting at a block; everything no region covers is zero.
#[derive(Debug)]
pub struct Region {
    pub block: u64,
    pub src: Src,
}

impl Region {
    fn start(&self) -> u64 {
        self.block * BLOCK
    }
    fn len(&self) -> u64 {
        match &self.src {
            Src::Bytes(b) => b.len() as u64,
            Src::Spool { len, .. } => *len,
        }
    }
    fn end(&self) -> u64 {
        self.start() + self.len()
    }

    /// Copies the part of the region at disk offset `at..at + out.len()`.
    fn copy(&self, spool: &File, at: u64, out: &mut [u8]) -> io::Result<()> {
        let from = (at - self.start()) as usize;
        match &self.src {
            Src::Bytes(b) => out.copy_from_slice(&b[from..from + out.len()]),
            Src::Spool { offset, .. } => spool.read_exact_at(out, offset + from as u64)?,
        }
        Ok(())
    }
}

/// An encoded file system, sorted by block.
#[derive(Debug)]
pub struct Disk {
    /// The disk's size in bytes.
    pub size: u64,
    pub regions: Vec<Region>,
    pub used_blocks: u64,
    pub inodes: u64,
}

/// Bytes gathered into one piece.
const BATCH: u64 = 8 << 20;
/// Zero chunks reported in one piece.
const ZERO_RUN: u64 = 1 << 16;

impl Disk {
    /// The disk as importer pieces of whole `chunk`-byte chunks.
    pub fn pieces<'a>(
        &'a self,
        spool: &'a File,
        spool_path: &'a std::path::Path,
        chunk: u64,
    ) -> impl Iterator<Item = Result<Piece, ImportError>> + 'a {
        let mut pos = 0u64;
        let mut ri = 0usize;
        std::iter::from_fn(move || {
            if pos >= self.size {
                return None;
            }
            while ri < self.regions.len() && self.regions[ri].end() <= pos {
                ri += 1;
            }
            let next = self.regions.get(ri).map_or(u64::MAX, Region::start);
            if next >= pos + chunk {
                let zeros = if next == u64::MAX {
                    (self.size - pos).div_ceil(chunk)
                } else {
                    (next.min(self.size) - pos) / chunk
                }
                .min(ZERO_RUN);
                pos = (pos + zeros * chunk).min(self.size);
                return Some(Ok(Piece::Known(vec![None; zeros as usize])));
            }
            // Chunks that some region touches, up to a batch.
            let mut end = pos;
            let mut k = ri;
            while end < self.size && end - pos < BATCH {
                while k < self.regions.len() && self.regions[k].end() <= end {
                    k += 1;
                }
                if self.regions.get(k).is_none_or(|r| r.start() >= end + chunk) {
                    break;
                }
                end = (end + chunk).min(self.size);
            }
            let mut buf = vec![0u8; (end - pos) as usize];
            for r in self.regions[ri..].iter().take_while(|r| r.start() < end) {
                let (a, b) = (r.start().max(pos), r.end().min(end));
                if a < b {
                    if let Err(source) =
                        r.copy(spool, a, &mut buf[(a - pos) as usize..(b - pos) as usize])
                    {
                        pos = self.size;
                        return Some(Err(ImportError::Read {
                            path: spool_path.to_owned(),
                            source,
                        }));
                    }
                }
            }
            pos = end;
            Some(Ok(Piece::Bytes(buf)))
        })
    }

    /// Writes the disk to `out` (a sparse file of `size` bytes).
    pub fn write_to(&self, spool: &File, out: &File) -> io::Result<()> {
        out.set_len(0)?;
        out.set_len(self.size)?;
        let mut buf = Vec::new();
        for r in &self.regions {
            buf.resize(r.len() as usize, 0);
            r.copy(spool, r.start(), &mut buf)?;
            out.write_all_at(&buf, r.start())?;
        }
        Ok(())
    }
}
