//! `kfrtrl serve`: settings from flags, then `KFRTRL_*` environment variables, then an optional
//! TOML file (`--config`), then the embedded defaults; logging; the runtime; signals.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

use kfrtrl::api::{
    AllowedOrigins, ApiKey, AppState, DEFAULT_SHUTDOWN_TIMEOUT, Limits, ServerConfig, default_thread_split,
    serve,
};
use kfrtrl::engine::{Durability, FsyncPolicy, ModelRequest};

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_DATA_DIR: &str = "./data";
const DEFAULT_LOG_FILTER: &str = "info";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(s, true)
    }
}

/// `--config`'s long help: every key the file may hold (a test keeps it complete).
const CONFIG_HELP: &str =
    "TOML config file [env: KFRTRL_CONFIG]. Flags win over KFRTRL_* variables, which win \
over the file; unknown keys are refused.

Top level: listen, data_dir, log_format, log_filter, runtime_threads, api_key, api_key_file, \
allowed_origins, shutdown_timeout_secs, checkpoint_interval_secs, checkpoint_keep, wal_fsync, \
stream_idle_ttl_secs.

[limits]: max_body_bytes, max_snapshot_bytes, max_tokens_per_request, queue_requests, queue_tokens, \
queue_requests_per_stream, queue_tokens_per_stream, max_models, max_model_bytes, \
max_total_model_bytes, max_streams, ws_max_in_flight, ws_max_in_flight_tokens, \
ws_idle_timeout_secs, max_hidden, max_parameters, request_timeout_secs, header_read_timeout_secs, \
body_read_timeout_secs, max_concurrent_requests, max_websockets, max_stored_streams, max_evicted_bytes, \
model_threads.

[[models]] (one table per model loaded at start; without the key, one model named `default` unless --no-default-model; `models = []`: none): name, \
vocab_size, cell, hidden, learner, tbptt_window, ok_rank, optimizer, lr, clip, clip_scope, \
gradient_before_reduction, influence_decay, influence_margin, tokens_per_update, tokens_per_update_ramp, tokens_per_update_start, update_unit, seed, init_std, uoro_epsilon, max_streams.";

