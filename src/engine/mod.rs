//! The engine: models and their streams, in memory. Each model has one worker, a dedicated OS
//! thread that alone owns the model's weights, optimizer and stream states (single writer), and
//! steps the queued tokens of all its streams as one batch per step (see `worker.rs`).
//!
//! [`Engine`] is what the API talks to. Its calls never block and never compute: they validate,
//! admit the work against the model's bounded queue and the stream's share of it (or refuse it
//! at once with [`EngineError::QueueFull`] or [`EngineError::StreamQueueFull`]), and hand back a
//! future of the worker's reply.
//!
//! Durability (when the engine has a data directory, see [`Durability`]): each model lives in
//! `<data dir>/models/<name>/` as checkpoints (`checkpoint.rs`) plus a write-ahead log of every
//! operation since (`wal.rs`). A checkpoint is a consistent copy the worker takes between two
//! steps ([`Engine::snapshot`]), written by one serialized writer per model: periodically
//! ([`Engine::run_checkpoints`]), on demand ([`Engine::checkpoint`]) and at shutdown. At boot,
//! [`Engine::restore`] loads the newest valid checkpoint of every model and replays its log.
//!
//! Guarantee: a request that was answered is durable (with the default fsync policy `always`,
//! even across a power loss). A request cut off by a crash may have taken effect in part, one
//! token per step: the stream's `position` says exactly how many of its tokens were consumed, so
//! a client can resend the rest.

pub mod checkpoint;
mod durability;
mod metrics;
mod model;
pub mod wal;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::core::ModelSpec;

pub use checkpoint::{EvictedStream, ModelSnapshot, StreamMeta, StreamSnapshot};
pub use durability::{DataDirLock, Durability, EvictedBytes};
pub use metrics::{EngineMetrics, ModelMetrics, SymbolMode};
pub use model::{
    MAX_NAME_LEN, MAX_STREAMS_PER_MODEL, ModelDefinition, ModelRequest, estimate_model_bytes, valid_name,
};
pub use wal::FsyncPolicy;

/// Limits that bound the engine's memory and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLimits {
    /// Token requests queued per model (waiting or in progress) before new ones are refused.
    pub queue_requests: usize,
    /// Tokens queued per model before new requests are refused.
    pub queue_tokens: usize,
    /// Token requests queued per stream before new ones to it are refused. A stream consumes
    /// one token per step, so without a share one client pipelining into one stream could keep
    /// the model's whole queue full and every other stream refused.
    pub queue_requests_per_stream: usize,
    /// Tokens queued per stream before new requests to it are refused.
    pub queue_tokens_per_stream: usize,
    /// Most tokens in one request.
    pub max_tokens_per_request: usize,
    /// Most models in the server.
    pub max_models: usize,
    /// Largest estimated memory of one model (weights, optimizer, all stream slots), in bytes.
    pub max_model_bytes: u64,
    /// Largest estimated memory of all models together, in bytes: a model that would take the
    /// server past it is refused at creation ([`EngineError::MemoryBudget`]).
    pub max_total_model_bytes: u64,
    /// Streams per model when a definition does not say (resident at once; more are evicted).
    pub default_max_streams: usize,
    /// Streams per model, resident and evicted together (durable engines evict idle streams to
    /// disk; this bounds the disk and the bookkeeping).
    pub max_stored_streams: usize,
    /// Threads of each model's pool, the worker's own included: the most cores one model's step
    /// uses at once.
    pub model_threads: usize,
    /// Disk that the evicted streams of all models may take together, in bytes (estimated per
    /// stream file; see [`EvictedBytes`]).
    pub max_evicted_bytes: u64,
}

/// A stream's default share of a model's queue of `queue` requests or tokens: a quarter of it,
/// never below `floor` (one request, or the largest one).
pub fn stream_share(queue: usize, floor: usize) -> usize {
    (queue / 4).max(floor)
}

/// Three quarters of the machine's memory (`MemTotal` of `/proc/meminfo`, or of a cgroup limit
/// below it), or 16 GiB where neither can be read: what the models may take together, leaving
/// the rest to queues, replies, the page cache and the system.
pub fn default_memory_budget() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let cgroup =
        std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|t| t.trim().parse::<u64>().ok());
    let total = match (meminfo, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) => m,
        (None, Some(c)) => c,
        (None, None) => 16 << 30,
    };
    total / 4 * 3
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            queue_requests: 4096,
            queue_tokens: 1 << 20,
            queue_requests_per_stream: stream_share(4096, 1),
            queue_tokens_per_stream: stream_share(1 << 20, 65_536),
            max_tokens_per_request: 65_536,
            max_models: 16,
            max_model_bytes: 4 << 30,
            max_total_model_bytes: default_memory_budget(),
            default_max_streams: 256,
            max_stored_streams: 100_000,
            model_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_evicted_bytes: 8 << 30,
        }
    }
}

