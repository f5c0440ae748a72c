//! The HTTP and WebSocket API on the engine (axum): routes under `/v1`, health and readiness,
//! Prometheus metrics, and the OpenAPI document. It is thin: it parses and validates requests,
//! forwards them to the [`Engine`], and renders replies or RFC 9457 problems. No CPU-heavy work
//! runs on the async runtime; the engine's workers do it on their own threads.
//!
//! [`serve`] runs the server on a bound listener until a shutdown future completes, then drains
//! within the shutdown deadline: `/readyz` turns 503 and new `/v1` requests get 503
//! `shutting-down`; in-flight requests finish; every WebSocket sends its in-flight replies, then
//! a 1001 close frame; then the listener closes and [`Engine::shutdown`] finishes the queued work.

mod admission;
mod auth;
mod limits;
mod listen;
mod metrics;
mod openapi;
mod origin;
mod parse_errors;
mod problem;
mod routes;
mod status;
mod transfer;
mod wire;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;

use crate::engine::{
    DataDirLock, Durability, Engine, EngineError, EngineMetrics, ModelDefinition, ModelRequest,
};

pub use auth::{ApiKey, WS_BEARER_PREFIX, WS_PROTOCOL};
pub use limits::{Limits, MAX_MODEL_THREADS, default_thread_split};
pub use metrics::HttpMetrics;
pub use openapi::{ContractError, OPENAPI_YAML, SCHEMAS, bundled_schemas, openapi_document};
pub use origin::AllowedOrigins;
pub use problem::{ApiError, PROBLEM_TYPE_PREFIX};
pub use wire::{DEFAULT_TOP_K, TokensRequest};

/// Default of [`ServerConfig::shutdown_timeout`].
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server runs with: its limits, the models it loads at start, where it keeps them, its
/// API key, and its shutdown deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Limits.
    pub limits: Limits,
    /// Models to create at start if the data directory does not hold them already (their
    /// missing fields take the defaults).
    pub models: Vec<ModelRequest>,
    /// When set, every `/v1` route needs it as a bearer token.
    pub api_key: Option<ApiKey>,
    /// Origins besides the server's own from which a browser may change models (see
    /// [`AllowedOrigins`]).
    pub allowed_origins: AllowedOrigins,
    /// How long a drain may take before the server gives up and fails.
    pub shutdown_timeout: Duration,
    /// Checkpoints and write-ahead logs (`None`: nothing survives the process).
    pub durability: Option<Durability>,
}

