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
//! operation since (`wal/`). A checkpoint is a consistent copy the worker takes between two
//! steps ([`Engine::snapshot`]), written by one serialized writer per model: periodically
//! ([`Engine::run_checkpoints`]), on demand ([`Engine::checkpoint`]) and at shutdown. At boot,
//! [`Engine::restore`] loads the newest valid checkpoint of every model and replays its log.
//!
//! Guarantee: a request that was answered is durable (with the default fsync policy `always`,
//! even across a power loss). A request cut off by a crash may have taken effect in part, one
//! token per step: the stream's `position` says exactly how many of its tokens were consumed, so
//! a client can resend the rest.

pub mod checkpoint;
mod checksum;
mod durability;
mod error;
mod lifecycle;
mod limits;
mod metrics;
mod model;
pub mod model_file;
mod persist;
mod transfer;
mod types;
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
pub use error::EngineError;
pub use limits::{EngineLimits, default_memory_budget, stream_share};
pub use metrics::{EngineMetrics, ModelMetrics, SymbolMode};
pub use model::{
    MAX_NAME_LEN, MAX_STREAMS_PER_MODEL, ModelDefinition, ModelRequest, estimate_model_bytes, valid_name,
};
pub use persist::CheckpointInfo;
pub use transfer::{ModelExport, export_tag};
pub use types::{Mode, ModelInfo, ModelState, ModelStats, Prediction, StreamInfo, TokenInput, TokensReply};
pub use wal::FsyncPolicy;

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
    /// Set by [`Engine::freeze`]: every change is refused with [`EngineError::Frozen`].
    frozen: AtomicBool,
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
    /// A snapshot with the states of the evicted streams, read from their files.
    Export {
        reply: oneshot::Sender<Result<Box<transfer::ModelExport>, EngineError>>,
    },
    /// Answered once every job queued before it is done and logged (see [`Engine::freeze`]).
    Barrier {
        reply: oneshot::Sender<Result<(), EngineError>>,
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
        } else if self.shared.frozen.load(Ordering::Acquire) {
            ModelState::Frozen
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
        let bytes = def.estimated_bytes(&spec);
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
        if handle.shared.frozen.load(Ordering::Acquire) {
            return Err(EngineError::Frozen(model.to_owned()));
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
        if handle.shared.frozen.load(Ordering::Acquire) {
            return Err(EngineError::Frozen(model.to_owned()));
        }
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

    /// Stops a model's stepping until the guard is dropped; requests keep queueing (up to the
    /// queue's bound). For maintenance that needs a quiet model, and for tests that need to
    /// know which tokens share a batch.
    pub fn hold(&self, model: &str) -> Result<HoldGuard, EngineError> {
        let handle = self.handle(model)?;
        handle.shared.held.store(true, Ordering::Release);
        Ok(HoldGuard { handle })
    }
}