/// Why the engine refused or failed a call. Every variant is a client-visible outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// No model by that name.
    #[error("model `{0}` does not exist")]
    UnknownModel(String),
    /// No stream by that name in the model.
    #[error("stream `{stream}` of model `{model}` does not exist")]
    UnknownStream {
        /// The model.
        model: String,
        /// The stream.
        stream: String,
    },
    /// A model by that name exists already.
    #[error("model `{0}` exists already")]
    DuplicateModel(String),
    /// The server holds its maximum number of models.
    #[error("the server holds its maximum of {0} models; delete one first")]
    ModelLimit(usize),
    /// A model or stream name does not match the naming rule.
    #[error("invalid {what} name `{name}`: names match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$")]
    InvalidName {
        /// `model` or `stream`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// A model definition was refused.
    #[error("invalid model config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A request without tokens.
    #[error("the request has no tokens")]
    EmptyInput,
    /// A token outside the model's vocabulary.
    #[error("token {token} at index {index} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange {
        /// Position in the request.
        index: usize,
        /// The token.
        token: i64,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A request with too many tokens.
    #[error("the request has {count} tokens; the limit is {limit}")]
    TooManyTokens {
        /// Tokens in the request.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The model's queue is full; the client should retry later.
    #[error("the queue of model `{0}` is full; retry later")]
    QueueFull(String),
    /// The stream's share of its model's queue is full; the client should retry later.
    #[error(
        "stream `{stream}` of model `{model}` would have more than {limit} {unit} queued; \
         retry once its queued requests are answered"
    )]
    StreamQueueFull {
        /// The model.
        model: String,
        /// The stream.
        stream: String,
        /// What the share counts: `"requests"` or `"tokens"`.
        unit: &'static str,
        /// How many of them a stream may have queued.
        limit: usize,
    },
    /// The model holds its maximum number of streams.
    #[error("model `{model}` holds its maximum of {limit} streams; delete a stream first")]
    StreamLimit {
        /// The model.
        model: String,
        /// Its stream limit.
        limit: usize,
    },
    /// A new stream would need one more stream moved to disk past the server's budget for
    /// evicted streams.
    #[error(
        "a new stream of model `{model}` needs an idle stream moved to disk, but the evicted streams \
         of the server fill their budget of {budget} MiB: delete streams or retry later"
    )]
    DiskBudget {
        /// The model.
        model: String,
        /// The budget, MiB.
        budget: u64,
    },
    /// The model would take the server's models past their memory budget.
    #[error(
        "model `{model}` would need about {requested} MiB; the server's models hold {used} MiB of \
         a budget of {budget} MiB: delete a model, or lower hidden or max_streams"
    )]
    MemoryBudget {
        /// The model refused.
        model: String,
        /// Its estimated memory, MiB.
        requested: u64,
        /// The estimated memory of the models already loaded, MiB.
        used: u64,
        /// The budget, MiB.
        budget: u64,
    },
    /// Every slot of the model holds a stream with work queued in this very step, so none can
    /// be evicted to make room for a new one; retry once some finish.
    #[error(
        "all {limit} stream slots of model `{model}` are busy with queued work; retry shortly \
         (idle streams are moved to disk to make room)"
    )]
    SlotsBusy {
        /// The model.
        model: String,
        /// Its resident stream slots.
        limit: usize,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model's durable storage failed (the write-ahead log, a checkpoint or a stream file):
    /// the request's effect is not durable.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The engine runs without a data directory: nothing to checkpoint.
    #[error("the server runs without a data directory; checkpoints are disabled")]
    NotDurable,
    /// The model's worker stopped unexpectedly (a bug): the request was not completed.
    #[error("the worker of model `{0}` stopped")]
    WorkerStopped(String),
}

impl EngineError {
    fn invalid_config(field: &str, reason: impl Into<String>) -> Self {
        EngineError::InvalidConfig { field: field.to_owned(), reason: reason.into() }
    }
}

/// Whether a token request changes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The stream consumes the tokens (and the model learns from them if asked).
    Consume,
    /// The tokens are evaluated on a copy of the stream's state; nothing changes.
    Predict,
}

/// A validated token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInput {
    /// Tokens, each inside the vocabulary; at least one.
    pub tokens: Vec<u32>,
    /// Whether the tokens train the weights.
    pub learn: bool,
    /// Whether the stream starts a new sequence before the first token.
    pub reset: bool,
    /// Number of next-token predictions in the reply (capped at the vocabulary size).
    pub top_k: usize,
    /// Whether the reply lists every token's loss.
    pub return_losses: bool,
}

/// One next-token prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The token.
    pub token: u32,
    /// Its probability.
    pub prob: f64,
    /// For byte-level models, the byte as text: printable ASCII as itself, any other byte
    /// escaped (`\n`, `\t`, `\r`, `\x00` … `\xff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The reply to a token request (the wire's tokens reply).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokensReply {
    /// The model.
    pub model: String,
    /// The stream.
    pub stream: String,
    /// Tokens the stream has consumed since it was created (unchanged by `/predict`).
    pub position: u64,
    /// Tokens of this request.
    pub consumed: usize,
    /// Mean loss of this request's tokens, in bits, each scored before learning from it; tokens
    /// whose loss was not finite (see `learner_resets`) are left out, and when that is every
    /// token it is `None` (`null` on the wire).
    pub mean_loss_bits: Option<f64>,
    /// Every token's loss in bits, when asked; `None` (`null`) for a loss that was not finite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub losses_bits: Option<Vec<Option<f64>>>,
    /// Times during this request that a non-finite loss, gradient or learner factor was met: the
    /// weight update of that step was skipped and the stream's learner state reset (its
    /// hidden state and position are kept). Omitted when zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub learner_resets: u32,
    /// The most likely next tokens, most likely first.
    pub predictions: Vec<Prediction>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// Live statistics of one stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamInfo {
    /// The model.
    pub model: String,
    /// The stream.
    pub stream: String,
    /// Tokens consumed since the stream was created.
    pub position: u64,
    /// Tokens consumed since the stream's last reset.
    pub sequence_position: u64,
    /// Tokens that trained the weights.
    pub symbols_learned: u64,
    /// Mean loss in bits over every token the stream consumed (null before the first).
    pub mean_loss_bits: Option<f64>,
    /// Moving average of the loss in bits over about the last 100 tokens (null before the first).
    pub loss_bits_avg: Option<f64>,
    /// Times its learner state was reset after a non-finite value.
    pub learner_resets: u64,
    /// Tokens queued for the stream.
    pub queued_tokens: usize,
    /// Seconds since the stream last consumed a token or was created (0 when evicted).
    pub idle_seconds: f64,
    /// Whether its state is in memory (false: evicted to disk, loaded back on its next request).
    pub resident: bool,
}

