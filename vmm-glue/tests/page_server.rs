//! The page server against a real userfaultfd: a VMM harness maps guest
//! memory, registers it and sends Firecracker's handshake; threads touch
//! pages in sequential, random and recorded orders; every byte is compared
//! with the memory file the snapshot was imported from. Where a resume
//! must end because the VMM exits, or a broken server would leave the VMM
//! hanging, the VMM is a child process (this test binary, running
//! `vmm_child`) and the test waits for it with a bound.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::import::ImportOptions;
use cairn_engine::memory::{import_memory, MemLayout};
use cairn_engine::objstore::{FileStore, ObjectStore, Resilient};
use cairn_engine::ManifestId;
use cairn_vmm_glue::uffd::harness::{
    send_handshake, synthetic_memory, RegionSpec, Release, VmmHarness,
};
use cairn_vmm_glue::uffd::{
    self, End, FaultInjector, HandshakeError, InjectionPoint, ResumeReport, ServeConfig,
    ServeError, ServedSnapshot, Stop,
};

const MIB: u64 = 1 << 20;

struct Env {
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    store: ChunkStore,
}

impl Env {
    fn file() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let remote: Arc<dyn ObjectStore> =
            Arc::new(FileStore::open(&dir.path().join("store")).unwrap());
        Env::with(dir, remote, "cache")
    }

    fn with(dir: tempfile::TempDir, remote: Arc<dyn ObjectStore>, cache: &str) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cfg = ChunkStoreConfig::new(dir.path().join(cache), 256 * MIB);
        let store = rt.block_on(ChunkStore::open(remote, cfg)).unwrap();
        Env {
            dir,
            _rt: rt,
            store,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Imports `bytes` as a memory snapshot; its id.
    fn import(&self, bytes: &[u8]) -> ManifestId {
        let file = self.path("mem.snap");
        std::fs::write(&file, bytes).unwrap();
        let layout = MemLayout::single(bytes.len() as u64, 4096);
        let opts = ImportOptions::new(self.path("staging"));
        let (m, _) = import_memory(&self.store, &file, &layout, None, &opts, &|_| {}).unwrap();
        m.id()
    }

    fn snapshot(&self, id: ManifestId) -> ServedSnapshot {
        ServedSnapshot::open(&self.store, id).unwrap()
    }

    /// Serves one connection on a fresh socket in a thread.
    fn serve_one(&self, snap: ServedSnapshot, cfg: ServeConfig) -> Served {
        let socket = self.path(&format!("uffd-{:08x}.sock", fastrand::u32(..)));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        let stop = Stop::new().unwrap();
        let (s, st) = (socket.clone(), stop.clone());
        std::thread::spawn(move || {
            uffd::serve(
                &s,
                &snap,
                &cfg,
                &st,
                || ready_tx.send(()).unwrap(),
                |r| {
                    let _ = tx.send(r);
                    false
                },
            )
            .unwrap();
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Served { socket, rx, stop }
    }

    /// The ids of the packs in the store (a `file://` one).
    fn packs(&self) -> Vec<PathBuf> {
        let mut packs: Vec<PathBuf> = std::fs::read_dir(self.path("store/packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pack"))
            .collect();
        packs.sort();
        packs
    }
}

/// A server for one resume: where to connect, its outcome, its stop.
struct Served {
    socket: PathBuf,
    rx: mpsc::Receiver<Result<ResumeReport, ServeError>>,
    stop: Stop,
}

impl Served {
    /// The outcome of a resume whose VMM is gone or going.
    fn outcome(&self) -> Result<ResumeReport, ServeError> {
        self.rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server reports when the resume ends")
    }
}

fn no_kill() -> ServeConfig {
    ServeConfig {
        kill_vmm: false,
        handshake_timeout: Duration::from_millis(500),
        ..ServeConfig::default()
    }
}

/// Ends a resume whose VMM is this process (which cannot exit): the
/// harness hangs up and the test stops the server, as an operator would.
fn finish(mut vmm: VmmHarness, served: Served) -> ResumeReport {
    vmm.disconnect();
    served.stop.request();
    let r = served.outcome().expect("the resume succeeds");
    assert_eq!(r.end, Some(End::Stopped));
    r
}

/// Guest memory: a 4 KiB-page region and, where the machine has huge pages,
/// a 2 MiB-page one.
fn layout() -> Vec<RegionSpec> {
    let mut specs = vec![RegionSpec {
        size: 24 * MIB,
        page_size: 4096,
    }];
    if VmmHarness::huge_pages_available(4) {
        specs.push(RegionSpec {
            size: 8 * MIB,
            page_size: 2 * MIB,
        });
    } else {
        VmmHarness::missing_prerequisite(
            "no 2 MiB huge pages here (vm.nr_hugepages): the huge-page region",
        );
        specs.push(RegionSpec {
            size: 8 * MIB,
            page_size: 4096,
        });
    }
    specs
}

/// Touches `pages` (offsets) from `threads` threads, each taking every
/// n-th, writing the source's own byte back into every third (a write
/// fault), and checks each touched page against `src` in full.
fn touch_and_check(vmm: &VmmHarness, src: &[u8], pages: &[u64], threads: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                for (i, &off) in pages.iter().enumerate().skip(t).step_by(threads) {
                    if i % 3 == 0 {
                        vmm.write_byte(off + 17, src[off as usize + 17]);
                    } else {
                        vmm.read_byte(off);
                    }
                    vmm.read(off, &mut buf);
                    assert!(
                        buf == src[off as usize..off as usize + 4096],
                        "page at {off} differs from the memory file"
                    );
                }
            });
        }
    });
}

