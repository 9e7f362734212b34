//! The lazy disk (image + overlay) against a plain byte-vector model:
//! random reads, unaligned writes, write-zeroes and flushes, then a reopen.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::disk::{Disk, LazyDisk};
use cairn_engine::export::export_raw;
use cairn_engine::import::{import_raw, ImportOptions};
use cairn_engine::objstore::{open_store, StoreUri};
use cairn_engine::overlay::Overlay;
use cairn_engine::snapshot::{fold_layers, snapshot_overlay};

const CS: usize = 64 << 10;

/// A `file://` store in `dir` with a 256 MiB cache.
fn file_store(dir: &Path, rt: &tokio::runtime::Runtime) -> ChunkStore {
    let uri: StoreUri = format!("file://{}", dir.join("store").display())
        .parse()
        .unwrap();
    let remote = rt.block_on(open_store(&uri)).unwrap();
    rt.block_on(remote.prepare()).unwrap();
    rt.block_on(ChunkStore::open(
        remote,
        ChunkStoreConfig::new(dir.join("cache"), 256 << 20),
    ))
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_sparse_image_imports_without_reading_its_holes_and_exports_identical() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = file_store(dir.path(), &rt);
    // 4 GiB, almost all hole: data at the start, unaligned in the middle,
    // and in the short last chunk.
    let size = (4u64 << 30) + 1000;
    let path = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut data = vec![0u8; 3 * CS];
    fastrand::Rng::with_seed(8).fill(&mut data);
    let spots = [0u64, (2 << 30) + 12345, size - 700];
    for &at in &spots {
        let n = (data.len() as u64).min(size - at) as usize;
        f.write_all_at(&data[..n], at).unwrap();
    }
    drop(f);
    let opts = ImportOptions::new(dir.path().join("staging"));
    let (manifest, report) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    assert_eq!(manifest.logical_size, size);
    // Nonzero chunks: 3 at the start, 4 straddling the unaligned spot and
    // the short last one.
    assert_eq!(manifest.chunks.len() - manifest.zero_chunks(), 3 + 4 + 1);
    assert_eq!(report.logical_bytes, size);

    let out = dir.path().join("out.raw");
    export_raw(&store, &manifest, &out, &|_| {}).unwrap();
    let back = std::fs::File::open(&out).unwrap();
    assert_eq!(back.metadata().unwrap().len(), size);
    for &at in &spots {
        let n = (data.len() as u64).min(size - at) as usize;
        let mut buf = vec![0u8; n + 4096];
        let start = at.saturating_sub(2048);
        let len = (n as u64 + 4096).min(size - start) as usize;
        back.read_exact_at(&mut buf[..len], start).unwrap();
        let mut want = vec![0u8; len];
        let lead = (at - start) as usize;
        want[lead..lead + n].copy_from_slice(&data[..n]);
        assert!(buf[..len] == want[..], "bytes around {at}");
    }
}

