//! A memory manifest's layout metadata comes from shared stores and tells
//! the page server where guest regions lie: any bytes must decode to an
//! error or to regions laid back to back inside the image, whose canonical
//! encoding is exactly those bytes (the manifest's id covers them).
#![no_main]

use cairn_engine::memory::MemLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the image's size.
    let (size, bytes) = match data.split_first() {
        Some((&shift, rest)) => (1u64 << (shift % 48), rest),
        None => (0, data),
    };
    if let Ok(layout) = MemLayout::decode(bytes, size) {
        let mut end = 0;
        for r in &layout.regions {
            assert_eq!(r.offset, end);
            assert!(r.page_size.is_power_of_two() && r.size % r.page_size == 0);
            end += r.size;
        }
        assert!(end <= size);
        assert_eq!(layout.encode(), bytes);
    }
});
