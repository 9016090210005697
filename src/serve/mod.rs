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
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{FieldDef, FieldType};
use crate::decode::MAX_ENTITY_BYTES;
use crate::engine::FeatureValue;
use crate::output::{write_batch_entry, write_json_str, write_lookup};
use crate::runtime::Shared;
use crate::telemetry;

/// Most entities one batch request may ask for.
pub const MAX_BATCH: usize = 1000;

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
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route: GET /v1/features/{pipeline}/{entity}, POST /v1/features/{pipeline}, GET /healthz, /readyz, /metrics",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: GET /v1/features/{pipeline}/{entity} reads one entity, POST /v1/features/{pipeline} a batch",
            )
        })
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

/// A request refused before the engine is read: its status and the message of its JSON body.
type Refusal = (StatusCode, String);

/// The pipeline's entity field: an int one keys entities by their decimal digits.
fn entity_field(state: &AppState) -> &FieldDef {
    let source = &state.shared.pipeline.source;
    &source.schema.fields[source.entity]
}

/// The entity id as the engine keys it, or why `entity` cannot be one. An int entity is keyed
/// by its canonical decimal digits, so `007` and `+7` find `7`.
fn entity_key(state: &AppState, entity: &str) -> Result<String, Refusal> {
    if entity.is_empty() || entity.len() > MAX_ENTITY_BYTES {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("an entity id is 1 to {MAX_ENTITY_BYTES} bytes"),
        ));
    }
    let field = entity_field(state);
    if field.ty != FieldType::Int {
        return Ok(entity.to_string());
    }
    entity.parse::<i64>().map(|i| i.to_string()).map_err(|_| {
        let mut shown = String::new();
        write_json_str(&mut shown, entity);
        (
            StatusCode::BAD_REQUEST,
            format!(
                "this pipeline's entity field `{}` is an int; {shown} is not a 64-bit integer",
                field.name
            ),
        )
    })
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

/// An entity's current values, or `Ok(None)` if it has no state.
fn read_entity(state: &AppState, entity: &str) -> Result<Option<(i64, Vec<FeatureValue>)>, Busy> {
    let engine = state.shared.engine_read_for(LOOKUP_WAIT).ok_or(Busy)?;
    Ok(engine.lookup(entity))
}

async fn get_features(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (pipeline, entity) = match path {
        Ok(Path(parts)) => parts,
        // Refused by the extractor (a path that is not UTF-8): still JSON.
        Err(e) => return error(e.status(), &e.body_text()),
    };
    if let Some(r) = check_pipeline(&state, &pipeline) {
        return r;
    }
    let key = match entity_key(&state, &entity) {
        Ok(key) => key,
        Err((status, message)) => return error(status, &message),
    };
    match read_entity(&state, &key) {
        Ok(Some((as_of, values))) => {
            let mut body = String::with_capacity(256);
            write_lookup(&mut body, &state.shared.pipeline, &key, as_of, &values);
            json(StatusCode::OK, body)
        }
        Ok(None) => {
            let mut shown = String::new();
            write_json_str(&mut shown, &key);
            error(StatusCode::NOT_FOUND, &format!("unknown entity {shown}"))
        }
        Err(Busy) => busy(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    /// Kept as written: an int entity is an integer literal, as ingest reads it, and a parsed
    /// JSON number no longer tells `0.0` (not an integer) from `-0` (the int 0).
    entities: Vec<Box<serde_json::value::RawValue>>,
}

/// The ids of a batch request as the engine keys them: strings, or integers for an int entity.
fn batch_keys(state: &AppState, request: &BatchRequest) -> Result<Vec<String>, Refusal> {
    if request.entities.len() > MAX_BATCH {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_BATCH} entities per request"),
        ));
    }
    let int_ids = entity_field(state).ty == FieldType::Int;
    request
        .entities
        .iter()
        .map(|raw| batch_key(state, raw.get(), int_ids))
        .collect()
}

/// One id of a batch request, from its JSON text.
fn batch_key(state: &AppState, text: &str, int_ids: bool) -> Result<String, Refusal> {
    let refuse = |message: String| Err((StatusCode::BAD_REQUEST, message));
    if text.starts_with('"') {
        return match serde_json::from_str::<String>(text) {
            Ok(id) => entity_key(state, &id),
            Err(e) => refuse(format!("entity id {text} is not a valid string: {e}")),
        };
    }
    let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !(int_ids && is_number) {
        return refuse(if int_ids {
            format!("an entity id is a string or an integer, not {text}")
        } else {
            format!("an entity id is a string, not {text}")
        });
    }
    // An integer literal has no fraction and no exponent (`1.0` and `1e2` are refused, as
    // ingest refuses them for an int field).
    if !text.bytes().skip(1).all(|b| b.is_ascii_digit()) {
        return refuse(format!("entity id {text} is not an integer"));
    }
    match text.parse::<i64>() {
        Ok(i) => Ok(i.to_string()),
        Err(_) => refuse(format!(
            "entity id {text} is outside the 64-bit integer range"
        )),
    }
}

async fn post_features(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let pipeline = match path {
        Ok(Path(pipeline)) => pipeline,
        // Refused by the extractor (a path that is not UTF-8): still JSON.
        Err(e) => return error(e.status(), &e.body_text()),
    };
    if let Some(r) = check_pipeline(&state, &pipeline) {
        return r;
    }
    let body = match body {
        Ok(body) => body,
        // Refused by the extractor (a body over the 2 MB limit): still JSON.
        Err(e) => return error(e.status(), &e.body_text()),
    };
    let request: BatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"entities\": [\"id\", ...]}}: {e}"),
            );
        }
    };
    let keys = match batch_keys(&state, &request) {
        Ok(keys) => keys,
        Err((status, message)) => return error(status, &message),
    };
    let mut out = String::from("{\"pipeline\":");
    write_json_str(&mut out, &state.shared.pipeline.name);
    out.push_str(",\"results\":[");
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match read_entity(&state, key) {
            Ok(Some((as_of, values))) => {
                write_batch_entry(&mut out, &state.shared.pipeline, key, as_of, &values)
            }
            Ok(None) => {
                out.push_str("{\"entity\":");
                write_json_str(&mut out, key);
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

#[cfg(test)]
mod tests;