#[test]
fn random_io_matches_a_model_and_flushed_state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = file_store(dir.path(), &rt);
    // 24 chunks and a short tail, so the last block is partial too.
    let mut image = common::test_image(24, CS, 3);
    image.extend_from_slice(&[0x5a; 1000]);
    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let mut opts = ImportOptions::new(dir.path().join("staging"));
    opts.chunk_size = CS as u32;
    let (manifest, _) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    let manifest = Arc::new(manifest);
    let size = image.len() as u64;

    let ov_dir = dir.path().join("overlay");
    let overlay = Overlay::open_or_create(&ov_dir, &manifest.id(), size).unwrap();
    let disk = LazyDisk::new(manifest.clone(), store.clone(), overlay.clone()).unwrap();
    let mut whole = vec![0u8; image.len()];
    disk.read(0, &mut whole).unwrap();
    assert!(whole == image, "an untouched disk reads as its image");

    let mut model = image.clone();
    let mut flushed = model.clone();
    let mut rng = fastrand::Rng::with_seed(11);
    for step in 0..400 {
        let off = rng.u64(..size);
        let len = rng.u64(1..=(size - off).min(40_000));
        let (o, l) = (off as usize, len as usize);
        match rng.u8(..10) {
            0..=3 => {
                let mut buf = vec![0u8; l];
                disk.read(off, &mut buf).unwrap();
                assert!(buf == model[o..o + l], "step {step}: read {len} at {off}");
            }
            4..=6 => {
                let data: Vec<u8> = (0..l).map(|_| rng.u8(..)).collect();
                disk.write(off, &data).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            7 | 8 => {
                disk.write_zeroes(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                disk.flush().unwrap();
                flushed.clone_from(&model);
            }
        }
    }
    disk.flush().unwrap();
    flushed.clone_from(&model);
    assert!(
        disk.read(size - 10, &mut [0u8; 11]).is_err(),
        "past the end"
    );
    drop(disk);
    drop(overlay);

    let overlay = Overlay::open_or_create(&ov_dir, &manifest.id(), size).unwrap();
    let disk = LazyDisk::new(manifest.clone(), store.clone(), overlay.clone()).unwrap();
    disk.read(0, &mut whole).unwrap();
    assert!(
        whole == flushed,
        "a reopened overlay serves what was flushed"
    );
    drop(disk);

    // Fold the overlay into a snapshot: its bytes are the disk's, and every
    // chunk the overlay did not touch keeps its parent's id.
    let (snap, report) =
        snapshot_overlay(&store, manifest.clone(), &overlay, &opts, &|_| {}).unwrap();
    let out = dir.path().join("snapshot.raw");
    export_raw(&store, &snap, &out, &|_| {}).unwrap();
    assert!(std::fs::read(&out).unwrap() == flushed);
    let cs = CS as u64;
    let mut touched = 0;
    for (i, (new, old)) in snap.chunks.iter().zip(&manifest.chunks).enumerate() {
        let blocks = (i as u64 * cs / 4096)..((i as u64 + 1) * cs).min(size).div_ceil(4096);
        if blocks.clone().any(|b| overlay.is_dirty(b)) {
            touched += 1;
        } else {
            assert_eq!(new, old, "untouched chunk {i} must be shared");
        }
    }
    assert!(touched > 0);
    assert!(
        report.new_chunks <= touched,
        "{} new for {touched} touched",
        report.new_chunks
    );
}

#[test]
fn sequential_reads_fetch_ahead_and_random_reads_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = file_store(dir.path(), &rt);
    let mut image = vec![0u8; 96 * CS];
    fastrand::Rng::with_seed(21).fill(&mut image);
    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let opts = ImportOptions::new(dir.path().join("staging"));
    let (manifest, _) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    let manifest = Arc::new(manifest);
    let cold = |name: &str| {
        let remote = store.remote().clone();
        rt.block_on(ChunkStore::open(
            remote,
            ChunkStoreConfig::new(dir.path().join(name), 256 << 20),
        ))
        .unwrap()
    };
    let ahead = |s: &ChunkStore| s.stats().readahead_chunks.load(Ordering::Relaxed);

    // Random 4 KiB reads, each in another chunk: no read-ahead.
    let random = cold("cache-random");
    let overlay =
        Overlay::open_or_create(&dir.path().join("ov1"), &manifest.id(), image.len() as u64)
            .unwrap();
    let disk = LazyDisk::new(manifest.clone(), random.clone(), overlay.clone()).unwrap();
    let mut buf = vec![0u8; 4096];
    for c in [50u64, 3, 77, 12, 90, 41, 8, 66] {
        disk.read(c * CS as u64, &mut buf).unwrap();
        assert!(buf[..] == image[(c as usize) * CS..][..4096]);
    }
    assert_eq!(ahead(&random), 0);

    // A sequential stream of 32 KiB reads: chunks arrive ahead of it.
    let seq = cold("cache-seq");
    let overlay =
        Overlay::open_or_create(&dir.path().join("ov2"), &manifest.id(), image.len() as u64)
            .unwrap();
    let disk = LazyDisk::new(manifest.clone(), seq.clone(), overlay.clone()).unwrap();
    let mut buf = vec![0u8; 32 << 10];
    for (i, at) in (0..image.len()).step_by(buf.len()).enumerate() {
        disk.read(at as u64, &mut buf).unwrap();
        assert!(buf[..] == image[at..at + buf.len()], "read {i} at {at}");
    }
    assert!(ahead(&seq) > 0, "a sequential stream reads ahead");
    let stats = seq.stats();
    assert!(
        stats.remote_gets.load(Ordering::Relaxed) < 96,
        "read-ahead merges chunks into fewer GETs than chunks"
    );
}

