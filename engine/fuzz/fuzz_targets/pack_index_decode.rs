//! Pack index objects are fetched from shared buckets: any bytes must parse
//! to an error or to an index whose frames are laid end to end and which
//! encodes back to the same tail.
#![no_main]

use cairn_engine::pack::PackIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = PackIndex::decode_tail(data) {
        let tail = index.encode_tail();
        assert!(data.ends_with(&tail));
        assert_eq!(PackIndex::decode_tail(&tail).unwrap(), index);
    }
});
