//! Creating and deleting models: the checks a new model passes (its definition, the server's
//! memory budget), the start of its worker, and a delete that moves its directory away before
//! the name can be taken again (both under the engine's lifecycle lock).

use super::*;

impl Engine {
    /// Refuses a model whose estimated memory would take all models past the budget (checked
    /// under the lifecycle lock, so that racing creates cannot overshoot it together).
    pub(super) fn check_memory_budget(
        &self,
        def: &ModelDefinition,
        spec: &ModelSpec,
    ) -> Result<(), EngineError> {
        let used: u128 = {
            let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
            models.values().map(|h| h.definition.estimated_bytes(&h.spec)).sum()
        };
        let requested = def.estimated_bytes(spec);
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
        self.spawn_model(def, spec, worker::Start::Fresh, false).await
    }

    /// Registers a model and starts its worker; `frozen`: it refuses changes until thawed.
    pub(super) async fn spawn_model(
        &self,
        def: ModelDefinition,
        spec: ModelSpec,
        start: worker::Start,
        frozen: bool,
    ) -> Result<ModelInfo, EngineError> {
        let name = def.name.clone();
        let (tx, rx) = sync_channel(self.limits.queue_requests + CONTROL_HEADROOM);
        let shared = Arc::new(Shared {
            name: name.clone(),
            pending_requests: AtomicUsize::new(0),
            pending_tokens: AtomicUsize::new(0),
            stream_shares: Mutex::new(HashMap::new()),
            held: AtomicBool::new(false),
            frozen: AtomicBool::new(frozen),
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
                    remove_after_worker(&handle, grave);
                }
            }
            tracing::info!(model, "model deleted");
            Ok(())
        });
        finish.await.map_err(|e| EngineError::Storage(format!("deleting the model failed: {e}")))?
    }
}

/// Removes `dir` in the background once the model's worker thread has exited (it may still hold
/// files there).
pub(super) fn remove_after_worker(handle: &ModelHandle, dir: PathBuf) {
    let thread = handle.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
    std::thread::spawn(move || {
        if let Some(t) = thread {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
