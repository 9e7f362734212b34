//! Shared test support: the real S3 server, test images, the object-store
//! conformance suite.
#![allow(dead_code)]

pub mod conformance;
pub mod fault_proxy;
pub mod private_s3;
pub mod wrappers;

#[allow(unused_imports)]
pub use private_s3::{PrivateS3, PRIVATE_KEY, PRIVATE_SECRET};

use std::sync::Arc;
use std::time::Duration;

use cairn_engine::objstore::{ObjectStore, Resilient, RetryPolicy, S3Options, S3Store};

/// The S3-compatible server the tests use, as `.ci/run` (or
/// `tools/dev/test.sh`) started it.
pub struct S3Env {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Reads the server's address from the environment, failing loudly when it
/// is missing: a test that claims S3 never quietly passes without one.
pub fn s3_env() -> S3Env {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("CAIRN_TEST_S3_ENDPOINT"),
        get("AWS_ACCESS_KEY_ID"),
        get("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(endpoint), Some(access_key), Some(secret_key)) => S3Env {
            endpoint,
            access_key,
            secret_key,
        },
        _ => panic!(
            "this test needs the S3 test server: set CAIRN_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (tools/dev/test.sh starts s3s-fs and sets them)"
        ),
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

pub fn s3_options(endpoint: &str, bucket: &str, key: &str, secret: &str) -> S3Options {
    S3Options {
        bucket: bucket.to_owned(),
        prefix: "store".to_owned(),
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".to_owned()),
        path_style: Some(true),
        part_size: Some(5 << 20),
        static_credentials: Some((key.to_owned(), secret.to_owned())),
    }
}

pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    }
}

/// A fresh bucket on the shared test server, behind the retry policy.
pub async fn fresh_s3_store(tag: &str) -> (Arc<dyn ObjectStore>, S3Store) {
    let env = s3_env();
    let bucket = unique(&format!("t-{tag}"));
    let s3 = S3Store::connect(&s3_options(
        &env.endpoint,
        &bucket,
        &env.access_key,
        &env.secret_key,
    ))
    .await;
    s3.ensure_bucket().await.expect("create a test bucket");
    (
        Arc::new(Resilient::new(Arc::new(s3.clone()), fast_retries(), 8)),
        s3,
    )
}

/// A fresh bucket on the shared test server reached through `endpoint` (a
/// fault proxy in front of it), behind the retry policy.
pub async fn fresh_s3_store_at(endpoint: &str, tag: &str) -> (Arc<dyn ObjectStore>, S3Store) {
    let env = s3_env();
    let bucket = unique(&format!("t-{tag}"));
    let opts = s3_options(endpoint, &bucket, &env.access_key, &env.secret_key);
    let s3 = S3Store::connect(&opts).await;
    s3.ensure_bucket().await.expect("create a test bucket");
    let retried = Resilient::new(Arc::new(s3.clone()), fast_retries(), 8);
    (Arc::new(retried), s3)
}

/// Deterministic test image bytes: a mix of zero, compressible, random and
/// repeated chunks, as a disk has.
pub fn test_image(chunks: usize, chunk_size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(chunks * chunk_size);
    for i in 0..chunks {
        match i % 5 {
            0 => out.extend(std::iter::repeat_n(0u8, chunk_size)),
            1 => out.extend((0..chunk_size).map(|_| rng.u8(..))),
            2 => out.extend(
                (0..chunk_size).map(|j| b"text of a file, more or less "[j % 29] ^ (i as u8 & 3)),
            ),
            3 => {
                let start = out.len() - chunk_size;
                out.extend_from_within(start..start + chunk_size);
            }
            _ => out.extend((0..chunk_size).map(|j| ((j / 64) as u8).wrapping_add(rng.u8(..4)))),
        }
    }
    out
}

/// moto's S3 server, as `tools/dev/moto-server.sh` started it: conditional
/// writes atomic under concurrency. It checks no credentials.
pub fn moto_endpoint() -> String {
    std::env::var("CAIRN_TEST_MOTO_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "this test needs moto's S3 server: set CAIRN_TEST_MOTO_ENDPOINT \
                 (eval \"$(tools/dev/moto-server.sh start)\"; tools/dev/test.sh does)"
            )
        })
}

/// A fresh bucket on moto, behind the retry policy.
pub async fn fresh_moto_store(tag: &str) -> (Arc<dyn ObjectStore>, S3Options) {
    let opts = moto_options(&unique(&format!("t-{tag}")));
    let s3 = S3Store::connect(&opts).await;
    s3.ensure_bucket()
        .await
        .expect("create a test bucket on moto");
    (
        Arc::new(Resilient::new(Arc::new(s3), fast_retries(), 8)),
        opts,
    )
}

pub fn moto_options(bucket: &str) -> S3Options {
    s3_options(&moto_endpoint(), bucket, "moto", "moto")
}
