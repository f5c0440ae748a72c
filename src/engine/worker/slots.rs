//! A worker's stream slots: opening, closing and copying streams, moving idle ones to disk and
//! back (within the server's disk budget for them), and finding a slot for a stream.

use super::*;

/// Why no slot could be found for a stream.
enum NoSlot {
    /// Every slot holds a stream and the model has no data directory to evict one to.
    NotDurable,
    /// Every resident stream has work queued in this step: none can be evicted now.
    AllBusy,
    /// Writing the evicted stream failed.
    EvictionFailed(String),
}

/// Removes `slot` from the free list (the last occurrence: a slot freed and retaken at once
/// leaves the list as it was).
fn take_free(free: &mut Vec<usize>, slot: usize) {
    if let Some(i) = free.iter().rposition(|&s| s == slot) {
        free.remove(i);
    }
}

impl Worker {
    /// Brings this model's share of the server's evicted-stream bytes up to date.
    pub(super) fn account_evicted(&mut self) {
        let now = self.evicted.len() as u64 * self.evicted_file_bytes;
        self.evicted_bytes.adjust(self.evicted_accounted, now);
        self.evicted_accounted = now;
    }

    /// Gives this model's share back (the worker ends: deleted, or the server stops).
    pub(super) fn release_evicted(&mut self) {
        self.evicted_bytes.adjust(self.evicted_accounted, 0);
        self.evicted_accounted = 0;
    }

    /// A new stream takes `slot` (which must be free) at the start of a sequence, with signs from
    /// counter 0 keyed by its name and by the index of this open among the model's opens. The
    /// name alone would make a stream closed and reopened under the same name replay the
    /// same signs (KF-RTRL.md §8.3 wants fresh ones); the index is checkpointed and counted again
    /// by replay, so a restore gives the same keys. The slot's history never enters.
    pub(super) fn apply_open(&mut self, slot: usize, name: String) {
        self.log(&Event::Open { slot: slot as u32, name: name.clone() });
        take_free(&mut self.free, slot);
        self.set.vacate(slot);
        let key = derive_key(derive_key(self.definition.seed, stream_label(&name)), self.opened_streams);
        self.opened_streams += 1;
        self.set.set_sign_key(slot, key);
        self.set.set_sign_counter(slot, 0);
        self.names.insert(name.clone(), slot);
        self.slots[slot] = Some(StreamEntry::new(StreamMeta::new(name)));
        self.metrics.active_streams.set(self.names.len() as i64);
    }

    /// Forgets the stream in `slot` and frees the slot. The losses a TBPTT window has scored
    /// but not yet backpropagated are applied as an update of their own right now: left to the
    /// next step, they would be missing from a checkpoint taken in between, and a restore would
    /// not reproduce the weights.
    pub(super) fn apply_close(&mut self, slot: usize) {
        self.log(&Event::Close { slot: slot as u32 });
        self.set.reset(&self.params, slot);
        let update = self.set.apply_carried(&mut self.params, &mut self.optimizer);
        self.record_update(update);
        if let Some(entry) = self.slots[slot].take() {
            self.names.remove(&entry.meta.name);
        }
        self.free.push(slot);
        self.busy.remove(&slot);
        self.metrics.active_streams.set(self.names.len() as i64);
    }

    pub(super) fn apply_copy(&mut self, src: usize, dst: usize) {
        self.log(&Event::Copy { src: src as u32, dst: dst as u32 });
        self.set.copy_slot_for_evaluation(src, dst);
    }

    /// Writes the stream in `slot` to its file and frees the slot.
    pub(super) fn apply_evict(&mut self, slot: usize) -> Result<(), String> {
        let dir = self.dir.clone().ok_or("eviction needs a data directory")?;
        let Some(entry) = self.slots[slot].as_ref() else { return Err("no stream to evict".into()) };
        let generation = self.next_generation;
        let meta = entry.meta.clone();
        checkpoint::write_stream(&dir, generation, &meta, &self.set.export_slot(slot))?;
        self.log(&Event::Evict { slot: slot as u32, generation });
        self.next_generation += 1;
        // The stream's TBPTT window went to the file with it: nothing to carry.
        self.set.vacate(slot);
        self.slots[slot] = None;
        self.names.remove(&meta.name);
        self.free.push(slot);
        self.busy.remove(&slot);
        self.evicted.insert(meta.name.clone(), EvictedStream { generation, meta });
        self.account_evicted();
        self.metrics.streams_evicted.inc();
        self.metrics.active_streams.set(self.names.len() as i64);
        Ok(())
    }

    /// Brings an evicted stream back into the free slot `slot`.
    pub(super) fn apply_load(&mut self, slot: usize, name: &str) -> Result<(), String> {
        let dir = self.dir.clone().ok_or("loading needs a data directory")?;
        let Some(evicted) = self.evicted.get(name) else { return Err(format!("`{name}` is not evicted")) };
        let generation = evicted.generation;
        let (meta, state) = checkpoint::read_stream(&dir, name, generation)?;
        self.set.import_slot(slot, &state).map_err(|e| e.to_string())?;
        self.log(&Event::Load { slot: slot as u32, generation, name: name.to_owned() });
        self.evicted.remove(name);
        self.account_evicted();
        take_free(&mut self.free, slot);
        self.names.insert(name.to_owned(), slot);
        self.slots[slot] = Some(StreamEntry::new(meta));
        self.metrics.streams_loaded.inc();
        self.metrics.active_streams.set(self.names.len() as i64);
        Ok(())
    }

