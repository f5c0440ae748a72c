//! A model's worker: the one thread that owns the model's weights, optimizer and stream slots.
//!
//! Its loop drains the command channel into per-stream FIFO queues, then takes one token from
//! every stream with queued work, runs them as one batched step (one optimizer update for the
//! whole batch), books each token's loss to the request it came from, and answers a request when
//! its last token is consumed. So the tokens of one stream are stepped in arrival order, and
//! requests to one stream queue behind each other. The step runs in two halves
//! ([`StreamSet::step_states`], then [`StreamSet::advance_learner`]): the replies leave between
//! them, as soon as the new predictions are known, while the learner's update still runs.
//!
//! `/predict` requests run on the scratch slot (the last one): when such a request reaches the
//! head of its stream's queue, the stream's slot is copied into the scratch slot, and its tokens
//! ride in the following batches on the copy with `learn = false`, which leaves the weights, the
//! optimizer and the stream's own slot untouched. One predict runs at a time; others wait at the
//! head of their streams' queues.
//!
//! Durability: every operation that changes the model (a stream opened, closed, copied,
//! evicted, loaded or forgotten; a batched step) goes through one `apply_*` method that both
//! performs it and appends it to the write-ahead log; replay at boot calls the same methods, so
//! the recovered model is bit-identical. Replies travel through the log's writer thread and are
//! sent only once the records they depend on are written (and synced, per the policy).
//!
//! Stream lifecycle: a stream idle for longer than the TTL, or the least recently used idle one
//! when a new stream needs a slot, is evicted: its state goes to a file and its slot is freed;
//! its next request loads it back, so eviction loses nothing.

mod durable;
mod replies;
mod slots;
mod step;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::f64::consts::LN_2;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView1, linalg::general_mat_mul, s};
use tokio::sync::oneshot;

use super::checkpoint::{self, EvictedStream, ModelSnapshot, StreamMeta, StreamSnapshot};
use super::wal::{self, Completion, Event, FsyncPolicy, RecordBuf, WalObserver, WalWriter};
use super::{
    Command, EngineError, EngineMetrics, Mode, ModelDefinition, ModelMetrics, ModelStats, Prediction,
    STOP_ABORT, STOP_DRAIN, Shared, StreamInfo, TokenJob, TokensReply, stream_label,
};
use crate::core::rng::derive_key;
use crate::core::{ModelSpec, Optimizer, Params, SlotStep, StreamSet, UpdateOutcome};

/// Weight of the newest token in the moving averages (a time constant of about 100 tokens).
const EMA_WEIGHT: f64 = 0.01;

/// How often an idle worker looks for streams past their TTL.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Where a model's durable state lives and how it is kept.
#[derive(Debug, Clone)]
pub(super) struct DurableConfig {
    /// The model's directory.
    pub dir: PathBuf,
    /// When the log is synced.
    pub fsync: FsyncPolicy,
    /// Idle streams older than this are evicted to disk.
    pub idle_ttl: Option<Duration>,
    /// Checkpoints kept.
    pub keep: usize,
}

/// How a worker starts.
pub(super) enum Start {
    /// A new model: fresh weights (and, when durable, its first checkpoint).
    Fresh,
    /// A model restored from a checkpoint, then the log past it.
    Restore(Box<ModelSnapshot>),
}

/// Everything a worker is started with.
pub(super) struct WorkerInit {
    pub definition: ModelDefinition,
    pub spec: ModelSpec,
    pub shared: Arc<Shared>,
    pub metrics: ModelMetrics,
    pub durable: Option<DurableConfig>,
    pub max_stored_streams: usize,
    /// The server's ledger of evicted-stream bytes.
    pub evicted_bytes: Arc<super::EvictedBytes>,
    /// Threads of the model's pool (at least 1).
    pub threads: usize,
    pub start: Start,
}

