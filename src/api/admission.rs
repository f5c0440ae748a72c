//! Admission of `/v1` requests, in this order: the bearer key (401), the drain (503
//! `shutting-down`), the concurrency limit (503 `overloaded`: shed at once rather than queued
//! without bound), then the request timeout (503 `timeout`). Health, readiness, metrics and the
//! OpenAPI document bypass all of it, so that probes and scrapers keep working under load.
//!
//! It also counts the work in progress (admitted requests and open WebSockets), so that a drain
//! can wait for it to finish before the server stops accepting connections.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntGauge;
use tokio::sync::{Semaphore, watch};

use super::AppState;
use super::auth::is_api_path;
use super::problem::ApiError;

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
    let Ok(_permit) = inner.admission.requests.clone().try_acquire_owned() else {
        return ApiError::overloaded("requests in progress", limits.max_concurrent_requests).into_response();
    };
    let _work = inner.admission.work.begin();
    let _counted = Counted::new(&inner.http.requests_in_progress);
    match tokio::time::timeout(limits.request_timeout(), next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(limits.request_timeout_secs).into_response(),
    }
}
