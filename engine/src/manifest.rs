//! Manifests: what an image or snapshot is, chunk by chunk.
//!
//! A manifest lists the logical size, the chunk size and, for every chunk,
//! its id or "zero". Its encoding is canonical (one encoding per content:
//! zero chunks and stored chunks in maximal runs), versioned and
//! CRC-checked, and the manifest's id is the BLAKE3 of that encoding.
//! Layout: `docs/formats/manifest.md`.

use crate::error::ErrorKind;
use crate::id::{ChunkId, ManifestId};
use crate::le::{Reader, Truncated};

pub const MANIFEST_MAGIC: [u8; 8] = *b"CRNMANI\0";
pub const MANIFEST_VERSION: u16 = 1;
/// Readers refuse manifests larger than this before decoding.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
pub const MIN_CHUNK_SHIFT: u8 = 12;
pub const MAX_CHUNK_SHIFT: u8 = 24;
/// Disks of up to 1 PiB.
pub const MAX_LOGICAL_SIZE: u64 = 1 << 50;
/// Chunks per manifest: 4 TiB at 64 KiB chunks. A manifest is held in
/// memory as one entry per chunk (33 bytes), so this bounds what a hostile
/// or oversized manifest can make a reader allocate (about 2 GiB).
pub const MAX_CHUNKS: u64 = 1 << 26;
const MAX_META_LEN: u32 = 16 << 20;
const RUN_ZERO: u8 = 0;
const RUN_CHUNKS: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is truncated at byte {0}")]
    Truncated(usize),
    #[error("not a manifest: bad magic")]
    BadMagic,
    #[error("manifest format version {0} is not supported (this build reads version {MANIFEST_VERSION}); upgrade cairn")]
    UnsupportedVersion(u16),
    #[error("manifest is {0} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
    #[error("manifest CRC mismatch")]
    Crc,
    #[error("manifest bytes hash to {actual}, expected {expected}")]
    DigestMismatch {
        expected: ManifestId,
        actual: ManifestId,
    },
}

impl From<Truncated> for ManifestError {
    fn from(e: Truncated) -> Self {
        ManifestError::Truncated(e.at)
    }
}

impl ManifestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ManifestError::UnsupportedVersion(_) => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ManifestKind {
    Disk = 1,
    Memory = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kind: ManifestKind,
    pub logical_size: u64,
    pub chunk_size: u32,
    /// One entry per chunk; `None` is an all-zero chunk (never stored).
    pub chunks: Vec<Option<ChunkId>>,
    /// Kind-specific layout metadata (memory regions, page size); empty for disks.
    pub meta: Vec<u8>,
}

impl Manifest {
    /// Number of chunks a disk of `logical_size` has at `chunk_size`.
    pub fn chunk_count_for(logical_size: u64, chunk_size: u32) -> u64 {
        logical_size.div_ceil(u64::from(chunk_size))
    }

    pub fn new_disk(logical_size: u64, chunk_size: u32, chunks: Vec<Option<ChunkId>>) -> Manifest {
        Manifest {
            kind: ManifestKind::Disk,
            logical_size,
            chunk_size,
            chunks,
            meta: Vec::new(),
        }
    }

