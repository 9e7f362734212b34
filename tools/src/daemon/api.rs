//! The daemon's HTTP+JSON API on its Unix socket (`docs/api/openapi.yaml`
//! describes it). Handlers hand the work to [`Host`] on a blocking thread:
//! its operations touch files and flush disks.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_engine::catalog::CatalogError;
use cairn_engine::ErrorKind;
use serde::Serialize;

use super::host::{
    CloneRequest, CreateRequest, ForkRequest, Host, MachineInput, Refusal, ResumeRequest,
};
use super::metrics::Metrics;
use super::migrate::{self, MigrateRequest};

#[derive(Clone)]
pub struct Api {
    pub host: Arc<Host>,
    pub metrics: Arc<Metrics>,
}

/// An error as the API answers it: a status and `{"error", "kind"}`.
pub struct ApiError(anyhow::Error);

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    kind: &'static str,
}

impl ApiError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        if let Some(r) = self.0.downcast_ref::<Refusal>() {
            return match r {
                Refusal::NoSuchSandbox(_) => (StatusCode::NOT_FOUND, "not_found"),
                Refusal::NameTaken(_) => (StatusCode::CONFLICT, "conflict"),
                Refusal::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            };
        }
        if let Some(e) = self.0.downcast_ref::<CatalogError>() {
            return match e.kind() {
                ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "invalid_input"),
                ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            };
        }
        (StatusCode::INTERNAL_SERVER_ERROR, "internal")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        let body = ErrorBody {
            error: format!("{:#}", self.0),
            kind,
        };
        (status, Json(body)).into_response()
    }
}

impl<E: Into<anyhow::Error>> From<E> for ApiError {
    fn from(e: E) -> ApiError {
        ApiError(e.into())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` on a blocking thread, timed under `op` in the metrics.
async fn blocking<T: Send + 'static>(
    api: &Api,
    op: &'static str,
    f: impl FnOnce(&Host) -> anyhow::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let host = api.host.clone();
    let metrics = api.metrics.clone();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || f(&host))
        .await
        .map_err(|e| anyhow::anyhow!("the {op} task failed: {e}"))?;
    metrics.observe_request(op, started.elapsed(), result.is_ok());
    Ok(result?)
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{key}", get(describe).delete(remove))
        .route("/v1/sandboxes/{key}/clone", post(clone_sandbox))
        .route("/v1/sandboxes/{key}/snapshot", post(snapshot))
        .route("/v1/snapshots/{id}/fork", post(fork))
        .route("/v1/sandboxes/{key}/suspend", post(suspend))
        .route("/v1/sandboxes/{key}/resume", post(resume))
        .route("/v1/sandboxes/{key}/migrate", post(migrate_out))
        .route("/metrics", get(metrics))
        .with_state(api)
}

#[derive(Serialize)]
struct Health {
    ok: bool,
    version: &'static str,
    store: String,
    /// This daemon's name in the catalog.
    host: String,
    sandboxes: usize,
}

// Handlers that read the host take its lock, which a thread waiting on
// this runtime may hold: they run on blocking threads, never on a worker.
// A call naming a sandbox this host suspended for idling resumes it first.

async fn health(State(api): State<Api>) -> ApiResult<Json<Health>> {
    let sandboxes = blocking(&api, "health", |h| Ok(h.list().len())).await?;
    Ok(Json(Health {
        ok: true,
        version: env!("CARGO_PKG_VERSION"),
        store: api.host.store().remote().uri().to_owned(),
        host: api.host.host_id().to_owned(),
        sandboxes,
    }))
}

async fn create(
    State(api): State<Api>,
    Json(req): Json<CreateRequest>,
) -> ApiResult<impl IntoResponse> {
    let view = blocking(&api, "create", move |h| h.create(req)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list(State(api): State<Api>) -> ApiResult<Json<serde_json::Value>> {
    let all = blocking(&api, "list", |h| Ok(h.list())).await?;
    Ok(serde_json::json!({ "sandboxes": all }).into())
}

async fn describe(State(api): State<Api>, Path(key): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        blocking(&api, "describe", move |h| {
            h.wake(&key)?;
            h.get(&key)
        })
        .await?,
    ))
}

async fn remove(State(api): State<Api>, Path(key): Path<String>) -> ApiResult<StatusCode> {
    blocking(&api, "remove", move |h| {
        h.wake(&key)?;
        h.remove(&key)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clone_sandbox(
    State(api): State<Api>,
    Path(key): Path<String>,
    Json(req): Json<CloneRequest>,
) -> ApiResult<impl IntoResponse> {
    let view = blocking(&api, "clone", move |h| {
        h.wake(&key)?;
        h.clone_sandbox(&key, req)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The VMM's files, when the request has a body.
fn machine(body: Option<Json<MachineInput>>) -> MachineInput {
    body.map(|Json(m)| m).unwrap_or_default()
}

async fn snapshot(
    State(api): State<Api>,
    Path(key): Path<String>,
    body: Option<Json<MachineInput>>,
) -> ApiResult<impl IntoResponse> {
    let input = machine(body);
    let rec = blocking(&api, "snapshot", move |h| {
        h.wake(&key)?;
        h.snapshot(&key, input)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

async fn fork(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(req): Json<ForkRequest>,
) -> ApiResult<impl IntoResponse> {
    let made = blocking(&api, "fork", move |h| h.fork(&id, req)).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "sandboxes": made })),
    ))
}

async fn suspend(
    State(api): State<Api>,
    Path(key): Path<String>,
    body: Option<Json<MachineInput>>,
) -> ApiResult<impl IntoResponse> {
    let input = machine(body);
    let rec = blocking(&api, "suspend", move |h| {
        h.wake(&key)?;
        h.suspend(&key, input)
    })
    .await?;
    Ok(Json(rec))
}

async fn resume(
    State(api): State<Api>,
    Path(key): Path<String>,
    Json(req): Json<ResumeRequest>,
) -> ApiResult<impl IntoResponse> {
    let view = blocking(&api, "resume", move |h| {
        h.resume(&key, &req.project, req.queues)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn migrate_out(
    State(api): State<Api>,
    Path(key): Path<String>,
    Json(req): Json<MigrateRequest>,
) -> ApiResult<impl IntoResponse> {
    let metrics = api.metrics.clone();
    let report = blocking(&api, "migrate", move |h| {
        h.wake(&key)?;
        let report = migrate::migrate(h, &key, req);
        metrics.observe_migration(report.as_ref().ok());
        report
    })
    .await?;
    Ok(Json(report))
}

async fn metrics(State(api): State<Api>) -> Response {
    // The store's garbage-collection totals: one GET of `gc/state`.
    match cairn_engine::gc::state::load(api.host.store().remote().as_ref()).await {
        Ok((s, _)) => api.metrics.observe_gc(&s),
        Err(e) => tracing::debug!(error = %e, "cannot read the collector's state"),
    }
    // Rendering takes the host's lock (see above).
    let a = api.clone();
    let text = tokio::task::spawn_blocking(move || a.metrics.render(&a.host))
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
