//! A model's worker: the one thread that owns the model's weights, optimizer and stream slots.
//!
//! Its loop drains the command channel into per-stream FIFO queues, then takes one token from
//! every stream with queued work, runs them as one batched [`StreamSet::step`] (one optimizer
//! update for the whole batch), books each token's loss to the request it came from, and answers
//! a request when its last token is consumed. So the tokens of one stream are stepped in arrival
//! order, and requests to one stream queue behind each other.
//!
//! `/predict` requests run on the scratch slot (the last one): when such a request reaches the
//! head of its stream's queue, the stream's slot is copied into the scratch slot, and its tokens
//! ride in the following batches on the copy with `learn = false`, which leaves the weights, the
//! optimizer and the stream's own slot untouched. One predict runs at a time; others wait at the
//! head of their streams' queues.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::f64::consts::LN_2;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use ndarray::{Array2, ArrayView1, linalg::general_mat_mul, s};
use tokio::sync::oneshot;

use super::{
    Command, EngineError, Mode, ModelDefinition, ModelMetrics, ModelSnapshot, ModelStats, Prediction,
    STOP_ABORT, STOP_DRAIN, Shared, StreamInfo, StreamSnapshot, TokenJob, TokensReply, stream_label,
};
use crate::core::rng::derive_key;
use crate::core::{ModelSpec, Optimizer, Params, SlotStep, StreamSet, UpdateOutcome};

/// Weight of the newest token in the moving averages (a time constant of about 100 tokens).
const EMA_WEIGHT: f64 = 0.01;

/// Runs a model's worker on the calling thread until the model is deleted or the engine shuts
/// down. `ready` learns whether the model could be allocated.
pub(super) fn run(
    definition: ModelDefinition,
    spec: ModelSpec,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    metrics: ModelMetrics,
    ready: oneshot::Sender<Result<(), String>>,
) {
    // The core's parallel sections fork inside this pool, off the async runtime's threads.
    let pool = match rayon::ThreadPoolBuilder::new()
        .thread_name({
            let name = definition.name.clone();
            move |i| format!("model-{name}-{i}")
        })
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build the thread pool: {e}")));
            return;
        }
    };
    pool.install(move || {
        let mut worker = Worker::new(definition, spec, shared, metrics);
        worker.shared.ready.store(true, Ordering::Release);
        let _ = ready.send(Ok(()));
        worker.run(rx);
    });
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
    loss_bits_sum: f64,
    losses_bits: Vec<f64>,
}

struct StreamEntry {
    name: String,
    /// Tokens consumed since the stream was created (the slot's position restarts on reset).
    position: u64,
    learned: u64,
    loss_bits_sum: f64,
    loss_bits_avg: Option<f64>,
    queue: VecDeque<Job>,
    queued_tokens: usize,
    last_active: Instant,
}

impl StreamEntry {
    fn new(name: String) -> Self {
        Self {
            name,
            position: 0,
            learned: 0,
            loss_bits_sum: 0.0,
            loss_bits_avg: None,
            queue: VecDeque::new(),
            queued_tokens: 0,
            last_active: Instant::now(),
        }
    }
}

fn ema(avg: &mut Option<f64>, x: f64) {
    *avg = Some(match *avg {
        None => x,
        Some(a) => a + EMA_WEIGHT * (x - a),
    });
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
    /// Free slots, lowest on top.
    free: Vec<usize>,
    /// Slots whose stream has queued jobs.
    busy: BTreeSet<usize>,
    /// The stream whose predict job occupies the scratch slot.
    predict_owner: Option<usize>,
    queued_tokens: usize,
    stats: ModelStats,
    top1_avg: Option<f64>,
    loss_avg: Option<f64>,
    // Step buffers, sized once for the full capacity.
    inputs: Vec<SlotStep>,
    losses: Vec<f64>,
    order: Vec<usize>,
    finished: Vec<(usize, usize)>,
    readout_slots: Vec<usize>,
    h1: Array2<f32>,
    logits: Array2<f32>,
}

