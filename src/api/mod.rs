//! The HTTP and WebSocket API on the engine (axum): routes under `/v1`, health and readiness,
//! Prometheus metrics, and the OpenAPI document. It is thin: it parses and validates requests,
//! forwards them to the [`Engine`], and renders replies or RFC 9457 problems. No CPU-heavy work
//! runs on the async runtime; the engine's workers do it on their own threads.
//!
//! [`serve`] runs the server on a bound listener until a shutdown future completes, then drains:
//! `/readyz` turns 503, new connections stop, in-flight requests finish, WebSockets close after
//! their in-flight replies, and the engine's workers finish their queues.

mod metrics;
mod openapi;
mod problem;
mod routes;
mod status;
mod wire;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;

use crate::engine::{Engine, EngineError, EngineLimits, EngineMetrics, ModelDefinition, ModelRequest};

pub use metrics::HttpMetrics;
pub use openapi::{ContractError, OPENAPI_YAML, SCHEMAS, bundled_schemas, openapi_document};
pub use problem::{ApiError, PROBLEM_TYPE_PREFIX};
pub use wire::{DEFAULT_TOP_K, TokensRequest};

/// Limits of the server (the `[limits]` table of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest HTTP body or WebSocket message, in bytes.
    pub max_body_bytes: usize,
    /// Most tokens in one request.
    pub max_tokens_per_request: usize,
    /// Token requests queued per model before 503 `queue-full`.
    pub queue_requests: usize,
    /// Tokens queued per model before 503 `queue-full`.
    pub queue_tokens: usize,
    /// Most models in the server.
    pub max_models: usize,
    /// Largest estimated memory of one model, in bytes.
    pub max_model_bytes: u64,
    /// Streams per model when its definition does not say.
    pub max_streams: usize,
    /// Requests outstanding per WebSocket connection before the server stops reading.
    pub ws_max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let engine = EngineLimits::default();
        Self {
            max_body_bytes: 1 << 20,
            max_tokens_per_request: engine.max_tokens_per_request,
            queue_requests: engine.queue_requests,
            queue_tokens: engine.queue_tokens,
            max_models: engine.max_models,
            max_model_bytes: engine.max_model_bytes,
            max_streams: engine.default_max_streams,
            ws_max_in_flight: 256,
        }
    }
}

impl Limits {
    fn engine_limits(&self) -> EngineLimits {
        EngineLimits {
            queue_requests: self.queue_requests,
            queue_tokens: self.queue_tokens,
            max_tokens_per_request: self.max_tokens_per_request,
            max_models: self.max_models,
            max_model_bytes: self.max_model_bytes,
            default_max_streams: self.max_streams,
        }
    }

    fn check(&self) -> Result<(), StartError> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_tokens_per_request", self.max_tokens_per_request),
            ("queue_requests", self.queue_requests),
            ("queue_tokens", self.queue_tokens),
            ("max_models", self.max_models),
            ("max_streams", self.max_streams),
            ("ws_max_in_flight", self.ws_max_in_flight),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(StartError::Config(format!("limits.{name} must be positive")));
        }
        if self.queue_tokens < self.max_tokens_per_request {
            return Err(StartError::Config(
                "limits.queue_tokens must be at least limits.max_tokens_per_request".to_owned(),
            ));
        }
        Ok(())
    }
}

/// What the server runs with: its limits and the models it loads at start.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Limits.
    pub limits: Limits,
    /// Models to load at start (their missing fields take the defaults).
    pub models: Vec<ModelRequest>,
}

impl Default for ServerConfig {
    /// The embedded defaults: one model named `default` with the default definition.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            models: vec![ModelRequest { name: "default".into(), ..Default::default() }],
        }
    }
}

/// Why the server could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A configured model was refused or could not be loaded.
    #[error("model `{name}`: {error}")]
    Model {
        /// The model.
        name: String,
        /// Why.
        error: EngineError,
    },
    /// The wire contract under `proto-schemas/` is broken.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Network error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Inner {
    engine: Arc<Engine>,
    registry: prometheus::Registry,
    http: HttpMetrics,
    limits: Limits,
    startup_models: Vec<ModelDefinition>,
    openapi: Bytes,
    ready: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    started: AtomicBool,
}

