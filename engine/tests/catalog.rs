//! The catalog against real stores: names, public names, snapshot states
//! and registration, sandboxes and their fencing, request counts, pages.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::catalog::{
    self, image, sandbox, snapshot, CatalogError, Made, NewImage, NewSandbox, NewSnapshot, Owner,
    SandboxSource, SandboxState, SnapshotState,
};
use cairn_engine::layout;
use cairn_engine::manifest::Manifest;
use cairn_engine::objstore::{FileStore, ObjectStore, PutMode, Resilient};
use cairn_engine::{ChunkId, ErrorKind, ManifestId};
use common::wrappers::{CountingStore, LostAnswerStore, Requests};

fn file_store(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    Arc::new(FileStore::open(dir).unwrap())
}

/// Puts a disk manifest of `chunks` 64 KiB chunks (seeded ids, some
/// shared with `base`) and returns its id.
async fn put_manifest(
    store: &dyn ObjectStore,
    seed: u8,
    shared: usize,
    chunks: usize,
) -> ManifestId {
    let ids = (0..chunks)
        .map(|i| {
            let owner = if i < shared { 0 } else { seed };
            Some(ChunkId::of(&[owner, i as u8]))
        })
        .collect();
    let m = Manifest::new_disk(chunks as u64 * 65536, 65536, ids);
    let id = m.id();
    store
        .put(
            &layout::manifest_key(&id),
            Bytes::from(m.encode()),
            PutMode::IfAbsent,
        )
        .await
        .unwrap();
    id
}

fn new_image(project: &str, name: &str, id: ManifestId) -> NewImage {
    NewImage {
        project: project.to_owned(),
        name: name.to_owned(),
        id,
        public: false,
        parent: None,
        made: Made::new("test", None),
    }
}

fn new_snapshot(project: &str, image: Option<ManifestId>) -> NewSnapshot {
    NewSnapshot {
        project: project.to_owned(),
        parent: None,
        image,
        sandbox: None,
        host: "host-a".to_owned(),
    }
}

