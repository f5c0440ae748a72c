//! The HTTP handlers: parse, validate, forward to the engine, reply. No computation here.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, OriginalUri, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::AppState;
use super::problem::{ApiError, ApiResult, status_body};
use super::wire::{JsonBody, TokensRequest};
use crate::engine::{EngineError, Mode, ModelRequest, valid_name};

/// Path parameters, with a problem reply when they cannot be decoded. Every `model` and `stream`
/// parameter is checked against the naming rule here, so that a name with a path trick (`..`,
/// an encoded `/`, NUL, non-ASCII, overlong) is refused with 400 before the engine sees it.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let invalid = |e: PathRejection| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid-name", "Invalid name", e.body_text())
        };
        let Path(named) =
            Path::<Vec<(String, String)>>::from_request_parts(parts, state).await.map_err(invalid)?;
        for (what, name) in &named {
            let what = match what.as_str() {
                "model" => "model",
                "stream" => "stream",
                _ => continue,
            };
            if !valid_name(name) {
                return Err(EngineError::InvalidName { what, name: name.clone() }.into());
            }
        }
        Path::<T>::from_request_parts(parts, state).await.map(|Path(t)| PathParams(t)).map_err(invalid)
    }
}

/// `POST /v1/models`: creates a model (201 with its description).
pub async fn create_model(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    let request: ModelRequest = super::wire::from_object(body)?;
    let engine = state.engine();
    let definition = request.resolve(&engine.default_definition(""));
    state.check_definition(&definition)?;
    created(engine.create_model(definition).await?)
}

/// 201 with the new model and its `Location`.
fn created(info: crate::engine::ModelInfo) -> ApiResult<Response> {
    let location = HeaderValue::from_str(&format!("/v1/models/{}", info.name))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(info)).into_response())
}

/// `PUT /v1/models/{model}`: creates the model the path names, so that a proxy can route the
/// creation by path. The body is a model definition whose `name` may be left out (when present it
/// must be the path's). Idempotent: 201 when it creates the model, 200 when a model of that name
/// and the same definition exists (a retried PUT), 409 `duplicate-model` when one exists with
/// another definition.
pub async fn put_model(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
    JsonBody(mut body): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    if let Some(fields) = body.as_object_mut() {
        match fields.get("name") {
            None => {
                fields.insert("name".to_string(), model.clone().into());
            }
            Some(serde_json::Value::String(name)) if *name == model => {}
            Some(other) => {
                return Err(ApiError::invalid_request(format!(
                    "the body names the model {other} and the path `{model}`; leave `name` out or make them equal"
                )));
            }
        }
    }
    let request: ModelRequest = super::wire::from_object(body)?;
    let engine = state.engine();
    let definition = request.resolve(&engine.default_definition(""));
    state.check_definition(&definition)?;
    // A model that exists already is compared first: a retried PUT must not be refused by a
    // budget or the model limit that its own model takes up.
    if engine.definition(&model).is_ok() {
        return same_model(&state, &definition);
    }
    match engine.create_model(definition.clone()).await {
        Ok(info) => created(info),
        // Created by a concurrent request in between.
        Err(EngineError::DuplicateModel(_)) => same_model(&state, &definition),
        Err(e) => Err(e.into()),
    }
}

/// The reply to a PUT of a model that exists: 200 with it when its definition is the one put,
/// else 409 `duplicate-model`.
fn same_model(state: &AppState, definition: &crate::engine::ModelDefinition) -> ApiResult<Response> {
    let engine = state.engine();
    let name = &definition.name;
    if engine.definition(name)? == *definition {
        return Ok(Json(engine.model(name)?).into_response());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "duplicate-model",
        "Duplicate model",
        format!("model `{name}` exists with another definition; GET it to compare, or DELETE it first"),
    ))
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Response {
    Json(json!({ "models": state.engine().models() })).into_response()
}

/// `GET /v1/models/{model}`.
pub async fn get_model(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
) -> ApiResult<Response> {
    Ok(Json(state.engine().model(&model)?).into_response())
}