/// Whether a model can serve yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Its worker is allocating the weights and stream slots; requests queue meanwhile.
    Loading,
    /// Serving.
    Ready,
    /// Its write-ahead log failed: it refuses every change and is not checkpointed until the
    /// server restarts (reads still work).
    Failed,
}

/// Live statistics of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStats {
    /// Tokens consumed by its streams.
    pub symbols_seen: u64,
    /// Tokens that trained the weights.
    pub symbols_learned: u64,
    /// Tokens evaluated by `/predict`.
    pub symbols_predicted: u64,
    /// Optimizer updates applied.
    pub optimizer_updates: u64,
    /// Updates refused because the gradient was not finite.
    pub nonfinite_updates: u64,
    /// Streams whose learner state was reset after a non-finite value.
    pub stream_faults: u64,
    /// Moving average of the loss in bits (about 100 tokens; null before the first).
    pub loss_bits_avg: Option<f64>,
    /// Moving average of the top-1 accuracy (null before the first token).
    pub top1_accuracy_avg: Option<f64>,
    /// Streams held (resident and evicted).
    pub streams: usize,
    /// Streams whose state is in memory.
    pub resident_streams: usize,
    /// Tokens queued, waiting to be stepped.
    pub queued_tokens: usize,
}

/// A model's description: its definition, state and live statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The model's name.
    pub name: String,
    /// Loading or ready.
    pub state: ModelState,
    /// The resolved definition.
    pub config: ModelDefinition,
    /// Live statistics.
    pub stats: ModelStats,
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// The stable 64-bit FNV-1a hash of a stream name: with the index of the stream's open among the
/// model's opens, the label of its random-sign key, so that signs depend on the stream's name,
/// open and position, never on its slot.
pub fn stream_label(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

const STOP_NONE: u8 = 0;
/// Finish every queued job, then exit.
const STOP_DRAIN: u8 = 1;
/// Fail every queued job, then exit (the model was deleted).
const STOP_ABORT: u8 = 2;

/// Extra channel room for control messages beyond the admitted token requests.
const CONTROL_HEADROOM: usize = 64;

/// State a model's worker shares with the engine front.
#[derive(Debug)]
struct Shared {
    name: String,
    pending_requests: AtomicUsize,
    pending_tokens: AtomicUsize,
    /// Requests and tokens queued per stream (admitted, not yet answered); a stream leaves the
    /// map when its last request is answered.
    stream_shares: Mutex<HashMap<String, StreamShare>>,
    held: AtomicBool,
    stop: AtomicU8,
    ready: AtomicBool,
    stats: Mutex<ModelStats>,
    /// Sequence number of the model's next logged operation (what a checkpoint would cover).
    next_seq: AtomicU64,
    /// Why the model's write-ahead log failed, once it has: from then on the model refuses
    /// every change and is never checkpointed, because its memory may hold steps the log lacks
    /// (their requests were answered with a storage failure). A restart recovers it from the
    /// disk, which holds exactly what was acknowledged.
    storage_failure: OnceLock<String>,
}

impl Shared {
    /// The error for a change refused because the model's log failed.
    fn storage_failed(&self) -> Option<EngineError> {
        self.storage_failure.get().map(|reason| {
            EngineError::Storage(format!(
                "model `{}` stopped accepting changes after a write to its storage failed ({reason}); \
                 restart the server once the disk is writable",
                self.name
            ))
        })
    }
}

/// An admitted token request's share of its model's queue, released when the job is dropped
/// (answered, failed, or lost with a stopped worker), whatever the path.
#[derive(Debug)]
struct Ticket {
    shared: Arc<Shared>,
    tokens: usize,
    /// The stream whose share holds the request (`None` until admission books it there).
    stream: Option<String>,
}

/// A stream's part of its model's queue.
#[derive(Debug, Clone, Copy, Default)]
struct StreamShare {
    requests: usize,
    tokens: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.pending_requests.fetch_sub(1, Ordering::AcqRel);
        self.shared.pending_tokens.fetch_sub(self.tokens, Ordering::AcqRel);
        if let Some(stream) = self.stream.take() {
            let mut shares = self.shared.stream_shares.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(share) = shares.get_mut(&stream) {
                share.requests -= 1;
                share.tokens -= self.tokens;
                if share.requests == 0 {
                    shares.remove(&stream);
                }
            }
        }
    }
}

/// What the front sends a model's worker.
#[derive(Debug)]
enum Command {
    Tokens {
        stream: String,
        job: TokenJob,
    },
    StreamInfo {
        stream: String,
        reply: oneshot::Sender<Result<StreamInfo, EngineError>>,
    },
    DeleteStream {
        stream: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    ListStreams {
        reply: oneshot::Sender<Result<Vec<StreamInfo>, EngineError>>,
    },
    /// Take a snapshot; with `rotate`, also start a new log segment after it (a checkpoint).
    Snapshot {
        /// With `rotate`, sent once the log holds everything in the snapshot (or its error).
        reply: oneshot::Sender<Result<Box<ModelSnapshot>, String>>,
        rotate: bool,
    },
    /// Re-check the hold and stop flags.
    Wake,
}

/// A token request in a worker's queues.
#[derive(Debug)]
struct TokenJob {
    input: TokenInput,
    mode: Mode,
    reply: oneshot::Sender<Result<TokensReply, EngineError>>,
    ticket: Ticket,
}

impl TokenJob {
    /// Releases the job's share of the queue, then replies, so that a client holding its reply
    /// can queue again at once.
    fn answer(self, result: Result<TokensReply, EngineError>) {
        let TokenJob { reply, ticket, .. } = self;
        drop(ticket);
        let _ = reply.send(result);
    }
}

struct ModelHandle {
    definition: ModelDefinition,
    spec: ModelSpec,
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Option<Box<ModelSnapshot>>>>>,
    /// Serializes the model's checkpoint writes; holds the sequence number of the last one.
    checkpoint: tokio::sync::Mutex<u64>,
}

impl ModelHandle {
    fn send(&self, command: Command) -> Result<(), EngineError> {
        self.tx.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::QueueFull(self.definition.name.clone()),
            TrySendError::Disconnected(_) => EngineError::UnknownModel(self.definition.name.clone()),
        })
    }

    fn info(&self) -> ModelInfo {
        let stats = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let state = if self.shared.storage_failure.get().is_some() {
            ModelState::Failed
        } else if self.shared.ready.load(Ordering::Acquire) {
            ModelState::Ready
        } else {
            ModelState::Loading
        };
        ModelInfo { name: self.definition.name.clone(), state, config: self.definition.clone(), stats }
    }

    fn stop(&self, how: u8) {
        self.shared.stop.store(how, Ordering::Release);
        // A full channel means the worker is draining it and will see the flag anyway.
        let _ = self.tx.try_send(Command::Wake);
    }
}