impl Default for ServerConfig {
    /// The embedded defaults: one model named `default` with the default definition, no key,
    /// in memory.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            models: vec![ModelRequest { name: "default".into(), ..Default::default() }],
            api_key: None,
            allowed_origins: AllowedOrigins::default(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            durability: None,
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
    /// The data directory cannot be used (another server holds it, or it cannot be created).
    #[error("{0}")]
    DataDir(String),
    /// Network error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The models stopped, but not cleanly (a final checkpoint failed, a model's storage had
    /// failed): the next start replays their logs.
    #[error("unclean stop: {0}")]
    Stop(String),
    /// The drain did not finish within the shutdown deadline.
    #[error("the drain did not finish within the shutdown deadline of {0:?}")]
    ShutdownTimeout(Duration),
}

struct Inner {
    engine: Arc<Engine>,
    registry: prometheus::Registry,
    http: HttpMetrics,
    limits: Limits,
    api_key: Option<ApiKey>,
    allowed_origins: AllowedOrigins,
    shutdown_timeout: Duration,
    admission: admission::Admission,
    startup_models: Vec<ModelDefinition>,
    openapi: Bytes,
    ready: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    started: AtomicBool,
    _data_dir_lock: Option<DataDirLock>,
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
        // Taken before anything reads the directory, and held as long as the state lives.
        let data_dir_lock =
            config.durability.as_ref().map(Durability::lock).transpose().map_err(StartError::DataDir)?;
        let engine = Arc::new(match config.durability {
            Some(d) => Engine::with_durability(config.limits.engine_limits(), engine_metrics, d),
            None => Engine::new(config.limits.engine_limits(), engine_metrics),
        });
        let mut startup_models = Vec::new();
        for request in config.models {
            let name = request.name.clone();
            let definition = request.resolve(&engine.default_definition(""));
            engine
                .check_definition(&definition)
                .and_then(|spec| config.limits.check_model_size(&spec))
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
                admission: admission::Admission::new(
                    config.limits.max_concurrent_requests,
                    config.limits.max_websockets,
                ),
                limits: config.limits,
                api_key: config.api_key,
                allowed_origins: config.allowed_origins,
                shutdown_timeout: config.shutdown_timeout,
                startup_models,
                openapi,
                ready: watch::Sender::new(false),
                draining: watch::Sender::new(false),
                started: AtomicBool::new(false),
                _data_dir_lock: data_dir_lock,
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

    /// Checks a definition against the engine's rules and the server's size caps.
    pub fn check_definition(&self, definition: &ModelDefinition) -> Result<(), EngineError> {
        let spec = self.engine().check_definition(definition)?;
        self.inner.limits.check_model_size(&spec)
    }

    /// Starts draining: `/readyz` turns 503 and WebSockets close after their in-flight replies.
    pub fn begin_drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Restores the models of the data directory, creates the configured ones it lacks, starts
    /// the periodic checkpoints, then flips readiness.
    async fn load_models(self) -> Result<(), StartError> {
        let restored = self
            .engine()
            .restore()
            .await
            .map_err(|error| StartError::Model { name: "(data directory)".into(), error })?;
        for definition in self.inner.startup_models.clone() {
            let name = definition.name.clone();
            if restored.contains(&name) {
                continue;
            }
            if let Err(error) = self.engine().create_model(definition).await {
                return Err(StartError::Model { name, error });
            }
        }
        tokio::spawn(self.engine().clone().run_checkpoints());
        self.inner.ready.send_replace(true);
        tracing::info!(restored = restored.len(), models = self.engine().models().len(), "ready");
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
        .route(
            "/v1/models/{model}",
            get(routes::get_model).put(routes::put_model).delete(routes::delete_model),
        )
        .route("/v1/models/{model}/checkpoint", post(routes::checkpoint_model))
        .route("/v1/models/{model}/freeze", post(transfer::freeze).delete(transfer::thaw))
        .route("/v1/models/{model}/snapshot", get(transfer::export).put(transfer::import))
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), admission::admit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admission::head_limits))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the request handler panicked").into_response()
        }))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes (or a configured model fails to
/// load), then drains (see the module's docs) within [`ServerConfig::shutdown_timeout`]. Logs
/// `listening` with the bound address, `ready` once every configured model is loaded, and
/// `stopped` after a complete drain; past the deadline it logs `shutdown deadline passed`, gives
/// up the work in progress, stops the models (final checkpoints, within one more deadline) and
/// fails with [`StartError::ShutdownTimeout`].
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
    // The listener stays open while the drain runs, so that `/readyz` can say 503 and new
    // requests get a problem instead of a refused connection.
    let (stop_accepting, accepting) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(listen::serve_connections(
        listener,
        router(state.clone()),
        state.inner.limits.header_read_timeout(),
        async move {
            let _ = accepting.await;
        },
    ));
    let mut draining = state.inner.draining.subscribe();
    let early_exit = tokio::select! {
        () = shutdown => None,
        () = until_draining(&mut draining) => None,
        ended = &mut server => Some(ended),
    };
    // Readiness turns first, then the log line: whoever reads "draining" (an operator, the
    // shutdown tests) must find `/readyz` already at 503.
    state.begin_drain();
    tracing::info!("draining");
    let deadline = state.inner.shutdown_timeout;
    // Stopping the models is one task, started by the drain or at its deadline, so that a drain
    // cut off halfway through it neither stops them twice nor abandons the stop.
    let (start_stopping, stop_now) = tokio::sync::oneshot::channel::<()>();
    let mut stopping = tokio::spawn({
        let engine = state.engine().clone();
        async move {
            let _ = stop_now.await;
            engine.shutdown().await
        }
    });
    let drain = async {
        state.inner.admission.work.idle().await;
        let _ = stop_accepting.send(());
        let served = match early_exit {
            Some(ended) => ended,
            None => server.await,
        };
        let loaded = match loader.await {
            Ok(result) => result,
            Err(e) => Err(StartError::Config(format!("model loading failed: {e}"))),
        };
        let _ = start_stopping.send(());
        let stopped = (&mut stopping).await;
        served.map_err(|e| StartError::Config(format!("the server task failed: {e}")))?;
        loaded?;
        match stopped {
            Ok(problems) if problems.is_empty() => Ok(()),
            Ok(problems) => Err(StartError::Stop(problems.join("; "))),
            Err(e) => Err(StartError::Stop(format!("stopping the models failed: {e}"))),
        }
    };
    let drained = tokio::time::timeout(deadline, drain).await;
    match drained {
        Ok(result) => {
            tracing::info!("stopped");
            result
        }
        Err(_) => {
            let in_progress = state.inner.admission.work.active();
            tracing::error!(?deadline, in_progress, "shutdown deadline passed");
            // The work in progress is given up, not the models: they still stop and write their
            // final checkpoints, so the next start need not replay their logs.
            // Dropping the drain dropped `start_stopping`, which starts the stop if it had not.
            // A handle polled after it completed panics; a finished stop has nothing to wait for.
            if !stopping.is_finished() && tokio::time::timeout(deadline, &mut stopping).await.is_err() {
                tracing::error!(?deadline, "the models did not stop within a second deadline");
            }
            Err(StartError::ShutdownTimeout(deadline))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unset shares follow the model's queue, so raising `max_tokens_per_request` (or the
    /// queue) alone still starts: a fixed default share would refuse such a config.
    #[test]
    fn unset_stream_shares_follow_the_models_queue() {
        let limits = Limits::default();
        let engine = limits.engine_limits();
        assert_eq!((engine.queue_requests_per_stream, engine.queue_tokens_per_stream), (1024, 1 << 18));

        let large = Limits { max_tokens_per_request: 300_000, queue_tokens: 2_000_000, ..Limits::default() };
        assert!(large.check().is_ok());
        assert_eq!(large.engine_limits().queue_tokens_per_stream, 500_000);
        let larger = Limits { max_tokens_per_request: 900_000, queue_tokens: 2_000_000, ..Limits::default() };
        assert!(larger.check().is_ok());
        assert_eq!(larger.engine_limits().queue_tokens_per_stream, 900_000, "never below one request");
        let tiny = Limits { queue_requests: 2, ..Limits::default() };
        assert_eq!(tiny.engine_limits().queue_requests_per_stream, 1);

        let explicit =
            Limits { queue_requests_per_stream: Some(7), queue_tokens_per_stream: Some(70_000), ..limits };
        let engine = explicit.engine_limits();
        assert_eq!((engine.queue_requests_per_stream, engine.queue_tokens_per_stream), (7, 70_000));
        assert!(Limits { queue_tokens_per_stream: Some(65_535), ..Limits::default() }.check().is_err());
    }
}