fn whole_memory(vmm: &VmmHarness) -> Vec<u8> {
    let mut out = vec![0u8; vmm.size() as usize];
    for (i, page) in out.chunks_mut(4096).enumerate() {
        vmm.read(i as u64 * 4096, page);
    }
    out
}

#[test]
fn serves_every_byte_records_the_working_set_and_prefetches_it() {
    let env = Env::file();
    let specs = layout();
    let size: u64 = specs.iter().map(|s| s.size).sum();
    let src = synthetic_memory(size, 7);
    let id = env.import(&src);

    // A scattered working set: random 4 KiB pages over all of memory.
    let ws = scattered(size, 3);

    // 1. A recording resume, one page a fault, four threads.
    let cfg = ServeConfig {
        fault_bytes: 4096,
        record: Some(ImportOptions::new(env.path("staging"))),
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    touch_and_check(&vmm, &src, &ws, 4);
    let recorded = finish(vmm, served);
    assert!(recorded.faults > 0 && recorded.first_fault_us.is_some());
    let rec_bytes = recorded.recorded_bytes.unwrap();
    assert!(rec_bytes >= ws.len() as u64 * 4096, "{rec_bytes}");
    assert_eq!(
        rec_bytes, recorded.fault_bytes,
        "every fault is recorded once"
    );
    assert!(recorded.handshake_us > 0.0);

    // 2. The next resume prefetches that set while the guest touches it in
    // the same order, then reads everything sequentially.
    let snap = env.snapshot(id);
    let recorded_set = snap.working_set.as_ref().unwrap();
    assert_eq!(recorded_set.set.bytes(), rec_bytes);
    assert_eq!(
        recorded_set.pages.manifest().chunk_size,
        cairn_engine::memory::working_set::PAGES_CHUNK_SIZE,
        "the pages image is read whole: large chunks"
    );
    let served = env.serve_one(snap, no_kill());
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    // Give the prefetch a head start (it needs milliseconds), so that it,
    // not the faults, installs the whole working set.
    std::thread::sleep(Duration::from_secs(1));
    touch_and_check(&vmm, &src, &ws, 2);
    assert!(
        whole_memory(&vmm) == src,
        "memory differs after a prefetching resume"
    );
    let prefetched = finish(vmm, served);
    assert_eq!(prefetched.prefetch_bytes, rec_bytes, "{prefetched:?}");
    assert_eq!(
        prefetched.prefetch_bytes + prefetched.fault_bytes,
        size,
        "every page installed by exactly one side: {prefetched:?}"
    );

    // 2b. Again with no head start: faults on pages the prefetchers are
    // about to install wait for them and are woken in batches.
    let served = env.serve_one(env.snapshot(id), no_kill());
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    touch_and_check(&vmm, &src, &ws, 2);
    assert!(
        whole_memory(&vmm) == src,
        "memory differs after a racing prefetch"
    );
    let raced = finish(vmm, served);
    assert_eq!(
        raced.prefetch_bytes + raced.fault_bytes,
        size,
        "every page installed by exactly one side: {raced:?}"
    );

    // 3. On demand with the default 64 KiB fault runs, no prefetch,
    // forwards and backwards from three threads.
    let cfg = ServeConfig {
        prefetch: false,
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    let all: Vec<u64> = (0..size / 4096).map(|p| p * 4096).collect();
    let backwards: Vec<u64> = all.iter().rev().copied().collect();
    std::thread::scope(|s| {
        s.spawn(|| touch_and_check(&vmm, &src, &all, 1));
        s.spawn(|| touch_and_check(&vmm, &src, &backwards, 2));
    });
    let demand = finish(vmm, served);
    assert_eq!(demand.prefetch_bytes, 0);
    assert_eq!(demand.fault_bytes, size);
    assert!(
        demand.faults < size / 4096 / 4,
        "64 KiB runs need far fewer faults than pages: {}",
        demand.faults
    );
}

#[test]
fn removed_pages_read_as_zeros() {
    let env = Env::file();
    let specs = [RegionSpec {
        size: 4 * MIB,
        page_size: 4096,
    }];
    let src = synthetic_memory(4 * MIB, 11);
    let id = env.import(&src);
    let served = env.serve_one(env.snapshot(id), no_kill());
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    // Touch the first MiB, give back 256 KiB of it and 256 KiB never touched.
    let first_mib: Vec<u64> = (0..256).map(|p| p * 4096).collect();
    touch_and_check(&vmm, &src, &first_mib, 1);
    vmm.remove(512 << 10, 256 << 10).unwrap();
    vmm.remove(2 * MIB, 256 << 10).unwrap();
    let mut expected = src.clone();
    expected[512 << 10..768 << 10].fill(0);
    expected[2 << 20..(2 << 20) + (256 << 10)].fill(0);
    assert!(
        whole_memory(&vmm) == expected,
        "removed pages must read as zeros, the rest as the file"
    );
    let r = finish(vmm, served);
    assert_eq!(r.removed_pages, 128);
}

#[test]
fn bad_handshakes_are_refused_with_clear_errors() {
    let env = Env::file();
    let src = synthetic_memory(2 * MIB, 5);
    let id = env.import(&src);
    let vmm = VmmHarness::new(&[RegionSpec {
        size: 2 * MIB,
        page_size: 4096,
    }])
    .unwrap();
    let fd = Some(vmm.uffd_fd());
    let region = |base: u64, size: u64, offset: u64| {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096}}"#
        )
    };
    let g = 1u64 << 30;
    let cases: Vec<(String, Option<i32>, &str)> = vec![
        ("[{\"base_host_virt_addr\":".into(), fd, "not a JSON array"),
        ("{\"regions\":[]}".into(), fd, "not a JSON array"),
        (
            format!("[{}]", region(g, 2 * MIB, 0)),
            None,
            "no userfaultfd",
        ),
        (
            format!("[{},{}]", region(g, 2 * MIB, 0), region(g + 4096, 4096, 0)),
            fd,
            "overlap",
        ),
        (
            format!("[{}]", region(g + 100, 4096, 0)),
            fd,
            "multiples of the page size",
        ),
        (format!("[{}]", region(g, 4 * MIB, 0)), fd, "snapshot has"),
        (String::new(), fd, "sent nothing"),
    ];
    for (json, fd, want) in cases {
        let served = env.serve_one(env.snapshot(id), no_kill());
        let stream = if json.is_empty() {
            std::os::unix::net::UnixStream::connect(&served.socket).unwrap()
        } else {
            send_handshake(&served.socket, json.as_bytes(), fd).unwrap()
        };
        let err = served
            .rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect_err("a bad handshake fails the resume");
        let text = uffd::DisplayChain(&err).to_string();
        assert!(matches!(err, ServeError::Handshake(_)), "{text}");
        assert!(text.contains(want), "{json:?}: {text}");
        drop(stream);
    }
    // A VMM that connects and closes at once is not waited for.
    let served = env.serve_one(env.snapshot(id), no_kill());
    drop(std::os::unix::net::UnixStream::connect(&served.socket).unwrap());
    let err = served
        .rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, ServeError::Handshake(HandshakeError::Closed(0))),
        "{err}"
    );
}

