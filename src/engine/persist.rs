//! Durability of the engine's models: restoring them at boot (newest valid checkpoint, then the
//! log, then a checkpoint of what was replayed), checkpoints on demand and periodic, and the
//! stop that writes each model's final checkpoint.

use super::*;

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

impl Engine {
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
                Ok(spec) => {
                    self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot)), false).await
                }
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
        let written = tokio::task::spawn_blocking(move || checkpoint::write(&dir, *snapshot, keep))
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
