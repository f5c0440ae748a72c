//! The worker's batched step: which queued tokens ride in the next batch (one per stream with
//! work, a predict's tokens on the scratch slot), the step itself with its write-ahead record, and
//! the booking of each token's loss and prediction to the request it came from.

use super::*;

impl Worker {
    /// Logs and steps a batch up to its new predictions ([`StreamSet::step_states`]) and books
    /// each token to its stream (not to its request: the live path does that); [`Worker::finish_step`] must follow
    /// (after the replies are on their way) with the same inputs. False if the core refused the
    /// batch (nothing changed, nothing to finish).
    pub(super) fn apply_step(&mut self, inputs: &[SlotStep]) -> bool {
        self.log_step(inputs);
        let nb = inputs.len();
        self.record_top1(inputs);
        let started = Instant::now();
        let outcome =
            self.set.step_states(&mut self.params, &mut self.optimizer, inputs, &mut self.losses[..nb]);
        self.step_seconds = started.elapsed().as_secs_f64();
        self.metrics.batch_size.observe(nb as f64);
        match outcome {
            Ok(report) => self.record_update(report.update),
            Err(e) => {
                // Inputs are validated on admission, so this is a bug; the step changed nothing.
                tracing::error!(model = %self.definition.name, error = %e, "batched step refused");
                return false;
            }
        }
        for (i, x) in inputs.iter().enumerate() {
            let bits = self.losses[i] / LN_2;
            if x.slot == self.scratch {
                self.metrics.predicted.inc();
                self.stats.symbols_predicted += 1;
                continue;
            }
            let Some(entry) = self.slots[x.slot].as_mut() else { continue };
            let meta = &mut entry.meta;
            meta.position += 1;
            // A stream at fault (its learner is reset below) can score a non-finite loss; booked,
            // it would poison its averages for good and make every later checkpoint unloadable
            // (JSON has no NaN).
            let scored = bits.is_finite();
            if scored {
                meta.loss_bits_sum += bits;
                ema(&mut meta.loss_bits_avg, bits);
            }
            entry.last_active = Instant::now();
            self.stats.symbols_seen += 1;
            if x.learn {
                meta.learned += 1;
                self.stats.symbols_learned += 1;
                self.metrics.learned.inc();
            } else {
                self.metrics.advanced.inc();
            }
            if scored {
                self.metrics.loss_bits.observe(bits);
                ema(&mut self.stats.loss_bits_avg, bits);
            }
        }
        // Streams whose learner the core reset after a non-finite value (a predict's scratch copy
        // is left out: it is thrown away). The request in progress learns it too (none in replay).
        let Self { set, slots, stats, metrics, scratch, .. } = self;
        for &slot in set.last_faulted_slots().iter().filter(|&&slot| slot != *scratch) {
            stats.stream_faults += 1;
            metrics.stream_faults.inc();
            if let Some(entry) = slots[slot].as_mut() {
                entry.meta.faults += 1;
                if let Some(Job::Tokens(active)) = entry.queue.front_mut() {
                    active.learner_resets += 1;
                }
            }
        }
        if let Some(avg) = self.stats.loss_bits_avg {
            self.metrics.loss_bits_avg.set(avg);
        }
        true
    }

    /// Counts an optimizer update (applied or refused) in the statistics and metrics.
    pub(super) fn record_update(&mut self, update: Option<UpdateOutcome>) {
        match update {
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
        }
    }

    /// The learner's half of the step [`Worker::apply_step`] began.
    pub(super) fn finish_step(&mut self, inputs: &[SlotStep]) {
        let started = Instant::now();
        self.set.advance_learner(&self.params, inputs);
        // The step's own time: the bookkeeping and replies between the halves are left out.
        self.metrics.step_duration.observe(self.step_seconds + started.elapsed().as_secs_f64());
    }

    /// One batched step: one token from every stream with queued tokens.
    pub(super) fn step(&mut self) {
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
    pub(super) fn collect_inputs(&mut self, inputs: &mut Vec<SlotStep>) {
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
                            self.close_stream(slot);
                            self.answer_after_log(reply, Ok(()));
                        }
                    }
                    Some(Job::Tokens(active)) if active.job.mode == Mode::Predict => {
                        if self.predict_owner.is_none() {
                            self.apply_copy(slot, self.scratch);
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

    pub(super) fn step_inputs(&mut self, inputs: &[SlotStep]) {
        if !self.apply_step(inputs) {
            for x in inputs {
                self.fail_head(
                    self.owner_of(x.slot),
                    EngineError::WorkerStopped(self.definition.name.clone()),
                );
            }
            return;
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
        // The replies leave (once logged) while the learner's update, most of a step, runs.
        self.flush_log();
        self.finish_step(inputs);
    }

    pub(super) fn owner_of(&self, slot: usize) -> usize {
        if slot == self.scratch { self.predict_owner.unwrap_or(slot) } else { slot }
    }

    pub(super) fn fail_head(&mut self, owner: usize, error: EngineError) {
        if owner == self.scratch || Some(owner) == self.predict_owner {
            self.predict_owner = None;
        }
        let Some(entry) = self.slots[owner].as_mut() else { return };
        let failed = match entry.queue.pop_front() {
            Some(Job::Tokens(active)) => {
                let left = active.job.input.tokens.len() - active.next;
                entry.queued_tokens -= left;
                self.queued_tokens -= left;
                Some(active.job)
            }
            Some(other) => {
                entry.queue.push_front(other);
                None
            }
            None => None,
        };
        if entry.queue.is_empty() {
            self.busy.remove(&owner);
        }
        if let Some(job) = failed {
            self.answer(job, Err(error));
        }
    }
}