impl Worker {
    fn new(definition: ModelDefinition, spec: ModelSpec, shared: Arc<Shared>, metrics: ModelMetrics) -> Self {
        let capacity = definition.max_streams + 1;
        let params = Params::<f32>::init(&spec);
        let optimizer = Optimizer::new(&spec);
        let set = StreamSet::<f32>::new(&spec, capacity);
        let (n, vocab) = (spec.n, spec.vocab);
        metrics.active_streams.set(0);
        metrics.queue_depth.set(0);
        Self {
            scratch: capacity - 1,
            slots: (0..capacity).map(|_| None).collect(),
            names: HashMap::new(),
            free: (0..capacity - 1).rev().collect(),
            busy: BTreeSet::new(),
            predict_owner: None,
            queued_tokens: 0,
            stats: ModelStats::default(),
            top1_avg: None,
            loss_avg: None,
            inputs: Vec::with_capacity(capacity),
            losses: vec![0.0; capacity],
            order: Vec::with_capacity(capacity),
            finished: Vec::with_capacity(capacity),
            readout_slots: Vec::with_capacity(capacity),
            h1: Array2::zeros((capacity, n + 1)),
            logits: Array2::zeros((capacity, vocab)),
            definition,
            spec,
            shared,
            metrics,
            params,
            optimizer,
            set,
        }
    }