/// Pages of `size` bytes of memory a guest touches, in its order: one in
/// eight, scattered, shuffled.
fn scattered(size: u64, seed: u64) -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pages: Vec<u64> = (0..size / 4096)
        .filter(|_| rng.u8(..8) == 0)
        .map(|p| p * 4096)
        .collect();
    rng.shuffle(&mut pages);
    pages
}

/// A recording resume that touches `pages` in order from one thread.
fn record(env: &Env, id: ManifestId, specs: &[RegionSpec], src: &[u8], pages: &[u64]) -> u64 {
    let cfg = ServeConfig {
        fault_bytes: 4096,
        record: Some(ImportOptions::new(env.path("staging"))),
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let mut vmm = VmmHarness::new(specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    touch_and_check(&vmm, src, pages, 1);
    finish(vmm, served).recorded_bytes.unwrap()
}

/// The VMM of the tests that need one in another process: told what to do
/// through `CAIRN_TEST_VMM_*` by [`run_vmm`]. It maps and registers
/// `REGIONS` (`size/page size,...`), with a blocking userfaultfd if
/// `BLOCKING` is set, connects as Firecracker `RELEASE` does, waits
/// `HEAD_START_MS` if set, touches the pages of `scattered(size, FIRST)` if set from two threads, then reads
/// every byte and exits 0 if all is `synthetic_memory(size, SEED)`.
/// `SCRIPT=outside` instead describes only the first region and touches
/// the second.
#[test]
#[ignore = "the VMM of tests that need one in a child process; run by them"]
fn vmm_child() {
    let Ok(socket) = std::env::var("CAIRN_TEST_VMM_SOCKET") else {
        return;
    };
    let var = |k: &str| std::env::var(format!("CAIRN_TEST_VMM_{k}")).ok();
    let regions: Vec<RegionSpec> = var("REGIONS")
        .unwrap()
        .split(',')
        .map(|r| {
            let (size, page) = r.split_once('/').unwrap();
            RegionSpec {
                size: size.parse().unwrap(),
                page_size: page.parse().unwrap(),
            }
        })
        .collect();
    let mut vmm = VmmHarness::with_uffd(&regions, var("BLOCKING").is_none()).unwrap();
    let socket = Path::new(&socket);
    if var("SCRIPT").as_deref() == Some("outside") {
        let full = vmm.handshake_json();
        let first_only = format!("{}}}]", full.split("},{").next().unwrap());
        let _stream = send_handshake(socket, first_only.as_bytes(), Some(vmm.uffd_fd())).unwrap();
        vmm.read_byte(0);
        // Outside every described region: the server cannot answer.
        vmm.read_byte(regions[0].size + 4096);
        std::process::exit(0);
    }
    let release = Release::parse(&var("RELEASE").unwrap()).unwrap();
    let src = synthetic_memory(vmm.size(), var("SEED").unwrap().parse().unwrap());
    vmm.connect_as(socket, release).unwrap();
    if let Some(ms) = var("HEAD_START_MS") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
    }
    if let Some(seed) = var("FIRST") {
        let pages = scattered(vmm.size(), seed.parse().unwrap());
        touch_and_check(&vmm, &src, &pages, 2);
    }
    assert!(
        whole_memory(&vmm) == src,
        "memory differs from the memory file"
    );
    std::process::exit(0);
}

/// Runs [`vmm_child`] against `socket` with `vars`; its exit status. A VMM
/// still running after a minute hangs on a fault nobody answers: it is
/// killed and the test fails.
fn run_vmm(socket: &Path, vars: &[(&str, &str)]) -> ExitStatus {
    let what = format!("{vars:?}");
    let mut child = spawn_vmm(socket, vars);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the VMM {what} hung: nobody answers its faults");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_vmm(socket: &Path, vars: &[(&str, &str)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "vmm_child", "--ignored", "--nocapture"])
        .env("CAIRN_TEST_VMM_SOCKET", socket)
        .envs(
            vars.iter()
                .map(|(k, v)| (format!("CAIRN_TEST_VMM_{k}"), *v)),
        )
        .spawn()
        .unwrap()
}

#[test]
fn a_failing_server_kills_the_vmm() {
    let env = Env::file();
    let id = env.import(&synthetic_memory(2 * MIB, 9));
    let cfg = ServeConfig {
        kill_vmm: true,
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let regions = format!("{MIB}/4096,{MIB}/4096");
    let status = run_vmm(
        &served.socket,
        &[("SCRIPT", "outside"), ("REGIONS", &regions)],
    );
    let err = served.outcome().unwrap_err();
    assert!(matches!(err, ServeError::OutsideRegions { .. }), "{err}");
    assert_eq!(
        status.signal(),
        Some(9),
        "the VMM is killed, not left hanging: {status:?}"
    );
}

#[test]
fn the_store_failing_during_a_fault_stops_the_server_without_serving_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = common::PrivateS3::start(&dir.path().join("s3"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3store = rt.block_on(async {
        let s3 = cairn_engine::objstore::S3Store::connect(&common::s3_options(
            &s3.endpoint,
            "mem",
            common::PRIVATE_KEY,
            common::PRIVATE_SECRET,
        ))
        .await;
        s3.ensure_bucket().await.unwrap();
        s3
    });
    let remote: Arc<dyn ObjectStore> =
        Arc::new(Resilient::new(Arc::new(s3store), common::fast_retries(), 8));
    let importer = Env::with(tempfile::tempdir().unwrap(), remote.clone(), "cache");
    let src = synthetic_memory(8 * MIB, 13);
    let id = importer.import(&src);
    // The server has an empty cache: every chunk comes from S3.
    let env = Env::with(dir, remote, "server-cache");
    let served = env.serve_one(env.snapshot(id), no_kill());
    let mut vmm = VmmHarness::new(&[RegionSpec {
        size: 8 * MIB,
        page_size: 4096,
    }])
    .unwrap();
    vmm.connect(&served.socket).unwrap();
    touch_and_check(&vmm, &src, &[0, 4096, 2 * MIB], 1);
    s3.kill();
    std::thread::scope(|s| {
        let vmm = &vmm;
        // Blocks until the server gives up and the test closes the fd.
        let toucher = s.spawn(move || vmm.read_byte(6 * MIB));
        let err = served
            .rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap_err();
        let text = uffd::DisplayChain(&err).to_string();
        assert!(matches!(err, ServeError::Store { .. }), "{text}");
        assert!(
            text.contains("127.0.0.1"),
            "the error names the endpoint: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !toucher.is_finished(),
            "the faulting thread got no bytes from a failed server"
        );
        // Unblock the guest thread (it then reads a fresh zero page).
        vmm.close_uffd();
        toucher.join().unwrap();
    });
    vmm.disconnect();
}

#[test]
fn every_firecracker_release_is_served_until_the_vmm_exits() {
    let env = Env::file();
    let size = 8 * MIB;
    let id = env.import(&synthetic_memory(size, 21));
    let regions = format!("{size}/4096");
    // 1.6 sends no page size and, like 1.7 to 1.11, drops the socket right
    // after the handshake; the VMM then touches every byte.
    for release in ["1.6", "1.7", "1.12"] {
        let served = env.serve_one(env.snapshot(id), no_kill());
        let status = run_vmm(
            &served.socket,
            &[("REGIONS", &regions), ("RELEASE", release), ("SEED", "21")],
        );
        assert!(status.success(), "{release}: {status:?}");
        let r = served.outcome().expect("the resume succeeds");
        assert_eq!(r.end, Some(End::VmmExited), "{release}");
        assert_eq!(r.fault_bytes, size, "{release}: every page served once");
    }
}

#[test]
fn a_blocking_userfaultfd_is_made_non_blocking() {
    let env = Env::file();
    let id = env.import(&synthetic_memory(4 * MIB, 22));
    let served = env.serve_one(env.snapshot(id), no_kill());
    let regions = format!("{}/4096", 4 * MIB);
    let status = run_vmm(
        &served.socket,
        &[
            ("REGIONS", &regions),
            ("RELEASE", "1.12"),
            ("SEED", "22"),
            ("BLOCKING", "1"),
        ],
    );
    assert!(status.success(), "{status:?}");
    // A fault loop blocked in read() never sees the VMM exit.
    let r = served.outcome().expect("the resume succeeds");
    assert_eq!(r.end, Some(End::VmmExited));
    assert_eq!(r.fault_bytes, 4 * MIB);
}

#[test]
fn a_panic_in_the_session_kills_the_vmm_first_fault_injector() {
    let env = Env::file();
    let id = env.import(&synthetic_memory(2 * MIB, 23));
    let cfg = ServeConfig {
        kill_vmm: true,
        fault_injector: FaultInjector::new(|point| {
            if let InjectionPoint::Fault { offset } = point {
                panic!("fault injector: the fault loop panics at offset {offset}");
            }
        }),
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let regions = format!("{}/4096", 2 * MIB);
    let status = run_vmm(
        &served.socket,
        &[("REGIONS", &regions), ("RELEASE", "1.12"), ("SEED", "23")],
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the VMM is killed, not left hanging: {status:?}"
    );
    assert!(
        served.rx.recv_timeout(Duration::from_secs(10)).is_err(),
        "the serving thread panicked: no report"
    );
}

#[test]
fn a_prefetch_worker_that_panics_gives_its_pages_back_fault_injector() {
    let env = Env::file();
    let size = 16 * MIB;
    let src = synthetic_memory(size, 24);
    let id = env.import(&src);
    let specs = [RegionSpec {
        size,
        page_size: 4096,
    }];
    let ws = scattered(size, 25);
    let recorded = record(&env, id, &specs, &src, &ws);
    let cfg = ServeConfig {
        fault_injector: FaultInjector::new(|point| {
            if let InjectionPoint::PrefetchCopy { worker: 0, .. } = point {
                panic!("fault injector: prefetch worker 0 panics with pages claimed");
            }
        }),
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let regions = format!("{size}/4096");
    let status = run_vmm(
        &served.socket,
        &[
            ("REGIONS", &regions),
            ("RELEASE", "1.12"),
            ("SEED", "24"),
            ("FIRST", "25"),
        ],
    );
    assert!(status.success(), "{status:?}");
    let r = served.outcome().expect("the resume succeeds");
    let why = r.prefetch_stopped.clone().unwrap_or_default();
    assert!(why.contains("worker 0 panicked"), "{r:?}");
    assert!(
        r.prefetch_ms.is_some(),
        "both workers told the handoff they stopped: {r:?}"
    );
    assert!(
        r.prefetch_bytes < recorded,
        "worker 0 installed nothing: {r:?}"
    );
    assert_eq!(r.prefetch_bytes + r.fault_bytes, size, "{r:?}");
}

#[test]
fn a_remove_racing_a_prefetch_copy_leaves_zeros_fault_injector() {
    let env = Env::file();
    let size = 8 * MIB;
    let src = synthetic_memory(size, 26);
    let id = env.import(&src);
    let specs = [RegionSpec {
        size,
        page_size: 4096,
    }];
    // A working set of 2 MiB in order: prefetch copies of 256 KiB.
    let ws: Vec<u64> = (0..512).map(|p| MIB + p * 4096).collect();
    record(&env, id, &specs, &src, &ws);
    // The first prefetch copy stops after its claim until the test lets it go.
    let (claimed_tx, claimed_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let pause = Mutex::new(Some((claimed_tx, go_rx)));
    let cfg = ServeConfig {
        fault_injector: FaultInjector::new(move |point| {
            if let InjectionPoint::PrefetchCopy { offset, len, .. } = point {
                let first = pause.lock().unwrap().take();
                if let Some((claimed, go)) = first {
                    claimed.send((offset, len)).unwrap();
                    go.recv().unwrap();
                }
            }
        }),
        ..no_kill()
    };
    let served = env.serve_one(env.snapshot(id), cfg);
    let mut vmm = VmmHarness::new(&specs).unwrap();
    vmm.connect(&served.socket).unwrap();
    let (offset, len) = claimed_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    // The guest gives the claimed pages back; madvise returns once the
    // server has read the REMOVE, and the kernel has zapped the range.
    vmm.remove(offset, len).unwrap();
    go_tx.send(()).unwrap();
    let mut expected = src.clone();
    expected[offset as usize..(offset + len) as usize].fill(0);
    assert!(
        whole_memory(&vmm) == expected,
        "pages given back read as zeros, never as the snapshot"
    );
    let r = finish(vmm, served);
    assert_eq!(r.removed_pages, len / 4096);
}

#[test]
fn a_working_set_whose_packs_are_lost_or_corrupt_is_served_from_the_snapshot() {
    for damage in ["lost", "corrupt"] {
        let env = Env::file();
        let size = 16 * MIB;
        let src = synthetic_memory(size, 27);
        let id = env.import(&src);
        let before = env.packs();
        let specs = [RegionSpec {
            size,
            page_size: 4096,
        }];
        record(&env, id, &specs, &src, &scattered(size, 28));
        let ws_packs: Vec<PathBuf> = env
            .packs()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        assert!(
            !ws_packs.is_empty(),
            "the working set's pages are in new packs"
        );
        for pack in &ws_packs {
            if damage == "lost" {
                // The object is gone; its index (`.idx`) remains.
                std::fs::remove_file(pack).unwrap();
            } else {
                let mut bytes = std::fs::read(pack).unwrap();
                for b in bytes.iter_mut().skip(64).step_by(512) {
                    *b ^= 0x5a;
                }
                std::fs::write(pack, bytes).unwrap();
            }
        }
        // A server with an empty cache: the working set must come from
        // its packs; the snapshot's own packs are intact.
        let remote: Arc<dyn ObjectStore> = Arc::new(FileStore::open(&env.path("store")).unwrap());
        let server = Env::with(tempfile::tempdir().unwrap(), remote, "cold-cache");
        let snap = server.snapshot(id);
        let served = server.serve_one(snap, no_kill());
        let regions = format!("{size}/4096");
        let status = run_vmm(
            &served.socket,
            &[
                ("REGIONS", &regions),
                ("RELEASE", "1.12"),
                ("SEED", "27"),
                ("FIRST", "28"),
            ],
        );
        assert!(status.success(), "{damage}: {status:?}");
        let r = served.outcome().expect("the resume succeeds");
        assert_eq!(r.end, Some(End::VmmExited), "{damage}");
        let why = r.prefetch_stopped.clone().unwrap_or_default();
        assert!(why.contains("working set"), "{damage}: {r:?}");
        assert_eq!(r.prefetch_bytes + r.fault_bytes, size, "{damage}: {r:?}");
    }
}

#[test]
fn huge_page_prefetch_installs_whole_pages_from_their_own_bytes() {
    if !VmmHarness::huge_pages_available(4) {
        VmmHarness::missing_prerequisite("no 2 MiB huge pages here (vm.nr_hugepages)");
        return;
    }
    let env = Env::file();
    let size = 8 * MIB;
    let src = synthetic_memory(size, 29);
    let id = env.import(&src);
    // Recorded by a VMM with 4 KiB pages: one run over [1 MiB, 5 MiB),
    // which covers the huge page [2 MiB, 4 MiB) whole and two in part.
    let ws: Vec<u64> = (256..1280).map(|p| p * 4096).collect();
    let small = [RegionSpec {
        size,
        page_size: 4096,
    }];
    assert_eq!(record(&env, id, &small, &src, &ws), 4 * MIB);
    // Resumed by one with 2 MiB pages, which gives the prefetch a head
    // start: without one, the guest may fault the whole page first (a
    // legitimate race, covered elsewhere), and this test is about what the
    // prefetch installs.
    let served = env.serve_one(env.snapshot(id), no_kill());
    let regions = format!("{size}/{}", 2 * MIB);
    let status = run_vmm(
        &served.socket,
        &[
            ("REGIONS", &regions),
            ("RELEASE", "1.12"),
            ("SEED", "29"),
            ("HEAD_START_MS", "1000"),
        ],
    );
    assert!(status.success(), "every byte where it belongs: {status:?}");
    let r = served.outcome().expect("the resume succeeds");
    assert_eq!(r.prefetch_bytes, 2 * MIB, "only the whole page: {r:?}");
    assert_eq!(r.prefetch_bytes + r.fault_bytes, size, "{r:?}");
}