/// A reply the worker will send; await it with [`PendingReply::wait`].
#[derive(Debug)]
pub struct PendingReply<T> {
    model: String,
    rx: oneshot::Receiver<Result<T, EngineError>>,
}

impl<T> PendingReply<T> {
    /// Waits for the worker's answer.
    pub async fn wait(self) -> Result<T, EngineError> {
        self.rx.await.unwrap_or_else(|_| Err(EngineError::WorkerStopped(self.model)))
    }
}

/// While alive, the model's worker queues requests but does not step (see [`Engine::hold`]).
pub struct HoldGuard {
    handle: Arc<ModelHandle>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.handle.shared.held.store(false, Ordering::Release);
        let _ = self.handle.tx.try_send(Command::Wake);
    }
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointInfo {
    /// The model.
    pub model: String,
    /// The file.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Sequence number of the first log record it does not contain.
    pub next_seq: u64,
    /// Resident streams saved in it.
    pub streams: usize,
    /// Seconds it took (snapshot, write, sync, pruning).
    pub seconds: f64,
}

/// All models of the server.
pub struct Engine {
    limits: EngineLimits,
    metrics: EngineMetrics,
    models: RwLock<BTreeMap<String, Arc<ModelHandle>>>,
    accepting: AtomicBool,
    durability: Option<Durability>,
    /// Held by every create and delete of a model, through the move of a deleted model's
    /// directory: a create can then never meet the directory of a model being deleted, nor
    /// lose its own to that move.
    lifecycle: Arc<tokio::sync::Mutex<()>>,
    evicted_bytes: Arc<EvictedBytes>,
}

impl Engine {
    /// An engine without models and without a data directory (nothing survives the process),
    /// whose metrics go to `metrics`.
    pub fn new(limits: EngineLimits, metrics: EngineMetrics) -> Self {
        let evicted_bytes = Arc::new(EvictedBytes::new(limits.max_evicted_bytes));
        Self {
            limits,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            accepting: AtomicBool::new(true),
            durability: None,
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
            evicted_bytes,
        }
    }

    /// An engine that keeps its models under `durability.data_dir` (call [`Engine::restore`]
    /// before serving to load what is there).
    pub fn with_durability(limits: EngineLimits, metrics: EngineMetrics, durability: Durability) -> Self {
        Self { durability: Some(durability), ..Self::new(limits, metrics) }
    }

    /// The durability settings, if the engine has a data directory.
    pub fn durability(&self) -> Option<&Durability> {
        self.durability.as_ref()
    }

    /// The disk the evicted streams of all models take, as estimated, against its budget.
    pub fn evicted_bytes(&self) -> &EvictedBytes {
        &self.evicted_bytes
    }

    /// The engine's limits.
    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// The definition every field of a [`ModelRequest`] falls back to.
    pub fn default_definition(&self, name: &str) -> ModelDefinition {
        ModelDefinition::with_defaults(name, self.limits.default_max_streams)
    }

    fn handle(&self, model: &str) -> Result<Arc<ModelHandle>, EngineError> {
        if !valid_name(model) {
            return Err(EngineError::InvalidName { what: "model", name: model.to_owned() });
        }
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models.get(model).cloned().ok_or_else(|| EngineError::UnknownModel(model.to_owned()))
    }

    /// Validates a definition and returns its checked spec.
    pub fn check_definition(&self, def: &ModelDefinition) -> Result<ModelSpec, EngineError> {
        if !valid_name(&def.name) {
            return Err(EngineError::InvalidName { what: "model", name: def.name.clone() });
        }
        let spec = def.model_config().check().map_err(|e| EngineError::invalid_config(e.field, e.reason))?;
        if !(1..=MAX_STREAMS_PER_MODEL).contains(&def.max_streams) {
            return Err(EngineError::invalid_config(
                "max_streams",
                format!("must be in 1..={MAX_STREAMS_PER_MODEL}"),
            ));
        }
        let bytes = estimate_model_bytes(&spec, def.max_streams + 1);
        if bytes > u128::from(self.limits.max_model_bytes) {
            return Err(EngineError::invalid_config(
                "max_streams",
                format!(
                    "the model would hold about {} MiB (weights, optimizer and {} stream slots); \
                     the server's limit is {} MiB: lower hidden or max_streams",
                    bytes >> 20,
                    def.max_streams,
                    self.limits.max_model_bytes >> 20
                ),
            ));
        }
        Ok(spec)
    }

