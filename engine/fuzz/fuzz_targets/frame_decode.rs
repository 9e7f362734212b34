//! Frames come from packs on remote tiers: any bytes must decode to an
//! error or to a chunk that really hashes to the id it claims.
#![no_main]

use cairn_engine::frame::{self, Verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, _)) = frame::decode(data) {
        if let Ok(raw) = frame::decode_chunk(data, header.id, Verify::Digest) {
            assert_eq!(raw.len(), header.raw_len as usize);
            assert_eq!(cairn_engine::ChunkId::of(&raw), header.id);
        }
    }
});
