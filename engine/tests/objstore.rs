//! The object-store seam against both real backends: a directory and the
//! S3 server (s3s-fs over HTTP with SigV4), and the S3 client against
//! faults the server cannot produce on demand (a fault proxy in front of
//! it: stalls, 409s, a completion raced by another writer).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_engine::objstore::{
    Deadline, FileStore, ObjectStore, PutMode, PutOutcome, Resilient, S3Store,
};
use cairn_engine::ErrorKind;
use common::fault_proxy::{Answer, FaultProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    common::conformance::run(&store).await;
    // Nothing is left half-written.
    assert_eq!(
        std::fs::read_dir(dir.path().join(".tmp")).unwrap().count(),
        0
    );
}

/// A failed write leaves no temporary file; a writer that died leaves one
/// that the next open deletes once it is old, and a young one (a live
/// writer's) is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_temporaries_never_accumulate() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join(".tmp");
    let store = FileStore::open(dir.path()).unwrap();
    let missing = dir.path().join("no-such-source");
    let err = store.put_file("packs/x.pack", &missing).await.unwrap_err();
    assert!(err.to_string().contains("packs/x.pack"), "{err}");
    // A target that cannot be made: a file where the directory should be.
    std::fs::write(dir.path().join("manifests"), b"in the way").unwrap();
    store
        .put("manifests/m", Bytes::from_static(b"m"), PutMode::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "a failed write left a file"
    );

    let old = tmp.join("left-by-a-dead-writer");
    let young = tmp.join("being-written");
    for f in [&old, &young] {
        std::fs::write(f, b"partial").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    FileStore::open(dir.path()).unwrap();
    assert!(!old.exists(), "a stale temporary file was kept");
    assert!(young.exists(), "a live writer's temporary file was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_the_conformance_suite() {
    let (store, _) = common::fresh_s3_store("conf").await;
    common::conformance::run(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_passes_the_conditional_writes_and_pages_suite() {
    // Not the whole suite: moto's multipart completion answer is one
    // aws-sdk-s3 refuses (docs: DESIGN.md, "S3 servers here").
    let (store, _) = common::fresh_moto_store("conf").await;
    common::conformance::run_conditional(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_permission_error() {
    let env = common::s3_env();
    let opts = common::s3_options(
        &env.endpoint,
        "cairn-any-bucket",
        &env.access_key,
        "not-the-secret",
    );
    let s3 = S3Store::connect(&opts).await;
    let store = Resilient::new(Arc::new(s3), common::fast_retries(), 4);
    let err = store
        .put("k", Bytes::from_static(b"x"), PutMode::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("AWS_SECRET_ACCESS_KEY") && msg.contains("HTTP 403"),
        "{msg}"
    );
    // Not retried: a wrong key does not get better.
    assert!(!msg.contains("gave up after"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_transient_error_after_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = common::s3_options(
        &format!("http://127.0.0.1:{port}"),
        "cairn-bucket",
        "k",
        "s",
    );
    let store = Resilient::new(
        Arc::new(S3Store::connect(&opts).await),
        common::fast_retries(),
        4,
    );
    let err = store.get("k", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    let msg = err.to_string();
    assert!(
        msg.contains("could not reach") && msg.contains("gave up after 4 attempts"),
        "{msg}"
    );
}

/// A short deadline for tests: three attempts or so, then the error.
const TEST_DEADLINE: Deadline = Deadline {
    attempt: Duration::from_millis(300),
    total: Duration::from_secs(1),
};

/// The test fails (instead of hanging for minutes) if `call` has not
/// returned long after its own deadline.
async fn must_return<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("a read with a deadline came back")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_server_never_answers_fails_within_its_deadline_naming_endpoint_and_key() {
    let proxy = FaultProxy::start(&common::s3_env().endpoint, |r| {
        if r.method == "GET" && r.target.contains("/hangs") {
            Answer::Stall
        } else if r.method == "GET" && r.target.contains("/cut") {
            Answer::StallMidBody
        } else {
            Answer::Forward
        }
    });
    let (store, _) = common::fresh_s3_store_at(&proxy.endpoint, "stall").await;
    for key in ["t/hangs", "t/cut", "t/fine"] {
        store
            .put(key, Bytes::from(vec![7u8; 100_000]), PutMode::IfAbsent)
            .await
            .unwrap();
    }
    for key in ["t/hangs", "t/cut"] {
        let err = must_return(store.get_within(key, Some(0..50_000), TEST_DEADLINE))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(key) && msg.contains(&proxy.endpoint[7..]) && msg.contains("gave up"),
            "the error names the key, the endpoint and that it gave up: {msg}"
        );
        // Each attempt was cut short and retried within the deadline.
        let attempts = proxy.count(|r| r.starts_with("GET") && r.contains(key));
        assert!(attempts >= 2, "{key}: {attempts} attempts");
    }
    // Reads that are answered are not affected.
    let ok = must_return(store.get_within("t/fine", Some(10..20), TEST_DEADLINE)).await;
    assert_eq!(&ok.unwrap()[..], &[7u8; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_conditional_request_conflict_is_retried() {
    // The first PUT and the first multipart completion of each key are
    // answered 409, as S3 does when another conditional write of the key
    // is in progress; later ones go to the server.
    let conflicted = std::sync::Mutex::new(std::collections::HashSet::new());
    let proxy = FaultProxy::start(&common::s3_env().endpoint, move |r| {
        let completion = r.method == "POST" && r.target.contains("uploadId=");
        let put = r.method == "PUT" && !r.target.contains("partNumber=");
        if (put || completion) && r.target.contains("/t/") {
            let key = r.target.split('?').next().unwrap().to_owned();
            if conflicted.lock().unwrap().insert(key) {
                return Answer::Error {
                    status: 409,
                    code: "ConditionalRequestConflict",
                    message: "A conflicting conditional operation is in progress. Please retry.",
                };
            }
        }
        Answer::Forward
    });
    let (store, _) = common::fresh_s3_store_at(&proxy.endpoint, "conflict").await;
    let small = Bytes::from_static(b"small object");
    assert_eq!(
        store
            .put("t/small", small.clone(), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(store.get("t/small", None).await.unwrap(), small);
    assert_eq!(
        proxy.count(|r| r.starts_with("PUT") && r.contains("/t/small")),
        2
    );

    // A multipart upload (the tests use 5 MiB parts) whose completion
    // meets a 409 is retried whole.
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(11 << 20)).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("big"), &big).unwrap();
    assert_eq!(
        store
            .put_file("t/big", &dir.path().join("big"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(store.get("t/big", None).await.unwrap(), big);
    let completions = proxy.count(|r| r.starts_with("POST") && r.contains("/t/big?uploadId="));
    assert_eq!(completions, 2);
}

#[test]
fn a_multipart_upload_keeps_an_object_that_appeared_while_its_parts_went_up() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The proxy holds the completion until the test has created the key.
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (arrived_tx, go_rx) = (
        std::sync::Mutex::new(arrived_tx),
        std::sync::Mutex::new(go_rx),
    );
    let proxy = FaultProxy::start(&common::s3_env().endpoint, move |r| {
        if r.method == "POST" && r.target.contains("uploadId=") {
            arrived_tx.lock().unwrap().send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
        }
        Answer::Forward
    });
    let (store, _) = rt.block_on(common::fresh_s3_store_at(&proxy.endpoint, "noclobber"));
    let dir = tempfile::tempdir().unwrap();
    let big = vec![0xb1u8; 11 << 20];
    let path = dir.path().join("big");
    std::fs::write(&path, &big).unwrap();

    let upload = {
        let (store, path) = (store.clone(), path.clone());
        rt.spawn(async move { store.put_file("t/key", &path).await })
    };
    arrived_rx.recv().unwrap();
    let first = Bytes::from_static(b"the first writer's object");
    assert_eq!(
        rt.block_on(store.put("t/key", first.clone(), PutMode::IfAbsent))
            .unwrap(),
        PutOutcome::Created
    );
    go_tx.send(()).unwrap();
    let outcome = rt.block_on(upload).unwrap().unwrap();
    assert_eq!(outcome, PutOutcome::AlreadyExisted);
    assert_eq!(rt.block_on(store.get("t/key", None)).unwrap(), first);
    // The refused upload's parts were given up.
    assert_eq!(
        proxy.count(|r| r.starts_with("DELETE") && r.contains("AbortMultipartUpload")),
        1
    );
}

/// Real 5xx answers through the whole client path (the server cannot be
/// made to fail on demand, so the fault proxy answers them): a 500 or 503
/// is retried and the read then succeeds; one that never stops is given
/// up after the policy's attempts, each of them a request the server saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_up_to_the_policy_s_attempts() {
    let failed = std::sync::Mutex::new(std::collections::HashMap::<String, u32>::new());
    let proxy = FaultProxy::start(&common::s3_env().endpoint, move |r| {
        if r.method != "GET" || !r.target.contains("/t/") {
            return Answer::Forward;
        }
        let key = r.target.split('?').next().unwrap().to_owned();
        let mut failed = failed.lock().unwrap();
        let n = failed.entry(key.clone()).or_default();
        *n += 1;
        if key.ends_with("/t/twice") && *n <= 2 {
            return Answer::Error {
                status: 500,
                code: "InternalError",
                message: "We encountered an internal error. Please try again.",
            };
        }
        if key.ends_with("/t/always") {
            return Answer::Error {
                status: 503,
                code: "ServiceUnavailable",
                message: "Please reduce your request rate.",
            };
        }
        Answer::Forward
    });
    let (store, _) = common::fresh_s3_store_at(&proxy.endpoint, "five").await;
    for key in ["t/twice", "t/always"] {
        store
            .put(key, Bytes::from_static(b"body"), PutMode::IfAbsent)
            .await
            .unwrap();
    }
    assert_eq!(&store.get("t/twice", None).await.unwrap()[..], b"body");
    assert_eq!(
        proxy.count(|r| r.starts_with("GET") && r.contains("/t/twice")),
        3
    );

    let err = store.get("t/always", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    let attempts = common::fast_retries().max_attempts as usize;
    assert_eq!(
        proxy.count(|r| r.starts_with("GET") && r.contains("/t/always")),
        attempts
    );
    let msg = err.to_string();
    assert!(
        msg.contains("server error")
            && msg.contains("HTTP 503")
            && msg.contains("t/always")
            && msg.contains(&format!("gave up after {attempts} attempts")),
        "{msg}"
    );
}

/// A burst of 503 SlowDown answers (the fault proxy throttles the first
/// requests of a burst of reads, as S3 does a hot prefix) cuts the
/// store's concurrency once, not once per refusal; every read succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowdown_burst_cuts_concurrency_once_and_every_read_succeeds() {
    let throttled = std::sync::atomic::AtomicUsize::new(0);
    let proxy = FaultProxy::start(&common::s3_env().endpoint, move |r| {
        if r.method == "GET"
            && r.target.contains("/hot/")
            && throttled.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6
        {
            return Answer::Error {
                status: 503,
                code: "SlowDown",
                message: "Please reduce your request rate.",
            };
        }
        Answer::Forward
    });
    let env = common::s3_env();
    let bucket = common::unique("t-slow");
    let opts = common::s3_options(&proxy.endpoint, &bucket, &env.access_key, &env.secret_key);
    let s3 = S3Store::connect(&opts).await;
    s3.ensure_bucket().await.unwrap();
    let store = Arc::new(Resilient::new(Arc::new(s3), common::fast_retries(), 16));
    let before = store.limiter().limit();
    for i in 0..16 {
        store
            .put(
                &format!("hot/{i}"),
                Bytes::from(vec![i as u8; 1000]),
                PutMode::IfAbsent,
            )
            .await
            .unwrap();
    }
    let reads: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.get(&format!("hot/{i}"), None).await })
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        assert_eq!(r.await.unwrap().unwrap(), vec![i as u8; 1000]);
    }
    assert_eq!(store.limiter().throttle_events(), 1, "one cut per burst");
    assert!(
        store.limiter().limit() < before,
        "{} after, {before} before",
        store.limiter().limit()
    );
    assert_eq!(
        proxy.count(|r| r.starts_with("GET") && r.contains("/hot/")),
        16 + 6,
        "each refused read tried again once it was refused"
    );
}

/// A bucket that does not exist: "not found", naming the bucket's URI and
/// saying what to check; not retried. Against moto, which answers
/// `NoSuchBucket` as S3 does (s3s-fs answers a read in a missing bucket
/// with `NoSuchKey`, which reads as a missing key: also not found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_not_found_naming_it_and_is_not_retried() {
    let proxy = FaultProxy::start(&common::moto_endpoint(), |_| Answer::Forward);
    let bucket = common::unique("t-never-made");
    let opts = common::s3_options(&proxy.endpoint, &bucket, "moto", "moto");
    let store = Resilient::new(
        Arc::new(S3Store::connect(&opts).await),
        common::fast_retries(),
        4,
    );
    let err = store.get("some/key", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&bucket)
            && msg.contains("HTTP 404, NoSuchBucket")
            && msg.contains("the bucket does not exist"),
        "{msg}"
    );
    assert_eq!(proxy.count(|r| r.starts_with("GET")), 1, "not retried");
}