/// `DELETE /v1/models/{model}`: 204; queued requests of the model fail with 404. With
/// `If-Match: <snapshot ETag>` (the last step of a move), the model is frozen first and deleted
/// only if its content is still the one exported: 412 `precondition-failed` otherwise, and it
/// stays as it was (a server restarted mid-move has thawed and may have learned since).
pub async fn delete_model(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    let engine = state.engine();
    if let Some(expected) = headers.get(header::IF_MATCH) {
        let expected = expected.to_str().unwrap_or_default().trim().to_owned();
        let was_frozen = engine.model(&model)?.state == crate::engine::ModelState::Frozen;
        engine.freeze(&model).await?;
        let current = super::transfer::content_tag(&state, &model).await;
        if current.as_deref() != Ok(expected.as_str()) {
            if !was_frozen {
                let _ = engine.thaw(&model);
            }
            return Err(match current {
                Ok(tag) => ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "precondition-failed",
                    "Precondition failed",
                    format!(
                        "model `{model}` holds content {tag}, not {expected}: it changed since that export"
                    ),
                ),
                Err(e) => e,
            });
        }
    }
    engine.delete_model(&model).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/models/{model}/checkpoint`: writes a checkpoint now; 200 with where and how big.
pub async fn checkpoint_model(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
) -> ApiResult<Response> {
    Ok(Json(state.engine().checkpoint(&model).await?).into_response())
}

async fn run_tokens(
    state: &AppState,
    model: &str,
    stream: &str,
    request: TokensRequest,
    mode: Mode,
) -> ApiResult<Response> {
    let engine = state.engine();
    let definition = engine.definition(model)?;
    let mode = request.mode(mode);
    let input = request.into_input(&definition, engine.limits().max_tokens_per_request)?;
    let reply = engine.tokens(model, stream, input, mode).await?;
    Ok(Json(reply).into_response())
}

/// `POST /v1/models/{model}/streams/{stream}/tokens`: the stream consumes the tokens.
pub async fn post_tokens(
    State(state): State<AppState>,
    PathParams((model, stream)): PathParams<(String, String)>,
    JsonBody(request): JsonBody<TokensRequest>,
) -> ApiResult<Response> {
    run_tokens(&state, &model, &stream, request, Mode::Consume).await
}

/// `POST /v1/models/{model}/streams/{stream}/predict`: the tokens run on a copy; nothing changes.
pub async fn post_predict(
    State(state): State<AppState>,
    PathParams((model, stream)): PathParams<(String, String)>,
    JsonBody(request): JsonBody<TokensRequest>,
) -> ApiResult<Response> {
    run_tokens(&state, &model, &stream, request, Mode::Predict).await
}

/// `GET /v1/models/{model}/streams/{stream}`.
pub async fn get_stream(
    State(state): State<AppState>,
    PathParams((model, stream)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    Ok(Json(state.engine().stream_info(&model, &stream).await?).into_response())
}

/// The query of `GET /v1/models/{model}/streams`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamListQuery {
    /// Most streams in the reply (the busiest first); all when absent.
    limit: Option<usize>,
}

/// `GET /v1/models/{model}/streams[?limit=N]`: the model's streams, most tokens first.
pub async fn list_streams(
    State(state): State<AppState>,
    PathParams(model): PathParams<String>,
    query: Result<Query<StreamListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::invalid_request(e.body_text()))?;
    let mut streams = state.engine().list_streams(&model).await?;
    let total = streams.len();
    streams.truncate(query.limit.unwrap_or(total));
    Ok(Json(json!({ "model": model, "total": total, "streams": streams })).into_response())
}

/// `DELETE /v1/models/{model}/streams/{stream}`: 204 once the requests queued before it are done.
pub async fn delete_stream(
    State(state): State<AppState>,
    PathParams((model, stream)): PathParams<(String, String)>,
) -> ApiResult<StatusCode> {
    state.engine().delete_stream(&model, &stream).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    Json(status_body("ok")).into_response()
}

/// `GET /readyz`: 200 once every configured model is loaded, 503 before, while draining, and
/// once a model's write-ahead log failed (it then refuses changes until a restart).
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        ApiError::not_ready("the server is draining").into_response()
    } else if !state.is_ready() {
        ApiError::not_ready("models are loading").into_response()
    } else if let Some((model, reason)) = state.engine().failed_models().into_iter().next() {
        ApiError::not_ready(format!(
            "model `{model}` refuses changes: its storage failed ({reason}); restart the server once \
             the disk is writable"
        ))
        .into_response()
    } else {
        Json(status_body("ready")).into_response()
    }
}

/// `GET /openapi.json`.
pub async fn openapi(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], state.inner.openapi.clone())
        .into_response()
}

/// Any path without a route.
pub async fn not_found(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::not_found(uri.path())
}

/// A route without the request's method.
pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
