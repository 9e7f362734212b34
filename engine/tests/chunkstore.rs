//! The chunk store over the real S3 server: import, lazy reads through the
//! cache, single flight, merged GETs, and every corruption and failure path:
//! lost packs (read elsewhere, repaired by a re-import) and stalled reads (a
//! fault proxy in front of the server).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::cache::ChunkCache;
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig, ChunkStoreError};
use cairn_engine::export::export_raw;
use cairn_engine::import::{import_raw, ImportOptions, DEFAULT_PACK_TARGET};
use cairn_engine::manifest::Manifest;
use cairn_engine::objstore::{Deadline, ObjectStore, PutMode, Resilient, S3Store};
use cairn_engine::pack::PackWriter;
use cairn_engine::{frame, layout, ChunkId, ErrorKind};
use common::fault_proxy::{Answer, FaultProxy};

const CS: usize = 64 << 10;

struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    remote: Arc<dyn ObjectStore>,
    image: Vec<u8>,
    manifest: Manifest,
}

impl Fixture {
    /// An image imported into a fresh bucket.
    fn new(tag: &str, chunks: usize, pack_target: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (remote, _) = rt.block_on(common::fresh_s3_store(tag));
        let image = common::test_image(chunks, CS, 7);
        let path = dir.path().join("image.raw");
        std::fs::write(&path, &image).unwrap();
        let store = open(&rt, &remote, &dir.path().join("import-cache"));
        let opts = import_options(dir.path().join("staging"), pack_target);
        let (manifest, _) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
        Fixture {
            _dir: dir,
            rt,
            remote,
            image,
            manifest,
        }
    }

    /// A store handle with its own, empty cache: everything comes from S3.
    fn cold_store(&self, name: &str) -> ChunkStore {
        open(&self.rt, &self.remote, &self._dir.path().join(name))
    }

    fn verify(&self, deep: bool) -> cairn_engine::verify::VerifyReport {
        let scratch = self._dir.path();
        let verify = cairn_engine::verify::verify(self.remote.as_ref(), deep, scratch, &|_| {});
        self.rt.block_on(verify).unwrap()
    }

    fn chunk(&self, i: usize) -> (ChunkId, &[u8]) {
        (
            self.manifest.chunks[i].unwrap(),
            &self.image[i * CS..(i + 1) * CS],
        )
    }
}