/// Flags of `kfrtrl serve`. Each also reads `KFRTRL_<NAME>` (e.g. `KFRTRL_LISTEN`) and the
/// config file; a flag wins over the environment, which wins over the file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (every key listed under --help) [env: KFRTRL_CONFIG].
    #[arg(long, long_help = CONFIG_HELP)]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (logged as `listening`)
    /// [env: KFRTRL_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the server's data, created if missing [env: KFRTRL_DATA_DIR] [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format [env: KFRTRL_LOG_FORMAT] [default: human].
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `kfrtrl=debug` [env: KFRTRL_LOG] [default: info].
    #[arg(long)]
    log_filter: Option<String>,
    /// Streams per model unless its definition says [env: KFRTRL_MAX_STREAMS] [default: 256].
    #[arg(long)]
    max_streams: Option<usize>,
    /// Token requests queued per model before 503 [env: KFRTRL_QUEUE_REQUESTS] [default: 4096].
    #[arg(long)]
    queue_requests: Option<usize>,
    /// Tokens queued per model before 503 [env: KFRTRL_QUEUE_TOKENS] [default: 1048576].
    #[arg(long)]
    queue_tokens: Option<usize>,
    /// Token requests queued per stream before 503, so that one busy stream cannot fill its
    /// model's queue [env: KFRTRL_QUEUE_REQUESTS_PER_STREAM] [default: a quarter of
    /// --queue-requests, at least 1].
    #[arg(long)]
    queue_requests_per_stream: Option<usize>,
    /// Tokens queued per stream before 503 [env: KFRTRL_QUEUE_TOKENS_PER_STREAM] [default: a
    /// quarter of --queue-tokens, at least --max-tokens-per-request].
    #[arg(long)]
    queue_tokens_per_stream: Option<usize>,
    /// Most tokens in one request [env: KFRTRL_MAX_TOKENS_PER_REQUEST] [default: 65536].
    #[arg(long)]
    max_tokens_per_request: Option<usize>,
    /// Largest body or WebSocket message in bytes [env: KFRTRL_MAX_BODY_BYTES] [default: 1048576].
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Largest model snapshot an import may upload, in bytes
    /// [env: KFRTRL_MAX_SNAPSHOT_BYTES] [default: 1073741824].
    #[arg(long)]
    max_snapshot_bytes: Option<u64>,
    /// Threads of the async runtime (network and JSON only; models have their own threads)
    /// [env: KFRTRL_RUNTIME_THREADS] [default: half the cores, at least 1].
    #[arg(long)]
    runtime_threads: Option<usize>,
    /// Threads of each model's pool: the most cores one model's step uses
    /// [env: KFRTRL_MODEL_THREADS] [default: the cores the runtime leaves, at least 1].
    #[arg(long)]
    model_threads: Option<usize>,
    /// Bearer token every `/v1` route then requires (at least 16 letters, digits or
    /// `!#$%&'*+-.^_`|~`); prefer the environment or --api-key-file over the command line,
    /// which other users can read [env: KFRTRL_API_KEY] [default: none, no authentication].
    #[arg(long)]
    api_key: Option<String>,
    /// File whose content (trailing whitespace trimmed) is the API key [env: KFRTRL_API_KEY_FILE].
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Comma-separated origins (`scheme://host[:port]`, or `*` for any) besides the server's own
    /// from which a browser may change models; other origins get 403 `cross-origin-request`
    /// [env: KFRTRL_ALLOWED_ORIGINS] [default: none].
    #[arg(long, value_name = "ORIGINS")]
    allowed_origins: Option<String>,
    /// Seconds a drain may take after SIGTERM or SIGINT; past them it logs `shutdown deadline passed` and exits with status 2
    /// [env: KFRTRL_SHUTDOWN_TIMEOUT_SECS] [default: 30].
    #[arg(long, value_name = "SECS")]
    shutdown_timeout: Option<f64>,
    /// Seconds an HTTP request may take before 503 `timeout` (the request stays queued and may
    /// still take effect: the stream's position tells) [env: KFRTRL_REQUEST_TIMEOUT_SECS]
    /// [default: 30].
    #[arg(long, value_name = "SECS")]
    request_timeout: Option<f64>,
    /// Seconds a client has to send a whole request head; a connection idle that long before or
    /// between requests is closed too [env: KFRTRL_HEADER_READ_TIMEOUT_SECS] [default: 10].
    #[arg(long, value_name = "SECS")]
    header_read_timeout: Option<f64>,
    /// Seconds a client has to send a whole `/v1` request body, read before the request counts
    /// against --max-concurrent-requests; past it, 408 `body-timeout`
    /// [env: KFRTRL_BODY_READ_TIMEOUT_SECS] [default: 10].
    #[arg(long, value_name = "SECS")]
    body_read_timeout: Option<f64>,
    /// `/v1` HTTP requests in progress at once; more get 503 `overloaded` with Retry-After
    /// [env: KFRTRL_MAX_CONCURRENT_REQUESTS] [default: 512].
    #[arg(long)]
    max_concurrent_requests: Option<usize>,
    /// WebSocket connections open at once; more get 503 `overloaded`
    /// [env: KFRTRL_MAX_WEBSOCKETS] [default: 1024].
    #[arg(long)]
    max_websockets: Option<usize>,
    /// Requests in flight per WebSocket before the server stops reading it (in flight until
    /// the reply is written) [env: KFRTRL_WS_MAX_IN_FLIGHT] [default: 256].
    #[arg(long)]
    ws_max_in_flight: Option<usize>,
    /// Tokens in flight per WebSocket before the server stops reading it (a larger request
    /// waits until it is alone) [env: KFRTRL_WS_MAX_IN_FLIGHT_TOKENS] [default: 65536].
    #[arg(long)]
    ws_max_in_flight_tokens: Option<usize>,
    /// Seconds a WebSocket may stay silent, Pongs to the server's Pings (sent every half of
    /// it) included, and the longest a write to it may take; past it the connection is dropped
    /// [env: KFRTRL_WS_IDLE_TIMEOUT_SECS] [default: 60].
    #[arg(long, value_name = "SECS")]
    ws_idle_timeout: Option<f64>,
    /// Models in the server [env: KFRTRL_MAX_MODELS] [default: 16].
    #[arg(long)]
    max_models: Option<usize>,
    /// Largest hidden size of a model [env: KFRTRL_MAX_HIDDEN] [default: 4096].
    #[arg(long)]
    max_hidden: Option<usize>,
    /// Most parameters of a model [env: KFRTRL_MAX_PARAMETERS] [default: 67108864].
    #[arg(long)]
    max_parameters: Option<u64>,
    /// Largest estimated memory of a model (weights, optimizer, every stream slot), in bytes
    /// [env: KFRTRL_MAX_MODEL_BYTES] [default: 4294967296].
    #[arg(long)]
    max_model_bytes: Option<u64>,
    /// Largest estimated memory of all models together, in bytes; a model past it gets 507
    /// `memory-budget` [env: KFRTRL_MAX_TOTAL_MODEL_BYTES] [default: 3/4 of the machine's memory].
    #[arg(long)]
    max_total_model_bytes: Option<u64>,
    /// Seconds between periodic checkpoints of a model that changed; 0: only on demand and at
    /// shutdown [env: KFRTRL_CHECKPOINT_INTERVAL_SECS] [default: 300].
    #[arg(long)]
    checkpoint_interval_secs: Option<u64>,
    /// Checkpoints kept per model [env: KFRTRL_CHECKPOINT_KEEP] [default: 3].
    #[arg(long)]
    checkpoint_keep: Option<usize>,
    /// When the write-ahead log is synced: always (before every reply), interval[:<ms>] (at most
    /// every 100 ms or <ms>), never [env: KFRTRL_WAL_FSYNC] [default: always].
    #[arg(long)]
    wal_fsync: Option<FsyncPolicy>,
    /// Streams idle this many seconds are evicted to disk (loaded back on their next request);
    /// 0: only when a model's slots are full [env: KFRTRL_STREAM_IDLE_TTL_SECS] [default: 600].
    #[arg(long)]
    stream_idle_ttl_secs: Option<u64>,
    /// Streams per model, resident and evicted [env: KFRTRL_MAX_STORED_STREAMS] [default: 100000].
    #[arg(long)]
    max_stored_streams: Option<usize>,
    /// Disk that the evicted streams of all models may take, in bytes; a new stream past it gets
    /// 507 `disk-budget` [env: KFRTRL_MAX_EVICTED_BYTES] [default: 8589934592].
    #[arg(long)]
    max_evicted_bytes: Option<u64>,
    /// Start without the `default` model when the config file lists none: a server behind the
    /// router holds only the models created through it [env: KFRTRL_NO_DEFAULT_MODEL].
    #[arg(long)]
    no_default_model: bool,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    log_filter: Option<String>,
    runtime_threads: Option<usize>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    allowed_origins: Option<Vec<String>>,
    shutdown_timeout_secs: Option<f64>,
    checkpoint_interval_secs: Option<u64>,
    checkpoint_keep: Option<usize>,
    wal_fsync: Option<String>,
    stream_idle_ttl_secs: Option<u64>,
    #[serde(default)]
    limits: Limits,
    /// Models loaded at start; when the key is absent, one model named `default` with the
    /// defaults (unless `--no-default-model`); `models = []`: none.
    models: Option<Vec<ModelRequest>>,
}

