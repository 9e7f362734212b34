//! Fuzzes the userfaultfd handshake parser: any bytes a VMM (or anything
//! else that connects) sends must give regions that check out or a clear
//! error, never a panic.
#![no_main]

use cairn_vmm_glue::uffd::parse_regions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (size, json) = match data.split_first() {
        Some((&shift, rest)) => (1u64 << (shift % 48), rest),
        None => (0, data),
    };
    if let Ok(regions) = parse_regions(json, size) {
        for r in &regions {
            assert!(r.size > 0 && r.size % r.page_size == 0);
            assert!(r.offset + r.size <= size);
        }
        for w in regions.windows(2) {
            assert!(w[0].base + w[0].size <= w[1].base);
        }
    }
});
