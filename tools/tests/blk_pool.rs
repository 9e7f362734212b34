//! The vhost-user-blk pool in process: many disks served by a fixed set of
//! threads, and a disk's cached reads served while other disks' reads
//! wait for the store. A libblkio client is the VMM. The store is
//! `file://` behind a gate that holds every GET while closed: a fault
//! injector (a real store cannot be made to hang on demand).

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_benches::blk_client::Client;
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::disk::Disk;
use cairn_engine::import::{import_raw, ImportOptions};
use cairn_engine::manifest::Manifest;
use cairn_engine::objstore::{
    Conditional, FileStore, ListPage, ObjectStore, Precondition, PutMode, PutOutcome, StoreError,
    Versioned,
};
use cairn_engine::overlay::Overlay;
use cairn_vmm_glue::blk::{
    pool_threads, BlkBackend, BlkServer, DeviceConfig, ReadCounts, DEFAULT_POLL,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CHUNK: u32 = 64 * 1024;

/// Fault injector: `file://` whose GETs wait while the gate is closed.
struct Gated {
    inner: FileStore,
    closed: AtomicBool,
    waiting: AtomicUsize,
}

impl Gated {
    async fn pass(&self) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        // Counted until it passes or is dropped (a timed-out GET).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        while self.closed.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[async_trait]
impl ObjectStore for Gated {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        self.pass().await;
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.inner.put(key, data, mode).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError> {
        self.inner.put_file(key, path).await
    }
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.pass().await;
        self.inner.get_versioned(key).await
    }
    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        self.inner.put_if(key, data, precondition).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.inner.list_page(prefix, start_after, limit).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Served {
    disk: Arc<Disk>,
    server: BlkServer,
    socket: std::path::PathBuf,
}

fn serve(dir: &Path, name: &str, manifest: &Arc<Manifest>, store: &ChunkStore) -> Served {
    let size = manifest.logical_size;
    let layer = Overlay::open_or_create(&dir.join(name), &manifest.id(), size).unwrap();
    let disk = Disk::open(manifest.clone(), store.clone(), vec![layer]).unwrap();
    let cfg = DeviceConfig {
        capacity_bytes: size,
        read_only: false,
        queues: 1,
        serial: name.into(),
        poll: DEFAULT_POLL,
    };
    let backend = BlkBackend::new(cfg, vec![disk.queue()]);
    let socket = dir.join(format!("{name}.sock"));
    let server = BlkServer::start(&socket, backend).unwrap();
    Served {
        disk,
        server,
        socket,
    }
}

#[test]
fn a_fixed_pool_serves_every_disk_and_cached_reads_pass_reads_waiting_for_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut image = vec![0u8; (16 * MIB) as usize];
    fastrand::Rng::with_seed(15).fill(&mut image);
    std::fs::write(dir.path().join("image.raw"), &image).unwrap();
    let open = |remote: Arc<dyn ObjectStore>, cache: &str| {
        let cfg = ChunkStoreConfig::new(dir.path().join(cache), 256 * MIB);
        rt.block_on(ChunkStore::open(remote, cfg)).unwrap()
    };
    let manifest = {
        let store = open(
            Arc::new(FileStore::open(&dir.path().join("store")).unwrap()),
            "import-cache",
        );
        let mut opts = ImportOptions::new(dir.path().join("staging"));
        opts.chunk_size = CHUNK;
        let (m, _) = import_raw(&store, &dir.path().join("image.raw"), &opts, &|_| {}).unwrap();
        Arc::new(m)
    };
    let gate = Arc::new(Gated {
        inner: FileStore::open(&dir.path().join("store")).unwrap(),
        closed: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
    });
    let store = open(gate.clone(), "cache");

    // The warm disk: its first 512 KiB read once, so cached.
    let warm = serve(dir.path(), "warm", &manifest, &store);
    let mut w = Client::connect(&warm.socket).unwrap();
    assert_eq!(
        w.read(0, (512 * KIB) as usize).unwrap(),
        image[..(512 * KIB) as usize]
    );
    let view = warm.disk.queue();
    until("the warm span is cached", || {
        !view.would_fetch(0, 512 * KIB)
    });
    let pool = pool_threads();
    let before = threads();

    // More disks than the pool has threads, each reading a region no one
    // has read, with the store holding every GET.
    gate.closed.store(true, Ordering::Release);
    let cold: Vec<Served> = (0..pool + 4)
        .map(|i| serve(dir.path(), &format!("cold{i}"), &manifest, &store))
        .collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = cold
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let socket = s.socket.clone();
            let answered = answered.clone();
            let at = 8 * MIB + i as u64 * 512 * KIB;
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let got = c.read(at, (64 * KIB) as usize).unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
                (at, got)
            })
        })
        .collect();
    until("the cold reads wait for the store", || {
        gate.waiting.load(Ordering::SeqCst) > pool
    });

    // The warm disk is served meanwhile, every byte right.
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..200 {
        let at = rng.u64(..512 * KIB / 4096) * 4096;
        let got = w.read(at, 4096).unwrap();
        assert_eq!(
            got,
            image[at as usize..at as usize + 4096],
            "warm read at {at}"
        );
    }
    assert!(
        answered.load(Ordering::SeqCst) == 0 && gate.waiting.load(Ordering::SeqCst) > pool,
        "the cold reads were still waiting while the warm ones were served"
    );

    // Fifty more disks cost no thread: the pool serves them all.
    let idle: Vec<Served> = (0..50)
        .map(|i| serve(dir.path(), &format!("idle{i}"), &manifest, &store))
        .collect();
    let after = threads();
    // (The cold readers' client threads were counted in neither.)
    assert!(
        after < before + cold.len() + 10,
        "{} disks more and {after} threads instead of {before}",
        cold.len() + idle.len()
    );

    gate.closed.store(false, Ordering::Release);
    for r in readers {
        let (at, got) = r.join().unwrap();
        assert_eq!(
            got,
            image[at as usize..(at + 64 * KIB) as usize],
            "cold read at {at}"
        );
    }
    // Each disk's reads are counted by where their bytes came from.
    assert_eq!(
        warm.server.read_counts(),
        ReadCounts {
            local_bytes: 200 * 4096,
            store_bytes: 512 * KIB,
        }
    );
    for s in &cold {
        assert_eq!(
            s.server.read_counts(),
            ReadCounts {
                local_bytes: 0,
                store_bytes: 64 * KIB,
            }
        );
    }
    // And the idle disks serve too.
    let mut c = Client::connect(&idle[49].socket).unwrap();
    assert_eq!(
        c.read(MIB, 4096).unwrap(),
        image[MIB as usize..(MIB + 4096) as usize]
    );
}