#[test]
fn a_cached_chunk_that_rots_under_a_reading_queue_is_fetched_again_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = file_store(dir.path(), &rt);
    let mut image = vec![0u8; 8 * CS];
    fastrand::Rng::with_seed(4).fill(&mut image);
    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let opts = ImportOptions::new(dir.path().join("staging"));
    let (manifest, _) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    let manifest = Arc::new(manifest);
    let overlay =
        Overlay::open_or_create(&dir.path().join("ov"), &manifest.id(), image.len() as u64)
            .unwrap();
    let disk = LazyDisk::new(manifest.clone(), store.clone(), overlay.clone()).unwrap();
    let id = manifest.chunks[2].unwrap();
    let want = &image[2 * CS..3 * CS];
    let mut buf = vec![0u8; CS];
    disk.read(2 * CS as u64, &mut buf).unwrap();
    store.fetch(&[id]).unwrap(); // wait until it is cached
                                 // Twice: the chunk is now in this queue's hot set, mapped.
    for _ in 0..2 {
        disk.read(2 * CS as u64, &mut buf).unwrap();
        assert!(buf == want);
    }
    // Rot the cached file in place, under the live mapping.
    let cached = dir.path().join("cache/chunks").join(id.to_hex());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut byte = [0u8];
    std::fs::File::open(&cached)
        .unwrap()
        .read_exact_at(&mut byte, len - 100)
        .unwrap();
    f.write_all_at(&[byte[0] ^ 1], len - 100).unwrap();
    disk.read(2 * CS as u64, &mut buf).unwrap();
    assert!(buf == want, "a rotten cached chunk is never served");
    assert_eq!(
        store.cache().stats().crc_failures.load(Ordering::Relaxed),
        1
    );
}

/// Writes `fill` at 4 KiB block `b` of `disk` and of `model`.
fn put(disk: &LazyDisk, model: &mut [u8], b: u64, fill: u8) {
    let at = (b * 4096) as usize;
    disk.write(b * 4096, &[fill; 4096]).unwrap();
    model[at..at + 4096].fill(fill);
}

fn whole(disk: &LazyDisk) -> Vec<u8> {
    let mut out = vec![0u8; disk.size() as usize];
    disk.read(0, &mut out).unwrap();
    out
}

#[test]
fn frozen_layers_hold_snapshots_clones_diverge_and_a_rebase_drops_folded_layers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = file_store(dir.path(), &rt);
    let image = common::test_image(16, CS, 5);
    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let mut opts = ImportOptions::new(dir.path().join("staging"));
    opts.chunk_size = CS as u32;
    let (manifest, _) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    let manifest = Arc::new(manifest);
    let size = image.len() as u64;
    let layer =
        |name: &str| Overlay::open_or_create(&dir.path().join(name), &manifest.id(), size).unwrap();

    let a = Disk::open(manifest.clone(), store.clone(), vec![layer("a0")]).unwrap();
    let qa = a.queue();
    let mut model_a = image.clone();
    put(&qa, &mut model_a, 3, 0xa1);
    put(&qa, &mut model_a, 40, 0xa1);
    // Freeze: the frozen layer is the state at the call; the next writes
    // go to the new live layer.
    let frozen = a.freeze(layer("a1")).unwrap();
    assert_eq!(frozen.len(), 1);
    assert!(frozen[0].is_frozen());
    let at_snapshot = model_a.clone();
    put(&qa, &mut model_a, 3, 0xa2);
    put(&qa, &mut model_a, 100, 0xa2);

    // A clone over the frozen layer sees the snapshot, not what came after.
    let b = Disk::open(
        manifest.clone(),
        store.clone(),
        [frozen.clone(), vec![layer("b0")]].concat(),
    )
    .unwrap();
    let qb = b.queue();
    assert!(whole(&qb) == at_snapshot);
    let mut model_b = at_snapshot.clone();
    put(&qb, &mut model_b, 40, 0xb1);
    put(&qb, &mut model_b, 200, 0xb1);
    assert!(
        whole(&qa) == model_a,
        "the clone's writes are not in the original"
    );
    assert!(
        whole(&qb) == model_b,
        "the original's writes are not in the clone"
    );
    // A frozen layer takes no writes.
    assert!(frozen[0].write_blocks(7, &[1; 4096]).is_err());

    // A deep stack: still one map lookup per block, and the map grows with
    // what was written, not with the stack.
    for round in 0..30u8 {
        a.freeze(layer(&format!("a{}", round + 2))).unwrap();
        put(&qa, &mut model_a, u64::from(round) * 7 % 250, round);
    }
    assert_eq!(a.layers().len(), 32);
    assert!(whole(&qa) == model_a);
    assert!(a.map_bytes() < 64 << 10, "{} bytes of map", a.map_bytes());

    // Fold every frozen layer into an image, rebase onto it: the folded
    // layers are dropped and the disk reads the same.
    let stack = a.layers();
    let folded = &stack[..stack.len() - 1];
    let (snap, _) = fold_layers(&store, manifest.clone(), folded, &opts, &|_| {}).unwrap();
    assert!(a.rebase(Arc::new(snap), folded));
    assert_eq!(a.layers().len(), 1);
    assert!(whole(&qa) == model_a);
    assert!(
        !a.rebase(manifest.clone(), folded),
        "only the stack's own bottom layers can be folded away"
    );
    // The clone still stands on its layers.
    assert!(whole(&qb) == model_b);
}
