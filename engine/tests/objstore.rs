//! The object-store seam against both real backends: a directory and the
//! S3 server (s3s-fs over HTTP with SigV4).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::objstore::{FileStore, ObjectStore, PutMode, Resilient, S3Store};
use cairn_engine::ErrorKind;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_the_conformance_suite() {
    let (store, _) = common::fresh_s3_store("conf").await;
    common::conformance::run(store.as_ref()).await;
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
