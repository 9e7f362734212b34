//! Frames: how one chunk is written anywhere (packs, remote tiers).
//!
//! A frame is a fixed 52-byte header followed by the payload. The header
//! carries the chunk id, so a pack can be re-indexed by a scan, and a CRC32
//! over the header and payload, so torn or rotten local bytes are caught
//! cheaply. The BLAKE3 id is checked separately, by whoever takes bytes from
//! a remote tier. Layout: `docs/formats/frame.md`.

use crate::error::ErrorKind;
use crate::id::ChunkId;
use crate::le::Reader;

pub const FRAME_MAGIC: [u8; 4] = *b"CRNF";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 52;
/// The largest chunk a frame may carry; readers refuse anything larger.
pub const MAX_CHUNK_LEN: u32 = 16 << 20;
/// zstd's worst case for MAX_CHUNK_LEN stays well below this.
const MAX_PAYLOAD_LEN: u32 = MAX_CHUNK_LEN + (1 << 20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is truncated: {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("bad frame magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame format version {0} is not supported (this build reads version {FRAME_VERSION})"
    )]
    UnsupportedVersion(u8),
    #[error("reserved frame header bytes are not zero")]
    Reserved,
    #[error("unknown frame codec {0}")]
    UnknownCodec(u8),
    #[error("frame lengths out of range: raw {raw_len}, payload {payload_len}")]
    BadLength { raw_len: u32, payload_len: u32 },
    #[error("frame CRC mismatch for chunk {id}: stored {stored:08x}, computed {computed:08x}")]
    CrcMismatch {
        id: ChunkId,
        stored: u32,
        computed: u32,
    },
    #[error("frame of chunk {id} does not decompress")]
    Decompress {
        id: ChunkId,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {id} decompressed to {got} bytes, header says {want}")]
    RawLength {
        id: ChunkId,
        got: usize,
        want: usize,
    },
    #[error("frame holds chunk {found}, expected {expected}")]
    WrongChunk { expected: ChunkId, found: ChunkId },
    #[error("bytes of chunk {expected} hash to {actual}")]
    DigestMismatch { expected: ChunkId, actual: ChunkId },
}

impl FrameError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FrameError::UnsupportedVersion(_) => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}

/// The parsed fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub payload_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len as usize
    }

    /// Parses and range-checks a header; the CRC is checked by [`decode`].
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
        if bytes.len() < FRAME_HEADER_LEN {
            return Err(FrameError::Truncated {
                have: bytes.len(),
                need: FRAME_HEADER_LEN,
            });
        }
        // The length is checked above: no field below can run short.
        let truncated = |_| FrameError::Truncated {
            have: bytes.len(),
            need: FRAME_HEADER_LEN,
        };
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array().map_err(truncated)?;
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = r.u8().map_err(truncated)?;
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let codec = r.u8().map_err(truncated)?;
        if r.u16().map_err(truncated)? != 0 {
            return Err(FrameError::Reserved);
        }
        let codec = match codec {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            other => return Err(FrameError::UnknownCodec(other)),
        };
        let raw_len = r.u32().map_err(truncated)?;
        let payload_len = r.u32().map_err(truncated)?;
        let lengths_ok = raw_len > 0
            && raw_len <= MAX_CHUNK_LEN
            && payload_len <= MAX_PAYLOAD_LEN
            && (codec != Codec::Raw || payload_len == raw_len);
        if !lengths_ok {
            return Err(FrameError::BadLength {
                raw_len,
                payload_len,
            });
        }
        let id = ChunkId::from_bytes(r.array().map_err(truncated)?);
        Ok(FrameHeader {
            id,
            codec,
            raw_len,
            payload_len,
            crc: r.u32().map_err(truncated)?,
        })
    }
}

fn crc_of(header_prefix: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_prefix);
    h.update(payload);
    h.finalize()
}

/// Compresses chunks into frames. One per thread: it owns a zstd context.
pub struct FrameEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl FrameEncoder {
    /// `level` is the zstd level (1 is fast; 3 is zstd's default; up to 19).
    pub fn new(level: i32) -> std::io::Result<FrameEncoder> {
        Ok(FrameEncoder {
            compressor: zstd::bulk::Compressor::new(level)?,
            scratch: Vec::new(),
        })
    }