fn completion(disk: ManifestId) -> snapshot::Completion {
    snapshot::Completion {
        disk,
        memory: None,
        vm_state: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_states_move_forward_only_and_illegal_moves_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let s = store.as_ref();
    let disk = put_manifest(s, 1, 0, 4).await;
    let illegal = |r: Result<_, CatalogError>, from: &str, to: &str| match r {
        Err(CatalogError::IllegalMove { from: f, to: t, .. }) => {
            assert_eq!((f.as_str(), t.as_str()), (from, to))
        }
        other => panic!("{from} -> {to} was not refused: {other:?}"),
    };

    let a = snapshot::create(s, new_snapshot("default", None))
        .await
        .unwrap();
    assert_eq!(a.state, SnapshotState::Pending);
    // pending -> completed skips the upload.
    illegal(
        snapshot::complete(s, "default", &a.id, completion(disk)).await,
        "pending",
        "completed",
    );
    let up = snapshot::start_upload(s, "default", &a.id, "host-b")
        .await
        .unwrap();
    assert_eq!(
        (up.state, up.host.as_str()),
        (SnapshotState::Uploading, "host-b")
    );
    illegal(
        snapshot::start_upload(s, "default", &a.id, "host-c").await,
        "uploading",
        "uploading",
    );
    let done = snapshot::complete(s, "default", &a.id, completion(disk))
        .await
        .unwrap();
    assert_eq!(done.state, SnapshotState::Completed);
    assert_eq!(done.disk, Some(disk));
    let uri = done.uri.clone().unwrap();
    assert_eq!(uri, format!("{}/snapshots/{}", s.uri(), a.id));
    // Completed is final.
    illegal(
        snapshot::fail(s, "default", &a.id, "late").await,
        "completed",
        "failed",
    );
    illegal(
        snapshot::start_upload(s, "default", &a.id, "x").await,
        "completed",
        "uploading",
    );
    illegal(
        snapshot::complete(s, "default", &a.id, completion(disk)).await,
        "completed",
        "completed",
    );

    // Failed is final, and keeps its reason.
    let b = snapshot::create(s, new_snapshot("default", None))
        .await
        .unwrap();
    let failed = snapshot::fail(s, "default", &b.id, "the store stopped answering")
        .await
        .unwrap();
    assert_eq!(
        failed.reason.as_deref(),
        Some("the store stopped answering")
    );
    illegal(
        snapshot::start_upload(s, "default", &b.id, "x").await,
        "failed",
        "uploading",
    );

    // What a completion names must be in the store.
    let c = snapshot::create(s, new_snapshot("default", None))
        .await
        .unwrap();
    snapshot::start_upload(s, "default", &c.id, "host-a")
        .await
        .unwrap();
    let missing = ManifestId::of(b"no such manifest");
    let e = snapshot::complete(s, "default", &c.id, completion(missing))
        .await
        .unwrap_err();
    assert!(
        matches!(e, CatalogError::NoSuchManifest { id, .. } if id == missing),
        "{e}"
    );
    let rec = snapshot::get(s, "default", &c.id)
        .await
        .unwrap()
        .unwrap()
        .record;
    assert_eq!(rec.state, SnapshotState::Uploading);

    // An unknown id is not found, not illegal.
    let e = snapshot::start_upload(s, "default", &catalog::new_id(), "x")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // Removal: refused while being taken, unless forced; then gone.
    let e = snapshot::remove(s, "default", &c.id, false, "t")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("uploading"), "{e}");
    snapshot::remove(s, "default", &c.id, true, "t")
        .await
        .unwrap();
    snapshot::remove(s, "default", &a.id, false, "t")
        .await
        .unwrap();
    assert!(snapshot::get(s, "default", &a.id).await.unwrap().is_none());
    assert!(snapshot::read_descriptor(s, &a.id).await.unwrap().is_none());
    let (ids, next) = snapshot::list_page(s, "default", None, 10).await.unwrap();
    assert_eq!((ids, next), (vec![b.id.clone()], None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_what_is_not_a_completed_snapshot_of_this_store_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let s = store.as_ref();
    // The snapshot's disk shares 6 of its 8 chunks with the image.
    let base = put_manifest(s, 1, 8, 8).await;
    let disk = put_manifest(s, 2, 6, 8).await;
    image::create(s, new_image("default", "base", base))
        .await
        .unwrap();

    let register = |uri: String, name: &'static str| {
        let store = store.clone();
        async move { snapshot::register(store.as_ref(), "default", &uri, name, false, None).await }
    };
    let refused = |r: Result<_, CatalogError>, want: &[&str]| {
        let e = r.expect_err("register was refused");
        let msg = e.to_string();
        for w in want {
            assert!(msg.contains(w), "`{msg}` does not say {w}");
        }
        e
    };

    let pending = snapshot::create(s, new_snapshot("default", Some(base)))
        .await
        .unwrap();
    let uri = |id: &str| snapshot::SnapshotUri::new(s, id).to_string();
    let e = refused(
        register(uri(&pending.id), "img").await,
        &["pending", "still being taken"],
    );
    assert_eq!(e.kind(), ErrorKind::Conflict);

    snapshot::start_upload(s, "default", &pending.id, "host-a")
        .await
        .unwrap();
    refused(
        register(uri(&pending.id), "img").await,
        &["uploading", "has not finished"],
    );

    let failed = snapshot::create(s, new_snapshot("default", Some(base)))
        .await
        .unwrap();
    snapshot::fail(s, "default", &failed.id, "disk full on host-a")
        .await
        .unwrap();
    refused(
        register(uri(&failed.id), "img").await,
        &["failed", "disk full on host-a"],
    );

    let unknown = catalog::new_id();
    let e = refused(
        register(uri(&unknown), "img").await,
        &[&unknown, "no snapshot"],
    );
    assert_eq!(e.kind(), ErrorKind::NotFound);

    let other = tempfile::tempdir().unwrap();
    let foreign = format!("file://{}/snapshots/{}", other.path().display(), pending.id);
    let e = refused(register(foreign, "img").await, &["another store"]);
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    refused(
        register(format!("s3://bucket/p/snapshots/{}", pending.id), "img").await,
        &["another store"],
    );
    refused(
        register("https://x/snapshots/abc".to_owned(), "img").await,
        &["not a snapshot URI"],
    );

    // Completed, in another project: says whose it is.
    let theirs = snapshot::create(s, new_snapshot("team", Some(base)))
        .await
        .unwrap();
    snapshot::start_upload(s, "team", &theirs.id, "host-a")
        .await
        .unwrap();
    snapshot::complete(s, "team", &theirs.id, completion(disk))
        .await
        .unwrap();
    refused(
        register(uri(&theirs.id), "img").await,
        &["belongs to project `team`", "--project team"],
    );

    // Completed here: registered, with its parent and how it was made.
    snapshot::start_upload(s, "default", &pending.id, "host-a")
        .await
        .ok();
    let done = snapshot::complete(s, "default", &pending.id, completion(disk))
        .await
        .unwrap();
    let img = snapshot::register(
        s,
        "default",
        done.uri.as_deref().unwrap(),
        "img",
        false,
        Some("FROM base\n".into()),
    )
    .await
    .unwrap();
    assert_eq!((img.id, img.parent), (disk, Some(base)));
    assert_eq!(img.made.how, "register");
    assert_eq!(img.made.from.as_deref(), done.uri.as_deref());
    assert_eq!(img.made.dockerfile.as_deref(), Some("FROM base\n"));
    // 2 of 8 chunks are its own.
    assert_eq!((img.size, img.unique_bytes), (8 * 65536, 2 * 65536));
    assert_eq!(catalog::resolve(s, "default", "img").await.unwrap(), disk);
    // Registering again the same way changes nothing; another name is refused.
    snapshot::register(
        s,
        "default",
        done.uri.as_deref().unwrap(),
        "img",
        false,
        None,
    )
    .await
    .unwrap();
    refused(
        register(done.uri.clone().unwrap(), "base").await,
        &["taken"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_per_project_and_public_names_resolve_from_every_project_own_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let s = store.as_ref();
    let (a, b, c) = (
        put_manifest(s, 1, 0, 2).await,
        put_manifest(s, 2, 0, 2).await,
        put_manifest(s, 3, 0, 2).await,
    );

    image::create(s, new_image("alpha", "ubuntu", a))
        .await
        .unwrap();
    // The same name in the same project, another image: refused.
    let e = image::create(s, new_image("alpha", "ubuntu", b))
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::NameTaken { .. }), "{e}");
    // The same again: nothing changes.
    image::create(s, new_image("alpha", "ubuntu", a))
        .await
        .unwrap();
    // Another project may use the name.
    image::create(s, new_image("beta", "ubuntu", b))
        .await
        .unwrap();
    assert_eq!(catalog::resolve(s, "alpha", "ubuntu").await.unwrap(), a);
    assert_eq!(catalog::resolve(s, "beta", "ubuntu").await.unwrap(), b);
    let e = catalog::resolve(s, "gamma", "ubuntu").await.unwrap_err();
    assert!(e.to_string().contains("project `gamma`"), "{e}");

    // A public image resolves everywhere; a project's own name wins.
    image::create(
        s,
        NewImage {
            public: true,
            ..new_image("alpha", "python", c)
        },
    )
    .await
    .unwrap();
    image::create(s, new_image("beta", "python", b))
        .await
        .unwrap();
    assert_eq!(catalog::resolve(s, "gamma", "python").await.unwrap(), c);
    assert_eq!(catalog::resolve(s, "beta", "python").await.unwrap(), b);
    let listed: Vec<_> = image::list(s, "gamma")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, r)| (n, r.unwrap().project))
        .collect();
    assert_eq!(listed, vec![("python".to_owned(), "alpha".to_owned())]);
    let listed = image::list(s, "alpha").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");

    // Public names are unique in the store; the refused project keeps nothing.
    let e = image::create(
        s,
        NewImage {
            public: true,
            ..new_image("beta", "node", a)
        },
    )
    .await;
    assert!(e.is_ok());
    let e = image::create(
        s,
        NewImage {
            public: true,
            ..new_image("gamma", "node", c)
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, CatalogError::PublicNameTaken { owner, .. } if owner == "beta"),
        "{e}"
    );
    assert_eq!(catalog::resolve(s, "gamma", "node").await.unwrap(), a);

    // Removed, the name resolves no more, and can be taken again.
    image::remove(s, "alpha", "python", "t").await.unwrap();
    assert!(catalog::resolve(s, "gamma", "python").await.is_err());
    image::create(
        s,
        NewImage {
            public: true,
            ..new_image("gamma", "python", a)
        },
    )
    .await
    .unwrap();
    assert_eq!(catalog::resolve(s, "delta", "python").await.unwrap(), a);
    image::remove(s, "alpha", "ubuntu", "t").await.unwrap();
    image::create(s, new_image("alpha", "ubuntu", c))
        .await
        .unwrap();
    assert_eq!(catalog::resolve(s, "alpha", "ubuntu").await.unwrap(), c);
    let e = image::remove(s, "alpha", "nothing", "t").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);

    // A rebuild moves a private name (create_or_move); a public one stays.
    let moved = image::create_or_move(s, new_image("alpha", "ubuntu", b))
        .await
        .unwrap();
    assert_eq!(moved.id, b);
    assert_eq!(catalog::resolve(s, "alpha", "ubuntu").await.unwrap(), b);
    let e = image::create_or_move(s, new_image("beta", "node", c))
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::NameTaken { .. }), "{e}");
    assert_eq!(catalog::resolve(s, "gamma", "node").await.unwrap(), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_before_the_catalog_are_project_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let s = store.as_ref();
    let (a, b) = (
        put_manifest(s, 1, 0, 3).await,
        put_manifest(s, 2, 0, 3).await,
    );
    s.put(
        &layout::image_ref_key("old"),
        Bytes::from(format!("{a}\n")),
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    assert_eq!(catalog::resolve(s, "default", "old").await.unwrap(), a);
    assert!(catalog::resolve(s, "other", "old").await.is_err());
    let listed = image::list(s, "default").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.as_ref().unwrap().made.how, "legacy-ref");
    // The name is taken for another image, and free to name the same one.
    let e = image::create(s, new_image("default", "old", b))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("before the catalog"), "{e}");
    image::create(s, new_image("default", "old", a))
        .await
        .unwrap();
    assert_eq!(image::list(s, "default").await.unwrap().len(), 1);
    // verify sees both the record and the old name.
    assert_eq!(image::every_name(s).await.unwrap().len(), 2);
    image::remove(s, "default", "old", "t").await.unwrap();
    image::remove(s, "default", "old", "t").await.unwrap();
    assert!(catalog::resolve(s, "default", "old").await.is_err());
    assert_eq!(s.head(&layout::image_ref_key("old")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_lost_a_sandbox_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let s = store.as_ref();
    let img = put_manifest(s, 1, 0, 2).await;
    let new = |name: Option<&str>, host: &str| NewSandbox {
        project: "default".to_owned(),
        name: name.map(str::to_owned),
        source: SandboxSource::Image(img),
        host: host.to_owned(),
    };
    let sb = sandbox::create(s, new(Some("web"), "host-a"))
        .await
        .unwrap();
    assert_eq!((sb.state, sb.generation), (SandboxState::Running, 1));
    let e = sandbox::create(s, new(Some("web"), "host-b"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("host-a"), "{e}");
    // By name and by id.
    assert_eq!(
        sandbox::get(s, "default", "web")
            .await
            .unwrap()
            .unwrap()
            .record
            .id,
        sb.id
    );
    assert_eq!(
        sandbox::get(s, "default", &sb.id)
            .await
            .unwrap()
            .unwrap()
            .record
            .name
            .as_deref(),
        Some("web")
    );

    let a = sb.owner();
    // Another host cannot take a running sandbox, nor move it.
    let e = sandbox::take(s, "default", "web", "host-b", false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("running on host-a"), "{e}");
    let b_guess = Owner {
        host: "host-b".into(),
        generation: 1,
    };
    let e = sandbox::set_state(
        s,
        "default",
        "web",
        &b_guess,
        SandboxState::Suspending,
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, CatalogError::Fenced { .. }), "{e}");
    // Illegal moves by the owner.
    let e = sandbox::set_state(s, "default", "web", &a, SandboxState::Suspended, None)
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::IllegalMove { .. }), "{e}");
    sandbox::set_state(s, "default", "web", &a, SandboxState::Suspending, None)
        .await
        .unwrap();
    let snap = catalog::new_id();
    let susp = sandbox::set_state(
        s,
        "default",
        "web",
        &a,
        SandboxState::Suspended,
        Some(&snap),
    )
    .await
    .unwrap();
    assert_eq!(susp.snapshot.as_deref(), Some(snap.as_str()));

    // host-b resumes it: generation 2; host-a is fenced from then on.
    let taken = sandbox::take(s, "default", "web", "host-b", false)
        .await
        .unwrap();
    assert_eq!(
        (taken.host.as_str(), taken.generation, taken.state),
        ("host-b", 2, SandboxState::Running)
    );
    let e = sandbox::set_state(s, "default", "web", &a, SandboxState::Suspending, None)
        .await
        .unwrap_err();
    match e {
        CatalogError::Fenced {
            host,
            generation,
            caller_generation,
            ..
        } => {
            assert_eq!(
                (host.as_str(), generation, caller_generation),
                ("host-b", 2, 1)
            )
        }
        other => panic!("{other}"),
    }
    let e = sandbox::remove(s, "default", "web", Some(&a), "host-a")
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::Fenced { .. }), "{e}");
    // A forced take-over (host-b is gone for good) fences host-b in turn.
    let forced = sandbox::take(s, "default", "web", "host-c", true)
        .await
        .unwrap();
    assert_eq!(forced.generation, 3);
    let e = sandbox::remove(s, "default", "web", Some(&taken.owner()), "host-b")
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::Fenced { .. }), "{e}");
    sandbox::remove(s, "default", "web", Some(&forced.owner()), "host-c")
        .await
        .unwrap();
    assert!(sandbox::get(s, "default", "web").await.unwrap().is_none());
    assert!(sandbox::get(s, "default", &sb.id).await.unwrap().is_none());
    // The name is free again; the old id does not lead to the new sandbox.
    let again = sandbox::create(s, new(Some("web"), "host-a"))
        .await
        .unwrap();
    assert_ne!(again.id, sb.id);
    assert!(sandbox::get(s, "default", &sb.id).await.unwrap().is_none());

    // Unnamed: by id; removed with its key.
    let eph = sandbox::create(s, new(None, "host-a")).await.unwrap();
    assert!(catalog::is_record_id(eph.key()));
    let e = sandbox::remove(s, "default", eph.key(), None, "cli")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    sandbox::remove(s, "default", eph.key(), Some(&eph.owner()), "host-a")
        .await
        .unwrap();
    let (keys, _) = sandbox::list_page(s, "default", None, 100).await.unwrap();
    assert_eq!(keys, vec!["web".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_recognized_as_ours() {
    // The first conditional write of each call lands but its answer is
    // lost; the retry finds the precondition failed, and the catalog must
    // not take its own write for another host's.
    let dir = tempfile::tempdir().unwrap();
    let plain = file_store(dir.path());
    let img = put_manifest(plain.as_ref(), 1, 0, 2).await;
    for lose in 1..=2 {
        let faulty: Arc<dyn ObjectStore> = Arc::new(LostAnswerStore::new(plain.clone(), lose));
        let store = Resilient::new(faulty, common::fast_retries(), 4);
        let name = format!("lost-{lose}");
        let sb = sandbox::create(
            &store,
            NewSandbox {
                project: "default".into(),
                name: Some(name.clone()),
                source: SandboxSource::Image(img),
                host: "host-a".into(),
            },
        )
        .await
        .expect("a create whose answer was lost is still ours");
        assert_eq!(
            sandbox::get(&store, "default", &name)
                .await
                .unwrap()
                .unwrap()
                .record
                .id,
            sb.id
        );
    }
    let faulty: Arc<dyn ObjectStore> = Arc::new(LostAnswerStore::new(plain.clone(), 1));
    let store = Resilient::new(faulty, common::fast_retries(), 4);
    let snap = snapshot::create(&store, new_snapshot("default", None))
        .await
        .unwrap();
    let faulty: Arc<dyn ObjectStore> = Arc::new(LostAnswerStore::new(plain.clone(), 1));
    let store = Resilient::new(faulty, common::fast_retries(), 4);
    let up = snapshot::start_upload(&store, "default", &snap.id, "host-a")
        .await
        .expect("a move whose answer was lost is still ours");
    assert_eq!(up.state, SnapshotState::Uploading);
}

/// Creates `n` more sandboxes (a tenth named) in `project`, 16 at a time.
async fn grow(store: &Arc<dyn ObjectStore>, project: &str, from: usize, n: usize, img: ManifestId) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..from + n {
        let store = store.clone();
        let project = project.to_owned();
        if tasks.len() >= 16 {
            tasks.join_next().await.unwrap().unwrap();
        }
        tasks.spawn(async move {
            let new = NewSandbox {
                project,
                name: i.is_multiple_of(10).then(|| format!("sb-{i:07}")),
                source: SandboxSource::Image(img),
                host: "host-a".into(),
            };
            sandbox::create(store.as_ref(), new).await.unwrap();
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
}

/// Requests per operation at two catalog sizes ten times apart: they do
/// not grow with the catalog. Also checks every page's contents.
async fn requests_do_not_grow_with_the_catalog(inner: Arc<dyn ObjectStore>, sizes: [usize; 2]) {
    let counted = Arc::new(CountingStore::new(inner.clone()));
    let store: Arc<dyn ObjectStore> = counted.clone();
    let img = put_manifest(inner.as_ref(), 1, 0, 2).await;
    let mut per_size = Vec::new();
    let mut have = 0;
    for size in sizes {
        grow(&inner, "scale", have, size - have, img).await;
        have = size;
        counted.take();
        let named = sandbox::create(
            store.as_ref(),
            NewSandbox {
                project: "scale".into(),
                name: Some(format!("probe-{size}")),
                source: SandboxSource::Image(img),
                host: "h".into(),
            },
        )
        .await
        .unwrap();
        let create_named = counted.take();
        let unnamed = sandbox::create(
            store.as_ref(),
            NewSandbox {
                project: "scale".into(),
                name: None,
                source: SandboxSource::Image(img),
                host: "h".into(),
            },
        )
        .await
        .unwrap();
        let create_unnamed = counted.take();
        let found = sandbox::get(store.as_ref(), "scale", "sb-0000000")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.record.name.as_deref(), Some("sb-0000000"));
        let by_name = counted.take();
        let found = sandbox::get(store.as_ref(), "scale", &unnamed.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.record.id, unnamed.id);
        let by_id = counted.take();
        let (page, next) = sandbox::list_page(store.as_ref(), "scale", Some("5"), 100)
            .await
            .unwrap();
        let one_page = counted.take();
        assert_eq!(page.len(), 100);
        assert!(page.iter().all(|k| k.as_str() > "5"));
        assert!(page.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(next.as_deref(), page.last().map(String::as_str));
        per_size.push((create_named, create_unnamed, by_name, by_id, one_page));
        // Every record once, in order, through pages of 1000.
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (keys, next) = sandbox::list_page(store.as_ref(), "scale", after.as_deref(), 1000)
                .await
                .unwrap();
            all.extend(keys);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(all.len(), size + 2 * per_size.len());
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(all.contains(&named.name.unwrap()));
    }
    let one = |get, put| Requests {
        get,
        put,
        ..Requests::default()
    };
    for (named, unnamed, by_name, by_id, page) in &per_size {
        // A named create reads the name and takes it, then writes its id.
        assert_eq!(*named, one(1, 2));
        assert_eq!(*unnamed, one(0, 1));
        assert_eq!(*by_name, one(1, 0));
        assert_eq!(*by_id, one(1, 0));
        assert_eq!(
            *page,
            Requests {
                list: 1,
                ..Requests::default()
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_file_a_lookup_is_one_get_and_a_page_one_list_however_many_records() {
    let dir = tempfile::tempdir().unwrap();
    requests_do_not_grow_with_the_catalog(file_store(dir.path()), [500, 5000]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_lookup_is_one_get_and_a_page_one_list_however_many_records() {
    let (store, _) = common::fresh_moto_store("scale").await;
    requests_do_not_grow_with_the_catalog(store, [300, 3000]).await;
}
