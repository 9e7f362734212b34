//! The CLI's side of the daemon's API: one HTTP/1.1 request over its Unix
//! socket, JSON in and out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub struct DaemonClient {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

/// A refusal or failure the daemon answered with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
}

impl DaemonClient {
    pub fn new(socket: &Path) -> Result<DaemonClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(DaemonClient {
            socket: socket.to_owned(),
            rt,
        })
    }

    /// Sends one request; the answer's JSON, or the daemon's error.
    pub fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        self.rt.block_on(self.send(method, path, body))
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let stream = match tokio::net::UnixStream::connect(&self.socket).await {
            Ok(s) => s,
            Err(e) => bail!(
                "no cairn daemon answers on {} ({e}): start one with `cairn daemon`, or point at yours with --daemon PATH or CAIRN_DAEMON",
                self.socket.display()
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the daemon")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON value"));
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cairn")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes.unwrap_or_default())))
            .expect("a well-formed request");
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("the daemon did not answer {path}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the daemon's answer")?
            .to_bytes();
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).with_context(|| {
                format!(
                    "the daemon's answer is not JSON: {}",
                    String::from_utf8_lossy(&body)
                )
            })?
        };
        if !status.is_success() {
            return Err(DaemonError {
                status,
                kind: value["kind"].as_str().unwrap_or("unknown").to_owned(),
                message: value["error"]
                    .as_str()
                    .map_or_else(|| format!("HTTP {status}"), str::to_owned),
            }
            .into());
        }
        Ok(value)
    }
}
