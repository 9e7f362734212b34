//! `s3://BUCKET/PREFIX`: any S3-compatible service, through aws-sdk-s3.
//!
//! Endpoint, region and credentials come from the standard AWS chain
//! (environment, profile). The SDK's own retries are turned off: retry,
//! backoff and throttling policy is [`super::Resilient`]'s alone, so it is
//! the same for every backend. This module only maps each failure to a
//! kind and a message that says what to do.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{
    check_key, Conditional, ListPage, ObjectStore, Precondition, PutMode, PutOutcome, S3Options,
    StoreError, Version, Versioned, MAX_PAGE,
};
use crate::error::ErrorKind;

const DEFAULT_PART_SIZE: usize = 16 << 20;
const MIN_PART_SIZE: usize = 5 << 20;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    uri: String,
}

impl S3Store {
    pub async fn connect(opts: &S3Options) -> S3Store {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let endpoint = opts.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        });
        let path_style = opts.path_style.unwrap_or(endpoint.is_some());
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            // cairn checks every frame by CRC32 and BLAKE3 itself; the SDK's
            // default checksum on every upload is refused by several
            // S3-compatible servers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(ep) = &endpoint {
            conf = conf.endpoint_url(ep);
        }
        if let Some((key, secret)) = &opts.static_credentials {
            conf = conf.credentials_provider(aws_sdk_s3::config::Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "cairn-static",
            ));
        }
        if let Some(region) = &opts.region {
            conf = conf.region(Region::new(region.clone()));
        } else if sdk.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        let prefix = opts.prefix.trim_matches('/');
        let uri = match &endpoint {
            Some(ep) => format!("s3://{}/{prefix} (at {ep})", opts.bucket),
            None => format!("s3://{}/{prefix}", opts.bucket),
        };
        S3Store {
            client: Client::from_conf(conf.build()),
            bucket: opts.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            part_size: opts
                .part_size
                .unwrap_or(DEFAULT_PART_SIZE)
                .max(MIN_PART_SIZE),
            uri,
        }
    }

    /// Creates the bucket if it does not exist (tests and first set-up).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) != Some(404) => {
                return Err(self.classify("create bucket", "", e))
            }
            Err(_) => {}
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.classify("create bucket", "", e)),
        }
    }

    fn full_key(&self, op: &'static str, key: &str) -> Result<String, StoreError> {
        check_key(key)
            .map_err(|m| StoreError::new(op, &self.uri, key, ErrorKind::InvalidInput, m))?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn classify<E>(&self, op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        if credentials_missing(&err) {
            return StoreError::new(
                op,
                &self.uri,
                key,
                ErrorKind::PermissionDenied,
                no_credentials_hint(),
            );
        }
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().unwrap_or("").to_owned();
        let mut throttled = false;
        let (kind, hint) = match (&err, status) {
            (SdkError::TimeoutError(_), _) => (ErrorKind::Transient, "timed out"),
            (SdkError::DispatchFailure(_), _) => (
                ErrorKind::Transient,
                "could not reach the S3 endpoint (is the server up, and AWS_ENDPOINT_URL right?)",
            ),
            (_, Some(404)) => (ErrorKind::NotFound, "not found"),
            (_, Some(401 | 403)) => (
                ErrorKind::PermissionDenied,
                "access denied: check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's policy",
            ),
            (_, Some(429)) | (_, Some(503)) if code == "SlowDown" || status == Some(429) => {
                throttled = true;
                (ErrorKind::Transient, "throttled by the service (SlowDown)")
            }
            // Another conditional write of the key was in progress: S3 asks
            // for a retry, which then sees the winner's object (412).
            (_, Some(409)) if matches!(code.as_str(), "ConditionalRequestConflict" | "OperationAborted") => {
                (ErrorKind::Transient, "a conflicting write of this key was in progress")
            }
            (_, Some(s)) if s >= 500 => (ErrorKind::Transient, "server error"),
            (SdkError::ResponseError(_), _) => (ErrorKind::Transient, "unreadable response"),
            _ => (ErrorKind::InvalidInput, "request refused"),
        };
        let hint = if code == "NoSuchBucket" {
            "the bucket does not exist (an import creates it; check the URI)"
        } else {
            hint
        };
        let detail = match (&err, status) {
            // The service answered: its status, code and message say it all.
            (SdkError::ServiceError(_), Some(status)) => {
                let message = err.message().map(|m| format!(": {m}")).unwrap_or_default();
                let code = if code.is_empty() {
                    String::new()
                } else {
                    format!(", {code}")
                };
                format!("{hint} (HTTP {status}{code}{message})")
            }
            // No answer: the cause chain (refused, reset, timed out) matters.
            _ => format!("{hint}: {}", DisplayErrorContext(&err)),
        };
        let mut e = StoreError::new(op, &self.uri, key, kind, detail).with_source(err);
        e.throttled = throttled;
        e
    }

    /// A GET's whole body; cut short, a transient error.
    async fn body(&self, key: &str, body: ByteStream) -> Result<Bytes, StoreError> {
        Ok(body
            .collect()
            .await
            .map_err(|e| {
                StoreError::new(
                    "get",
                    &self.uri,
                    key,
                    ErrorKind::Transient,
                    format!("body cut short: {e}"),
                )
                .with_source(e)
            })?
            .into_bytes())
    }

    fn etag(&self, op: &'static str, key: &str, etag: Option<&str>) -> Result<Version, StoreError> {
        match etag {
            Some(t) if !t.is_empty() => Ok(Version(t.to_owned())),
            _ => Err(StoreError::new(
                op,
                &self.uri,
                key,
                ErrorKind::Unsupported,
                "the server sent no ETag: conditional writes need an S3 server that returns one",
            )),
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        path: &Path,
        len: u64,
    ) -> Result<PutOutcome, StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.classify("put", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result = self.upload_parts(key, full, path, len, &upload_id).await;
        if !matches!(result, Ok(PutOutcome::Created)) {
            // Failed, or refused because the object exists: drop the parts.
            // Best effort: a failed abort leaves parts the bucket's lifecycle
            // rules reclaim; the original outcome is the one worth reporting.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        path: &Path,
        len: u64,
        upload_id: &str,
    ) -> Result<PutOutcome, StoreError> {
        let io = |e: std::io::Error| {
            StoreError::new(
                "put",
                &self.uri,
                key,
                ErrorKind::Io,
                format!("reading {}: {e}", path.display()),
            )
            .with_source(e)
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let mut parts = Vec::new();
        let mut done = 0u64;
        let mut number = 1;
        while done < len {
            let n = (len - done).min(self.part_size as u64) as usize;
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf).await.map_err(io)?;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| self.classify("put", key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
            done += n as u64;
            number += 1;
        }
        // If-None-Match on the completion: an object that appeared while
        // the parts went up is kept, as a small put keeps it. Servers that
        // ignore the header overwrite it with the same bytes (keys are
        // content addresses); README, "Store URIs", says which do what.
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(412) => {
                Ok(PutOutcome::AlreadyExisted)
            }
            Err(e) => Err(self.classify("put", key, e)),
        }
    }
}

/// Whether a request failed because the credentials chain found nothing.
fn credentials_missing<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: std::error::Error + 'static,
{
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

/// One line naming where credentials were looked for.
fn no_credentials_hint() -> String {
    let var = |name: &str, default: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    format!(
        "no S3 credentials: looked at AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, profile `{}` \
         (AWS_PROFILE) in {} and {}, web identity, container and instance metadata; set the \
         variables or configure the profile",
        var("AWS_PROFILE", "default"),
        var("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        var("AWS_CONFIG_FILE", "~/.aws/config"),
    )
}

#[async_trait]
impl ObjectStore for S3Store {
    fn uri(&self) -> &str {
        &self.uri
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let full = self.full_key("get", key)?;
        let mut req = self.client.get_object().bucket(&self.bucket).key(&full);
        if let Some(r) = &range {
            if r.start >= r.end {
                return Ok(Bytes::new());
            }
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = req.send().await.map_err(|e| self.classify("get", key, e))?;
        let bytes = self.body(key, out.body).await?;
        if let Some(r) = range {
            if bytes.len() as u64 != r.end - r.start {
                return Err(StoreError::new(
                    "get",
                    &self.uri,
                    key,
                    ErrorKind::Transient,
                    format!(
                        "asked for {} bytes at {}, got {}",
                        r.end - r.start,
                        r.start,
                        bytes.len()
                    ),
                ));
            }
        }
        Ok(bytes)
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        let full = self.full_key("put", key)?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data));
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(412) => {
                Ok(PutOutcome::AlreadyExisted)
            }
            Err(e) => Err(self.classify("put", key, e)),
        }
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<PutOutcome, StoreError> {
        let full = self.full_key("put", key)?;
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|e| {
                StoreError::new(
                    "put",
                    &self.uri,
                    key,
                    ErrorKind::Io,
                    format!("{}: {e}", path.display()),
                )
            })?
            .len();
        if len <= self.part_size as u64 {
            let data = tokio::fs::read(path).await.map_err(|e| {
                StoreError::new(
                    "put",
                    &self.uri,
                    key,
                    ErrorKind::Io,
                    format!("{}: {e}", path.display()),
                )
            })?;
            return self.put(key, Bytes::from(data), PutMode::IfAbsent).await;
        }
        // Content-addressed: an object already there holds these bytes.
        if self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExisted);
        }
        self.put_multipart(key, &full, path, len).await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let full = self.full_key("head", key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => Ok(None),
            Err(e) => Err(self.classify("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}{prefix}", self.prefix))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| self.classify("list", prefix, e))?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| k.strip_prefix(&self.prefix))
                    .map(str::to_owned),
            );
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let full = self.full_key("get", key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                return Ok(None)
            }
            Err(e) => return Err(self.classify("get", key, e)),
        };
        let version = self.etag("get", key, out.e_tag())?;
        let data = self.body(key, out.body).await?;
        Ok(Some(Versioned { data, version }))
    }

    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        let full = self.full_key("put", key)?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data));
        let req = match &precondition {
            Precondition::Absent => req.if_none_match("*"),
            Precondition::Matches(v) => req.if_match(&v.0),
        };
        match req.send().await {
            Ok(out) => Ok(Conditional::Written(self.etag("put", key, out.e_tag())?)),
            // 412: the key exists, or is at another version. 404: If-Match
            // on a key that is gone.
            Err(e)
                if matches!(
                    e.raw_response().map(|r| r.status().as_u16()),
                    Some(412 | 404)
                ) =>
            {
                Ok(Conditional::PreconditionFailed)
            }
            Err(e) => Err(self.classify("put", key, e)),
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .set_start_after(start_after.map(|a| format!("{}{a}", self.prefix)))
            .max_keys(limit.clamp(1, MAX_PAGE) as i32)
            .send()
            .await
            .map_err(|e| self.classify("list", prefix, e))?;
        Ok(ListPage {
            keys: out
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .filter_map(|k| k.strip_prefix(&self.prefix))
                .map(str::to_owned)
                .collect(),
            truncated: out.is_truncated() == Some(true),
        })
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        self.ensure_bucket().await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key("delete", key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => Ok(()),
            Err(e) => Err(self.classify("delete", key, e)),
        }
    }
}
