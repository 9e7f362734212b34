//! Store URIs: `file:///abs/dir` and `s3://bucket/prefix?options`.
//!
//! S3 options in the query: `endpoint=URL`, `region=NAME`,
//! `path_style=true|false`, `part_size=BYTES`. Anything not given comes
//! from the standard AWS environment and profile chain.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::{FileStore, ObjectStore, Resilient, RetryPolicy, StoreError};
use crate::error::ErrorKind;

/// How to reach a bucket. Unset fields come from the AWS environment.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/` needed).
    pub prefix: String,
    /// Overrides `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); the default is on
    /// when a custom endpoint is set (MinIO, Ceph RGW, Garage), off for AWS.
    pub path_style: Option<bool>,
    /// Files larger than this are uploaded in parts of this size.
    pub part_size: Option<usize>,
    /// Access key and secret to use instead of the AWS chain. Never read
    /// from a URI (secrets do not belong in one); for embedding and tests.
    pub static_credentials: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad store URI `{uri}`: {reason}")]
pub struct UriError {
    uri: String,
    reason: String,
}

#[derive(Debug, Clone)]
pub enum StoreUri {
    File(PathBuf),
    S3(S3Options),
}

impl FromStr for StoreUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| UriError {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err(
                    "a file:// URI needs an absolute path, as in file:///var/lib/cairn",
                ));
            }
            return Ok(StoreUri::File(PathBuf::from(path)));
        }
        let Some(rest) = uri.strip_prefix("s3://") else {
            return Err(err("expected file:///DIR or s3://BUCKET/PREFIX"));
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(err(
                "the bucket name must be 3 to 63 characters of a-z, 0-9, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && super::check_key(prefix).is_err() {
            return Err(err(
                "the prefix must be segments of A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
        let mut opts = S3Options {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            ..S3Options::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| err("query options are key=value"))?;
            match k {
                "endpoint" => opts.endpoint = Some(v.to_owned()),
                "region" => opts.region = Some(v.to_owned()),
                "path_style" => {
                    opts.path_style =
                        Some(v.parse().map_err(|_| err("path_style is true or false"))?)
                }
                "part_size" => {
                    opts.part_size = Some(
                        v.parse()
                            .map_err(|_| err("part_size is a number of bytes"))?,
                    )
                }
                _ => {
                    return Err(err(&format!(
                        "unknown option `{k}` (known: endpoint, region, path_style, part_size)"
                    )))
                }
            }
        }
        Ok(StoreUri::S3(opts))
    }
}

impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUri::File(p) => write!(f, "file://{}", p.display()),
            StoreUri::S3(o) => write!(f, "s3://{}/{}", o.bucket, o.prefix),
        }
    }
}

/// Most requests one store has in flight, before throttling cuts it.
const MAX_CONCURRENCY: usize = 32;

/// Opens the store a URI names, wrapped in the shared retry policy.
pub async fn open_store(uri: &StoreUri) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let inner: Arc<dyn ObjectStore> = match uri {
        StoreUri::File(root) => Arc::new(FileStore::open(root).map_err(|e| {
            StoreError::new(
                "open",
                &uri.to_string(),
                "",
                ErrorKind::Io,
                format!(
                    "cannot create or open the store directory {}: {e}",
                    root.display()
                ),
            )
        })?),
        #[cfg(feature = "s3")]
        StoreUri::S3(opts) => Arc::new(super::S3Store::connect(opts).await),
        #[cfg(not(feature = "s3"))]
        StoreUri::S3(_) => {
            return Err(StoreError::new(
                "open",
                &uri.to_string(),
                "",
                ErrorKind::Unsupported,
                "this build has no S3 support",
            ))
        }
    };
    Ok(Arc::new(Resilient::new(
        inner,
        RetryPolicy::default(),
        MAX_CONCURRENCY,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        match "s3://my-bucket/a/b?endpoint=http://127.0.0.1:9000&path_style=true"
            .parse()
            .unwrap()
        {
            StoreUri::S3(o) => {
                assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("my-bucket", "a/b"));
                assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
                assert_eq!(o.path_style, Some(true));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            "file:///tmp/x".parse().unwrap(),
            StoreUri::File(_)
        ));
        for bad in [
            "file://rel",
            "s3://",
            "s3://B/x",
            "s3://ok-bucket/x?bogus=1",
            "http://x",
            "s3://bkt/../x",
        ] {
            let e = bad.parse::<StoreUri>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