    /// Refuses a model whose estimated memory would take all models past the budget (checked
    /// under the lifecycle lock, so that racing creates cannot overshoot it together).
    fn check_memory_budget(&self, def: &ModelDefinition, spec: &ModelSpec) -> Result<(), EngineError> {
        let estimate = |spec: &ModelSpec, streams: usize| estimate_model_bytes(spec, streams + 1);
        let used: u128 = {
            let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
            models.values().map(|h| estimate(&h.spec, h.definition.max_streams)).sum()
        };
        let requested = estimate(spec, def.max_streams);
        let budget = u128::from(self.limits.max_total_model_bytes);
        if used + requested > budget {
            let mib = |b: u128| u64::try_from(b >> 20).unwrap_or(u64::MAX);
            return Err(EngineError::MemoryBudget {
                model: def.name.clone(),
                requested: mib(requested),
                used: mib(used),
                budget: mib(budget),
            });
        }
        Ok(())
    }

    /// Creates a model and starts its worker; returns once the worker has allocated it (and,
    /// with a data directory, written its first checkpoint).
    pub async fn create_model(&self, def: ModelDefinition) -> Result<ModelInfo, EngineError> {
        let spec = self.check_definition(&def)?;
        let _lifecycle = self.lifecycle.lock().await;
        self.check_memory_budget(&def, &spec)?;
        if let Some(d) = &self.durability {
            let dir = d.model_dir(&def.name);
            let taken = tokio::task::spawn_blocking(move || checkpoint::list(&dir).map(|l| !l.is_empty()))
                .await
                .unwrap_or(Ok(false));
            if matches!(taken, Ok(true)) && self.handle(&def.name).is_err() {
                return Err(EngineError::Storage(format!(
                    "the data directory holds checkpoints of a model `{}` that is not loaded",
                    def.name
                )));
            }
        }
        self.spawn_model(def, spec, worker::Start::Fresh).await
    }

