//! The engine's Prometheus metrics. Labels are bounded: `model` (at most the server's model
//! limit, removed when a model is deleted) and `mode`; never a stream.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, exponential_buckets,
};

/// Families of the engine's metrics, registered in one registry.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    symbols: IntCounterVec,
    loss_bits: HistogramVec,
    loss_bits_avg: GaugeVec,
    top1_accuracy_avg: GaugeVec,
    optimizer_updates: IntCounterVec,
    gradient_norm: GaugeVec,
    nonfinite_updates: IntCounterVec,
    batch_size: HistogramVec,
    step_duration: HistogramVec,
    queue_depth: IntGaugeVec,
    active_streams: IntGaugeVec,
    wal_fsync_duration: HistogramVec,
    wal_bytes: IntCounterVec,
    wal_failures: IntCounterVec,
    streams_evicted: IntCounterVec,
    streams_loaded: IntCounterVec,
    stream_faults: IntCounterVec,
    checkpoints: IntCounterVec,
    checkpoint_last_success: GaugeVec,
    checkpoint_duration: HistogramVec,
    checkpoint_bytes: IntGaugeVec,
    not_restored: IntGaugeVec,
}

/// How a symbol was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolMode {
    /// Consumed and learned from.
    Learn,
    /// Consumed without learning (`learn: false`).
    Advance,
    /// Evaluated on a copy of a stream (`/predict`).
    Predict,
}

/// The metrics of one model, with the label values bound once.
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    /// Symbols learned from.
    pub learned: IntCounter,
    /// Symbols consumed without learning.
    pub advanced: IntCounter,
    /// Symbols evaluated by `/predict`.
    pub predicted: IntCounter,
    /// Loss of every consumed symbol, in bits.
    pub loss_bits: Histogram,
    /// Moving average of the loss in bits.
    pub loss_bits_avg: Gauge,
    /// Moving average of top-1 accuracy.
    pub top1_accuracy_avg: Gauge,
    /// Optimizer updates applied.
    pub optimizer_updates: IntCounter,
    /// Global gradient norm (before clipping) of the last update.
    pub gradient_norm: Gauge,
    /// Updates refused because the gradient was not finite.
    pub nonfinite_updates: IntCounter,
    /// Streams per batched step.
    pub batch_size: Histogram,
    /// Wall time of one batched step.
    pub step_duration: Histogram,
    /// Tokens queued in the model's worker.
    pub queue_depth: IntGauge,
    /// Streams held by the model.
    pub active_streams: IntGauge,
    /// Wall time of one sync of the write-ahead log.
    pub wal_fsync_duration: Histogram,
    /// Bytes appended to the write-ahead log.
    pub wal_bytes: IntCounter,
    /// Failures of the write-ahead log.
    pub wal_failures: IntCounter,
    /// Streams evicted to disk.
    pub streams_evicted: IntCounter,
    /// Evicted streams loaded back.
    pub streams_loaded: IntCounter,
    /// Streams whose learner was reset after a non-finite value.
    pub stream_faults: IntCounter,
}

impl ModelMetrics {
    /// The counter of a mode.
    pub fn symbols(&self, mode: SymbolMode) -> &IntCounter {
        match mode {
            SymbolMode::Learn => &self.learned,
            SymbolMode::Advance => &self.advanced,
            SymbolMode::Predict => &self.predicted,
        }
    }
}

