//! The server's limits (the `[limits]` table of the config file): sizes, queues, timeouts and
//! caps, each checked once at start ([`Limits::check`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::StartError;
use crate::core::ModelSpec;
use crate::engine::{EngineError, EngineLimits, stream_share};

/// Most threads of one model's pool (every model has its own pool).
pub const MAX_MODEL_THREADS: usize = 256;

/// How the server splits the machine's cores when not told: `(runtime threads, threads of each
/// model's pool)`. The runtime gets half (at least 1) and the models the rest (at least 1): a
/// model's pool thread that competes with the runtime for a core delays every reply (measured on
/// 2 cores, 64 HTTP streams: p99 5.9-9.2 ms with a 2-thread pool, 4.5-4.7 ms with 1 thread, same
/// throughput).
pub fn default_thread_split(cores: usize) -> (usize, usize) {
    let runtime = (cores / 2).max(1);
    (runtime, cores.saturating_sub(runtime).max(1))
}

/// Limits of the server (the `[limits]` table of the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest HTTP body or WebSocket message, in bytes.
    pub max_body_bytes: usize,
    /// Largest model snapshot a `PUT /v1/models/{model}/snapshot` may upload, in bytes (read
    /// chunk by chunk into one buffer, never through `max_body_bytes`' path).
    pub max_snapshot_bytes: u64,
    /// Most tokens in one request.
    pub max_tokens_per_request: usize,
    /// Token requests queued per model before 503 `queue-full`.
    pub queue_requests: usize,
    /// Tokens queued per model before 503 `queue-full`.
    pub queue_tokens: usize,
    /// Token requests queued per stream before 503 `queue-full` for that stream (each stream
    /// gets one token per step, so this share keeps one busy stream from filling its model's
    /// queue). `None`: a quarter of `queue_requests`, at least 1.
    pub queue_requests_per_stream: Option<usize>,
    /// Tokens queued per stream before 503 `queue-full` for that stream. `None`: a quarter of
    /// `queue_tokens`, at least `max_tokens_per_request`.
    pub queue_tokens_per_stream: Option<usize>,
    /// Most models in the server.
    pub max_models: usize,
    /// Largest estimated memory of one model, in bytes.
    pub max_model_bytes: u64,
    /// Largest estimated memory of all models together, in bytes (`None`: three quarters of the
    /// machine's memory); a model past it is refused with 507 `memory-budget`.
    pub max_total_model_bytes: Option<u64>,
    /// Streams per model when its definition does not say.
    pub max_streams: usize,
    /// Requests outstanding per WebSocket connection before the server stops reading; a request
    /// stays outstanding until its reply is written.
    pub ws_max_in_flight: usize,
    /// Tokens of the requests outstanding per WebSocket connection before the server stops
    /// reading (a larger request waits until it is alone). A reply holds a loss per token and
    /// the `top_k` predictions of the last one, so with `ws_max_in_flight` this bounds the
    /// memory of the replies a slow reader has not taken yet.
    pub ws_max_in_flight_tokens: usize,
    /// Seconds a WebSocket may show no sign of life (no message, not even the Pong to the
    /// server's Ping, sent every half of it, and no reply taken) while the server waits to read,
    /// and the longest a write to it may take (during a drain, all of a connection's writes
    /// end within half the shutdown timeout); past it the server drops the connection.
    pub ws_idle_timeout_secs: f64,
    /// Largest hidden size of a model.
    pub max_hidden: usize,
    /// Most parameters (weights and readout) of a model.
    pub max_parameters: u64,
    /// Seconds an HTTP request may take before it is answered with 503 `timeout`.
    pub request_timeout_secs: f64,
    /// Seconds a client has to send a whole request head, counted from when the server waits
    /// for it: a connection that sends none in time (idle from the start, stalled halfway
    /// through its headers, or kept alive without a next request) is closed.
    pub header_read_timeout_secs: f64,
    /// Seconds a client has to send a whole `/v1` request body, read before the request takes
    /// one of `max_concurrent_requests` (a slow body holds no permit); past it, 408
    /// `body-timeout` and the connection closes.
    pub body_read_timeout_secs: f64,
    /// `/v1` HTTP requests in progress at once; beyond, 503 `overloaded`.
    pub max_concurrent_requests: usize,
    /// WebSocket connections open at once; beyond, 503 `overloaded`.
    pub max_websockets: usize,
    /// Streams per model, resident and evicted together.
    pub max_stored_streams: usize,
    /// Disk that the evicted streams of all models may take together, in bytes; a new stream
    /// that would need one more moved to disk past it gets 507 `disk-budget`.
    pub max_evicted_bytes: u64,
    /// Threads of each model's pool (`None`: every core; `kfrtrl serve` leaves the async
    /// runtime's cores out).
    pub model_threads: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        let engine = EngineLimits::default();
        Self {
            max_body_bytes: 1 << 20,
            max_snapshot_bytes: 1 << 30,
            max_tokens_per_request: engine.max_tokens_per_request,
            queue_requests: engine.queue_requests,
            queue_tokens: engine.queue_tokens,
            queue_requests_per_stream: None,
            queue_tokens_per_stream: None,
            max_models: engine.max_models,
            max_model_bytes: engine.max_model_bytes,
            max_total_model_bytes: None,
            max_streams: engine.default_max_streams,
            ws_max_in_flight: 256,
            ws_max_in_flight_tokens: 65_536,
            ws_idle_timeout_secs: 60.0,
            max_hidden: crate::core::model::limits::MAX_HIDDEN,
            max_parameters: 1 << 26,
            request_timeout_secs: 30.0,
            header_read_timeout_secs: 10.0,
            body_read_timeout_secs: 10.0,
            max_concurrent_requests: 512,
            max_websockets: 1024,
            max_stored_streams: engine.max_stored_streams,
            max_evicted_bytes: engine.max_evicted_bytes,
            model_threads: None,
        }
    }
}

