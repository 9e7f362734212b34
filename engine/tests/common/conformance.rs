//! One suite every object store must pass, run against `file://` and S3.

use bytes::Bytes;
use cairn_engine::objstore::{ObjectStore, PutMode, PutOutcome};
use cairn_engine::ErrorKind;

pub async fn run(store: &dyn ObjectStore) {
    // Put if absent: first wins, second is a no-op.
    let a = Bytes::from_static(b"first version");
    assert_eq!(
        store
            .put("t/obj", a.clone(), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store
            .put("t/obj", Bytes::from_static(b"other"), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExisted
    );
    assert_eq!(store.get("t/obj", None).await.unwrap(), a);
    assert_eq!(
        &store.get("t/obj", Some(6..13)).await.unwrap()[..],
        b"version"
    );
    assert_eq!(store.head("t/obj").await.unwrap(), Some(a.len() as u64));

    // Overwrite replaces.
    store
        .put("t/obj", Bytes::from_static(b"second"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(&store.get("t/obj", None).await.unwrap()[..], b"second");

    // Missing objects.
    let err = store.get("t/missing", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("t/missing"), "{err}");
    assert_eq!(store.head("t/missing").await.unwrap(), None);
    store.delete("t/missing").await.unwrap();

    // A range past the end is an error, not short data.
    assert!(store.get("t/obj", Some(3..100)).await.is_err());

    // Invalid keys are refused before any I/O.
    let err = store.get("../escape", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);

    // Listing is by prefix, sorted, and complete.
    for k in ["t/list/b", "t/list/a", "t/list/c/d", "t/listed"] {
        store
            .put(k, Bytes::from_static(b"x"), PutMode::IfAbsent)
            .await
            .unwrap();
    }
    assert_eq!(
        store.list("t/list/").await.unwrap(),
        vec!["t/list/a", "t/list/b", "t/list/c/d"]
    );
    assert_eq!(store.list("t/list").await.unwrap().len(), 4);

    // A file larger than a multipart part (the S3 tests use 5 MiB parts).
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(12 << 20) + 123)
        .map(|i: u32| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let path = dir.path().join("big");
    std::fs::write(&path, &big).unwrap();
    assert_eq!(
        store.put_file("t/big", &path).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put_file("t/big", &path).await.unwrap(),
        PutOutcome::AlreadyExisted
    );
    assert_eq!(store.head("t/big").await.unwrap(), Some(big.len() as u64));
    let across = (5 << 20) - 10..(10 << 20) + 10;
    let got = store
        .get("t/big", Some(across.start as u64..across.end as u64))
        .await
        .unwrap();
    assert_eq!(&got[..], &big[across]);

    // Delete.
    store.delete("t/big").await.unwrap();
    assert_eq!(store.head("t/big").await.unwrap(), None);
}
