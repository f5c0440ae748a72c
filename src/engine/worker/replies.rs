//! What a worker tells its clients: the statistics of a stream, the bookkeeping of scored
//! tokens, the replies of finished requests and their next-token predictions.

use super::*;

/// A byte as text: printable ASCII as itself, any other byte escaped (`\n`, `\t`, `\r`,
/// `\x00` … `\xff`), so that a client can always show what a prediction is.
fn byte_text(byte: u8) -> String {
    if (0x20..0x7f).contains(&byte) {
        char::from(byte).to_string()
    } else {
        std::ascii::escape_default(byte).to_string()
    }
}

impl Worker {
    pub(super) fn stream_info(&self, slot: usize) -> StreamInfo {
        let Some(entry) = self.slots[slot].as_ref() else {
            return self.evicted_info(&StreamMeta::new(String::new()));
        };
        let meta = &entry.meta;
        StreamInfo {
            model: self.definition.name.clone(),
            stream: meta.name.clone(),
            position: meta.position,
            sequence_position: self.set.position(slot),
            symbols_learned: meta.learned,
            mean_loss_bits: (meta.position > 0).then(|| meta.loss_bits_sum / meta.position as f64),
            loss_bits_avg: meta.loss_bits_avg,
            learner_resets: meta.faults,
            queued_tokens: entry.queued_tokens,
            idle_seconds: entry.last_active.elapsed().as_secs_f64(),
            resident: true,
        }
    }

    pub(super) fn evicted_info(&self, meta: &StreamMeta) -> StreamInfo {
        StreamInfo {
            model: self.definition.name.clone(),
            stream: meta.name.clone(),
            position: meta.position,
            sequence_position: 0,
            symbols_learned: meta.learned,
            mean_loss_bits: (meta.position > 0).then(|| meta.loss_bits_sum / meta.position as f64),
            loss_bits_avg: meta.loss_bits_avg,
            learner_resets: meta.faults,
            queued_tokens: 0,
            idle_seconds: 0.0,
            resident: false,
        }
    }

    /// Books one stepped token to its request.
    pub(super) fn book(&mut self, x: &SlotStep, bits: f64) {
        let owner = self.owner_of(x.slot);
        let Some(entry) = self.slots[owner].as_mut() else { return };
        let Some(Job::Tokens(active)) = entry.queue.front_mut() else { return };
        let finite = bits.is_finite().then_some(bits);
        if let Some(bits) = finite {
            active.loss_bits_sum += bits;
            active.scored += 1;
        }
        if active.job.input.return_losses {
            active.losses_bits.push(finite);
        }
        active.next += 1;
        let done = active.next == active.job.input.tokens.len();
        entry.queued_tokens -= 1;
        self.queued_tokens -= 1;
        if done {
            self.finished.push((owner, x.slot));
        }
    }

    /// Replies to every request whose last token was just stepped, with the top-k predictions of
    /// the slot it ran on (one readout GEMM for all of them).
    pub(super) fn answer_finished(&mut self) {
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
                stream: entry.meta.name.clone(),
                position: entry.meta.position,
                consumed,
                mean_loss_bits: (active.scored > 0).then(|| active.loss_bits_sum / active.scored as f64),
                losses_bits: active.job.input.return_losses.then_some(active.losses_bits),
                learner_resets: active.learner_resets,
                predictions,
            };
            self.answer(active.job, Ok(reply));
        }
        self.readout_slots = slots;
        self.finished = finished;
        self.finished.clear();
    }

    /// Updates the top-1 accuracy average with the current predictions of the scored streams
    /// (one readout GEMM for the batch; predicts and resets are left out).
    pub(super) fn record_top1(&mut self, inputs: &[SlotStep]) {
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
                ema(&mut self.stats.top1_accuracy_avg, if best.0 == x.token as usize { 1.0 } else { 0.0 });
            }
            if let Some(avg) = self.stats.top1_accuracy_avg {
                self.metrics.top1_accuracy_avg.set(avg);
            }
        }
        self.readout_slots = slots;
    }

    /// Logits `V [h; 1]` of the given slots into the first rows of `self.logits`.
    pub(super) fn readout(&mut self, slots: &[usize]) {
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

    pub(super) fn top_k_of(&self, owner: usize) -> usize {
        match self.slots[owner].as_ref().and_then(|e| e.queue.front()) {
            Some(Job::Tokens(active)) => active.job.input.top_k,
            _ => 0,
        }
    }

    /// The `k` most likely tokens of logits row `row` with their softmax probabilities, most
    /// likely first (ties by token).
    pub(super) fn top_k(&self, row: usize, k: usize) -> Vec<Prediction> {
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
                text: byte_level.then(|| byte_text(token as u8)),
            })
            .collect()
    }
}