/// Runs a model's worker on the calling thread until the model is deleted or the engine shuts
/// down. `ready` learns whether the model could be allocated (and restored). Returns the model's
/// final snapshot when it stopped by draining (for the shutdown checkpoint).
pub(super) fn run(
    init: WorkerInit,
    rx: Receiver<Command>,
    ready: oneshot::Sender<Result<(), String>>,
) -> Option<Box<ModelSnapshot>> {
    // The core's parallel sections fork inside this pool, off the async runtime's threads.
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(init.threads.max(1))
        .thread_name({
            let name = init.definition.name.clone();
            move |i| format!("model-{name}-{i}")
        })
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build the thread pool: {e}")));
            return None;
        }
    };
    pool.install(move || {
        let mut worker = match Worker::start(init) {
            Ok(worker) => worker,
            Err(e) => {
                let _ = ready.send(Err(e));
                return None;
            }
        };
        worker.shared.ready.store(true, Ordering::Release);
        worker.publish_stats();
        let _ = ready.send(Ok(()));
        let drained = worker.run(rx);
        worker.release_evicted();
        drained.then(|| Box::new(worker.snapshot()))
    })
}

/// A queued piece of work of one stream.
enum Job {
    Tokens(ActiveJob),
    /// Forget the stream once the jobs before this one are done.
    Delete(oneshot::Sender<Result<(), EngineError>>),
}

struct ActiveJob {
    job: TokenJob,
    /// Index of the next token to step.
    next: usize,
    /// Sum and count of the request's finite losses (a stream at fault can score a non-finite one).
    loss_bits_sum: f64,
    scored: usize,
    losses_bits: Vec<Option<f64>>,
    /// Times the stream's learner was reset after a non-finite value during this request.
    learner_resets: u32,
}

struct StreamEntry {
    meta: StreamMeta,
    queue: VecDeque<Job>,
    queued_tokens: usize,
    last_active: Instant,
}

impl StreamEntry {
    fn new(meta: StreamMeta) -> Self {
        Self { meta, queue: VecDeque::new(), queued_tokens: 0, last_active: Instant::now() }
    }
}

fn ema(avg: &mut Option<f64>, x: f64) {
    *avg = Some(match *avg {
        None => x,
        Some(a) => a + EMA_WEIGHT * (x - a),
    });
}

/// The log of a durable model.
struct Durable {
    config: DurableConfig,
    wal: WalWriter,
    records: RecordBuf,
    completions: Vec<Completion>,
    last_sweep: Instant,
}

struct Observer {
    metrics: ModelMetrics,
    shared: Arc<Shared>,
}

impl WalObserver for Observer {
    fn synced(&self, seconds: f64) {
        self.metrics.wal_fsync_duration.observe(seconds);
    }
    fn wrote(&self, bytes: usize) {
        self.metrics.wal_bytes.inc_by(bytes as u64);
    }
    fn failed(&self, error: &str) {
        // Set before the failed batch's replies go out: the worker and the front refuse every
        // later change, and no checkpoint saves the steps the log lacks.
        let _ = self.shared.storage_failure.set(error.to_owned());
        self.metrics.wal_failures.inc();
        tracing::error!(
            model = %self.shared.name,
            error,
            "write-ahead log failed: the model refuses changes and is not checkpointed until restart"
        );
    }
}

struct Worker {
    definition: ModelDefinition,
    spec: ModelSpec,
    shared: Arc<Shared>,
    metrics: ModelMetrics,
    params: Params<f32>,
    optimizer: Optimizer<f32>,
    set: StreamSet<f32>,
    /// The slot `/predict` requests run on.
    scratch: usize,
    slots: Vec<Option<StreamEntry>>,
    names: HashMap<String, usize>,
    /// Free slots, handed out from the end.
    free: Vec<usize>,
    /// Slots whose stream has queued jobs.
    busy: BTreeSet<usize>,
    /// The stream whose predict job occupies the scratch slot.
    predict_owner: Option<usize>,
    queued_tokens: usize,
    stats: ModelStats,
    /// Sequence number of the next logged operation.
    next_seq: u64,
    /// Generation of the next evicted-stream file.
    next_generation: u64,
    /// Streams opened so far: the label of the next open's sign key.
    opened_streams: u64,
    /// Streams whose state is on disk.
    evicted: BTreeMap<String, EvictedStream>,
    max_stored_streams: usize,
    /// The server's ledger of evicted-stream bytes, this model's estimate per stream file, and
    /// what it has accounted there.
    evicted_bytes: Arc<super::EvictedBytes>,
    evicted_file_bytes: u64,
    evicted_accounted: u64,
    /// The model's directory (durable models only; evicted streams live under it).
    dir: Option<PathBuf>,
    durable: Option<Durable>,
    // Step buffers, sized once for the full capacity.
    inputs: Vec<SlotStep>,
    losses: Vec<f64>,
    order: Vec<usize>,
    finished: Vec<(usize, usize)>,
    readout_slots: Vec<usize>,
    h1: Array2<f32>,
    logits: Array2<f32>,
    /// Seconds the pending step's first half took (its second half adds to it).
    step_seconds: f64,
    /// Freezes waiting for the queued jobs to finish.
    barriers: Vec<oneshot::Sender<Result<(), EngineError>>>,
}

