//! A durable worker's state on disk: the start (fresh, or a checkpoint and the log past it),
//! snapshots for checkpoints, the write-ahead log, and the replay of its events.

use super::*;

impl Worker {
    /// Builds the worker: fresh, or restored from a checkpoint and the log past it; then, for a
    /// durable model, writes its first checkpoint (fresh) and opens its log.
    pub(super) fn start(init: WorkerInit) -> Result<Self, String> {
        let mut worker = Self::new(&init);
        let fresh = matches!(init.start, Start::Fresh);
        if let Start::Restore(snapshot) = init.start {
            worker.restore(*snapshot)?;
        }
        if let Some(config) = init.durable {
            let dir = &config.dir;
            worker.dir = Some(dir.clone());
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if fresh {
                // Leftovers of an earlier model of this name must not be replayed into this one.
                if let Ok(old) = wal::segments(dir) {
                    for (_, path) in old {
                        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                }
                let _ = std::fs::remove_dir_all(dir.join("streams"));
                checkpoint::write(dir, worker.snapshot(), config.keep)?;
            } else {
                let log =
                    wal::read_from(dir, worker.next_seq).map_err(|e| format!("{}: {e}", dir.display()))?;
                if log.dropped_bytes > 0 {
                    tracing::warn!(
                        model = %worker.definition.name,
                        bytes = log.dropped_bytes,
                        "dropped a torn or damaged tail of the write-ahead log"
                    );
                }
                let events = log.events.len();
                worker.dir = Some(dir.clone());
                // The process's counters count this process's work: the replayed steps were
                // counted by the one that crashed, so they go to metrics nobody scrapes.
                let live =
                    std::mem::replace(&mut worker.metrics, EngineMetrics::detached(&worker.definition.name));
                let replayed = log.events.into_iter().try_for_each(|event| worker.replay(event));
                worker.metrics = live;
                replayed?;
                worker.publish_gauges();
                tracing::info!(model = %worker.definition.name, events, next_seq = worker.next_seq, "log replayed");
            }
            let wal = WalWriter::start(
                dir,
                worker.next_seq,
                config.fsync,
                &worker.definition.name,
                Observer { metrics: worker.metrics.clone(), shared: worker.shared.clone() },
            )
            .map_err(|e| format!("{}: cannot open the write-ahead log: {e}", dir.display()))?;
            worker.durable = Some(Durable {
                config,
                wal,
                records: RecordBuf::default(),
                completions: Vec::new(),
                last_sweep: Instant::now(),
            });
        }
        worker.shared.next_seq.store(worker.next_seq, Ordering::Release);
        worker.account_evicted();
        Ok(worker)
    }

    /// Loads a snapshot into a freshly built worker.
    pub(super) fn restore(&mut self, s: ModelSnapshot) -> Result<(), String> {
        if s.definition != self.definition {
            return Err("the checkpoint's definition differs from the model's".into());
        }
        if s.params.w.dim() != self.params.w.dim() || s.params.v.dim() != self.params.v.dim() {
            return Err("the checkpoint's weights do not match the model's shape".into());
        }
        self.params = s.params;
        self.optimizer = s.optimizer;
        for stream in s.stream_slots {
            let slot = stream.slot;
            if slot >= self.scratch || self.slots[slot].is_some() {
                return Err(format!("stream `{}` has an invalid slot {slot}", stream.meta.name));
            }
            self.set
                .import_slot(slot, &stream.state)
                .map_err(|e| format!("stream `{}`: {e}", stream.meta.name))?;
            self.names.insert(stream.meta.name.clone(), slot);
            self.slots[slot] = Some(StreamEntry::new(stream.meta));
        }
        self.set.import_slot(self.scratch, &s.scratch).map_err(|e| format!("scratch slot: {e}"))?;
        let mut seen = vec![false; self.scratch];
        for &slot in &s.free {
            if slot >= self.scratch || self.slots[slot].is_some() || std::mem::replace(&mut seen[slot], true)
            {
                return Err(format!("the free list holds an invalid slot {slot}"));
            }
        }
        if s.free.len() + self.names.len() != self.scratch {
            return Err("the free list and the streams do not cover the slots".into());
        }
        self.free = s.free;
        self.next_seq = s.next_seq;
        self.next_generation = s.next_generation;
        self.opened_streams = s.opened_streams;
        self.evicted = s.evicted;
        self.stats = s.stats;
        self.metrics.active_streams.set(self.names.len() as i64);
        Ok(())
    }

    /// The snapshot with the states of the evicted streams, read from their files.
    pub(super) fn export(&self) -> Result<super::super::ModelExport, EngineError> {
        let mut evicted_states = Vec::with_capacity(self.evicted.len());
        for (name, evicted) in &self.evicted {
            let dir = self
                .dir
                .as_deref()
                .ok_or_else(|| EngineError::Storage("evicted streams without a data directory".into()))?;
            let (_, state) =
                checkpoint::read_stream(dir, name, evicted.generation).map_err(EngineError::Storage)?;
            evicted_states.push(state);
        }
        Ok(super::super::ModelExport { snapshot: self.snapshot(), evicted_states })
    }

    /// A consistent copy of the model (between two steps).
    pub(super) fn snapshot(&self) -> ModelSnapshot {
        let mut stream_slots: Vec<StreamSnapshot> = self
            .names
            .values()
            .filter_map(|&slot| {
                let entry = self.slots[slot].as_ref()?;
                Some(StreamSnapshot { slot, meta: entry.meta.clone(), state: self.set.export_slot(slot) })
            })
            .collect();
        stream_slots.sort_by_key(|s| s.slot);
        let mut stats = self.stats.clone();
        stats.streams = self.names.len() + self.evicted.len();
        stats.queued_tokens = 0;
        ModelSnapshot {
            definition: self.definition.clone(),
            params: self.params.clone(),
            optimizer: self.optimizer.clone(),
            stream_slots,
            scratch: self.set.export_slot(self.scratch),
            free: self.free.clone(),
            next_seq: self.next_seq,
            next_generation: self.next_generation,
            opened_streams: self.opened_streams,
            evicted: self.evicted.clone(),
            stats,
        }
    }

    /// Hands the records and replies gathered since the last call to the log's writer.
    pub(super) fn flush_log(&mut self) {
        if let Some(d) = self.durable.as_mut()
            && (!d.records.is_empty() || !d.completions.is_empty())
        {
            d.wal.append(d.records.take(), std::mem::take(&mut d.completions));
        }
        self.shared.next_seq.store(self.next_seq, Ordering::Release);
    }

    /// Appends an operation to the log (when durable); every state change goes through here.
    pub(super) fn log(&mut self, event: &Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(d) = self.durable.as_mut() {
            d.records.push_event(seq, event);
        }
    }

    pub(super) fn log_step(&mut self, inputs: &[SlotStep]) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(d) = self.durable.as_mut() {
            d.records.push(seq, |out| wal::encode_step(inputs, out));
        }
    }