/// A setting from the flag, else the environment variable `KFRTRL_<var>`, else the file.
fn pick<T: FromStr>(flag: Option<T>, var: &str, file: Option<T>) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    if flag.is_some() {
        return Ok(flag);
    }
    let name = format!("KFRTRL_{var}");
    match std::env::var(&name) {
        Ok(value) if !value.is_empty() => value.parse().map(Some).map_err(|e| format!("{name}={value}: {e}")),
        _ => Ok(file),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

struct Settings {
    listen: String,
    data_dir: PathBuf,
    log_format: LogFormat,
    log_filter: String,
    runtime_threads: usize,
    server: ServerConfig,
}

fn settings(args: ServeArgs) -> Result<Settings, String> {
    let config_path = pick(args.config, "CONFIG", None)?;
    let file = match &config_path {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let mut limits = file.limits;
    let overrides = [
        (args.max_streams, "MAX_STREAMS", &mut limits.max_streams),
        (args.queue_requests, "QUEUE_REQUESTS", &mut limits.queue_requests),
        (args.queue_tokens, "QUEUE_TOKENS", &mut limits.queue_tokens),
        (args.max_tokens_per_request, "MAX_TOKENS_PER_REQUEST", &mut limits.max_tokens_per_request),
        (args.max_body_bytes, "MAX_BODY_BYTES", &mut limits.max_body_bytes),
        (args.max_stored_streams, "MAX_STORED_STREAMS", &mut limits.max_stored_streams),
    ];
    for (flag, var, slot) in overrides {
        if let Some(value) = pick(flag, var, None)? {
            *slot = value;
        }
    }
    if let Some(value) = pick(args.max_snapshot_bytes, "MAX_SNAPSHOT_BYTES", None)? {
        limits.max_snapshot_bytes = value;
    }
    // Unset, the shares follow the model's queue (a quarter of it); set, they are fixed.
    let shares = [
        (args.queue_requests_per_stream, "QUEUE_REQUESTS_PER_STREAM", &mut limits.queue_requests_per_stream),
        (args.queue_tokens_per_stream, "QUEUE_TOKENS_PER_STREAM", &mut limits.queue_tokens_per_stream),
    ];
    for (flag, var, slot) in shares {
        if let Some(value) = pick(flag, var, None)? {
            *slot = Some(value);
        }
    }
    let hardening = [
        (args.max_concurrent_requests, "MAX_CONCURRENT_REQUESTS", &mut limits.max_concurrent_requests),
        (args.max_websockets, "MAX_WEBSOCKETS", &mut limits.max_websockets),
        (args.ws_max_in_flight, "WS_MAX_IN_FLIGHT", &mut limits.ws_max_in_flight),
        (args.ws_max_in_flight_tokens, "WS_MAX_IN_FLIGHT_TOKENS", &mut limits.ws_max_in_flight_tokens),
        (args.max_models, "MAX_MODELS", &mut limits.max_models),
        (args.max_hidden, "MAX_HIDDEN", &mut limits.max_hidden),
    ];
    for (flag, var, slot) in hardening {
        if let Some(value) = pick(flag, var, None)? {
            *slot = value;
        }
    }
    for (flag, var, slot) in [
        (args.max_parameters, "MAX_PARAMETERS", &mut limits.max_parameters),
        (args.max_model_bytes, "MAX_MODEL_BYTES", &mut limits.max_model_bytes),
        (args.max_evicted_bytes, "MAX_EVICTED_BYTES", &mut limits.max_evicted_bytes),
    ] {
        if let Some(value) = pick(flag, var, None)? {
            *slot = value;
        }
    }
    if let Some(bytes) = pick(args.max_total_model_bytes, "MAX_TOTAL_MODEL_BYTES", None)? {
        limits.max_total_model_bytes = Some(bytes);
    }
    if let Some(seconds) = pick(args.request_timeout, "REQUEST_TIMEOUT_SECS", None)? {
        limits.request_timeout_secs = seconds;
    }
    if let Some(seconds) = pick(args.header_read_timeout, "HEADER_READ_TIMEOUT_SECS", None)? {
        limits.header_read_timeout_secs = seconds;
    }
    if let Some(seconds) = pick(args.body_read_timeout, "BODY_READ_TIMEOUT_SECS", None)? {
        limits.body_read_timeout_secs = seconds;
    }
    if let Some(seconds) = pick(args.ws_idle_timeout, "WS_IDLE_TIMEOUT_SECS", None)? {
        limits.ws_idle_timeout_secs = seconds;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime_threads = pick(args.runtime_threads, "RUNTIME_THREADS", file.runtime_threads)?
        .unwrap_or(default_thread_split(cores).0)
        .max(1);
    limits.model_threads = Some(
        pick(args.model_threads, "MODEL_THREADS", limits.model_threads)?
            .unwrap_or(cores.saturating_sub(runtime_threads).max(1)),
    );
    let shutdown_secs = pick(args.shutdown_timeout, "SHUTDOWN_TIMEOUT_SECS", file.shutdown_timeout_secs)?;
    let shutdown_timeout = match shutdown_secs {
        None => DEFAULT_SHUTDOWN_TIMEOUT,
        Some(s) if s > 0.0 && s <= 1e8 => Duration::from_secs_f64(s),
        Some(s) => return Err(format!("the shutdown timeout must be in (0, 1e8] seconds (got {s})")),
    };
    let api_key = api_key(args.api_key, args.api_key_file, file.api_key, file.api_key_file)?;
    let allowed_origins = match pick(args.allowed_origins, "ALLOWED_ORIGINS", None)? {
        Some(list) => AllowedOrigins::parse_list(&list)?,
        None => AllowedOrigins::new(&file.allowed_origins.unwrap_or_default())?,
    };
    let no_default = pick(args.no_default_model.then_some(true), "NO_DEFAULT_MODEL", None)?.unwrap_or(false);
    let models = match file.models {
        Some(models) => models,
        None if no_default => Vec::new(),
        None => ServerConfig::default().models,
    };
    let data_dir: PathBuf =
        pick(args.data_dir, "DATA_DIR", file.data_dir)?.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let mut durability = Durability::new(&data_dir);
    let file_fsync = file.wal_fsync.map(|s| s.parse::<FsyncPolicy>()).transpose()?;
    if let Some(fsync) = pick(args.wal_fsync, "WAL_FSYNC", file_fsync)? {
        durability.fsync = fsync;
    }
    if let Some(secs) =
        pick(args.checkpoint_interval_secs, "CHECKPOINT_INTERVAL_SECS", file.checkpoint_interval_secs)?
    {
        durability.checkpoint_interval = (secs > 0).then(|| Duration::from_secs(secs));
    }
    if let Some(keep) = pick(args.checkpoint_keep, "CHECKPOINT_KEEP", file.checkpoint_keep)? {
        if keep == 0 {
            return Err("checkpoint_keep must be at least 1".into());
        }
        durability.checkpoint_keep = keep;
    }
    if let Some(secs) = pick(args.stream_idle_ttl_secs, "STREAM_IDLE_TTL_SECS", file.stream_idle_ttl_secs)? {
        durability.stream_idle_ttl = (secs > 0).then(|| Duration::from_secs(secs));
    }
    Ok(Settings {
        listen: pick(args.listen, "LISTEN", file.listen)?.unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
        data_dir,
        log_format: pick(args.log_format, "LOG_FORMAT", file.log_format)?.unwrap_or(LogFormat::Human),
        log_filter: pick(args.log_filter, "LOG", file.log_filter)?
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
        runtime_threads,
        server: ServerConfig {
            limits,
            models,
            api_key,
            allowed_origins,
            shutdown_timeout,
            durability: Some(durability),
        },
    })
}

/// The API key from the flag, the environment or the file, each as the key itself or as a file
/// holding it; never logged, never echoed in an error.
fn api_key(
    flag: Option<String>,
    flag_file: Option<PathBuf>,
    config: Option<String>,
    config_file: Option<PathBuf>,
) -> Result<Option<ApiKey>, String> {
    let key = match (pick(flag, "API_KEY", None)?, pick(flag_file, "API_KEY_FILE", None)?) {
        (Some(key), _) => Some(key),
        (None, Some(path)) => Some(read_key(&path)?),
        (None, None) => match (config, config_file) {
            (Some(key), _) => Some(key),
            (None, Some(path)) => Some(read_key(&path)?),
            (None, None) => None,
        },
    };
    key.map(|k| ApiKey::new(&k)).transpose()
}

fn read_key(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("API key file {}: {e}", path.display()))?;
    Ok(text.trim_end().to_owned())
}

fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("log filter `{filter}`: {e}"))?;
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(color);
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), String> {
    let settings = settings(args)?;
    init_logging(settings.log_format, &settings.log_filter)?;
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|e| format!("data dir {}: {e}", settings.data_dir.display()))?;
    let model_threads = settings.server.limits.model_threads;
    let state = AppState::new(settings.server).map_err(|e| e.to_string())?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("kfrtrl-io");
    // A runtime as wide as the machine would only compete with the models' pools (measured: p99
    // HTTP latency 18 ms with 2 runtime threads on 2 cores, 13 ms with 1).
    runtime.worker_threads(settings.runtime_threads);
    let runtime = runtime.build().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
        tracing::info!(
            data_dir = %settings.data_dir.display(),
            runtime_threads = settings.runtime_threads,
            model_threads,
            "starting"
        );
        serve(listener, state, shutdown_signal()).await.map_err(|e| e.to_string())
    });
    // `serve` awaited everything that matters (or gave up at the deadline): tasks still
    // running, such as a worker join past the deadline, must not hold the exit.
    runtime.shutdown_background();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 19.12): `serve --help` listed a few of the config file's keys. Every
    /// `[limits]` key and every model field must appear in `--config`'s long help.
    #[test]
    fn the_config_help_names_every_limit_and_model_key() {
        let keys = |value: serde_json::Value| -> Vec<String> {
            value.as_object().expect("an object").keys().cloned().collect()
        };
        let limits = keys(serde_json::to_value(Limits::default()).unwrap());
        let model =
            keys(serde_json::to_value(kfrtrl::engine::ModelDefinition::with_defaults("m", 1)).unwrap());
        assert!(limits.len() > 20 && model.len() > 15);
        for key in limits.iter().chain(&model) {
            assert!(
                CONFIG_HELP.contains(&format!(" {key},")) || CONFIG_HELP.contains(&format!(" {key}.")),
                "{key}"
            );
        }
    }
}