/// Import options for `CS`-byte chunks and packs of `pack_target` bytes.
fn import_options(staging: PathBuf, pack_target: u64) -> ImportOptions {
    let mut opts = ImportOptions::new(staging);
    opts.chunk_size = CS as u32;
    opts.pack_target = pack_target;
    opts
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open(rt: &tokio::runtime::Runtime, remote: &Arc<dyn ObjectStore>, cache: &Path) -> ChunkStore {
    rt.block_on(ChunkStore::open(
        remote.clone(),
        ChunkStoreConfig::new(cache.to_owned(), 256 << 20),
    ))
    .unwrap()
}

#[test]
fn cold_reads_come_from_s3_verified_and_match_the_image() {
    let f = Fixture::new("cold", 40, 1 << 20);
    let store = f.cold_store("c1");
    for (i, id) in f.manifest.chunks.iter().enumerate() {
        let Some(id) = id else {
            assert!(f.image[i * CS..(i + 1) * CS].iter().all(|&b| b == 0));
            continue;
        };
        // An unaligned read inside the chunk.
        let mut buf = vec![0u8; 5000];
        store.read(id, 1234, &mut buf).unwrap();
        assert_eq!(buf, f.image[i * CS + 1234..i * CS + 6234]);
    }
    let stats = store.stats();
    let distinct = f.manifest.distinct_chunks().len() as u64;
    assert_eq!(stats.chunks_fetched.load(Ordering::Relaxed), distinct);
    assert_eq!(stats.digest_failures.load(Ordering::Relaxed), 0);
    // A second pass is served by the cache alone.
    let gets = stats.remote_gets.load(Ordering::Relaxed);
    let (id, bytes) = f.chunk(1);
    let mut buf = vec![0u8; CS];
    store.read(&id, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
    assert_eq!(stats.remote_gets.load(Ordering::Relaxed), gets);

    // Export through a cold cache is byte-identical.
    let out = f._dir.path().join("export.raw");
    export_raw(&f.cold_store("c2"), &f.manifest, &out, &|_| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), f.image);
}

#[test]
fn concurrent_misses_of_one_chunk_make_one_request() {
    let f = Fixture::new("single", 10, 8 << 20);
    let store = f.cold_store("c");
    let (id, bytes) = f.chunk(1);
    std::thread::scope(|s| {
        for _ in 0..8 {
            let store = store.clone();
            s.spawn(move || {
                let mut buf = vec![0u8; CS];
                store.read(&id, 0, &mut buf).unwrap();
                assert_eq!(buf, bytes);
            });
        }
    });
    assert_eq!(store.stats().remote_gets.load(Ordering::Relaxed), 1);
    assert_eq!(store.stats().chunks_fetched.load(Ordering::Relaxed), 1);
}

#[test]
fn adjacent_misses_are_merged_into_few_ranged_gets() {
    let f = Fixture::new("merge", 60, 64 << 20);
    let store = f.cold_store("c");
    let ids = f.manifest.distinct_chunks();
    store.fetch(&ids).unwrap();
    let gets = store.stats().remote_gets.load(Ordering::Relaxed);
    // One pack, a few MiB: one GET (at most one per 8 MiB run).
    assert_eq!(gets, 1, "{} chunks took {gets} GETs", ids.len());
    assert_eq!(
        store.stats().chunks_fetched.load(Ordering::Relaxed),
        ids.len() as u64
    );
}

#[test]
fn a_flipped_byte_in_a_cached_chunk_is_fetched_again_never_served() {
    let f = Fixture::new("flip", 10, 8 << 20);
    let cache_dir = f._dir.path().join("c");
    let store = f.cold_store("c");
    let (id, bytes) = f.chunk(1);
    let mut buf = vec![0u8; CS];
    store.read(&id, 0, &mut buf).unwrap();
    // A read is answered before the chunk is cached; wait for the cache.
    store.fetch(&[id]).unwrap();
    // Rot the cached copy on disk.
    let path = cache_dir.join("chunks").join(id.to_hex());
    let mut cached = std::fs::read(&path).unwrap();
    let n = cached.len();
    cached[n - 100] ^= 0x01;
    std::fs::write(&path, &cached).unwrap();
    // Reopen so no state survives in memory either.
    let store = f.cold_store("c");
    let mut buf = vec![0u8; CS];
    store.read(&id, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
    assert_eq!(
        store.cache().stats().crc_failures.load(Ordering::Relaxed),
        1
    );
    assert_eq!(store.stats().chunks_fetched.load(Ordering::Relaxed), 1);
    // The cache now holds a good copy again.
    let mut again = vec![0u8; CS];
    store.read(&id, 0, &mut again).unwrap();
    assert_eq!(again, bytes);
}

#[test]
fn a_remote_chunk_that_does_not_hash_to_its_id_is_refused_and_not_cached() {
    let f = Fixture::new("forge", 10, 8 << 20);
    let store = f.cold_store("c");
    // Chunk 1 is random bytes, stored raw. Forge its frame: change a payload
    // byte and fix the CRC, as a buggy or malicious writer could.
    let (id, _) = f.chunk(1);
    let loc = store.locate(&id).unwrap();
    let key = layout::pack_key(&loc.pack);
    let mut pack = f.rt.block_on(f.remote.get(&key, None)).unwrap().to_vec();
    let at = loc.entry.offset as usize;
    let frame_len = loc.entry.frame_len as usize;
    let (h, _) = frame::decode(&pack[at..at + frame_len]).unwrap();
    assert_eq!(h.codec, frame::Codec::Raw);
    pack[at + frame::FRAME_HEADER_LEN + 10] ^= 0xff;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&pack[at..at + 48]);
    crc.update(&pack[at + frame::FRAME_HEADER_LEN..at + frame_len]);
    pack[at + 48..at + 52].copy_from_slice(&crc.finalize().to_le_bytes());
    f.rt.block_on(f.remote.put(&key, Bytes::from(pack), PutMode::Overwrite))
        .unwrap();

    let mut buf = vec![0u8; CS];
    let err = store.read(&id, 0, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(matches!(err, ChunkStoreError::Corrupt { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&id.to_hex()) && msg.contains(&key), "{msg}");
    assert!(!store.cache().contains(&id));
    assert_eq!(store.stats().digest_failures.load(Ordering::Relaxed), 1);
    // Other chunks of the same pack are still fine.
    let (other, bytes) = f.chunk(2);
    store.read(&other, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
}

#[test]
fn a_pack_torn_by_a_crash_is_recovered_and_uploaded_by_the_next_import() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (remote, _) = rt.block_on(common::fresh_s3_store("torn"));
    let image = common::test_image(20, CS, 3);
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    // A crashed import: 6 frames written, the 7th torn, no index.
    let mut enc = frame::FrameEncoder::new(1).unwrap();
    let torn = staging.join("0000000000000001.partial");
    let mut w = PackWriter::create(&torn).unwrap();
    let mut stored = Vec::new();
    for i in [1, 2, 4, 6, 7, 9, 11] {
        let c = &image[i * CS..(i + 1) * CS];
        w.append(&enc.encode(ChunkId::of(c), c)).unwrap();
        stored.push(ChunkId::of(c));
    }
    drop(w);
    let len = std::fs::metadata(&torn).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .unwrap()
        .set_len(len - 100)
        .unwrap();

    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let store = open(&rt, &remote, &dir.path().join("cache"));
    let mut opts = ImportOptions::new(staging.clone());
    opts.chunk_size = CS as u32;
    let (manifest, report) = import_raw(&store, &path, &opts, &|_| {}).unwrap();
    assert_eq!(report.recovered_packs, 1);
    assert!(!torn.exists());
    // The six whole frames were reused, not written again.
    for id in &stored[..6] {
        assert!(store.contains(id));
    }
    let distinct = manifest.distinct_chunks();
    let recovered_in_image = stored[..6]
        .iter()
        .filter(|id| distinct.contains(id))
        .count() as u64;
    assert_eq!(
        report.new_chunks,
        distinct.len() as u64 - recovered_in_image
    );
    let out = dir.path().join("out.raw");
    export_raw(
        &open(&rt, &remote, &dir.path().join("c2")),
        &manifest,
        &out,
        &|_| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(out).unwrap(), image);
}

#[test]
fn an_import_cut_off_by_the_server_stopping_fails_cleanly_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut server = common::PrivateS3::start(&dir.path().join("s3root"));
    let bucket = "cairn-interrupt";
    let opts = common::s3_options(
        &server.endpoint,
        bucket,
        common::PRIVATE_KEY,
        common::PRIVATE_SECRET,
    );
    let s3 = rt.block_on(S3Store::connect(&opts));
    rt.block_on(s3.ensure_bucket()).unwrap();
    let remote: Arc<dyn ObjectStore> =
        Arc::new(Resilient::new(Arc::new(s3), common::fast_retries(), 8));

    // 2000 chunks of 64 KiB (125 MiB), packs of 1 MiB: many uploads.
    let image = common::test_image(2000, CS, 11);
    let path = dir.path().join("image.raw");
    std::fs::write(&path, &image).unwrap();
    let mut iopts = ImportOptions::new(dir.path().join("staging"));
    iopts.chunk_size = CS as u32;
    iopts.pack_target = 1 << 20;

    let packs_dir = dir
        .path()
        .join("s3root")
        .join(bucket)
        .join("store")
        .join("packs");
    let result = std::thread::scope(|s| {
        let import = s.spawn(|| {
            let store = open(&rt, &remote, &dir.path().join("cache"));
            import_raw(&store, &path, &iopts, &|_| {})
        });
        // Stop the server once a few packs have landed.
        let idx_count = || {
            std::fs::read_dir(&packs_dir).map_or(0, |d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".idx")
                })
                .count()
            })
        };
        while idx_count() < 3 && !import.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        server.kill();
        import.join().unwrap()
    });
    let err = result.expect_err("the import must fail when the server goes away");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err:#?}");
    assert!(err.to_string().contains("rerun the import"), "{err}");
    let uploaded_before = std::fs::read_dir(&packs_dir).unwrap().count();
    assert!(uploaded_before >= 3);

    server.restart();
    let store = open(&rt, &remote, &dir.path().join("cache"));
    let (manifest, report) = import_raw(&store, &path, &iopts, &|_| {}).unwrap();
    // The rerun reused what reached the store.
    let all_new = report.stored_bytes;
    assert!(
        report.new_bytes < all_new,
        "rerun wrote {} of {} bytes",
        report.new_bytes,
        all_new
    );
    let out = dir.path().join("out.raw");
    export_raw(
        &open(&rt, &remote, &dir.path().join("c2")),
        &manifest,
        &out,
        &|_| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(out).unwrap(), image);
    // And the store verifies clean.
    let report = rt
        .block_on(cairn_engine::verify::verify(
            remote.as_ref(),
            true,
            dir.path(),
            &|_| {},
        ))
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Reads chunk `id` from `threads` threads at once; every reader's result.
/// Fails the test (rather than hanging it) if a reader is not back long
/// after the fetch deadline.
fn read_concurrently(
    store: &ChunkStore,
    id: ChunkId,
    threads: usize,
) -> Vec<Result<Vec<u8>, ChunkStoreError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..threads {
        let (store, tx) = (store.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CS];
            let _ = tx.send(store.read(&id, 0, &mut buf).map(|()| buf));
        });
    }
    (0..threads)
        .map(|_| {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("every reader is answered")
        })
        .collect()
}

