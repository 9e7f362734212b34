//! Store URIs: `file:///abs/dir` and `s3://bucket/prefix?options`.
//!
//! S3 options in the query: `endpoint=URL`, `region=NAME`,
//! `path_style=true|false`, `part_size=SIZE` (bytes, or e.g. `16M`).
//! Anything not given comes from the standard AWS environment and profile
//! chain.

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

    /// Parsed by the `url` crate: query values are percent-decoded (an
    /// endpoint may carry `%3A` for `:`; an IPv6 endpoint is written
    /// `http://[::1]:9000`), and a file path may be percent-encoded.
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| UriError {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        // The URL standard resolves `.` and `..` away; a store location
        // that spells them is refused instead of silently moved.
        let location = uri.split(['?', '#']).next().unwrap_or("");
        if location
            .split('/')
            .skip(3)
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(err("the path may not hold `.` or `..` segments"));
        }
        let url = url::Url::parse(uri)
            .map_err(|e| err(&format!("{e} (expected file:///DIR or s3://BUCKET/PREFIX)")))?;
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(err(
                        "a file:// URI needs an absolute path, as in file:///var/lib/cairn",
                    ));
                }
                if url.query().is_some() {
                    return Err(err("a file:// URI takes no options"));
                }
                let path = url.to_file_path().map_err(|()| err("not a local path"))?;
                Ok(StoreUri::File(path))
            }
            "s3" => s3_options(&url).map(StoreUri::S3).map_err(|r| err(&r)),
            _ => Err(err("expected file:///DIR or s3://BUCKET/PREFIX")),
        }
    }
}

/// The bucket, prefix and query options of an `s3://` URL.
fn s3_options(url: &url::Url) -> Result<S3Options, String> {
    let bucket = url.host_str().unwrap_or("");
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err("the bucket name must be 3 to 63 characters of a-z, 0-9, '.' and '-'".into());
    }
    let prefix = url.path().trim_matches('/');
    if !prefix.is_empty() && super::check_key(prefix).is_err() {
        return Err("the prefix must be segments of A-Z, a-z, 0-9, '.', '_' and '-'".into());
    }
    let mut opts = S3Options {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        ..S3Options::default()
    };
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "endpoint" => {
                let endpoint =
                    url::Url::parse(&v).map_err(|e| format!("endpoint `{v}` is not a URL: {e}"))?;
                if !matches!(endpoint.scheme(), "http" | "https") {
                    return Err(format!("endpoint `{v}` must be http:// or https://"));
                }
                opts.endpoint = Some(v.into_owned());
            }
            "region" => opts.region = Some(v.into_owned()),
            "path_style" => {
                opts.path_style = Some(v.parse().map_err(|_| "path_style is true or false")?)
            }
            "part_size" => {
                let size = crate::size::parse_size(&v).map_err(|e| format!("part_size: {e}"))?;
                opts.part_size = Some(
                    usize::try_from(size).map_err(|_| format!("part_size `{v}` is too large"))?,
                );
            }
            other => {
                return Err(format!(
                    "unknown option `{other}` (known: endpoint, region, path_style, part_size)"
                ))
            }
        }
    }
    Ok(opts)
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
            StoreUri::File(p) if p == std::path::Path::new("/tmp/x")
        ));
        match "file:///tmp/with%20space".parse().unwrap() {
            StoreUri::File(p) => assert_eq!(p, std::path::Path::new("/tmp/with space")),
            other => panic!("{other:?}"),
        }
        // Sizes as the README writes them; endpoints percent-decoded and
        // with IPv6 hosts.
        match "s3://bkt/p?part_size=16M&endpoint=http%3A%2F%2F%5B%3A%3A1%5D%3A9000"
            .parse()
            .unwrap()
        {
            StoreUri::S3(o) => {
                assert_eq!(o.part_size, Some(16 << 20));
                assert_eq!(o.endpoint.as_deref(), Some("http://[::1]:9000"));
            }
            other => panic!("{other:?}"),
        }
        match "s3://bkt/p?endpoint=http://[::1]:9000&part_size=8388608"
            .parse()
            .unwrap()
        {
            StoreUri::S3(o) => {
                assert_eq!(o.endpoint.as_deref(), Some("http://[::1]:9000"));
                assert_eq!(o.part_size, Some(8 << 20));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "file://rel",
            "s3://",
            "s3://B/x",
            "s3://ok-bucket/x?bogus=1",
            "http://x",
            "s3://bkt/../x",
            "s3://bkt/x?part_size=5Q",
            "s3://bkt/x?endpoint=ftp://h",
            "s3://bkt/x?endpoint=nota url",
            "file:///x?endpoint=y",
        ] {
            let e = bad.parse::<StoreUri>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