impl Worker {
    fn new(init: &WorkerInit) -> Self {
        let (definition, spec) = (init.definition.clone(), init.spec.clone());
        let capacity = definition.max_streams + 1;
        let params = Params::<f32>::init(&spec);
        let optimizer = Optimizer::new(&spec);
        let set = StreamSet::<f32>::new(&spec, capacity);
        let (n, vocab) = (spec.n, spec.vocab);
        init.metrics.active_streams.set(0);
        init.metrics.queue_depth.set(0);
        Self {
            scratch: capacity - 1,
            slots: (0..capacity).map(|_| None).collect(),
            names: HashMap::new(),
            free: (0..capacity - 1).rev().collect(),
            busy: BTreeSet::new(),
            predict_owner: None,
            queued_tokens: 0,
            stats: ModelStats::default(),
            next_seq: 0,
            next_generation: 0,
            opened_streams: 0,
            evicted: BTreeMap::new(),
            max_stored_streams: init.max_stored_streams,
            evicted_bytes: init.evicted_bytes.clone(),
            // The state tensors in f32 and a margin for the file's header.
            evicted_file_bytes: crate::core::SlotStateLayout::of(&spec).bytes(4) as u64 + 4096,
            evicted_accounted: 0,
            dir: None,
            durable: None,
            inputs: Vec::with_capacity(capacity),
            losses: vec![0.0; capacity],
            order: Vec::with_capacity(capacity),
            finished: Vec::with_capacity(capacity),
            readout_slots: Vec::with_capacity(capacity),
            h1: Array2::zeros((capacity, n + 1)),
            logits: Array2::zeros((capacity, vocab)),
            step_seconds: 0.0,
            barriers: Vec::new(),
            definition,
            spec,
            shared: init.shared.clone(),
            metrics: init.metrics.clone(),
            params,
            optimizer,
            set,
        }
    }

