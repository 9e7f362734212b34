//! The writers' half of garbage collection (`cairn_engine::gc::guard`):
//! an import never relies on a chunk that only condemned packs hold, by
//! name (a deduplicated chunk) or by id (a base image's chunk), and a
//! session longer than the grace period stores again what was condemned
//! while it ran.

mod common;

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use cairn_engine::catalog;
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::gc::{self, GcOptions};
use cairn_engine::import::{import_pieces, import_raw, ImportOptions, Piece};
use cairn_engine::layout;
use cairn_engine::manifest::Manifest;
use cairn_engine::objstore::{FileStore, ObjectStore};

const CS: usize = 64 << 10;

struct Env {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    remote: Arc<dyn ObjectStore>,
    store: ChunkStore,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let remote: Arc<dyn ObjectStore> =
            Arc::new(FileStore::open(&dir.path().join("store")).unwrap());
        let store = open(&rt, &remote, &dir.path().join("cache"));
        Env {
            dir,
            rt,
            remote,
            store,
        }
    }

    fn opts(&self) -> ImportOptions {
        let mut o = ImportOptions::new(self.dir.path().join("staging"));
        o.chunk_size = CS as u32;
        o
    }

    /// Imports `bytes` (named by nothing): its manifest.
    fn import(&self, bytes: &[u8]) -> Manifest {
        let path = self.dir.path().join("image.raw");
        std::fs::write(&path, bytes).unwrap();
        import_raw(&self.store, &path, &self.opts(), &|_| {})
            .unwrap()
            .0
    }

    /// One collection run with a grace period of `grace`.
    fn collect(&self, grace: Duration) -> gc::GcReport {
        let mut o = GcOptions::new(
            "test:1".into(),
            self.dir.path().join("gc-staging"),
            self.dir.path().join("gc-indexes"),
        );
        o.grace = grace;
        self.rt
            .block_on(gc::run(self.remote.as_ref(), &o, &|_| {}))
            .unwrap()
    }

    /// Whether every chunk of `m` is in a pack the collector has not
    /// condemned, as a host that opens the store now sees it. (A chunk
    /// stored again may land in a pack identical to the condemned one,
    /// which is then taken off the list.)
    fn held_safely(&self, m: &Manifest) -> bool {
        let (state, _) = self
            .rt
            .block_on(gc::state::load(self.remote.as_ref()))
            .unwrap();
        let fresh = open(&self.rt, &self.remote, &self.dir.path().join("fresh-cache"));
        fresh.with_pack_map(|map| {
            m.distinct_chunks()
                .iter()
                .all(|c| map.holds_outside(c, |p| state.is_condemned(&layout::pack_key(p))))
        })
    }
}

fn open(rt: &tokio::runtime::Runtime, remote: &Arc<dyn ObjectStore>, cache: &Path) -> ChunkStore {
    rt.block_on(ChunkStore::open(
        remote.clone(),
        ChunkStoreConfig::new(cache.to_owned(), 64 << 20),
    ))
    .unwrap()
}

#[test]
fn an_import_stores_again_the_chunks_only_a_condemned_pack_holds() {
    let env = Env::new();
    let old = common::test_image(4, CS, 1);
    env.import(&old);
    let r = env.collect(Duration::from_secs(3600));
    assert_eq!(r.condemned, 2, "the pack and the manifest: {r:?}");

    let new = [&old[..], &common::test_image(2, CS, 2)[..]].concat();
    let path = env.dir.path().join("new.raw");
    std::fs::write(&path, &new).unwrap();
    let (m, report) = import_raw(&env.store, &path, &env.opts(), &|_| {}).unwrap();
    assert_eq!(
        report.new_chunks, report.distinct_chunks,
        "nothing deduplicated against the condemned pack"
    );
    assert!(env.held_safely(&m));
}

#[test]
fn chunks_named_by_id_that_only_a_condemned_pack_holds_are_stored_again() {
    let env = Env::new();
    let base = env.import(&common::test_image(4, CS, 3));
    env.collect(Duration::from_secs(3600));
    // A snapshot over `base` with nothing changed names all its chunks by id.
    let pieces = vec![Ok(Piece::Known(base.chunks.clone()))];
    let (m, report) = import_pieces(
        &env.store,
        pieces.into_iter(),
        base.logical_size,
        &env.opts(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(report.new_chunks, report.distinct_chunks, "{report:?}");
    assert_eq!(m.chunks, base.chunks);
    assert!(env.held_safely(&m));
}

/// Sends on drop: a stalled session goes on however the test ends.
struct Release(mpsc::Sender<()>);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[test]
fn a_session_longer_than_the_grace_period_stores_again_what_was_condemned_meanwhile() {
    let env = Env::new();
    let old = common::test_image(4, CS, 4);
    let m_old = env.import(&old);
    // Named, so the first run (which leaves a grace period of 1 s in the
    // collector's state) condemns nothing.
    let named = catalog::NewImage {
        project: "default".into(),
        name: "old".into(),
        id: m_old.id(),
        public: false,
        parent: None,
        made: catalog::Made::new("test", None),
    };
    env.rt
        .block_on(catalog::image::create(env.remote.as_ref(), named))
        .unwrap();
    assert_eq!(env.collect(Duration::from_secs(1)).condemned, 0);

    // An import that deduplicates against the pack, then stalls: the
    // pieces are the test's, so it decides when the session goes on.
    let (go, wait) = mpsc::channel::<()>();
    let (started, on_start) = mpsc::channel::<()>();
    let tail = common::test_image(2, CS, 5);
    let pieces = [Piece::Bytes(old.clone()), Piece::Bytes(tail)]
        .into_iter()
        .enumerate()
        .map(move |(i, p)| {
            if i == 1 {
                started.send(()).unwrap();
                wait.recv().unwrap();
            }
            Ok(p)
        });
    let (m, report) = std::thread::scope(|s| {
        let release = Release(go);
        let session = s.spawn(|| {
            import_pieces(&env.store, pieces, 6 * CS as u64, &env.opts(), &|_| {}).unwrap()
        });
        on_start.recv().unwrap();
        // The name goes; nothing names the import yet: the pack is condemned.
        env.rt
            .block_on(catalog::image::remove(
                env.remote.as_ref(),
                "default",
                "old",
                "test",
            ))
            .unwrap();
        let r = env.collect(Duration::from_secs(1));
        assert_eq!(r.condemned, 2, "the pack and the manifest: {r:?}");
        std::thread::sleep(Duration::from_millis(1200));
        drop(release);
        session.join().unwrap()
    });
    assert_eq!(
        report.new_chunks, report.distinct_chunks,
        "the deduplicated chunks were stored again: {report:?}"
    );
    assert!(env.held_safely(&m));
}