    /// Applies one logged operation during replay.
    pub(super) fn replay(&mut self, event: Event) -> Result<(), String> {
        let bad = |what: &str| format!("log record {what} does not fit the model's state");
        match event {
            Event::Open { slot, name } => {
                let slot = slot as usize;
                if slot >= self.scratch || self.slots[slot].is_some() || !self.free.contains(&slot) {
                    return Err(bad("open"));
                }
                self.apply_open(slot, name);
            }
            Event::Close { slot } => {
                let slot = slot as usize;
                if self.slots.get(slot).is_none_or(Option::is_none) || slot >= self.scratch {
                    return Err(bad("close"));
                }
                self.apply_close(slot);
            }
            Event::Copy { src, dst } => {
                if src as usize >= self.slots.len() || dst as usize >= self.slots.len() {
                    return Err(bad("copy"));
                }
                self.apply_copy(src as usize, dst as usize);
            }
            Event::Step(inputs) => {
                let ok = inputs.windows(2).all(|w| w[0].slot < w[1].slot)
                    && inputs.iter().all(|x| {
                        (x.slot == self.scratch || self.slots.get(x.slot).is_some_and(Option::is_some))
                            && (x.token as usize) < self.spec.vocab
                    });
                if !ok {
                    return Err(bad("step"));
                }
                if self.apply_step(&inputs) {
                    self.finish_step(&inputs);
                }
            }
            Event::Evict { slot, generation } => {
                let slot = slot as usize;
                if slot >= self.scratch || self.slots[slot].is_none() || generation != self.next_generation {
                    return Err(bad("evict"));
                }
                self.apply_evict(slot)?;
            }
            Event::Load { slot, generation, name } => {
                let slot = slot as usize;
                let known = self.evicted.get(&name).is_some_and(|e| e.generation == generation);
                if slot >= self.scratch || self.slots[slot].is_some() || !known || !self.free.contains(&slot)
                {
                    return Err(bad("load"));
                }
                self.apply_load(slot, &name)?;
            }
            Event::Forget { name } => {
                if !self.evicted.contains_key(&name) {
                    return Err(bad("forget"));
                }
                self.apply_forget(&name);
            }
        }
        Ok(())
    }
}