    /// Loads every model found in the data directory: the newest valid checkpoint of each, then
    /// its log. Returns the names loaded. Models that cannot be loaded are reported and skipped.
    pub async fn restore(&self) -> Result<Vec<String>, EngineError> {
        let Some(d) = &self.durability else { return Ok(Vec::new()) };
        let models_dir = d.models_dir();
        std::fs::create_dir_all(&models_dir)
            .map_err(|e| EngineError::Storage(format!("{}: {e}", models_dir.display())))?;
        let mut names: Vec<String> = std::fs::read_dir(&models_dir)
            .map_err(|e| EngineError::Storage(format!("{}: {e}", models_dir.display())))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| valid_name(name))
            .collect();
        names.sort();
        let mut loaded = Vec::new();
        for name in names {
            let dir = d.model_dir(&name);
            let found = tokio::task::spawn_blocking(move || checkpoint::load_latest(&dir))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let found = match found {
                Ok(found) => found,
                Err(reason) => {
                    tracing::error!(model = %name, %reason, "cannot read the model's checkpoints: skipped");
                    self.metrics.model_not_restored(&name);
                    continue;
                }
            };
            let checkpoint::Latest { best, rejected } = found;
            for reason in &rejected {
                tracing::error!(model = %name, %reason, "checkpoint rejected");
            }
            let Some((snapshot, path)) = best else {
                tracing::warn!(model = %name, "no valid checkpoint: the directory is ignored");
                continue;
            };
            if snapshot.definition.name != name {
                tracing::error!(model = %name, "the checkpoint belongs to another model: ignored");
                continue;
            }
            tracing::info!(model = %name, checkpoint = %path.display(), "restoring");
            let def = snapshot.definition.clone();
            let checkpoint_seq = snapshot.next_seq;
            // One model that cannot be loaded (its log does not fit its checkpoint, it exceeds
            // a lowered size limit, ...) must not keep the others from serving. Its directory
            // stays as it is, and a new model cannot take its name until it is dealt with.
            let spawned = match self.check_definition(&def) {
                Ok(spec) => self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot))).await,
                Err(e) => Err(e),
            };
            match spawned {
                Ok(_) => {
                    // Its age is the checkpoint's, not the boot's: the replayed log is not in it.
                    if let Ok(written) = std::fs::metadata(&path).and_then(|m| m.modified()) {
                        self.metrics.checkpoint_written_at(&name, written);
                    }
                    // A checkpoint of the replayed log at once: without it every crash adds its
                    // log to the next boot's replay, and boots grow slower and slower.
                    let replayed = self.handle(&name).map(|h| h.shared.next_seq.load(Ordering::Acquire));
                    if replayed.is_ok_and(|seq| seq > checkpoint_seq) {
                        match self.checkpoint(&name).await {
                            Ok(info) => {
                                tracing::info!(model = %name, next_seq = info.next_seq, "checkpoint after replay")
                            }
                            Err(error) => {
                                tracing::warn!(model = %name, %error, "no checkpoint after replay: the next boot replays again")
                            }
                        }
                    }
                    loaded.push(name);
                }
                Err(error) => {
                    tracing::error!(model = %name, %error, "model cannot be restored: skipped");
                    self.metrics.model_not_restored(&name);
                }
            }
        }
        Ok(loaded)
    }

    async fn spawn_model(
        &self,
        def: ModelDefinition,
        spec: ModelSpec,
        start: worker::Start,
    ) -> Result<ModelInfo, EngineError> {
        let name = def.name.clone();
        let (tx, rx) = sync_channel(self.limits.queue_requests + CONTROL_HEADROOM);
        let shared = Arc::new(Shared {
            name: name.clone(),
            pending_requests: AtomicUsize::new(0),
            pending_tokens: AtomicUsize::new(0),
            stream_shares: Mutex::new(HashMap::new()),
            held: AtomicBool::new(false),
            stop: AtomicU8::new(STOP_NONE),
            ready: AtomicBool::new(false),
            stats: Mutex::new(ModelStats::default()),
            next_seq: AtomicU64::new(0),
            storage_failure: OnceLock::new(),
        });
        // The last checkpoint: the one restored, or the one a new model writes first (at seq 0).
        let checkpointed = match &start {
            worker::Start::Restore(s) => s.next_seq,
            worker::Start::Fresh => 0,
        };
        let handle = Arc::new(ModelHandle {
            definition: def.clone(),
            spec: spec.clone(),
            tx,
            shared: shared.clone(),
            thread: Mutex::new(None),
            checkpoint: tokio::sync::Mutex::new(checkpointed),
        });
        {
            let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
            if !self.accepting.load(Ordering::Acquire) {
                return Err(EngineError::ShuttingDown);
            }
            if models.contains_key(&name) {
                return Err(EngineError::DuplicateModel(name));
            }
            if models.len() >= self.limits.max_models {
                return Err(EngineError::ModelLimit(self.limits.max_models));
            }
            models.insert(name.clone(), handle.clone());
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let metrics = self.metrics.for_model(&name);
        let init = worker::WorkerInit {
            definition: def,
            spec,
            shared,
            metrics,
            durable: self.durability.as_ref().map(|d| worker::DurableConfig {
                dir: d.model_dir(&name),
                fsync: d.fsync,
                idle_ttl: d.stream_idle_ttl,
                keep: d.checkpoint_keep,
            }),
            max_stored_streams: self.limits.max_stored_streams,
            evicted_bytes: self.evicted_bytes.clone(),
            threads: self.limits.model_threads,
            start,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || worker::run(init, rx, ready_tx));
        let outcome = match spawned {
            Ok(thread) => {
                *handle.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
                ready_rx.await.unwrap_or_else(|_| Err("the worker stopped while loading".to_owned()))
            }
            Err(e) => Err(format!("cannot start the worker thread: {e}")),
        };
        match outcome {
            Ok(()) => {
                if self.durability.is_some() {
                    self.metrics.checkpoint_succeeded(&name, 0.0, 0);
                }
                self.metrics.model_serving(&name);
                tracing::info!(model = %name, "model ready");
                Ok(handle.info())
            }
            Err(reason) => {
                let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
                if models.get(&name).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                    models.remove(&name);
                    self.metrics.remove_model(&name);
                }
                drop(models);
                tracing::error!(model = %name, %reason, "model failed to load");
                Err(EngineError::Storage(format!("model `{name}` failed to load: {reason}")))
            }
        }
    }

    /// Every model, by name.
    pub fn models(&self) -> Vec<ModelInfo> {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models.values().map(|h| h.info()).collect()
    }

    /// One model's description.
    pub fn model(&self, model: &str) -> Result<ModelInfo, EngineError> {
        Ok(self.handle(model)?.info())
    }

    /// A model's resolved definition.
    pub fn definition(&self, model: &str) -> Result<ModelDefinition, EngineError> {
        Ok(self.handle(model)?.definition.clone())
    }

    /// Whether every model's worker has loaded.
    pub fn all_ready(&self) -> bool {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models.values().all(|h| h.shared.ready.load(Ordering::Acquire))
    }

    /// The models whose write-ahead log failed, with the reason (see [`ModelState::Failed`]).
    pub fn failed_models(&self) -> Vec<(String, String)> {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models
            .values()
            .filter_map(|h| h.shared.storage_failure.get().map(|r| (h.definition.name.clone(), r.clone())))
            .collect()
    }

    /// Whether `handle` is still the model registered under its name (not deleted, perhaps
    /// replaced by a new model of the same name).
    fn is_registered(&self, handle: &Arc<ModelHandle>) -> bool {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models.get(&handle.definition.name).is_some_and(|h| Arc::ptr_eq(h, handle))
    }

    /// Deletes a model: its queued requests fail with [`EngineError::UnknownModel`] and its worker
    /// exits (in the background). Waits for a checkpoint of it in progress to finish first.
    pub async fn delete_model(&self, model: &str) -> Result<(), EngineError> {
        let lifecycle = self.lifecycle.clone().lock_owned().await;
        let handle = self.handle(model)?;
        let removed = {
            let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
            match models.get(model) {
                Some(h) if Arc::ptr_eq(h, &handle) => models.remove(model),
                _ => None,
            }
        };
        if removed.is_none() {
            return Err(EngineError::UnknownModel(model.to_owned()));
        }
        handle.stop(STOP_ABORT);
        // Finished in a task of its own: a caller that gives up waiting (a request timeout, a
        // client gone) must not leave the directory in place, to come back at the next boot.
        let (metrics, durability, model) = (self.metrics.clone(), self.durability.clone(), model.to_owned());
        let finish = tokio::spawn(async move {
            let _lifecycle = lifecycle;
            // A checkpoint of this model that is being written finishes before its directory is
            // renamed (and before its metrics go, which it would bring back), and one that
            // starts later finds the model gone: no checkpoint of it can land in the directory
            // of a new model of the same name.
            let _checkpoints = handle.checkpoint.lock().await;
            metrics.remove_model(&model);
            if let Some(d) = &durability {
                // Renamed out of the way at once (a model of the same name may be created next),
                // removed in the background once the worker has let go of it.
                let dir = d.model_dir(&model);
                let grave = d.models_dir().join(format!(".deleted-{model}-{}", unique_suffix()));
                if let Err(e) = std::fs::rename(&dir, &grave) {
                    // The model is gone from memory but not from disk: the next boot would bring
                    // it back, so the client must not hear that it is deleted.
                    tracing::error!(model, error = %e, "cannot remove the model's directory");
                    return Err(EngineError::Storage(format!(
                        "model `{model}` stopped, but its directory could not be moved away ({e}); \
                         it will be loaded again at the next start"
                    )));
                } else {
                    let thread = handle.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
                    std::thread::spawn(move || {
                        if let Some(t) = thread {
                            let _ = t.join();
                        }
                        let _ = std::fs::remove_dir_all(&grave);
                    });
                }
            }
            tracing::info!(model, "model deleted");
            Ok(())
        });
        finish.await.map_err(|e| EngineError::Storage(format!("deleting the model failed: {e}")))?
    }

    /// Validates and queues a token request; the reply comes when the worker has consumed (or,
    /// in [`Mode::Predict`], evaluated) its last token. Requests to one stream are answered in
    /// the order they were submitted.
    pub fn submit(
        &self,
        model: &str,
        stream: &str,
        mut input: TokenInput,
        mode: Mode,
    ) -> Result<PendingReply<TokensReply>, EngineError> {
        let handle = self.handle(model)?;
        if !valid_name(stream) {
            return Err(EngineError::InvalidName { what: "stream", name: stream.to_owned() });
        }
        if !self.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(failed) = handle.shared.storage_failed() {
            return Err(failed);
        }
        let count = input.tokens.len();
        if count == 0 {
            return Err(EngineError::EmptyInput);
        }
        let limit = self.limits.max_tokens_per_request;
        if count > limit {
            return Err(EngineError::TooManyTokens { count, limit });
        }
        let vocab = handle.spec.vocab;
        if let Some((index, &token)) = input.tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { index, token: i64::from(token), vocab });
        }
        input.top_k = input.top_k.min(vocab);
        let ticket = self.admit(&handle, stream, count)?;
        let (reply, rx) = oneshot::channel();
        let job = TokenJob { input, mode, reply, ticket };
        handle.send(Command::Tokens { stream: stream.to_owned(), job })?;
        Ok(PendingReply { model: model.to_owned(), rx })
    }

    fn admit(&self, handle: &Arc<ModelHandle>, stream: &str, tokens: usize) -> Result<Ticket, EngineError> {
        let shared = &handle.shared;
        // The ticket undoes the increments if admission fails below.
        let mut ticket = Ticket { shared: shared.clone(), tokens, stream: None };
        let requests = shared.pending_requests.fetch_add(1, Ordering::AcqRel) + 1;
        let queued = shared.pending_tokens.fetch_add(tokens, Ordering::AcqRel) + tokens;
        if requests > self.limits.queue_requests || queued > self.limits.queue_tokens {
            return Err(EngineError::QueueFull(shared.name.clone()));
        }
        let mut shares = shared.stream_shares.lock().unwrap_or_else(PoisonError::into_inner);
        let share = shares.get(stream).copied().unwrap_or_default();
        let over = if share.requests + 1 > self.limits.queue_requests_per_stream {
            Some(("requests", self.limits.queue_requests_per_stream))
        } else if share.tokens + tokens > self.limits.queue_tokens_per_stream {
            Some(("tokens", self.limits.queue_tokens_per_stream))
        } else {
            None
        };
        if let Some((unit, limit)) = over {
            return Err(EngineError::StreamQueueFull {
                model: shared.name.clone(),
                stream: stream.to_owned(),
                unit,
                limit,
            });
        }
        let booked = StreamShare { requests: share.requests + 1, tokens: share.tokens + tokens };
        match shares.get_mut(stream) {
            Some(share) => *share = booked,
            None => {
                shares.insert(stream.to_owned(), booked);
            }
        }
        ticket.stream = Some(stream.to_owned());
        Ok(ticket)
    }

    /// Convenience: [`Engine::submit`] and wait.
    pub async fn tokens(
        &self,
        model: &str,
        stream: &str,
        input: TokenInput,
        mode: Mode,
    ) -> Result<TokensReply, EngineError> {
        self.submit(model, stream, input, mode)?.wait().await
    }

    /// A stream's statistics (answered between two steps, ahead of queued tokens).
    pub async fn stream_info(&self, model: &str, stream: &str) -> Result<StreamInfo, EngineError> {
        let handle = self.stream_handle(model, stream)?;
        let (reply, rx) = oneshot::channel();
        handle.send(Command::StreamInfo { stream: stream.to_owned(), reply })?;
        PendingReply { model: model.to_owned(), rx }.wait().await
    }

    /// Every stream of a model with its statistics, most tokens consumed first (ties by name);
    /// answered between two steps, ahead of queued tokens.
    pub async fn list_streams(&self, model: &str) -> Result<Vec<StreamInfo>, EngineError> {
        let handle = self.handle(model)?;
        let (reply, rx) = oneshot::channel();
        handle.send(Command::ListStreams { reply })?;
        PendingReply { model: model.to_owned(), rx }.wait().await
    }

    /// Forgets a stream once the requests queued before this call are answered.
    pub async fn delete_stream(&self, model: &str, stream: &str) -> Result<(), EngineError> {
        let handle = self.stream_handle(model, stream)?;
        let (reply, rx) = oneshot::channel();
        handle.send(Command::DeleteStream { stream: stream.to_owned(), reply })?;
        PendingReply { model: model.to_owned(), rx }.wait().await
    }

    fn stream_handle(&self, model: &str, stream: &str) -> Result<Arc<ModelHandle>, EngineError> {
        let handle = self.handle(model)?;
        if !valid_name(stream) {
            return Err(EngineError::InvalidName { what: "stream", name: stream.to_owned() });
        }
        Ok(handle)
    }

    /// A consistent copy of a model, taken by its worker between two steps.
    pub async fn snapshot(&self, model: &str) -> Result<ModelSnapshot, EngineError> {
        let handle = self.handle(model)?;
        let (reply, rx) = oneshot::channel();
        handle.send(Command::Snapshot { reply, rotate: false })?;
        let snapshot = rx.await.map_err(|_| EngineError::WorkerStopped(model.to_owned()))?;
        snapshot.map(|s| *s).map_err(EngineError::Storage)
    }

    /// Writes a checkpoint of a model now (one writer per model: a second call waits for the
    /// first). Taking it changes nothing the model does next.
    pub async fn checkpoint(&self, model: &str) -> Result<CheckpointInfo, EngineError> {
        let d = self.durability.clone().ok_or(EngineError::NotDurable)?;
        let handle = self.handle(model)?;
        let mut last = handle.checkpoint.lock().await;
        if !self.is_registered(&handle) {
            return Err(EngineError::UnknownModel(model.to_owned()));
        }
        if let Some(failed) = handle.shared.storage_failed() {
            return Err(failed);
        }
        let started = std::time::Instant::now();
        let (reply, rx) = oneshot::channel();
        handle.send(Command::Snapshot { reply, rotate: true })?;
        // It arrives once the log holds every step in it (or with the log's error).
        let snapshot = rx.await.map_err(|_| EngineError::WorkerStopped(model.to_owned()))?;
        let snapshot = snapshot.map_err(|_| {
            handle
                .shared
                .storage_failed()
                .unwrap_or_else(|| EngineError::Storage("the write-ahead log failed".into()))
        })?;
        // Its steps are on disk, so writing it would be sound even if the new segment could not
        // be created; a failed model is still never checkpointed, which keeps the rule simple.
        if let Some(failed) = handle.shared.storage_failed() {
            return Err(failed);
        }
        let dir = d.model_dir(model);
        let result = self.write_checkpoint(model, dir, snapshot, d.checkpoint_keep, started).await;
        if let Ok(info) = &result {
            *last = info.next_seq;
        }
        result
    }

    async fn write_checkpoint(
        &self,
        model: &str,
        dir: PathBuf,
        snapshot: Box<ModelSnapshot>,
        keep: usize,
        started: std::time::Instant,
    ) -> Result<CheckpointInfo, EngineError> {
        let (next_seq, streams) = (snapshot.next_seq, snapshot.stream_slots.len());
        let written = tokio::task::spawn_blocking(move || checkpoint::write(&dir, &snapshot, keep))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let seconds = started.elapsed().as_secs_f64();
        match written {
            Ok((path, bytes)) => {
                self.metrics.checkpoint_succeeded(model, seconds, bytes);
                tracing::info!(model, path = %path.display(), bytes, seconds, "checkpoint written");
                Ok(CheckpointInfo {
                    model: model.to_owned(),
                    path: path.display().to_string(),
                    bytes,
                    next_seq,
                    streams,
                    seconds,
                })
            }
            Err(e) => {
                self.metrics.checkpoint_failed(model);
                tracing::error!(model, error = %e, "checkpoint failed");
                Err(EngineError::Storage(e))
            }
        }
    }

    /// Checkpoints every model that changed since its last checkpoint, every
    /// `checkpoint_interval`, until the engine shuts down. Spawn it once.
    pub async fn run_checkpoints(self: Arc<Self>) {
        let Some(every) = self.durability.as_ref().and_then(|d| d.checkpoint_interval) else { return };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if !self.accepting.load(Ordering::Acquire) {
                return;
            }
            let handles: Vec<Arc<ModelHandle>> =
                self.models.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
            for handle in handles {
                if !handle.shared.ready.load(Ordering::Acquire)
                    || handle.shared.storage_failure.get().is_some()
                {
                    continue;
                }
                let last = handle.checkpoint.lock().await;
                // Checked under the lock that deletion takes: a deleted model's metrics must
                // not come back.
                if !self.is_registered(&handle) {
                    continue;
                }
                if *last != handle.shared.next_seq.load(Ordering::Acquire) {
                    drop(last);
                    let _ = self.checkpoint(&handle.definition.name).await;
                } else {
                    // The newest checkpoint still holds all of the model's learning, so an idle
                    // model must not look like one whose checkpoints stopped.
                    self.metrics.checkpoint_current(&handle.definition.name);
                }
            }
        }
    }

    /// Stops a model's stepping until the guard is dropped; requests keep queueing (up to the
    /// queue's bound). For maintenance that needs a quiet model, and for tests that need to
    /// know which tokens share a batch.
    pub fn hold(&self, model: &str) -> Result<HoldGuard, EngineError> {
        let handle = self.handle(model)?;
        handle.shared.held.store(true, Ordering::Release);
        Ok(HoldGuard { handle })
    }

    /// Refuses new work, lets every worker finish its queued requests, waits for them and writes
    /// each model's final checkpoint. Returns what went wrong (a final checkpoint that could not
    /// be written, a model whose storage had failed, a worker that ended abnormally), one line
    /// per model: a stop that leaves work for the next start's replay is not a clean stop.
    pub async fn shutdown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.accepting.store(false, Ordering::Release);
        let handles: Vec<Arc<ModelHandle>> = {
            let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
            models.values().cloned().collect()
        };
        for handle in &handles {
            handle.stop(STOP_DRAIN);
        }
        for handle in handles {
            let thread = handle.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
            let Some(thread) = thread else { continue };
            let name = handle.definition.name.clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(Some(_))) if handle.shared.storage_failure.get().is_some() => {
                    tracing::error!(
                        model = %name,
                        "no final checkpoint: the model's storage failed, so memory may hold steps \
                         that were answered as failed; the next start restores what was acknowledged"
                    );
                    problems.push(format!("model `{name}`: no final checkpoint, its storage had failed"));
                }
                Ok(Ok(Some(snapshot))) => {
                    if let Some(d) = &self.durability {
                        let _last = handle.checkpoint.lock().await;
                        let dir = d.model_dir(&name);
                        let written =
                            self.write_checkpoint(&name, dir, snapshot, d.checkpoint_keep, started).await;
                        if let Err(e) = written {
                            problems.push(format!("model `{name}`: the final checkpoint failed: {e}"));
                        }
                    }
                }
                Ok(Ok(None)) => {}
                _ => {
                    tracing::error!(model = %name, "model worker ended abnormally");
                    problems.push(format!("model `{name}`: its worker ended abnormally"));
                }
            }
        }
        problems
    }
}