    /// Byte length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> u32 {
        let start = index as u64 * u64::from(self.chunk_size);
        (self.logical_size - start).min(u64::from(self.chunk_size)) as u32
    }

    /// Distinct stored chunks, in first-use order.
    pub fn distinct_chunks(&self) -> Vec<ChunkId> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .flatten()
            .filter(|id| seen.insert(**id))
            .copied()
            .collect()
    }

    pub fn zero_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_none()).count()
    }

    pub fn id(&self) -> ManifestId {
        ManifestId::of(&self.encode())
    }

    fn check(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT)
                .contains(&(self.chunk_size.trailing_zeros() as u8))
        {
            return bad(format!(
                "chunk size {} is not a power of two between 4 KiB and 16 MiB",
                self.chunk_size
            ));
        }
        if self.logical_size > MAX_LOGICAL_SIZE {
            return bad(format!("logical size {} exceeds 1 PiB", self.logical_size));
        }
        let want = Self::chunk_count_for(self.logical_size, self.chunk_size);
        if want > MAX_CHUNKS {
            return bad(format!(
                "{want} chunks are more than the {MAX_CHUNKS} a manifest may hold: use a larger chunk size"
            ));
        }
        if self.chunks.len() as u64 != want {
            return bad(format!(
                "{} chunk entries for a size of {} bytes at {} bytes a chunk (expected {want})",
                self.chunks.len(),
                self.logical_size,
                self.chunk_size
            ));
        }
        if self.meta.len() > MAX_META_LEN as usize {
            return bad(format!("{} bytes of metadata", self.meta.len()));
        }
        Ok(())
    }

    /// The canonical encoding. Panics only on a manifest that `check`
    /// rejects, which no constructor in this crate makes.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(e) = self.check() {
            panic!("encoding an invalid manifest: {e}");
        }
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 32);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.push(self.chunk_size.trailing_zeros() as u8);
        out.extend_from_slice(&self.logical_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.meta);
        let mut i = 0;
        while i < self.chunks.len() {
            let zero = self.chunks[i].is_none();
            let run = self.chunks[i..]
                .iter()
                .take(u32::MAX as usize)
                .take_while(|c| c.is_none() == zero)
                .count();
            out.push(if zero { RUN_ZERO } else { RUN_CHUNKS });
            out.extend_from_slice(&(run as u32).to_le_bytes());
            if !zero {
                for id in self.chunks[i..i + run].iter().flatten() {
                    out.extend_from_slice(id.as_bytes());
                }
            }
            i += run;
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes `bytes` that must hash to `expected`.
    pub fn decode_verified(bytes: &[u8], expected: ManifestId) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let actual = ManifestId::of(bytes);
        if actual != expected {
            return Err(ManifestError::DigestMismatch { expected, actual });
        }
        Manifest::decode(bytes)
    }

    /// Decodes and fully validates a canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        if r.take(8)? != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u16()?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        if bytes.len() < 4 {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != Reader::new(crc).u32()? {
            return Err(ManifestError::Crc);
        }
        let mut r = Reader::new(body);
        r.skip(10)?;
        let inconsistent = |m: String| ManifestError::Inconsistent(m);
        let kind = match r.u8()? {
            1 => ManifestKind::Disk,
            2 => ManifestKind::Memory,
            k => return Err(inconsistent(format!("unknown kind {k}"))),
        };
        let shift = r.u8()?;
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&shift) {
            return Err(inconsistent(format!("chunk size 2^{shift} out of range")));
        }
        let chunk_size = 1u32 << shift;
        let logical_size = r.u64()?;
        let count = r.u64()?;
        if logical_size > MAX_LOGICAL_SIZE
            || count != Manifest::chunk_count_for(logical_size, chunk_size)
        {
            return Err(inconsistent(format!(
                "{count} chunks cannot make a disk of {logical_size} bytes at {chunk_size} bytes a chunk"
            )));
        }
        let meta_len = r.u32()?;
        if meta_len > MAX_META_LEN {
            return Err(inconsistent(format!("{meta_len} bytes of metadata")));
        }
        let meta = r.take(meta_len as usize)?.to_vec();
        if count > MAX_CHUNKS {
            return Err(inconsistent(format!(
                "{count} chunks are more than the {MAX_CHUNKS} a manifest may hold"
            )));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut last_tag = None;
        while r.remaining() > 0 {
            let tag = r.u8()?;
            let run = u64::from(r.u32()?);
            if run == 0 || last_tag == Some(tag) {
                return Err(inconsistent(format!(
                    "non-canonical run at byte {}",
                    r.pos() - 5
                )));
            }
            if chunks.len() as u64 + run > count {
                return Err(inconsistent(format!(
                    "runs exceed the {count} chunks declared"
                )));
            }
            match tag {
                RUN_ZERO => chunks.extend(std::iter::repeat_n(None, run as usize)),
                RUN_CHUNKS => {
                    let ids = run
                        .checked_mul(32)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or(ManifestError::Truncated(r.pos()))?;
                    let mut ids = Reader::new(r.take(ids)?);
                    while ids.remaining() > 0 {
                        let id: [u8; 32] = ids.array()?;
                        if id == [0u8; 32] {
                            return Err(inconsistent("all-zero chunk id in a stored run".into()));
                        }
                        chunks.push(Some(ChunkId::from_bytes(id)));
                    }
                }
                t => return Err(inconsistent(format!("unknown run tag {t}"))),
            }
            last_tag = Some(tag);
        }
        if chunks.len() as u64 != count {
            return Err(inconsistent(format!(
                "runs cover {} chunks, header declares {count}",
                chunks.len()
            )));
        }
        Ok(Manifest {
            kind,
            logical_size,
            chunk_size,
            chunks,
            meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let c = |i: u8| Some(ChunkId::of(&[i]));
        Manifest::new_disk(
            5 * 65536 + 100,
            65536,
            vec![c(1), None, None, c(2), c(1), c(3)],
        )
    }

    #[test]
    fn a_large_mostly_zero_disk_round_trips() {
        // 64 GiB at 64 KiB chunks: a million entries, nearly all zero.
        let mut chunks = vec![None; 1 << 20];
        chunks[12345] = Some(ChunkId::of(b"one stored chunk"));
        let m = Manifest::new_disk(64 << 30, 64 << 10, chunks);
        let bytes = m.encode();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(Manifest::decode_verified(&bytes, m.id()).unwrap(), m);
    }

    #[test]
    fn encodes_and_decodes_to_itself() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode_verified(&bytes, m.id()).unwrap(), m);
        assert_eq!(m.chunk_len(5), 100);
        assert_eq!(m.distinct_chunks().len(), 3);
    }

    #[test]
    fn unknown_version_and_bad_sizes_are_clear_errors() {
        let mut bytes = sample().encode();
        bytes[8] = 7;
        let err = Manifest::decode(&bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("version 7"), "{err}");

        // Claim a logical size the chunk list cannot cover, fix the CRC.
        let mut bytes = sample().encode();
        bytes[12..20].copy_from_slice(&(100u64 << 20).to_le_bytes());
        let n = bytes.len();
        let crc = crc32fast::hash(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(matches!(err, ManifestError::Inconsistent(_)), "{err}");
        // It names the fields that disagree, with their values.
        let msg = err.to_string();
        assert!(
            msg.contains("chunks cannot make a disk of 104857600 bytes")
                && msg.contains("bytes a chunk"),
            "{msg}"
        );

        let mut bytes = sample().encode();
        bytes[30] ^= 1;
        let err = Manifest::decode(&bytes).unwrap_err();
        assert!(matches!(err, ManifestError::Crc), "{err}");
        assert!(err.to_string().contains("CRC"), "{err}");
        assert!(Manifest::decode_verified(&sample().encode(), ManifestId::of(b"x")).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(pattern in proptest::collection::vec(0u8..4, 0..300), tail in 1u32..=4096) {
            let chunks: Vec<_> = pattern.iter().map(|&p| (p > 0).then(|| ChunkId::of(&[p]))).collect();
            let size = if chunks.is_empty() { 0 } else { (chunks.len() as u64 - 1) * 4096 + u64::from(tail) };
            let m = Manifest::new_disk(size, 4096, chunks);
            let bytes = m.encode();
            prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if bytes.len() > 8 { bytes[..8].copy_from_slice(&MANIFEST_MAGIC); }
            let _ = Manifest::decode(&bytes);
        }
    }
}
