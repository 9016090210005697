//! The HTTP API: online feature look-ups for model serving, health, readiness and metrics.
//!
//! `GET /v1/features/{pipeline}/{entity}` and `POST /v1/features/{pipeline}` read the engine's
//! current state (values as of now: quiet entities already decayed by the watermark).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::output::{write_json_str, write_lookup};
use crate::runtime::Shared;
use crate::telemetry;

/// Most entities one batch request may ask for.
pub const MAX_BATCH: usize = 1000;
const MAX_ENTITY_BYTES: usize = 1024;

#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/features/{pipeline}/{entity}", get(get_features))
        .route(
            "/v1/features/{pipeline}",
            axum::routing::post(post_features),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("HTTP API listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(telemetry::HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(telemetry::HTTP_LATENCY, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    let mut body = String::from("{\"error\":");
    write_json_str(&mut body, message);
    body.push('}');
    json(status, body)
}

fn check_pipeline(state: &AppState, pipeline: &str) -> Option<Response> {
    (pipeline != state.shared.pipeline.name).then(|| {
        error(
            StatusCode::NOT_FOUND,
            &format!("unknown pipeline `{pipeline}`"),
        )
    })
}

fn check_entity(entity: &str) -> Option<Response> {
    if entity.is_empty() || entity.len() > MAX_ENTITY_BYTES {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "an entity id is 1 to 1024 bytes",
        ));
    }
    None
}

/// How long a look-up waits for the engine. The processing thread steps aside for readers
/// between events; it holds the engine longer only while it cannot go on (the schema registry
/// or the output topic unreachable), and then a look-up answers 503 rather than hang.
const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The engine was not available within [`LOOKUP_WAIT`].
struct Busy;

fn busy() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine is busy (waiting for Kafka or the schema registry); retry shortly",
    )
}

/// Appends `{"entity","as_of","features":{...}}` for one entity; `Ok(false)` if unknown.
fn write_entity(state: &AppState, entity: &str, out: &mut String) -> Result<bool, Busy> {
    let engine = state.shared.engine_read_for(LOOKUP_WAIT).ok_or(Busy)?;
    let Some((as_of, values)) = engine.lookup(entity) else {
        return Ok(false);
    };
    drop(engine);
    write_lookup(out, &state.shared.pipeline, entity, as_of, &values);
    Ok(true)
}

async fn get_features(
    State(state): State<AppState>,
    Path((pipeline, entity)): Path<(String, String)>,
) -> Response {
    if let Some(r) = check_pipeline(&state, &pipeline).or_else(|| check_entity(&entity)) {
        return r;
    }
    let mut body = String::with_capacity(256);
    match write_entity(&state, &entity, &mut body) {
        Ok(true) => json(StatusCode::OK, body),
        Ok(false) => error(StatusCode::NOT_FOUND, &format!("unknown entity `{entity}`")),
        Err(Busy) => busy(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    entities: Vec<String>,
}

async fn post_features(
    State(state): State<AppState>,
    Path(pipeline): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = check_pipeline(&state, &pipeline) {
        return r;
    }
    let request: BatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"entities\": [\"id\", ...]}}: {e}"),
            );
        }
    };
    if request.entities.len() > MAX_BATCH {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_BATCH} entities per request"),
        );
    }
    if let Some(r) = request.entities.iter().find_map(|e| check_entity(e)) {
        return r;
    }
    let mut out = String::from("{\"pipeline\":");
    write_json_str(&mut out, &state.shared.pipeline.name);
    out.push_str(",\"results\":[");
    for (i, entity) in request.entities.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match write_entity(&state, entity, &mut out) {
            Ok(true) => {}
            Ok(false) => {
                out.push_str("{\"entity\":");
                write_json_str(&mut out, entity);
                out.push_str(",\"found\":false}");
            }
            Err(Busy) => return busy(),
        }
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: partitions not yet assigned and restored\n",
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