    pub(super) fn apply_forget(&mut self, name: &str) {
        self.log(&Event::Forget { name: name.to_owned() });
        self.evicted.remove(name);
        self.account_evicted();
    }

    /// Evicts streams idle past the TTL (at most every [`SWEEP_EVERY`]).
    pub(super) fn sweep_idle(&mut self) {
        let Some(ttl) = self.ttl() else { return };
        if self.shared.storage_failure.get().is_some() {
            return;
        }
        let Some(d) = self.durable.as_mut() else { return };
        if d.last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        d.last_sweep = Instant::now();
        let idle: Vec<usize> = self
            .names
            .values()
            .copied()
            .filter(|&slot| {
                self.evictable(slot)
                    && self.slots[slot].as_ref().is_some_and(|e| e.last_active.elapsed() >= ttl)
            })
            .collect();
        for slot in idle {
            // Past the disk budget an idle stream stays in memory (its slot is still bounded).
            if self.evicted_bytes.would_exceed(self.evicted_file_bytes) {
                break;
            }
            if let Err(e) = self.apply_evict(slot) {
                tracing::error!(model = %self.definition.name, error = %e, "cannot evict an idle stream");
                break;
            }
        }
    }

    pub(super) fn evictable(&self, slot: usize) -> bool {
        self.predict_owner != Some(slot) && self.slots[slot].as_ref().is_some_and(|e| e.queue.is_empty())
    }

    /// A free slot, evicting the least recently used idle stream if there is none (durable
    /// models only).
    fn free_slot(&mut self) -> Result<usize, NoSlot> {
        if let Some(&slot) = self.free.last() {
            return Ok(slot);
        }
        if self.dir.is_none() {
            return Err(NoSlot::NotDurable);
        }
        let lru = self
            .names
            .values()
            .copied()
            .filter(|&slot| self.evictable(slot))
            .min_by_key(|&slot| self.slots[slot].as_ref().map(|e| e.last_active))
            .ok_or(NoSlot::AllBusy)?;
        self.apply_evict(lru).map_err(NoSlot::EvictionFailed)?;
        self.free.last().copied().ok_or_else(|| NoSlot::EvictionFailed("no slot was freed".into()))
    }

    /// The slot of a stream, loading it back if evicted, or opening it if new and `create`.
    pub(super) fn resident_slot(&mut self, name: &str, create: bool) -> Result<usize, EngineError> {
        if let Some(&slot) = self.names.get(name) {
            return Ok(slot);
        }
        let evicted = self.evicted.contains_key(name);
        if !evicted && !create {
            return Err(self.unknown_stream(name.to_owned()));
        }
        if !evicted && self.names.len() + self.evicted.len() >= self.max_stored_streams {
            return Err(EngineError::StreamLimit {
                model: self.definition.name.clone(),
                limit: self.max_stored_streams,
            });
        }
        if !evicted && self.free.is_empty() && self.evicted_bytes.would_exceed(self.evicted_file_bytes) {
            return Err(EngineError::DiskBudget {
                model: self.definition.name.clone(),
                budget: self.evicted_bytes.budget() >> 20,
            });
        }
        let slot = match self.free_slot() {
            Ok(slot) => slot,
            Err(NoSlot::NotDurable) => {
                return Err(EngineError::StreamLimit {
                    model: self.definition.name.clone(),
                    limit: self.definition.max_streams,
                });
            }
            Err(NoSlot::AllBusy) => {
                return Err(EngineError::SlotsBusy {
                    model: self.definition.name.clone(),
                    limit: self.definition.max_streams,
                });
            }
            Err(NoSlot::EvictionFailed(reason)) => {
                // Nothing changed (the stream stays resident), but the disk refuses writes: the
                // model stops taking changes and turns not ready, as after a failed log write.
                let reason = format!("cannot evict a stream to make room: {reason}");
                let _ = self.shared.storage_failure.set(reason.clone());
                tracing::error!(
                    model = %self.definition.name,
                    error = %reason,
                    "stream file write failed: the model refuses changes until restart"
                );
                return Err(self.shared.storage_failed().unwrap_or(EngineError::Storage(reason)));
            }
        };
        if evicted {
            self.apply_load(slot, name).map_err(|e| {
                tracing::error!(model = %self.definition.name, stream = name, error = %e, "cannot load a stream");
                EngineError::Storage(e)
            })?;
        } else {
            self.apply_open(slot, name.to_owned());
        }
        Ok(slot)
    }

    pub(super) fn unknown_stream(&self, stream: String) -> EngineError {
        EngineError::UnknownStream { model: self.definition.name.clone(), stream }
    }

    /// Ends a stream (its delete job was answered): it is forgotten, or, if requests queued
    /// after the delete, it starts over as a new stream of the same name in the same slot.
    pub(super) fn close_stream(&mut self, slot: usize) {
        let Some(entry) = self.slots[slot].as_mut() else { return };
        let queue = std::mem::take(&mut entry.queue);
        let queued_tokens = entry.queued_tokens;
        let name = entry.meta.name.clone();
        self.apply_close(slot);
        if !queue.is_empty() {
            self.apply_open(slot, name);
            if let Some(entry) = self.slots[slot].as_mut() {
                entry.queue = queue;
                entry.queued_tokens = queued_tokens;
            }
            self.busy.insert(slot);
        }
    }
}