    fn run(&mut self, rx: Receiver<Command>) {
        loop {
            let stop = self.shared.stop.load(Ordering::Acquire);
            if stop == STOP_ABORT {
                self.abort(&rx);
                return;
            }
            let held = stop != STOP_DRAIN && self.shared.held.load(Ordering::Acquire);
            if self.busy.is_empty() || held {
                if stop == STOP_DRAIN {
                    match rx.try_recv() {
                        Ok(command) => self.handle(command),
                        Err(_) => return,
                    }
                } else {
                    match rx.recv() {
                        Ok(command) => self.handle(command),
                        Err(_) => return,
                    }
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.busy.is_empty() => return,
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
            self.publish_stats();
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
                Command::Snapshot { .. } | Command::Wake => {}
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Tokens { stream, job } => {
                let slot = match self.names.get(&stream) {
                    Some(&slot) => slot,
                    // A predict changes nothing, so it does not create the stream either.
                    None if job.mode == Mode::Predict => {
                        job.answer(Err(self.unknown_stream(stream)));
                        return;
                    }
                    None => match self.open_stream(stream) {
                        Some(slot) => slot,
                        None => {
                            let limit = self.definition.max_streams;
                            let model = self.definition.name.clone();
                            job.answer(Err(EngineError::StreamLimit { model, limit }));
                            return;
                        }
                    },
                };
                let count = job.input.tokens.len();
                if let Some(entry) = self.slots[slot].as_mut() {
                    entry.queued_tokens += count;
                    entry.queue.push_back(Job::Tokens(ActiveJob {
                        losses_bits: if job.input.return_losses {
                            Vec::with_capacity(count)
                        } else {
                            Vec::new()
                        },
                        job,
                        next: 0,
                        loss_bits_sum: 0.0,
                    }));
                    self.queued_tokens += count;
                    self.busy.insert(slot);
                }
            }
            Command::StreamInfo { stream, reply } => {
                let info = match self.names.get(&stream) {
                    Some(&slot) => Ok(self.stream_info(slot)),
                    None => Err(self.unknown_stream(stream)),
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
                None => {
                    let _ = reply.send(Err(self.unknown_stream(stream)));
                }
            },
            Command::ListStreams { reply } => {
                let mut list: Vec<StreamInfo> =
                    self.names.values().map(|&slot| self.stream_info(slot)).collect();
                list.sort_by(|a, b| b.position.cmp(&a.position).then_with(|| a.stream.cmp(&b.stream)));
                let _ = reply.send(Ok(list));
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Wake => {}
        }
    }

    fn unknown_stream(&self, stream: String) -> EngineError {
        EngineError::UnknownStream { model: self.definition.name.clone(), stream }
    }

    /// Gives a new stream a slot at the start of a sequence, with signs keyed by its name.
    fn open_stream(&mut self, name: String) -> Option<usize> {
        let slot = self.free.pop()?;
        self.set.reset(slot);
        self.set.set_sign_key(slot, derive_key(self.definition.seed, stream_label(&name)));
        self.names.insert(name.clone(), slot);
        self.slots[slot] = Some(StreamEntry::new(name));
        self.metrics.active_streams.set(self.names.len() as i64);
        Some(slot)
    }

    /// Ends a stream (its delete job was answered): it is forgotten, or, if requests queued
    /// after the delete, it starts over as a new stream of the same name in the same slot.
    fn close_stream(&mut self, slot: usize) {
        self.set.reset(slot);
        let Some(entry) = self.slots[slot].as_mut() else { return };
        if entry.queue.is_empty() {
            let name = std::mem::take(&mut entry.name);
            self.slots[slot] = None;
            self.names.remove(&name);
            self.free.push(slot);
            self.busy.remove(&slot);
            self.metrics.active_streams.set(self.names.len() as i64);
        } else {
            let queue = std::mem::take(&mut entry.queue);
            let queued_tokens = entry.queued_tokens;
            *entry =
                StreamEntry { queue, queued_tokens, ..StreamEntry::new(std::mem::take(&mut entry.name)) };
        }
    }

    fn stream_info(&self, slot: usize) -> StreamInfo {
        let entry = self.slots[slot].as_ref();
        let (name, position, learned, sum, avg, queued, idle) = entry.map_or_else(
            || (String::new(), 0, 0, 0.0, None, 0, 0.0),
            |e| {
                (
                    e.name.clone(),
                    e.position,
                    e.learned,
                    e.loss_bits_sum,
                    e.loss_bits_avg,
                    e.queued_tokens,
                    e.last_active.elapsed().as_secs_f64(),
                )
            },
        );
        StreamInfo {
            model: self.definition.name.clone(),
            stream: name,
            position,
            sequence_position: self.set.position(slot),
            symbols_learned: learned,
            mean_loss_bits: (position > 0).then(|| sum / position as f64),
            loss_bits_avg: avg,
            queued_tokens: queued,
            idle_seconds: idle,
        }
    }

    fn snapshot(&self) -> ModelSnapshot {
        let mut stream_slots: Vec<StreamSnapshot> = self
            .names
            .iter()
            .map(|(name, &slot)| StreamSnapshot {
                name: name.clone(),
                slot,
                position: self.slots[slot].as_ref().map_or(0, |e| e.position),
            })
            .collect();
        stream_slots.sort_by_key(|s| s.slot);
        ModelSnapshot {
            definition: self.definition.clone(),
            params: self.params.clone(),
            optimizer: self.optimizer.clone(),
            streams: self.set.clone(),
            stream_slots,
        }
    }

    fn publish_stats(&mut self) {
        self.stats.streams = self.names.len();
        self.stats.queued_tokens = self.queued_tokens;
        self.stats.loss_bits_avg = self.loss_avg;
        self.stats.top1_accuracy_avg = self.top1_avg;
        let mut shared = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
        shared.clone_from(&self.stats);
    }

    /// One batched step: one token from every stream with queued tokens.
    fn step(&mut self) {
        let mut inputs = std::mem::take(&mut self.inputs);
        inputs.clear();
        self.collect_inputs(&mut inputs);
        if !inputs.is_empty() {
            self.step_inputs(&inputs);
        }
        self.inputs = inputs;
    }

    /// Answers the delete jobs at the heads of the queues, starts a predict job on the scratch
    /// slot if it is free, and lists the next token of every stream (sorted by slot).
    fn collect_inputs(&mut self, inputs: &mut Vec<SlotStep>) {
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(self.busy.iter().copied());
        for &slot in &order {
            loop {
                let Some(entry) = self.slots[slot].as_mut() else {
                    self.busy.remove(&slot);
                    break;
                };
                match entry.queue.front() {
                    None => {
                        self.busy.remove(&slot);
                        break;
                    }
                    Some(Job::Delete(_)) => {
                        if let Some(Job::Delete(reply)) = entry.queue.pop_front() {
                            let _ = reply.send(Ok(()));
                        }
                        self.close_stream(slot);
                    }
                    Some(Job::Tokens(active)) if active.job.mode == Mode::Predict => {
                        if self.predict_owner.is_none() {
                            self.set.copy_slot(slot, self.scratch);
                            self.predict_owner = Some(slot);
                        }
                        break;
                    }
                    Some(Job::Tokens(active)) => {
                        let input = &active.job.input;
                        inputs.push(SlotStep {
                            slot,
                            token: input.tokens[active.next],
                            learn: input.learn,
                            reset: input.reset && active.next == 0,
                        });
                        break;
                    }
                }
            }
        }
        self.order = order;
        if let Some(owner) = self.predict_owner
            && let Some(Some(Job::Tokens(active))) = self.slots[owner].as_ref().map(|e| e.queue.front())
        {
            let input = &active.job.input;
            inputs.push(SlotStep {
                slot: self.scratch,
                token: input.tokens[active.next],
                learn: false,
                reset: input.reset && active.next == 0,
            });
        }
    }

    fn step_inputs(&mut self, inputs: &[SlotStep]) {
        let nb = inputs.len();
        self.record_top1(inputs);
        let started = Instant::now();
        let outcome = self.set.step(&mut self.params, &mut self.optimizer, inputs, &mut self.losses[..nb]);
        self.metrics.step_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.batch_size.observe(nb as f64);
        match outcome {
            Ok(report) => match report.update {
                Some(UpdateOutcome::Applied { grad_norm, .. }) => {
                    self.metrics.optimizer_updates.inc();
                    self.metrics.gradient_norm.set(grad_norm);
                    self.stats.optimizer_updates += 1;
                }
                Some(UpdateOutcome::NonFinite) => {
                    self.metrics.nonfinite_updates.inc();
                    self.stats.nonfinite_updates += 1;
                    tracing::warn!(model = %self.definition.name, "non-finite gradient: update skipped");
                }
                None => {}
            },
            Err(e) => {
                // Inputs are validated on admission, so this is a bug; the step changed nothing.
                tracing::error!(model = %self.definition.name, error = %e, "batched step refused");
                for x in inputs {
                    self.fail_head(
                        self.owner_of(x.slot),
                        EngineError::WorkerStopped(self.definition.name.clone()),
                    );
                }
                return;
            }
        }
        self.finished.clear();
        for (i, x) in inputs.iter().enumerate() {
            let bits = self.losses[i] / LN_2;
            self.book(x, bits);
        }
        // Statistics first, so that a client holding its reply sees them include its tokens.
        self.metrics.queue_depth.set(self.queued_tokens as i64);
        self.publish_stats();
        self.answer_finished();
    }

    fn owner_of(&self, slot: usize) -> usize {
        if slot == self.scratch { self.predict_owner.unwrap_or(slot) } else { slot }
    }

    fn fail_head(&mut self, owner: usize, error: EngineError) {
        if owner == self.scratch || Some(owner) == self.predict_owner {
            self.predict_owner = None;
        }
        let Some(entry) = self.slots[owner].as_mut() else { return };
        if let Some(Job::Tokens(active)) = entry.queue.pop_front() {
            let left = active.job.input.tokens.len() - active.next;
            entry.queued_tokens -= left;
            self.queued_tokens -= left;
            active.job.answer(Err(error));
        }
        if entry.queue.is_empty() {
            self.busy.remove(&owner);
        }
    }

    /// Updates the top-1 accuracy average with the current predictions of the scored streams
    /// (one readout GEMM for the batch; predicts and resets are left out).
    fn record_top1(&mut self, inputs: &[SlotStep]) {
        let mut slots = std::mem::take(&mut self.readout_slots);
        slots.clear();
        slots.extend(inputs.iter().filter(|x| x.slot != self.scratch && !x.reset).map(|x| x.slot));
        if !slots.is_empty() {
            self.readout(&slots);
            let mut targets = inputs.iter().filter(|x| x.slot != self.scratch && !x.reset);
            for i in 0..slots.len() {
                let Some(x) = targets.next() else { break };
                let row = self.logits.row(i);
                let best = row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (t, &l)| {
                    if l > best.1 { (t, l) } else { best }
                });
                ema(&mut self.top1_avg, if best.0 == x.token as usize { 1.0 } else { 0.0 });
            }
            if let Some(avg) = self.top1_avg {
                self.metrics.top1_accuracy_avg.set(avg);
            }
        }
        self.readout_slots = slots;
    }

    /// Logits `V [h; 1]` of the given slots into the first rows of `self.logits`.
    fn readout(&mut self, slots: &[usize]) {
        let n = self.spec.n;
        for (i, &slot) in slots.iter().enumerate() {
            let mut row = self.h1.row_mut(i);
            row.slice_mut(s![..n]).assign(&ArrayView1::from(self.set.hidden(slot)));
            row[n] = 1.0;
        }
        let rows = slots.len();
        general_mat_mul(
            1.0,
            &self.h1.slice(s![..rows, ..]),
            &self.params.v.t(),
            0.0,
            &mut self.logits.slice_mut(s![..rows, ..]),
        );
    }

    /// Books one stepped token to its request and stream.
    fn book(&mut self, x: &SlotStep, bits: f64) {
        let owner = self.owner_of(x.slot);
        let predict = x.slot == self.scratch;
        let Some(entry) = self.slots[owner].as_mut() else { return };
        let Some(Job::Tokens(active)) = entry.queue.front_mut() else { return };
        active.loss_bits_sum += bits;
        if active.job.input.return_losses {
            active.losses_bits.push(bits);
        }
        active.next += 1;
        let done = active.next == active.job.input.tokens.len();
        entry.queued_tokens -= 1;
        self.queued_tokens -= 1;
        if predict {
            self.metrics.predicted.inc();
            self.stats.symbols_predicted += 1;
        } else {
            entry.position += 1;
            entry.loss_bits_sum += bits;
            ema(&mut entry.loss_bits_avg, bits);
            entry.last_active = Instant::now();
            self.stats.symbols_seen += 1;
            if x.learn {
                entry.learned += 1;
                self.stats.symbols_learned += 1;
                self.metrics.learned.inc();
            } else {
                self.metrics.advanced.inc();
            }
            self.metrics.loss_bits.observe(bits);
            ema(&mut self.loss_avg, bits);
            if let Some(avg) = self.loss_avg {
                self.metrics.loss_bits_avg.set(avg);
            }
        }
        if done {
            self.finished.push((owner, x.slot));
        }
    }

    /// Replies to every request whose last token was just stepped, with the top-k predictions of
    /// the slot it ran on (one readout GEMM for all of them).
    fn answer_finished(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        let finished = std::mem::take(&mut self.finished);
        let mut slots = std::mem::take(&mut self.readout_slots);
        slots.clear();
        slots.extend(finished.iter().map(|&(_, slot)| slot));
        self.readout(&slots);
        for (i, &(owner, slot)) in finished.iter().enumerate() {
            let predictions = self.top_k(i, self.top_k_of(owner));
            let Some(entry) = self.slots[owner].as_mut() else { continue };
            let Some(Job::Tokens(active)) = entry.queue.pop_front() else { continue };
            if entry.queue.is_empty() {
                self.busy.remove(&owner);
            }
            if slot == self.scratch {
                self.predict_owner = None;
            }
            let consumed = active.job.input.tokens.len();
            let reply = TokensReply {
                model: self.definition.name.clone(),
                stream: entry.name.clone(),
                position: entry.position,
                consumed,
                mean_loss_bits: active.loss_bits_sum / consumed as f64,
                losses_bits: active.job.input.return_losses.then_some(active.losses_bits),
                predictions,
            };
            active.job.answer(Ok(reply));
        }
        self.readout_slots = slots;
        self.finished = finished;
        self.finished.clear();
    }

    fn top_k_of(&self, owner: usize) -> usize {
        match self.slots[owner].as_ref().and_then(|e| e.queue.front()) {
            Some(Job::Tokens(active)) => active.job.input.top_k,
            _ => 0,
        }
    }

    /// The `k` most likely tokens of logits row `row` with their softmax probabilities, most
    /// likely first (ties by token).
    fn top_k(&self, row: usize, k: usize) -> Vec<Prediction> {
        if k == 0 {
            return Vec::new();
        }
        let logits = self.logits.row(row);
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let mut tokens: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(tokens.len());
        if k < tokens.len() {
            tokens.select_nth_unstable_by(k - 1, by_logit);
            tokens.truncate(k);
        }
        tokens.sort_unstable_by(by_logit);
        let byte_level = self.definition.byte_level();
        tokens
            .into_iter()
            .map(|token| Prediction {
                token,
                prob: f64::from(logits[token as usize] - max).exp() / sum,
                text: (byte_level && (0x20..0x7f).contains(&token))
                    .then(|| char::from(token as u8).to_string()),
            })
            .collect()
    }
}
