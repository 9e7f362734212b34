//! Memory images: full and diff imports round-trip byte for byte, a diff
//! shares every unchanged chunk with its parent, and holes (not zeros)
//! mean "unchanged".

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::export::export_raw;
use cairn_engine::import::ImportOptions;
use cairn_engine::manifest::ManifestKind;
use cairn_engine::memory::{import_memory, MemImportError, MemLayout};
use cairn_engine::objstore::{FileStore, ObjectStore};

#[test]
fn full_and_diff_memory_files_round_trip_and_share_unchanged_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let remote: Arc<dyn ObjectStore> =
        Arc::new(FileStore::open(&dir.path().join("store")).unwrap());
    let store = rt
        .block_on(ChunkStore::open(
            remote,
            ChunkStoreConfig::new(dir.path().join("cache"), 128 << 20),
        ))
        .unwrap();
    let opts = ImportOptions::new(dir.path().join("staging"));
    let cs = 64 << 10;
    let base = common::test_image(64, cs, 1);
    let full = dir.path().join("full.mem");
    std::fs::write(&full, &base).unwrap();
    let layout = MemLayout::single(base.len() as u64, 4096);
    let (parent, report) = import_memory(&store, &full, &layout, None, &opts, &|_| {}).unwrap();
    assert_eq!(parent.kind, ManifestKind::Memory);
    assert_eq!(MemLayout::of(&parent).unwrap(), layout);
    assert!(report.zero_chunks > 0, "zero chunks are elided");
    assert!(
        report.distinct_chunks < report.chunks - report.zero_chunks,
        "repeats stored once"
    );

    // A Firecracker-style diff: the parent's size, sparse, with a few pages
    // written, one of them with zeros over data (a real change).
    let diff = dir.path().join("diff.mem");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&diff)
        .unwrap();
    f.set_len(base.len() as u64).unwrap();
    let mut expected = base.clone();
    let page_a = 5 * cs + 4096; // inside chunk 5
    let page_b = 41 * cs; // first page of chunk 41 (random bytes), zeros over data
    let page_c = 63 * cs + 60 * 1024; // last page of the last chunk
    for (at, fill) in [(page_a, 0x11u8), (page_b, 0), (page_c, 0x33)] {
        f.write_all_at(&[fill; 4096], at as u64).unwrap();
        expected[at..at + 4096].fill(fill);
    }
    drop(f);
    let mut dl = layout.clone();
    dl.parent = Some(parent.id());
    let parent = Arc::new(parent);
    let (child, report) =
        import_memory(&store, &diff, &dl, Some(parent.clone()), &opts, &|_| {}).unwrap();
    assert!(
        report.new_chunks <= 3,
        "only the changed chunks are new: {report:?}"
    );
    let changed: Vec<usize> = (0..64)
        .filter(|&i| child.chunks[i] != parent.chunks[i])
        .collect();
    assert_eq!(changed, vec![5, 41, 63]);
    assert_eq!(MemLayout::of(&child).unwrap().parent, Some(parent.id()));

    let out = dir.path().join("out.mem");
    export_raw(&store, &child, &out, &|_| {}).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "diff export differs"
    );
    export_raw(&store, &parent, &out, &|_| {}).unwrap();
    assert!(std::fs::read(&out).unwrap() == base, "full export differs");

    // A diff of another size is refused, naming both sizes.
    let short = dir.path().join("short.mem");
    std::fs::write(&short, vec![1u8; 8192]).unwrap();
    let err = import_memory(
        &store,
        &short,
        &MemLayout::single(8192, 4096),
        Some(parent),
        &opts,
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, MemImportError::DiffSize { .. }), "{err}");
}
