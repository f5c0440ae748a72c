//! The settings of a load run and what it reports.

use std::time::Duration;

use serde::Serialize;

use crate::engine::ModelDefinition;

/// The transport of a load run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `POST .../tokens`, one request in flight per stream.
    Http,
    /// One WebSocket per stream, up to `pipeline` messages in flight.
    Ws,
}

impl Protocol {
    /// Parses `http` or `ws`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Protocol::Http),
            "ws" | "websocket" => Some(Protocol::Ws),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL of the server, `http://host:port`.
    pub url: String,
    /// The model to load.
    pub model: String,
    /// Concurrent streams (one connection each).
    pub streams: usize,
    /// Tokens per request or message.
    pub tokens_per_message: usize,
    /// HTTP or WebSocket.
    pub protocol: Protocol,
    /// Messages in flight per WebSocket (HTTP always has one).
    pub pipeline: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Stream names are `{prefix}-{i}`.
    pub stream_prefix: String,
    /// Soak: report every interval (see [`Sample`]).
    pub report_every: Option<Duration>,
    /// A local server's process id, to read its resident memory from `/proc` when its
    /// `/metrics` has no `process_resident_memory_bytes`.
    pub server_pid: Option<u32>,
    /// Bearer token for a server with an API key.
    pub api_key: Option<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One interval of a soak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the measured window started, at the end of the interval (the interval
    /// began at the previous sample's end, or at the start).
    pub elapsed_seconds: f64,
    /// Tokens answered in the interval, per second of its real length (which may exceed the
    /// report interval when the sampler was held up).
    pub symbols_per_sec: f64,
    /// Requests answered in the interval, per second of its real length.
    pub requests_per_sec: f64,
    /// Requests that failed in the interval.
    pub errors: u64,
    /// Latency of the interval's requests, in milliseconds.
    pub latency_ms: Latency,
    /// The server's resident memory at the end of the interval, in bytes (when known).
    pub rss_bytes: Option<u64>,
}

/// The server's resident memory over a soak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// When every stream existed (after each had sent its first request), in bytes.
    pub all_streams_bytes: u64,
    /// At the end, in bytes.
    pub end_bytes: u64,
    /// The largest sample, in bytes.
    pub max_bytes: u64,
    /// `end / all_streams - 1`: how much memory grew once every stream existed.
    pub growth: f64,
}

/// What the model's worker did during the measured window, from `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerSide {
    /// Batched steps.
    pub steps: f64,
    /// Mean wall time of one step, in milliseconds.
    pub mean_step_ms: f64,
    /// Mean streams per step.
    pub mean_batch: f64,
}

/// The in-process engine's step throughput at the batch size the server reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineComparison {
    /// Streams per step (the server's mean batch, rounded).
    pub batch: usize,
    /// Threads of the in-process step (match the server's `--model-threads` to compare alike).
    pub threads: usize,
    /// Median tokens per second of the in-process step.
    pub symbols_per_sec: f64,
    /// Wall time of one in-process step, in milliseconds.
    pub step_ms: f64,
    /// The server's symbols per second over the engine's.
    pub server_fraction: f64,
    /// `2 × step_ms + 1`: the HTTP p99 target.
    pub p99_budget_ms: f64,
}

/// The outcome of a load run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// HTTP or WebSocket.
    pub protocol: Protocol,
    /// The model.
    pub model: String,
    /// Hidden units of the model.
    pub hidden: usize,
    /// Concurrent streams.
    pub streams: usize,
    /// Tokens per request or message.
    pub tokens_per_message: usize,
    /// Messages in flight per stream.
    pub pipeline: usize,
    /// Length of the measured window, in seconds.
    pub seconds: f64,
    /// Requests answered without error in the window.
    pub requests: u64,
    /// Tokens of those requests.
    pub symbols: u64,
    /// `symbols / seconds`.
    pub symbols_per_sec: f64,
    /// `requests / seconds`.
    pub requests_per_sec: f64,
    /// Requests that failed (HTTP status or problem reply).
    pub errors: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Request latency in milliseconds.
    pub latency_ms: Latency,
    /// The worker's steps during the window (absent when `/metrics` has none for the model).
    pub server: Option<ServerSide>,
    /// The soak's intervals (empty without [`LoadConfig::report_every`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    /// The server's resident memory, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// Filled by [`engine_comparison`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineComparison>,
    /// The model's definition, as the server describes it.
    #[serde(skip)]
    pub definition: Option<ModelDefinition>,
}

/// Why a load run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or answered unexpectedly.
    #[error("{0}")]
    Server(String),
}