    /// Runs until stopped; true when the model drained (shutdown), false when it was deleted.
    fn run(&mut self, rx: Receiver<Command>) -> bool {
        loop {
            let stop = self.shared.stop.load(Ordering::Acquire);
            if stop == STOP_ABORT {
                self.abort(&rx);
                return false;
            }
            if let Some(failed) = self.shared.storage_failed() {
                self.fail_queued(&failed);
            }
            let held = stop != STOP_DRAIN && self.shared.held.load(Ordering::Acquire);
            if self.busy.is_empty() || held {
                self.flush_log();
                if stop == STOP_DRAIN {
                    match rx.try_recv() {
                        Ok(command) => self.handle(command),
                        Err(_) => return true,
                    }
                } else if self.ttl().is_some() {
                    match rx.recv_timeout(SWEEP_EVERY) {
                        Ok(command) => self.handle(command),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return true,
                    }
                } else {
                    match rx.recv() {
                        Ok(command) => self.handle(command),
                        Err(_) => return true,
                    }
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.busy.is_empty() => {
                        self.flush_log();
                        return true;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.metrics.queue_depth.set(self.queued_tokens as i64);
            let held = self.shared.stop.load(Ordering::Acquire) != STOP_DRAIN
                && self.shared.held.load(Ordering::Acquire);
            if !held && !self.busy.is_empty() {
                self.step();
                self.metrics.queue_depth.set(self.queued_tokens as i64);
            }
            self.sweep_idle();
            self.release_barriers();
            self.flush_log();
            self.publish_stats();
        }
    }

    fn ttl(&self) -> Option<Duration> {
        self.durable.as_ref().and_then(|d| d.config.idle_ttl)
    }

    /// Sends a token reply once the log holds what it depends on.
    fn answer(&mut self, job: TokenJob, result: Result<TokensReply, EngineError>) {
        match self.durable.as_mut() {
            Some(d) => d.completions.push(Box::new(move |logged: Result<(), String>| {
                job.answer(logged.map_err(EngineError::Storage).and(result));
            })),
            None => job.answer(result),
        }
    }

    /// Sends a reply that carries no tokens once the log holds what it depends on.
    fn answer_after_log(
        &mut self,
        reply: oneshot::Sender<Result<(), EngineError>>,
        result: Result<(), EngineError>,
    ) {
        match self.durable.as_mut() {
            Some(d) => d.completions.push(Box::new(move |logged: Result<(), String>| {
                let _ = reply.send(logged.map_err(EngineError::Storage).and(result));
            })),
            None => {
                let _ = reply.send(result);
            }
        }
    }

    /// Fails every queued and incoming job: the model was deleted.
    fn abort(&mut self, rx: &Receiver<Command>) {
        let gone = || EngineError::UnknownModel(self.definition.name.clone());
        for entry in self.slots.iter_mut().flatten() {
            for job in entry.queue.drain(..) {
                match job {
                    Job::Tokens(active) => {
                        active.job.answer(Err(gone()));
                    }
                    Job::Delete(reply) => {
                        let _ = reply.send(Err(gone()));
                    }
                }
            }
        }
        while let Ok(command) = rx.try_recv() {
            match command {
                Command::Tokens { job, .. } => {
                    job.answer(Err(gone()));
                }
                Command::StreamInfo { reply, .. } => {
                    let _ = reply.send(Err(gone()));
                }
                Command::DeleteStream { reply, .. } => {
                    let _ = reply.send(Err(gone()));
                }
                Command::ListStreams { reply } => {
                    let _ = reply.send(Err(gone()));
                }
                Command::Export { reply } => {
                    let _ = reply.send(Err(gone()));
                }
                Command::Barrier { reply } => {
                    let _ = reply.send(Err(gone()));
                }
                Command::Snapshot { .. } | Command::Wake => {}
            }
        }
    }

    /// Fails every queued job with `error`, changing nothing (the model's log failed).
    fn fail_queued(&mut self, error: &EngineError) {
        if self.busy.is_empty() {
            return;
        }
        for entry in self.slots.iter_mut().flatten() {
            for job in entry.queue.drain(..) {
                match job {
                    Job::Tokens(active) => active.job.answer(Err(error.clone())),
                    Job::Delete(reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            entry.queued_tokens = 0;
        }
        self.busy.clear();
        self.queued_tokens = 0;
        self.predict_owner = None;
    }

    fn handle(&mut self, command: Command) {
        // After the log failed, nothing may change: what is on disk is what was acknowledged.
        let command = match (self.shared.storage_failed(), command) {
            (Some(failed), Command::Tokens { job, .. }) => return job.answer(Err(failed)),
            (Some(failed), Command::DeleteStream { reply, .. }) => {
                let _ = reply.send(Err(failed));
                return;
            }
            (_, command) => command,
        };
        // Checked here too, not only at admission: a request admitted just before the freeze but
        // handled after its barrier would change the model behind the export's back.
        let frozen = || EngineError::Frozen(self.definition.name.clone());
        let command = match command {
            Command::Tokens { job, .. } if self.shared.frozen.load(Ordering::Acquire) => {
                return job.answer(Err(frozen()));
            }
            Command::DeleteStream { reply, .. } if self.shared.frozen.load(Ordering::Acquire) => {
                let _ = reply.send(Err(frozen()));
                return;
            }
            command => command,
        };
        match command {
            Command::Tokens { stream, job } => {
                // A predict changes nothing, so it does not create the stream either.
                let slot = match self.resident_slot(&stream, job.mode == Mode::Consume) {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.answer(job, Err(e));
                        return;
                    }
                };
                let count = job.input.tokens.len();
                if let Some(entry) = self.slots[slot].as_mut() {
                    entry.queued_tokens += count;
                    entry.last_active = Instant::now();
                    entry.queue.push_back(Job::Tokens(ActiveJob {
                        losses_bits: if job.input.return_losses {
                            Vec::with_capacity(count)
                        } else {
                            Vec::new()
                        },
                        job,
                        next: 0,
                        loss_bits_sum: 0.0,
                        scored: 0,
                        learner_resets: 0,
                    }));
                    self.queued_tokens += count;
                    self.busy.insert(slot);
                }
            }
            Command::StreamInfo { stream, reply } => {
                let info = match (self.names.get(&stream), self.evicted.get(&stream)) {
                    (Some(&slot), _) => Ok(self.stream_info(slot)),
                    (None, Some(evicted)) => Ok(self.evicted_info(&evicted.meta)),
                    (None, None) => Err(self.unknown_stream(stream)),
                };
                let _ = reply.send(info);
            }
            Command::DeleteStream { stream, reply } => match self.names.get(&stream) {
                Some(&slot) => {
                    if let Some(entry) = self.slots[slot].as_mut() {
                        entry.queue.push_back(Job::Delete(reply));
                        self.busy.insert(slot);
                    }
                }
                None if self.evicted.contains_key(&stream) => {
                    self.apply_forget(&stream);
                    self.answer_after_log(reply, Ok(()));
                }
                None => {
                    let _ = reply.send(Err(self.unknown_stream(stream)));
                }
            },
            Command::ListStreams { reply } => {
                let mut list: Vec<StreamInfo> =
                    self.names.values().map(|&slot| self.stream_info(slot)).collect();
                list.extend(self.evicted.values().map(|e| self.evicted_info(&e.meta)));
                list.sort_by(|a, b| b.position.cmp(&a.position).then_with(|| a.stream.cmp(&b.stream)));
                let _ = reply.send(Ok(list));
            }
            Command::Snapshot { reply, rotate } => {
                let snapshot = Box::new(self.snapshot());
                if rotate {
                    self.flush_log();
                    if let Some(d) = &self.durable {
                        // A checkpoint of steps whose records could still fail would save steps
                        // answered as failed: the snapshot leaves once they are on disk.
                        d.wal.rotate(
                            self.next_seq,
                            Box::new(move |logged: Result<(), String>| {
                                let _ = reply.send(logged.map(|()| snapshot));
                            }),
                        );
                        return;
                    }
                }
                let _ = reply.send(Ok(snapshot));
            }
            Command::Export { reply } => {
                let _ = reply.send(self.export().map(Box::new));
            }
            Command::Barrier { reply } => {
                self.barriers.push(reply);
                self.release_barriers();
            }
            Command::Wake => {}
        }
    }

    /// Answers the barriers once no job is queued, after the log holds every step before them.
    fn release_barriers(&mut self) {
        if !self.busy.is_empty() || self.barriers.is_empty() {
            return;
        }
        for reply in std::mem::take(&mut self.barriers) {
            self.answer_after_log(reply, Ok(()));
        }
    }

    /// Sets the model's gauges from its state (after a restore).
    fn publish_gauges(&self) {
        self.metrics.active_streams.set(self.names.len() as i64);
        if let Some(avg) = self.stats.loss_bits_avg {
            self.metrics.loss_bits_avg.set(avg);
        }
        if let Some(avg) = self.stats.top1_accuracy_avg {
            self.metrics.top1_accuracy_avg.set(avg);
        }
    }

    fn publish_stats(&mut self) {
        self.stats.streams = self.names.len() + self.evicted.len();
        self.stats.resident_streams = self.names.len();
        self.stats.queued_tokens = self.queued_tokens;
        let mut shared = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
        shared.clone_from(&self.stats);
    }
}