/// The server's shared state: the engine, metrics and readiness.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// Checks the configuration and creates the engine (without loading models: [`serve`] does).
    pub fn new(config: ServerConfig) -> Result<Self, StartError> {
        config.limits.check()?;
        let registry = prometheus::Registry::new();
        let engine_metrics = EngineMetrics::register(&registry)?;
        let http = HttpMetrics::register(&registry)?;
        let engine = Arc::new(Engine::new(config.limits.engine_limits(), engine_metrics));
        let mut startup_models = Vec::new();
        for request in config.models {
            let name = request.name.clone();
            let definition = request.resolve(&engine.default_definition(""));
            engine
                .check_definition(&definition)
                .map_err(|error| StartError::Model { name: name.clone(), error })?;
            if startup_models.iter().any(|d: &ModelDefinition| d.name == name) {
                return Err(StartError::Model {
                    name: name.clone(),
                    error: EngineError::DuplicateModel(name),
                });
            }
            startup_models.push(definition);
        }
        let openapi = Bytes::from(openapi_document()?.to_string());
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                registry,
                http,
                limits: config.limits,
                startup_models,
                openapi,
                ready: watch::Sender::new(false),
                draining: watch::Sender::new(false),
                started: AtomicBool::new(false),
            }),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// The metrics registry.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.inner.registry
    }

    /// Whether every configured model is loaded.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Completes once every configured model is loaded.
    pub async fn wait_ready(&self) {
        let mut ready = self.inner.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Starts draining: `/readyz` turns 503 and WebSockets close after their in-flight replies.
    pub fn begin_drain(&self) {
        self.inner.draining.send_replace(true);
    }

    async fn load_models(self) -> Result<(), StartError> {
        for definition in self.inner.startup_models.clone() {
            let name = definition.name.clone();
            if let Err(error) = self.engine().create_model(definition).await {
                return Err(StartError::Model { name, error });
            }
        }
        self.inner.ready.send_replace(true);
        tracing::info!(models = self.inner.startup_models.len(), "ready");
        Ok(())
    }
}

/// Completes once the server starts draining.
async fn until_draining(draining: &mut watch::Receiver<bool>) {
    // The borrow guard is dropped here, so that callers' futures stay `Send`.
    let _ = draining.wait_for(|d| *d).await;
}

/// The router with every route, the body limit, metrics and panic handling.
pub fn router(state: AppState) -> Router {
    let stream = "/v1/models/{model}/streams/{stream}";
    Router::new()
        .route("/v1/models", post(routes::create_model).get(routes::list_models))
        .route("/v1/models/{model}", get(routes::get_model).delete(routes::delete_model))
        .route(&format!("{stream}/tokens"), post(routes::post_tokens))
        .route(&format!("{stream}/predict"), post(routes::post_predict))
        .route("/v1/models/{model}/streams", get(routes::list_streams))
        .route(stream, get(routes::get_stream).delete(routes::delete_stream))
        .route(&format!("{stream}/ws"), get(ws::upgrade))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(routes::openapi))
        .route("/", get(status::index))
        .route("/status/app.js", get(status::script))
        .route("/status/style.css", get(status::style))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.inner.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the request handler panicked").into_response()
        }))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes (or a configured model fails to
/// load), then drains. Logs `listening` with the bound address, and `ready` once every
/// configured model is loaded.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    if state.inner.started.swap(true, Ordering::AcqRel) {
        return Err(StartError::Config("this state is already being served".to_owned()));
    }
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let loader = tokio::spawn({
        let state = state.clone();
        async move {
            let loaded = state.clone().load_models().await;
            if loaded.is_err() {
                state.begin_drain();
            }
            loaded
        }
    });
    let mut draining = state.inner.draining.subscribe();
    let graceful = {
        let state = state.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = until_draining(&mut draining) => {}
            }
            tracing::info!("draining");
            state.begin_drain();
        }
    };
    // Replies are small writes answered by the client's next request: without TCP_NODELAY,
    // Nagle's algorithm may hold a reply back until the previous one is acknowledged.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, router(state.clone())).with_graceful_shutdown(graceful).await;
    state.begin_drain();
    let loaded = match loader.await {
        Ok(result) => result,
        Err(e) => Err(StartError::Config(format!("model loading failed: {e}"))),
    };
    state.engine().shutdown().await;
    tracing::info!("stopped");
    served?;
    loaded
}