impl Limits {
    pub(crate) fn engine_limits(&self) -> EngineLimits {
        EngineLimits {
            queue_requests: self.queue_requests,
            queue_tokens: self.queue_tokens,
            queue_requests_per_stream: self
                .queue_requests_per_stream
                .unwrap_or(stream_share(self.queue_requests, 1)),
            queue_tokens_per_stream: self
                .queue_tokens_per_stream
                .unwrap_or(stream_share(self.queue_tokens, self.max_tokens_per_request)),
            max_tokens_per_request: self.max_tokens_per_request,
            max_models: self.max_models,
            max_model_bytes: self.max_model_bytes,
            max_total_model_bytes: self
                .max_total_model_bytes
                .unwrap_or_else(crate::engine::default_memory_budget),
            default_max_streams: self.max_streams,
            max_stored_streams: self.max_stored_streams,
            max_evicted_bytes: self.max_evicted_bytes,
            model_threads: self.model_threads.unwrap_or(EngineLimits::default().model_threads),
        }
    }

    pub(crate) fn check(&self) -> Result<(), StartError> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_tokens_per_request", self.max_tokens_per_request),
            ("queue_requests", self.queue_requests),
            ("queue_tokens", self.queue_tokens),
            ("queue_requests_per_stream", self.queue_requests_per_stream.unwrap_or(1)),
            ("queue_tokens_per_stream", self.queue_tokens_per_stream.unwrap_or(1)),
            ("max_models", self.max_models),
            ("max_streams", self.max_streams),
            ("ws_max_in_flight", self.ws_max_in_flight),
            ("ws_max_in_flight_tokens", self.ws_max_in_flight_tokens),
            ("max_hidden", self.max_hidden),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_websockets", self.max_websockets),
            ("max_stored_streams", self.max_stored_streams),
            ("model_threads", self.model_threads.unwrap_or(1)),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(StartError::Config(format!("limits.{name} must be positive")));
        }
        if self.max_snapshot_bytes == 0 {
            return Err(StartError::Config("limits.max_snapshot_bytes must be positive".to_owned()));
        }
        if self.max_parameters == 0 {
            return Err(StartError::Config("limits.max_parameters must be positive".to_owned()));
        }
        if self.model_threads.is_some_and(|t| t > MAX_MODEL_THREADS) {
            return Err(StartError::Config(format!(
                "limits.model_threads must be at most {MAX_MODEL_THREADS}"
            )));
        }
        // Past a few years, a timeout is no timeout (and `Duration` would overflow).
        if !(self.request_timeout_secs > 0.0 && self.request_timeout_secs <= 1e8) {
            return Err(StartError::Config("limits.request_timeout_secs must be in (0, 1e8]".to_owned()));
        }
        for (name, secs) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
        ] {
            if !(secs > 0.0 && secs <= 1e8) {
                return Err(StartError::Config(format!("limits.{name} must be in (0, 1e8]")));
            }
        }
        if u32::try_from(self.ws_max_in_flight_tokens).is_err() {
            return Err(StartError::Config(format!(
                "limits.ws_max_in_flight_tokens must be at most {}",
                u32::MAX
            )));
        }
        if !(self.ws_idle_timeout_secs > 0.0 && self.ws_idle_timeout_secs <= 1e8) {
            return Err(StartError::Config("limits.ws_idle_timeout_secs must be in (0, 1e8]".to_owned()));
        }
        if self.queue_tokens < self.max_tokens_per_request {
            return Err(StartError::Config(
                "limits.queue_tokens must be at least limits.max_tokens_per_request".to_owned(),
            ));
        }
        if self.queue_tokens_per_stream.is_some_and(|share| share < self.max_tokens_per_request) {
            return Err(StartError::Config(
                "limits.queue_tokens_per_stream must be at least limits.max_tokens_per_request".to_owned(),
            ));
        }
        Ok(())
    }

    /// [`Limits::request_timeout_secs`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }

    /// [`Limits::header_read_timeout_secs`] as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_secs)
    }

    /// [`Limits::body_read_timeout_secs`] as a duration.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_read_timeout_secs)
    }

    /// [`Limits::ws_idle_timeout_secs`] as a duration.
    pub fn ws_idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.ws_idle_timeout_secs)
    }

    /// The server's caps on a model's size beyond the engine's memory estimate: hidden units
    /// and parameters; and the contract's ranges of `tbptt_window` and `ok_rank`, which the
    /// engine checks for their own learner only but every reply echoes.
    pub(crate) fn check_model_size(&self, spec: &ModelSpec) -> Result<(), EngineError> {
        let refuse =
            |field: &str, reason: String| EngineError::InvalidConfig { field: field.to_owned(), reason };
        let max_window = crate::core::model::limits::MAX_TBPTT_WINDOW;
        if !(1..=max_window).contains(&spec.config.tbptt_window) {
            return Err(refuse("tbptt_window", format!("must be in 1..={max_window}")));
        }
        let max_rank = crate::core::model::limits::MAX_OK_RANK;
        if !(1..=max_rank).contains(&spec.config.ok_rank) {
            return Err(refuse("ok_rank", format!("must be in 1..={max_rank}")));
        }
        if spec.n > self.max_hidden {
            return Err(refuse("hidden", format!("the server's limit is {}", self.max_hidden)));
        }
        let parameters = spec.total_params() as u64;
        if parameters > self.max_parameters {
            return Err(refuse(
                "hidden",
                format!(
                    "the model would have {parameters} parameters; the server's limit is {}: lower \
                     hidden or vocab_size",
                    self.max_parameters
                ),
            ));
        }
        Ok(())
    }
}
