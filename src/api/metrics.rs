//! HTTP-level metrics (requests and durations by route template, requests in progress, WebSocket
//! connections, replies and closes) and the process's own (`process_*`: memory, CPU, file descriptors), the
//! middleware that records them, and the `/metrics` exposition of the server's registry.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
    exponential_buckets,
};

use super::AppState;
use super::problem::ApiError;

/// The route label of requests that matched no route (never the raw path: labels stay bounded).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// HTTP metric families.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    durations: HistogramVec,
    /// Open WebSocket connections.
    pub websocket_connections: IntGauge,
    /// WebSocket replies written, by status (200 for a tokens reply, else the problem's).
    pub websocket_replies: IntCounterVec,
    /// Time from reading a WebSocket request to writing its reply.
    pub websocket_reply_durations: Histogram,
    /// WebSocket connections ended, by why.
    pub websocket_closes: IntCounterVec,
    /// `/v1` HTTP requests admitted and not yet answered.
    pub requests_in_progress: IntGauge,
}

impl HttpMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_http_requests_total",
                    "HTTP requests by route template, method and status.",
                ),
                &["route", "method", "status"],
            )?,
            durations: HistogramVec::new(
                HistogramOpts::new(
                    "kfrtrl_http_request_duration_seconds",
                    "Time from receiving an HTTP request to its response, by route template and method.",
                )
                .buckets(exponential_buckets(5e-5, 2.0, 18)?),
                &["route", "method"],
            )?,
            websocket_connections: IntGauge::new(
                "kfrtrl_websocket_connections",
                "Open WebSocket connections.",
            )?,
            websocket_replies: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_websocket_replies_total",
                    "WebSocket replies written, by status (200: a tokens reply; else the problem's status).",
                ),
                &["status"],
            )?,
            websocket_reply_durations: Histogram::with_opts(
                HistogramOpts::new(
                    "kfrtrl_websocket_reply_duration_seconds",
                    "Time from reading a WebSocket request to writing its reply.",
                )
                .buckets(exponential_buckets(5e-5, 2.0, 18)?),
            )?,
            websocket_closes: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_websocket_closes_total",
                    "WebSocket connections ended, by reason (client, shutdown, idle_timeout, write_timeout, message_too_large, invalid_utf8, protocol_error).",
                ),
                &["reason"],
            )?,
            requests_in_progress: IntGauge::new(
                "kfrtrl_http_requests_in_progress",
                "HTTP requests under /v1 admitted and not yet answered (capped by max_concurrent_requests).",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.durations.clone()))?;
        registry.register(Box::new(m.websocket_connections.clone()))?;
        registry.register(Box::new(m.websocket_replies.clone()))?;
        registry.register(Box::new(m.websocket_reply_durations.clone()))?;
        registry.register(Box::new(m.websocket_closes.clone()))?;
        registry.register(Box::new(m.requests_in_progress.clone()))?;
        // process_resident_memory_bytes, CPU seconds, open fds, threads: what a soak watches.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Middleware: counts and times every request under its matched route template.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status();
    let http = &state.inner.http;
    http.requests.with_label_values(&[route.as_str(), method, status.as_str()]).inc();
    http.durations.with_label_values(&[route.as_str(), method]).observe(started.elapsed().as_secs_f64());
    // A probe's 503 (models loading, a drain) is the answer it exists to give, not a failure.
    if status.is_server_error() && route != "/readyz" {
        tracing::warn!(%route, method, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(%route, method, status = status.as_u16(), "request");
    }
    response
}

/// `GET /metrics`: the Prometheus text exposition of every metric of the server.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.inner.registry.gather(), &mut body) {
        Ok(()) => {
            let mut response = body.into_response();
            if let Ok(content_type) = HeaderValue::from_str(encoder.format_type()) {
                response.headers_mut().insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
        Err(e) => ApiError::internal(format!("cannot encode metrics: {e}")).into_response(),
    }
}