/// An error with its causes, as the CLI prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// The pack keys holding the manifest's chunks, in chunk order, once each.
fn packs_of(store: &ChunkStore, manifest: &Manifest) -> Vec<String> {
    let mut keys = Vec::new();
    for id in manifest.chunks.iter().flatten() {
        let key = layout::pack_key(&store.locate(id).unwrap().pack);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

#[test]
fn a_chunk_whose_pack_object_is_gone_fails_every_reader_with_a_clear_error() {
    let f = Fixture::new("gone", 40, 256 << 10);
    // Opened while the pack was there: the read finds out.
    let store = f.cold_store("c");
    let (id, _) = f.chunk(1);
    let key = layout::pack_key(&store.locate(&id).unwrap().pack);
    f.rt.block_on(f.remote.delete(&key)).unwrap();
    for result in read_concurrently(&store, id, 8) {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(matches!(err, ChunkStoreError::Lost { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&id.to_hex())
                && msg.contains(&key)
                && msg.contains(f.remote.uri())
                && msg.contains("cairn verify"),
            "names the chunk, the pack, the store and what to do: {msg}"
        );
    }
    assert_eq!(store.stats().lost_packs.load(Ordering::Relaxed), 1);
    assert!(!store.cache().contains(&id));
    // A store opened now knows from the listing, and says the same.
    let fresh = f.cold_store("c2");
    let err = read_concurrently(&fresh, id, 2).pop().unwrap().unwrap_err();
    assert!(matches!(err, ChunkStoreError::Lost { .. }), "{err}");
    // Chunks of other packs read on.
    let other = (0..40)
        .filter_map(|i| f.manifest.chunks[i].map(|c| (i, c)))
        .find(|(_, c)| layout::pack_key(&store.locate(c).unwrap().pack) != key)
        .unwrap();
    let mut buf = vec![0u8; CS];
    store.read(&other.1, 0, &mut buf).unwrap();
    assert_eq!(buf, f.image[other.0 * CS..(other.0 + 1) * CS]);
}

#[test]
fn a_pack_read_that_stalls_fails_every_reader_within_the_fetch_deadline() {
    let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stalling = stall.clone();
    let proxy = FaultProxy::start(&common::s3_env().endpoint, move |r| {
        if r.method == "GET" && r.target.contains(".pack") && stalling.load(Ordering::Acquire) {
            Answer::Stall
        } else {
            Answer::Forward
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (remote, _) = rt.block_on(common::fresh_s3_store_at(&proxy.endpoint, "stall"));
    let image = common::test_image(10, CS, 5);
    std::fs::write(dir.path().join("image.raw"), &image).unwrap();
    let opts = import_options(dir.path().join("staging"), DEFAULT_PACK_TARGET);
    let importer = open(&rt, &remote, &dir.path().join("import-cache"));
    let (manifest, _) =
        import_raw(&importer, &dir.path().join("image.raw"), &opts, &|_| {}).unwrap();

    stall.store(true, Ordering::Release);
    let mut cfg = ChunkStoreConfig::new(dir.path().join("cache"), 256 << 20);
    cfg.fetch_deadline = Deadline {
        attempt: std::time::Duration::from_millis(300),
        total: std::time::Duration::from_secs(1),
    };
    let store = rt.block_on(ChunkStore::open(remote, cfg)).unwrap();
    let id = manifest.chunks[1].unwrap();
    for result in read_concurrently(&store, id, 8) {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
        let text = chain(&err);
        assert!(
            text.contains(&id.to_hex())
                && text.contains(".pack")
                && text.contains(&proxy.endpoint[7..])
                && text.contains("gave up"),
            "names the chunk, the pack, the endpoint: {text}"
        );
    }
    // One fetch for all eight readers (each of its attempts cut short).
    assert_eq!(store.stats().fetch_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn another_copy_of_a_lost_packs_chunks_is_used() {
    // Every chunk stored twice, packed differently, as two hosts importing
    // one image at the same moment store it. (Two imports one after the
    // other would not: an import refreshes its pack map when it starts.)
    let f = Fixture::new("copies", 40, 256 << 10);
    let copy = f._dir.path().join("copy.pack");
    let mut w = PackWriter::create(&copy).unwrap();
    let mut enc = frame::FrameEncoder::new(1).unwrap();
    let mut seen = std::collections::HashSet::new();
    for (i, id) in f.manifest.chunks.iter().enumerate() {
        if let Some(id) = id.filter(|id| seen.insert(*id)) {
            let raw = &f.image[i * CS..((i + 1) * CS).min(f.image.len())];
            w.append(&enc.encode(id, raw)).unwrap();
        }
    }
    let index = w.finish().unwrap();
    f.rt.block_on(async {
        f.remote
            .put_file(&layout::pack_key(&index.id), &copy)
            .await?;
        let tail = Bytes::from(index.encode_tail());
        f.remote
            .put(&layout::pack_index_key(&index.id), tail, PutMode::IfAbsent)
            .await
    })
    .unwrap();
    // Whichever pack a reader goes to first for the first chunk: every
    // chunk it holds is in another pack too.
    let first_packs = packs_of(&f.cold_store("look"), &f.manifest);

    let store = f.cold_store("c");
    f.rt.block_on(f.remote.delete(&first_packs[0])).unwrap();
    let out = f._dir.path().join("out.raw");
    export_raw(&store, &f.manifest, &out, &|_| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), f.image);
    assert_eq!(store.stats().lost_packs.load(Ordering::Relaxed), 1);

    let report = f.verify(false);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let what = &report.problems[0].what;
    assert!(
        what.contains(&first_packs[0]) && what.contains("every chunk it held is in another pack"),
        "{what}"
    );
}

#[test]
fn importing_the_image_again_repairs_a_lost_pack() {
    let f = Fixture::new("repair", 40, 256 << 10);
    let running = f.cold_store("running");
    let lost = packs_of(&running, &f.manifest)[1].clone();
    f.rt.block_on(f.remote.delete(&lost)).unwrap();

    // Lost: reads of its chunks fail, verify names it.
    let out = f._dir.path().join("out.raw");
    let err = export_raw(&running, &f.manifest, &out, &|_| {}).unwrap_err();
    assert!(chain(&err).contains(&lost), "{}", chain(&err));
    let report = f.verify(false);
    assert!(
        report.problems[0].what.contains(&lost) && report.problems[0].what.contains("import"),
        "{:?}",
        report.problems
    );

    // The same file imported again uploads what was lost.
    let opts = import_options(f._dir.path().join("staging"), 256 << 10);
    let importer = f.cold_store("importer");
    let (again, report) =
        import_raw(&importer, &f._dir.path().join("image.raw"), &opts, &|_| {}).unwrap();
    assert_eq!(again, f.manifest);
    assert!(report.new_chunks > 0, "{report:?}");
    let report = f.verify(true);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Every byte reads back, on a fresh store and on the one that saw the
    // pack lost while it ran.
    for store in [f.cold_store("fresh"), running] {
        export_raw(&store, &f.manifest, &out, &|_| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), f.image);
    }
}

/// Whether this process is the child running `test`. If not, runs `test`
/// alone in a child process (it changes process-wide limits, which would
/// disturb the tests beside it) and fails if the child does.
fn run_in_child(test: &str) -> bool {
    if std::env::var("CAIRN_TEST_CHILD").as_deref() == Ok(test) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("CAIRN_TEST_CHILD", test)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    false
}

/// Sets the soft limit of `resource` for this process; the old limits.
fn limit(resource: rustix::process::Resource, soft: u64) -> rustix::process::Rlimit {
    let old = rustix::process::getrlimit(resource);
    let new = rustix::process::Rlimit {
        current: Some(soft),
        maximum: old.maximum,
    };
    rustix::process::setrlimit(resource, new).unwrap();
    old
}

#[test]
fn a_cached_chunk_that_cannot_be_opened_for_want_of_descriptors_is_fetched_again() {
    if !run_in_child(
        "a_cached_chunk_that_cannot_be_opened_for_want_of_descriptors_is_fetched_again",
    ) {
        return;
    }
    let f = Fixture::new("emfile", 10, 8 << 20);
    let ids = f.manifest.distinct_chunks();
    f.cold_store("c").fetch(&ids).unwrap();
    // Another server on the same cache: it knows the chunks, has mapped
    // none, and has a connection to the store open (it listed the packs).
    let store = f.cold_store("c");
    let (id, bytes) = f.chunk(1);
    let file = f._dir.path().join("c/chunks").join(id.to_hex());
    assert!(store.cache().contains(&id) && file.exists());

    // No descriptor left: the cached file cannot be opened.
    let old = limit(rustix::process::Resource::Nofile, 256);
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    let mut buf = vec![0u8; CS];
    let read = store.read(&id, 0, &mut buf);
    drop(held);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, old).unwrap();

    read.unwrap();
    assert_eq!(buf, bytes, "served from the store instead");
    assert_eq!(
        store.cache().stats().open_failures.load(Ordering::Relaxed),
        1
    );
    assert_eq!(store.stats().chunks_fetched.load(Ordering::Relaxed), 1);
    assert!(
        file.exists(),
        "the cached file is kept for when it can be opened"
    );
    store.read(&id, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
}

#[test]
fn a_cached_chunk_that_cannot_be_mapped_for_want_of_memory_is_a_miss() {
    if !run_in_child("a_cached_chunk_that_cannot_be_mapped_for_want_of_memory_is_a_miss") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw: Vec<u8> = (0..CS).map(|i| (i * 7 % 251) as u8).collect();
    let id = ChunkId::of(&raw);
    ChunkCache::open(dir.path(), 64 << 20)
        .unwrap()
        .insert(id, &raw)
        .unwrap();
    let cache = ChunkCache::open(dir.path(), 64 << 20).unwrap();
    let file = dir.path().join("chunks").join(id.to_hex());

    // Address space for less than the chunk's mapping.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let old = limit(rustix::process::Resource::As, (vm_kib + 16) << 10);
    let got = cache.get(&id);
    rustix::process::setrlimit(rustix::process::Resource::As, old).unwrap();

    assert!(matches!(got, Ok(None)), "a miss, not {got:?}");
    assert_eq!(cache.stats().open_failures.load(Ordering::Relaxed), 1);
    assert!(file.exists(), "the cached file is kept");
    cache.insert(id, &raw).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(cache.read(&id, 4096, &mut buf).unwrap());
    assert_eq!(buf, raw[4096..8192]);
}