impl EngineMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let model = &["model"];
        let m = Self {
            symbols: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_symbols_total",
                    "Symbols processed, by model and mode (learn, advance, predict).",
                ),
                &["model", "mode"],
            )?,
            loss_bits: HistogramVec::new(
                HistogramOpts::new("kfrtrl_loss_bits", "Loss of each consumed symbol, in bits.").buckets(
                    vec![0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 24.0],
                ),
                model,
            )?,
            loss_bits_avg: GaugeVec::new(
                Opts::new("kfrtrl_loss_bits_avg", "Moving average (about 100 symbols) of the loss in bits."),
                model,
            )?,
            top1_accuracy_avg: GaugeVec::new(
                Opts::new(
                    "kfrtrl_top1_accuracy_avg",
                    "Moving average (about 100 symbols) of the accuracy of the most likely next token.",
                ),
                model,
            )?,
            optimizer_updates: IntCounterVec::new(
                Opts::new("kfrtrl_optimizer_updates_total", "Optimizer updates applied to the weights."),
                model,
            )?,
            gradient_norm: GaugeVec::new(
                Opts::new(
                    "kfrtrl_gradient_norm",
                    "Global gradient norm (before clipping) of the last update.",
                ),
                model,
            )?,
            nonfinite_updates: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_nonfinite_updates_total",
                    "Updates refused because the gradient estimate was not finite.",
                ),
                model,
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("kfrtrl_batch_size", "Streams stepped together in one batched step.")
                    .buckets(exponential_buckets(1.0, 2.0, 13)?),
                model,
            )?,
            step_duration: HistogramVec::new(
                HistogramOpts::new("kfrtrl_step_duration_seconds", "Wall time of one batched step.")
                    .buckets(exponential_buckets(2.5e-5, 2.0, 18)?),
                model,
            )?,
            queue_depth: IntGaugeVec::new(
                Opts::new("kfrtrl_queue_depth", "Tokens queued in a model's worker, waiting to be stepped."),
                model,
            )?,
            active_streams: IntGaugeVec::new(
                Opts::new("kfrtrl_active_streams", "Streams whose state a model holds in memory."),
                model,
            )?,
            wal_fsync_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kfrtrl_wal_fsync_duration_seconds",
                    "Wall time of one sync of a model's write-ahead log (one group commit).",
                )
                .buckets(exponential_buckets(2.5e-5, 2.0, 18)?),
                model,
            )?,
            wal_bytes: IntCounterVec::new(
                Opts::new("kfrtrl_wal_bytes_total", "Bytes appended to a model's write-ahead log."),
                model,
            )?,
            wal_failures: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_wal_failures_total",
                    "Write-ahead log failures (the model refuses requests until restarted).",
                ),
                model,
            )?,
            streams_evicted: IntCounterVec::new(
                Opts::new("kfrtrl_streams_evicted_total", "Streams whose state was evicted to disk."),
                model,
            )?,
            streams_loaded: IntCounterVec::new(
                Opts::new("kfrtrl_streams_loaded_total", "Evicted streams loaded back into memory."),
                model,
            )?,
            stream_faults: IntCounterVec::new(
                Opts::new(
                    "kfrtrl_stream_faults_total",
                    "Streams whose learner state was reset after a non-finite loss, gradient or factor.",
                ),
                model,
            )?,
            checkpoints: IntCounterVec::new(
                Opts::new("kfrtrl_checkpoints_total", "Checkpoints attempted, by outcome (ok, error)."),
                &["model", "outcome"],
            )?,
            checkpoint_last_success: GaugeVec::new(
                Opts::new(
                    "kfrtrl_checkpoint_last_success_timestamp_seconds",
                    "Unix time at which a model was last known to be fully checkpointed: a checkpoint written, or a periodic check that found nothing new since the last one.",
                ),
                model,
            )?,
            checkpoint_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kfrtrl_checkpoint_duration_seconds",
                    "Wall time of a checkpoint (snapshot, write, sync, pruning).",
                )
                .buckets(exponential_buckets(1e-3, 2.0, 16)?),
                model,
            )?,
            checkpoint_bytes: IntGaugeVec::new(
                Opts::new("kfrtrl_checkpoint_bytes", "Size of a model's last checkpoint."),
                model,
            )?,
            not_restored: IntGaugeVec::new(
                Opts::new(
                    "kfrtrl_model_not_restored",
                    "1 for a model of the data directory that could not be restored at start (skipped; \
                     the log says why).",
                ),
                model,
            )?,
        };
        registry.register(Box::new(m.symbols.clone()))?;
        registry.register(Box::new(m.loss_bits.clone()))?;
        registry.register(Box::new(m.loss_bits_avg.clone()))?;
        registry.register(Box::new(m.top1_accuracy_avg.clone()))?;
        registry.register(Box::new(m.optimizer_updates.clone()))?;
        registry.register(Box::new(m.gradient_norm.clone()))?;
        registry.register(Box::new(m.nonfinite_updates.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        registry.register(Box::new(m.step_duration.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.active_streams.clone()))?;
        registry.register(Box::new(m.wal_fsync_duration.clone()))?;
        registry.register(Box::new(m.wal_bytes.clone()))?;
        registry.register(Box::new(m.wal_failures.clone()))?;
        registry.register(Box::new(m.streams_evicted.clone()))?;
        registry.register(Box::new(m.streams_loaded.clone()))?;
        registry.register(Box::new(m.stream_faults.clone()))?;
        registry.register(Box::new(m.checkpoints.clone()))?;
        registry.register(Box::new(m.checkpoint_last_success.clone()))?;
        registry.register(Box::new(m.checkpoint_duration.clone()))?;
        registry.register(Box::new(m.checkpoint_bytes.clone()))?;
        registry.register(Box::new(m.not_restored.clone()))?;
        Ok(m)
    }

    /// Metrics of one model that no registry exports (for work that must not be counted, such
    /// as replaying the write-ahead log at boot).
    pub fn detached(model: &str) -> ModelMetrics {
        let registry = Registry::new();
        match Self::register(&registry) {
            Ok(metrics) => metrics.for_model(model),
            // Registering into an empty registry only fails on a bug in the metric definitions,
            // which the engine's own registration at start would have hit first.
            Err(e) => unreachable!("metric definitions are invalid: {e}"),
        }
    }

    /// Records a model of the data directory that could not be restored.
    pub fn model_not_restored(&self, model: &str) {
        self.not_restored.with_label_values(&[model]).set(1);
    }

    /// Clears [`EngineMetrics::model_not_restored`] once a model of that name serves.
    pub fn model_serving(&self, model: &str) {
        let _ = self.not_restored.remove_label_values(&[model]);
    }

    /// Records when a restored model's checkpoint was written (it is the newest state on disk).
    pub fn checkpoint_written_at(&self, model: &str, at: std::time::SystemTime) {
        self.checkpoint_last_success.with_label_values(&[model]).set(unix_seconds(at));
    }

    /// The metrics of one model (created at zero on first use).
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        ModelMetrics {
            learned: self.symbols.with_label_values(&[model, "learn"]),
            advanced: self.symbols.with_label_values(&[model, "advance"]),
            predicted: self.symbols.with_label_values(&[model, "predict"]),
            loss_bits: self.loss_bits.with_label_values(&[model]),
            loss_bits_avg: self.loss_bits_avg.with_label_values(&[model]),
            top1_accuracy_avg: self.top1_accuracy_avg.with_label_values(&[model]),
            optimizer_updates: self.optimizer_updates.with_label_values(&[model]),
            gradient_norm: self.gradient_norm.with_label_values(&[model]),
            nonfinite_updates: self.nonfinite_updates.with_label_values(&[model]),
            batch_size: self.batch_size.with_label_values(&[model]),
            step_duration: self.step_duration.with_label_values(&[model]),
            queue_depth: self.queue_depth.with_label_values(&[model]),
            active_streams: self.active_streams.with_label_values(&[model]),
            wal_fsync_duration: self.wal_fsync_duration.with_label_values(&[model]),
            wal_bytes: self.wal_bytes.with_label_values(&[model]),
            wal_failures: self.wal_failures.with_label_values(&[model]),
            streams_evicted: self.streams_evicted.with_label_values(&[model]),
            streams_loaded: self.streams_loaded.with_label_values(&[model]),
            stream_faults: self.stream_faults.with_label_values(&[model]),
        }
    }

    /// Records a successful checkpoint (`bytes` 0: the first one of a new or restored model,
    /// whose size is not known here).
    pub fn checkpoint_succeeded(&self, model: &str, seconds: f64, bytes: u64) {
        self.checkpoint_last_success
            .with_label_values(&[model])
            .set(unix_seconds(std::time::SystemTime::now()));
        if bytes > 0 {
            self.checkpoints.with_label_values(&[model, "ok"]).inc();
            self.checkpoint_duration.with_label_values(&[model]).observe(seconds);
            self.checkpoint_bytes.with_label_values(&[model]).set(bytes as i64);
        }
        let _ = self.checkpoints.with_label_values(&[model, "error"]);
    }

    /// Records that a periodic check found the model's newest checkpoint current (nothing
    /// learned since), so the checkpoint's age stays a measure of learning at risk.
    pub fn checkpoint_current(&self, model: &str) {
        self.checkpoint_last_success
            .with_label_values(&[model])
            .set(unix_seconds(std::time::SystemTime::now()));
    }

    /// Records a failed checkpoint.
    pub fn checkpoint_failed(&self, model: &str) {
        self.checkpoints.with_label_values(&[model, "error"]).inc();
    }

    /// Drops every series of a deleted model, so that labels stay bounded by the live models.
    pub fn remove_model(&self, model: &str) {
        for mode in ["learn", "advance", "predict"] {
            let _ = self.symbols.remove_label_values(&[model, mode]);
        }
        let one = &[model];
        let _ = self.loss_bits.remove_label_values(one);
        let _ = self.loss_bits_avg.remove_label_values(one);
        let _ = self.top1_accuracy_avg.remove_label_values(one);
        let _ = self.optimizer_updates.remove_label_values(one);
        let _ = self.gradient_norm.remove_label_values(one);
        let _ = self.nonfinite_updates.remove_label_values(one);
        let _ = self.batch_size.remove_label_values(one);
        let _ = self.step_duration.remove_label_values(one);
        let _ = self.queue_depth.remove_label_values(one);
        let _ = self.active_streams.remove_label_values(one);
        let _ = self.wal_fsync_duration.remove_label_values(one);
        let _ = self.wal_bytes.remove_label_values(one);
        let _ = self.wal_failures.remove_label_values(one);
        let _ = self.streams_evicted.remove_label_values(one);
        let _ = self.streams_loaded.remove_label_values(one);
        let _ = self.stream_faults.remove_label_values(one);
        for outcome in ["ok", "error"] {
            let _ = self.checkpoints.remove_label_values(&[model, outcome]);
        }
        let _ = self.checkpoint_last_success.remove_label_values(one);
        let _ = self.checkpoint_duration.remove_label_values(one);
        let _ = self.checkpoint_bytes.remove_label_values(one);
    }
}

fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
