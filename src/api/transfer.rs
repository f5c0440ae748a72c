//! The handlers that move a model between servers: freeze and thaw, snapshot export and import.
//! The engine does the work (`engine::transfer`); these parse, check and stream the bytes.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::AppState;
use super::problem::{ApiError, ApiResult};
use super::routes::PathParams;
use crate::engine::{EngineError, ModelExport, export_tag};

/// `POST /v1/models/{model}/freeze`: stops the model's changes (503 `model-frozen` with
/// `Retry-After`) and answers once the requests admitted before are answered: what a snapshot
/// taken now holds is everything acknowledged. 200 with the model (state `frozen`).
pub async fn freeze(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
) -> ApiResult<Response> {
    Ok(Json(state.engine().freeze(&model).await?).into_response())
}

/// `DELETE /v1/models/{model}/freeze`: lets the model change again; 200 with the model.
pub async fn thaw(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
) -> ApiResult<Response> {
    Ok(Json(state.engine().thaw(&model)?).into_response())
}

/// `GET /v1/models/{model}/snapshot`: the model as one safetensors file (weights, optimizer,
/// every stream's state and learner factors, evicted streams included, counters), taken between
/// two steps. `ETag` is a digest of the bytes: a server holding the same state exports the same.
pub async fn export(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
) -> ApiResult<Response> {
    let (bytes, tag) = export_bytes(&state, &model).await?;
    let tag = HeaderValue::from_str(&tag).map_err(|e| ApiError::internal(e.to_string()))?;
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{model}.safetensors\""))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
        (header::ETAG, tag),
        (header::CONTENT_DISPOSITION, disposition),
    ];
    Ok((headers, bytes).into_response())
}

/// The export file of a model and its content tag.
async fn export_bytes(state: &AppState, model: &str) -> ApiResult<(Vec<u8>, String)> {
    let started = std::time::Instant::now();
    let export = state.engine().export(model).await?;
    let copied = started.elapsed().as_secs_f64();
    let (bytes, tag) = tokio::task::spawn_blocking(move || {
        let bytes = export.into_bytes()?;
        let tag = export_tag(&bytes)?;
        Ok::<_, String>((bytes, tag))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(model, bytes = bytes.len(), copied, seconds, "snapshot exported");
    Ok((bytes, tag))
}

/// The content tag of a model as it is now (the `ETag` its export would have).
pub async fn content_tag(state: &AppState, model: &str) -> ApiResult<String> {
    export_bytes(state, model).await.map(|(_, tag)| tag)
}

/// `PUT /v1/models/{model}/snapshot`: creates the model from a snapshot file (the body, up to
/// `max_snapshot_bytes`), under the path's name. It continues exactly: its next replies equal,
/// bit for bit, those of the server that exported it. 201 with the model, its `Location` and the
/// snapshot's `ETag`; 409 `duplicate-model` when the name is taken, 422 `invalid-snapshot` for a
/// damaged, truncated or foreign file, and nothing changes on any refusal.
pub async fn import(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let engine = state.engine();
    // Refused before the upload is read: a retry of a finished move costs nothing.
    if engine.model(&model).is_ok() {
        return Err(EngineError::DuplicateModel(model).into());
    }
    let limit = state.inner.limits.max_snapshot_bytes;
    let started = std::time::Instant::now();
    let bytes = read_limited(body, &headers, limit).await?;
    let read = started.elapsed().as_secs_f64();
    let (export, tag, bytes) = tokio::task::spawn_blocking(move || {
        let export = ModelExport::from_bytes(&bytes)?;
        let tag = export_tag(&bytes)?;
        Ok::<_, String>((export, tag, bytes))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|reason| ApiError::from(EngineError::InvalidSnapshot(reason)))?;
    // Renamed, the file's bookkeeping names another model: the first checkpoint is written anew.
    let file = (export.snapshot.definition.name == model).then_some(bytes);
    let export = export.renamed(&model);
    // This server's own limits (hidden size, parameters), as for a model created here.
    state.check_definition(&export.snapshot.definition)?;
    let parsed = started.elapsed().as_secs_f64();
    let info = engine.import(export, file).await?;
    tracing::info!(model, read, parsed, seconds = started.elapsed().as_secs_f64(), "snapshot imported");
    let location = HeaderValue::from_str(&format!("/v1/models/{model}"))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let tag = HeaderValue::from_str(&tag).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((StatusCode::CREATED, [(header::LOCATION, location), (header::ETAG, tag)], Json(info)).into_response())
}

/// Reads a body chunk by chunk into one buffer (sized from `Content-Length` when declared), up
/// to `limit` bytes: a snapshot is held once, never as chunks and a copy of them.
async fn read_limited(body: Body, headers: &HeaderMap, limit: u64) -> ApiResult<Vec<u8>> {
    let declared = super::admission::declared_body_length(headers).unwrap_or(0);
    let mut bytes = Vec::with_capacity(usize::try_from(declared.min(limit)).unwrap_or(0));
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::bad_body())?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() as u64 + data.len() as u64 > limit {
                // The rest of the body is not read: the connection cannot carry another request.
                return Err(ApiError::body_too_large(limit)
                    .with_header(header::CONNECTION, HeaderValue::from_static("close")));
            }
            bytes.extend_from_slice(&data);
        }
    }
    if bytes.is_empty() {
        return Err(EngineError::InvalidSnapshot(
            "the body is empty; send the file of GET .../snapshot".into(),
        )
        .into());
    }
    Ok(bytes)
}
