//! RFC 9457 problem details: every error the API returns, over HTTP (`application/problem+json`)
//! and over WebSocket (the same JSON object as a message), with one stable `type` per case.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::engine::EngineError;

/// Prefix of every problem `type`; the suffix names the case (e.g. `queue-full`).
pub const PROBLEM_TYPE_PREFIX: &str = "urn:kfrtrl:problem:";

/// An error reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    retry_after_seconds: Option<u32>,
    extensions: Map<String, Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// A problem of case `slug` with a human-readable `detail`.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after_seconds: None,
            extensions: Map::new(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header (e.g. `WWW-Authenticate`); over WebSocket it is not sent.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds an extension member (e.g. the offending `field`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    /// Asks the client to retry after this many seconds (`Retry-After`).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self.extensions.insert("retry_after_seconds".to_owned(), seconds.into());
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The case's stable name (the suffix of `type`).
    pub fn slug(&self) -> &'static str {
        self.slug
    }

    /// The problem object.
    pub fn to_json(&self) -> Value {
        let mut body = Map::new();
        body.insert("type".into(), format!("{PROBLEM_TYPE_PREFIX}{}", self.slug).into());
        body.insert("title".into(), self.title.into());
        body.insert("status".into(), self.status.as_u16().into());
        body.insert("detail".into(), self.detail.clone().into());
        for (k, v) in &self.extensions {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }

    /// 400: the body is not JSON.
    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON", detail)
    }

    /// 400: the body has a field the message does not define.
    pub fn unknown_field(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unknown-field", "Unknown field", detail)
    }

    /// 422: well-formed JSON that is not a valid message (types, missing or conflicting fields).
    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request", detail)
    }

    /// 422: text sent to a model that is not byte-level.
    pub fn text_not_allowed(model: &str, vocab: usize) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "text-needs-byte-model",
            "Text needs a byte-level model",
            format!("model `{model}` has a vocabulary of {vocab}, not 256 bytes: send `tokens`"),
        )
    }

    /// 413: the body exceeds the limit.
    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Body too large",
            format!("the body or message exceeds {limit} bytes"),
        )
        .with("limit", limit)
    }

    /// 408: the body did not arrive within the deadline.
    pub fn body_timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Body too slow",
            format!("the request body did not arrive within {seconds} s"),
        )
    }

    /// 400: the body could not be read (the client broke its framing or went away).
    pub fn bad_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "Unreadable body",
            "the request body could not be read",
        )
    }

    /// 414: the request target exceeds the limit.
    pub fn uri_too_long(length: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "Request target too long",
            format!("the request target has {length} bytes; the limit is {limit}"),
        )
        .with("limit", limit)
    }

    /// 404: no route.
    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", format!("no route for {path}"))
    }

    /// 405: the route exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 400: a WebSocket message that is not text.
    pub fn unsupported_message() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported-message",
            "Unsupported message",
            "send each tokens request as one JSON text message",
        )
    }

    /// 503: not ready (models loading) or draining.
    pub fn not_ready(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready", detail).retry_after(1)
    }

    /// 401: a `/v1` route without the server's bearer token (`wrong` when one was sent).
    pub fn unauthorized(wrong: bool) -> Self {
        let (detail, challenge) = if wrong {
            ("the bearer token is wrong", r#"Bearer realm="kfrtrl", error="invalid_token""#)
        } else {
            (
                "this server needs `Authorization: Bearer <key>` (WebSocket: the subprotocol \
                 `kfrtrl.bearer.<key>` next to `kfrtrl.v1`)",
                r#"Bearer realm="kfrtrl""#,
            )
        };
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge))
    }

    /// 503: `what` (requests in progress, WebSocket connections) is at its limit; shed, not queued.
    pub fn overloaded(what: &str, limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            format!("the server holds its maximum of {limit} {what}; retry later"),
        )
        .with("limit", limit)
        .retry_after(1)
    }

    /// 503: the request did not finish within the request timeout. Its tokens stay queued and
    /// may still be consumed, in full or in part.
    pub fn timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Request timeout",
            format!(
                "the request did not finish within {seconds} s; it stays queued and may still take \
                 effect, in full or in part: the stream's `position` (GET \
                 /v1/models/{{model}}/streams/{{stream}}) tells how far it got before you resend"
            ),
        )
        .retry_after(1)
    }

    /// 503: the server is draining; new requests are refused (the connection closes after).
    pub fn shutting_down() -> Self {
        Self::from(EngineError::ShuttingDown)
            .with_header(header::CONNECTION, HeaderValue::from_static("close"))
    }

    /// 426: a WebSocket route requested without a valid WebSocket upgrade.
    pub fn upgrade_required(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UPGRADE_REQUIRED, "upgrade-required", "WebSocket upgrade required", detail)
            .with_header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .with_header(header::CONNECTION, HeaderValue::from_static("Upgrade"))
            // RFC 6455 §4.4: a refused version is answered with the versions the server speaks.
            .with_header(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"))
    }

    /// 403: a browser sent a state-changing request from another origin
    /// ([`super::origin`]).
    pub fn cross_origin(origin: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "cross-origin-request",
            "Cross-origin request refused",
            format!(
                "a browser sent this request from {origin:?}, another origin; the server takes requests that \
                 change models only from its own pages and the origins in `allowed_origins`"
            ),
        )
    }

    /// 500: a bug (a handler panicked).
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", detail)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let detail = e.to_string();
        match e {
            EngineError::UnknownModel(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown-model", "Unknown model", detail)
            }
            EngineError::UnknownStream { .. } => {
                Self::new(StatusCode::NOT_FOUND, "unknown-stream", "Unknown stream", detail)
            }
            EngineError::DuplicateModel(_) => {
                Self::new(StatusCode::CONFLICT, "duplicate-model", "Duplicate model", detail)
            }
            EngineError::ModelLimit(limit) => {
                Self::new(StatusCode::CONFLICT, "model-limit", "Too many models", detail).with("limit", limit)
            }
            EngineError::StreamLimit { limit, .. } => {
                Self::new(StatusCode::CONFLICT, "stream-limit", "Too many streams", detail)
                    .with("limit", limit)
            }
            EngineError::InvalidName { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid-name", "Invalid name", detail)
            }
            EngineError::InvalidConfig { field, .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-config", "Invalid model config", detail)
                    .with("field", field)
            }
            EngineError::EmptyInput => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "empty-input", "Empty input", detail)
            }
            EngineError::TokenOutOfRange { index, token, vocab } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "token-out-of-range",
                "Token outside the vocabulary",
                detail,
            )
            .with("index", index)
            .with("token", token)
            .with("vocab_size", vocab),
            EngineError::TooManyTokens { limit, .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too-many-tokens", "Too many tokens", detail)
                    .with("limit", limit)
            }
            EngineError::QueueFull(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "queue-full", "Queue full", detail).retry_after(1)
            }
            EngineError::StreamQueueFull { limit, .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "queue-full", "Queue full", detail)
                    .with("limit", limit)
                    .retry_after(1)
            }
            EngineError::DiskBudget { budget, .. } => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "disk-budget", "Disk budget reached", detail)
                    .with("limit", budget)
            }
            EngineError::MemoryBudget { budget, .. } => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "memory-budget", "Memory budget reached", detail)
                    .with("limit", budget)
            }
            EngineError::SlotsBusy { limit, .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "slots-busy", "All stream slots busy", detail)
                    .with("limit", limit)
                    .retry_after(1)
            }
            EngineError::Frozen(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "model-frozen", "Model frozen", detail)
                    .retry_after(1)
            }
            EngineError::InvalidSnapshot(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-snapshot", "Invalid snapshot", detail)
            }
            EngineError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", "Shutting down", detail)
                    .retry_after(5)
            }
            EngineError::WorkerStopped(_) => Self::internal(detail),
            EngineError::Storage(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "storage-failure", "Storage failure", detail)
                    .retry_after(5)
            }
            EngineError::NotDurable => {
                Self::new(StatusCode::CONFLICT, "not-durable", "No data directory", detail)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_json().to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// The reply of a handler: a JSON value with a status, or a problem.
pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON object for messages that only need a status (`/healthz`).
pub fn status_body(status: &str) -> Value {
    json!({ "status": status })
}
