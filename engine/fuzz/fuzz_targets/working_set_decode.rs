//! Working-set objects (`wsets/<snapshot id>`) come from shared stores and
//! steer what a resume prefetches: any bytes must decode to an error or to
//! runs that all lie inside the snapshot, whose canonical encoding is
//! exactly those bytes.
#![no_main]

use cairn_engine::memory::working_set::{WorkingSet, UNIT};
use cairn_engine::ManifestId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the snapshot's size (a power of two of UNITs).
    let (size, bytes) = match data.split_first() {
        Some((&shift, rest)) => (UNIT << (shift % 40), rest),
        None => (0, data),
    };
    if let Ok(ws) = WorkingSet::decode(bytes, ManifestId::of(b"snapshot"), size) {
        for run in &ws.runs {
            assert!(!run.is_empty() && run.offset() + run.len() <= size);
        }
        assert_eq!(ws.encode(), bytes);
    }
});
