//! Manifests name snapshots and come from shared stores: any bytes must
//! decode to an error or to a manifest whose canonical encoding is exactly
//! those bytes (one encoding per content, so ids are stable).
#![no_main]

use cairn_engine::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
