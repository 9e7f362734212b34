//! One suite every object store must pass, run against `file://` and S3.

use bytes::Bytes;
use cairn_engine::objstore::{Conditional, ObjectStore, Precondition, PutMode, PutOutcome};
use cairn_engine::ErrorKind;

pub async fn run(store: &dyn ObjectStore) {
    run_conditional(store).await;
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

/// Conditional writes and listing by pages, one request after another:
/// what every store must do, including S3 servers that are not atomic
/// under concurrency (s3s-fs) and those that keep objects small (moto).
pub async fn run_conditional(store: &dyn ObjectStore) {
    let key = "catalog/conf/rec";
    let v0 = Bytes::from_static(b"{\"v\":0}");
    assert_eq!(store.get_versioned(key).await.unwrap(), None);
    // Absent: the first create wins, the second is refused.
    let Conditional::Written(ver0) = store
        .put_if(key, v0.clone(), Precondition::Absent)
        .await
        .unwrap()
    else {
        panic!("the first create of {key} was refused")
    };
    assert_eq!(
        store
            .put_if(key, Bytes::from_static(b"other"), Precondition::Absent)
            .await
            .unwrap(),
        Conditional::PreconditionFailed
    );
    let got = store.get_versioned(key).await.unwrap().unwrap();
    assert_eq!((got.data, &got.version), (v0.clone(), &ver0));

    // Matches: a write at the current version wins and moves the version;
    // one at the old version is refused and changes nothing.
    let v1 = Bytes::from_static(b"{\"v\":1}");
    let Conditional::Written(ver1) = store
        .put_if(key, v1.clone(), Precondition::Matches(ver0.clone()))
        .await
        .unwrap()
    else {
        panic!("a compare-and-swap at the current version was refused")
    };
    assert_ne!(ver1, ver0);
    assert_eq!(
        store
            .put_if(
                key,
                Bytes::from_static(b"stale"),
                Precondition::Matches(ver0.clone())
            )
            .await
            .unwrap(),
        Conditional::PreconditionFailed
    );
    let got = store.get_versioned(key).await.unwrap().unwrap();
    assert_eq!((got.data, got.version), (v1, ver1.clone()));
    // Matches on a key that is gone fails too.
    store.delete(key).await.unwrap();
    assert_eq!(
        store
            .put_if(key, v0.clone(), Precondition::Matches(ver1))
            .await
            .unwrap(),
        Conditional::PreconditionFailed
    );
    assert_eq!(store.get_versioned(key).await.unwrap(), None);

    // Pages: every key once, in order, whatever the page size and start.
    let mut names: Vec<String> = [
        "a", "b", "ab", "abc", "abcd", "abd", "a-b", "a.b", "a_b", "B", "Z9",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((0..40).map(|i| {
        format!(
            "{:032x}",
            (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834)
        )
    }))
    .collect();
    let prefix = "catalog/conf/page/";
    for n in &names {
        store
            .put_if(
                &format!("{prefix}{n}"),
                Bytes::from_static(b"x"),
                Precondition::Absent,
            )
            .await
            .unwrap();
    }
    // Another collection beside it is not listed.
    store
        .put_if(
            "catalog/conf/pagex/a",
            Bytes::from_static(b"x"),
            Precondition::Absent,
        )
        .await
        .unwrap();
    names.sort();
    let want: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
    for page in [1, 7, 51, 1000] {
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = store
                .list_page(prefix, after.as_deref(), page)
                .await
                .unwrap();
            assert!(p.keys.len() <= page);
            got.extend(p.keys.iter().cloned());
            match p.next_start_after() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(got, want, "pages of {page}");
    }
    // A start that is not a key, and a prefix within the collection.
    let p = store
        .list_page(prefix, Some(&format!("{prefix}abca")), 3)
        .await
        .unwrap();
    assert_eq!(
        p.keys,
        want[want.iter().position(|k| k.ends_with("/abcd")).unwrap()..][..3]
    );
    assert!(p.truncated);
    let p = store
        .list_page(&format!("{prefix}ab"), None, 100)
        .await
        .unwrap();
    let abs: Vec<_> = want
        .iter()
        .filter(|k| k[prefix.len()..].starts_with("ab"))
        .cloned()
        .collect();
    assert_eq!((p.keys, p.truncated), (abs, false));
    // The whole listing agrees.
    assert_eq!(store.list(prefix).await.unwrap(), want);
}