    /// Appends the frame of chunk `raw` (whose id is `id`) to `out`.
    ///
    /// The payload is zstd unless that saves less than 1/32 of the bytes,
    /// in which case the chunk is stored raw and reads skip decompression.
    pub fn encode_into(&mut self, id: ChunkId, raw: &[u8], out: &mut Vec<u8>) {
        assert!(
            !raw.is_empty() && raw.len() <= MAX_CHUNK_LEN as usize,
            "chunk length {} out of range",
            raw.len()
        );
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let compressed = self
            .compressor
            .compress_to_buffer(raw, &mut self.scratch)
            .is_ok();
        let pays = compressed && self.scratch.len() < raw.len() - raw.len() / 32;
        let (codec, payload) = if pays {
            (Codec::Zstd, &self.scratch[..])
        } else {
            (Codec::Raw, raw)
        };
        let start = out.len();
        out.extend_from_slice(&FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(codec as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(id.as_bytes());
        let crc = crc_of(&out[start..start + 48], payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(payload);
    }

    pub fn encode(&mut self, id: ChunkId, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + raw.len());
        self.encode_into(id, raw, &mut out);
        out
    }
}

/// Checks a whole frame's header and CRC; returns the header and payload.
pub fn decode(frame: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    let header = FrameHeader::parse(frame)?;
    let need = header.frame_len();
    if frame.len() < need {
        return Err(FrameError::Truncated {
            have: frame.len(),
            need,
        });
    }
    let payload = &frame[FRAME_HEADER_LEN..need];
    let computed = crc_of(&frame[..48], payload);
    if computed != header.crc {
        return Err(FrameError::CrcMismatch {
            id: header.id,
            stored: header.crc,
            computed,
        });
    }
    Ok((header, payload))
}

/// How much to trust a frame's claimed id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// CRC only: for local bytes this process wrote.
    Crc,
    /// CRC and BLAKE3 of the decompressed bytes: for anything from a remote tier.
    Digest,
}

thread_local! {
    /// One zstd decompression context per thread: creating one costs more
    /// than decompressing a small chunk.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut()
            .expect("decompressor just created")
            .decompress(payload, capacity)
    })
}

/// Decodes the chunk in `frame`, which must be chunk `expected`.
pub fn decode_chunk(
    frame: &[u8],
    expected: ChunkId,
    verify: Verify,
) -> Result<Vec<u8>, FrameError> {
    let (header, payload) = decode(frame)?;
    if header.id != expected {
        return Err(FrameError::WrongChunk {
            expected,
            found: header.id,
        });
    }
    let raw = match header.codec {
        Codec::Raw => payload.to_vec(),
        Codec::Zstd => {
            let want = header.raw_len as usize;
            let raw = decompress(payload, want).map_err(|source| FrameError::Decompress {
                id: header.id,
                source,
            })?;
            if raw.len() != want {
                return Err(FrameError::RawLength {
                    id: header.id,
                    got: raw.len(),
                    want,
                });
            }
            raw
        }
    };
    if verify == Verify::Digest {
        let actual = ChunkId::of(&raw);
        if actual != expected {
            return Err(FrameError::DigestMismatch { expected, actual });
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_of(raw: &[u8]) -> (ChunkId, Vec<u8>) {
        let id = ChunkId::of(raw);
        (id, FrameEncoder::new(1).unwrap().encode(id, raw))
    }

    #[test]
    fn compressible_chunks_are_zstd_and_random_ones_raw() {
        let (_, f) = frame_of(&[7u8; 65536]);
        assert_eq!(FrameHeader::parse(&f).unwrap().codec, Codec::Zstd);
        assert!(f.len() < 1000);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let (id, f) = frame_of(&noise);
        let h = FrameHeader::parse(&f).unwrap();
        assert_eq!(h.codec, Codec::Raw);
        assert_eq!(decode_chunk(&f, id, Verify::Digest).unwrap(), noise);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let (id, f) = frame_of(b"some bytes of a chunk, repeated, repeated, repeated");
        for byte in 0..f.len() {
            let mut bad = f.clone();
            bad[byte] ^= 0x10;
            assert!(
                decode_chunk(&bad, id, Verify::Crc).is_err(),
                "flip at {byte} not caught"
            );
        }
    }

    #[test]
    fn a_forged_frame_with_a_valid_crc_fails_the_digest() {
        let raw = b"real content".to_vec();
        let claimed = ChunkId::of(b"other content");
        let f = FrameEncoder::new(1).unwrap().encode(claimed, &raw);
        assert!(decode_chunk(&f, claimed, Verify::Crc).is_ok());
        let err = decode_chunk(&f, claimed, Verify::Digest).unwrap_err();
        assert!(matches!(err, FrameError::DigestMismatch { .. }));
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn wrong_version_is_unsupported() {
        let (id, mut f) = frame_of(b"abc");
        f[4] = 9;
        let err = decode_chunk(&f, id, Verify::Crc).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    proptest! {
        #[test]
        fn round_trip(raw in proptest::collection::vec(any::<u8>(), 1..20000), level in 1i32..5) {
            let id = ChunkId::of(&raw);
            let f = FrameEncoder::new(level).unwrap().encode(id, &raw);
            prop_assert_eq!(decode_chunk(&f, id, Verify::Digest).unwrap(), raw);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
