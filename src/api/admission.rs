//! Admission of `/v1` requests, in this order: the bearer key (401), the drain (503
//! `shutting-down`), the whole body read within its deadline (408 `body-timeout`), the
//! concurrency limit (503 `overloaded`: shed at once rather than queued
//! without bound), then the request timeout (503 `timeout`). Health, readiness, metrics and the
//! OpenAPI document bypass all of it, so that probes and scrapers keep working under load.
//!
//! Before all of it, [`head_limits`] refuses what the request head alone shows to be too large.
//!
//! It also counts the work in progress (admitted requests and open WebSockets), so that a drain
//! can wait for it to finish before the server stops accepting connections.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntGauge;
use tokio::sync::{Semaphore, watch};

use super::auth::is_api_path;
use super::problem::ApiError;
use super::{AppState, Limits};

/// Longest request target (path and query) the server reads: every route's is far shorter
/// (names are at most [`crate::engine::MAX_NAME_LEN`] bytes). Beyond 64 KiB the HTTP library's
/// parser refuses the head before any route sees it; `parse_errors` gives that 414 its problem.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Refuses, from the request head alone, what no route will accept: a request target over
/// [`MAX_URI_BYTES`] (414) and a declared `Content-Length` over the body limit (413, answered at
/// once instead of after reading the body). Runs before admission, so neither takes a permit.
pub async fn head_limits(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError::uri_too_long(target, MAX_URI_BYTES).into_response();
    }
    let limits = &state.inner.limits;
    let limit =
        if is_snapshot_upload(&request) { limits.max_snapshot_bytes } else { limits.max_body_bytes as u64 };
    if declared_length(&request).is_some_and(|n| n > limit) {
        return closing(ApiError::body_too_large(limit));
    }
    next.run(request).await
}

/// Whether the request uploads a model snapshot (`PUT /v1/models/{model}/snapshot`): its body
/// has its own limit and is read by its handler as it arrives, within the request timeout.
pub fn is_snapshot_upload(request: &Request) -> bool {
    let path = request.uri().path();
    request.method() == axum::http::Method::PUT
        && path.starts_with("/v1/models/")
        && path.ends_with("/snapshot")
        && path.matches('/').count() == 4
}

/// The body length the request's `Content-Length` declares, if it declares one.
fn declared_length(request: &Request) -> Option<u64> {
    declared_body_length(request.headers())
}

/// The body length `Content-Length` declares, if the headers declare one.
pub fn declared_body_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// A refusal after which the connection closes: the body was not read (or not all of it), so
/// the connection cannot carry another request.
fn closing(problem: ApiError) -> Response {
    let mut response = problem.into_response();
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Counts the requests and WebSockets in progress.
#[derive(Debug, Clone)]
pub struct WorkTracker {
    active: Arc<watch::Sender<usize>>,
}

impl WorkTracker {
    /// A tracker with nothing in progress.
    pub fn new() -> Self {
        Self { active: Arc::new(watch::Sender::new(0)) }
    }

    /// Counts one piece of work until the guard is dropped (whatever the path: finished,
    /// failed, or cancelled because the client went away).
    pub fn begin(&self) -> WorkGuard {
        self.active.send_modify(|n| *n += 1);
        WorkGuard { active: self.active.clone() }
    }

    /// Completes once nothing is in progress.
    pub async fn idle(&self) {
        let mut active = self.active.subscribe();
        let _ = active.wait_for(|n| *n == 0).await;
    }

    /// Work in progress now.
    pub fn active(&self) -> usize {
        *self.active.borrow()
    }
}

/// One piece of work in progress; see [`WorkTracker::begin`].
#[derive(Debug)]
pub struct WorkGuard {
    active: Arc<watch::Sender<usize>>,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n -= 1);
    }
}

/// Adds one to a gauge until dropped.
struct Counted<'a>(&'a IntGauge);

impl<'a> Counted<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The limits that admission enforces, built once from [`super::Limits`].
#[derive(Debug)]
pub struct Admission {
    /// Requests in progress at once.
    pub requests: Arc<Semaphore>,
    /// WebSocket connections open at once.
    pub websockets: Arc<Semaphore>,
    /// Work in progress, for the drain.
    pub work: WorkTracker,
}

impl Admission {
    /// Admission with these caps.
    pub fn new(max_requests: usize, max_websockets: usize) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            websockets: Arc::new(Semaphore::new(max_websockets)),
            work: WorkTracker::new(),
        }
    }
}

/// Middleware: admits a `/v1` request or answers it with the problem that says why not.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !is_api_path(request.uri().path()) {
        return next.run(request).await;
    }
    let inner = &state.inner;
    if let Err(problem) = super::origin::check(request.method(), request.headers(), &inner.allowed_origins) {
        return problem.into_response();
    }
    if let Some(key) = &inner.api_key
        && let Err(problem) = key.check(request.headers())
    {
        return problem.into_response();
    }
    if state.is_draining() {
        return ApiError::shutting_down().into_response();
    }
    // Before the data directory is restored, a model would look missing (404) and a client
    // creating or deleting it could race the restore.
    if !state.is_ready() {
        return ApiError::not_ready("models are loading").into_response();
    }
    let limits = &inner.limits;
    // In progress from here (a drain waits for it), but holding a permit only once its body is in.
    let _work = inner.admission.work.begin();
    let _counted = Counted::new(&inner.http.requests_in_progress);
    let read = if is_snapshot_upload(&request) { Ok(request) } else { read_body(request, limits).await };
    let request = match read {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let Ok(_permit) = inner.admission.requests.clone().try_acquire_owned() else {
        return ApiError::overloaded("requests in progress", limits.max_concurrent_requests).into_response();
    };
    match tokio::time::timeout(limits.request_timeout(), next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(limits.request_timeout_secs).into_response(),
    }
}

/// Reads a request's whole body within [`Limits::body_read_timeout`], before the request takes a
/// permit: a client that trickles its body (one byte every few seconds) then holds a connection
/// for a bounded time and no permit at all, where it used to hold a permit for the whole
/// request timeout (issue 19.4). Memory stays bounded by what clients actually send, at most
/// `max_body_bytes` per connection.
async fn read_body(request: Request, limits: &Limits) -> Result<Request, Response> {
    let declared = declared_length(&request);
    if declared == Some(0) || (declared.is_none() && !request.headers().contains_key(TRANSFER_ENCODING)) {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let read =
        tokio::time::timeout(limits.body_read_timeout(), axum::body::to_bytes(body, limits.max_body_bytes));
    match read.await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(error)) => {
            let too_large = error.into_inner().downcast_ref::<http_body_util::LengthLimitError>().is_some();
            Err(if too_large {
                closing(ApiError::body_too_large(limits.max_body_bytes as u64))
            } else {
                closing(ApiError::bad_body())
            })
        }
        Err(_) => Err(closing(ApiError::body_timeout(limits.body_read_timeout_secs))),
    }
}
