//! The streams of one model: every stream's state lives in a slot of a [`StreamSet`], side by side
//! with the others, so that any subset of slots advances as one batched step.
//!
//! One step of a batch, for each input `(slot, token)`:
//! 1. [`StreamSet::score`]: the slot's current prediction `softmax(V [h; 1])` is scored against
//!    `token` (the loss is taken before learning from it), and the gradient of that loss is
//!    estimated by the model's learner and averaged over the batch;
//! 2. the caller applies the optimizer ([`StreamSet::step`] does all three);
//! 3. [`StreamSet::advance`]: the state consumes `token` (`a_t = [x_t; h_{t-1}; 1]`) and the
//!    learner's influence estimate follows it. Its two halves can be called apart
//!    ([`StreamSet::advance_states`], then [`StreamSet::advance_learner`]) so that the new
//!    predictions are known before the learner's costly update runs.
//!
//! The per-token path (`score`, `advance`, `step`, `predict`) allocates nothing after
//! construction: every buffer is sized for the full capacity.
//!
//! [`StreamSet::export_slot`] and [`StreamSet::import_slot`] move one slot's complete state
//! ([`SlotState`](super::slot_state::SlotState)) out of and into any set of the same spec, bit for
//! bit; fault recovery and those moves live in `slots.rs`.

use ndarray::{Array2, s};

use super::float::Float;
use super::learner::raw::SlotRows;
use super::learner::{Learner, StepInputs, for_each_input};
use super::linalg::{Par, gemm};
use super::model::{LearnerKind, ModelSpec, Params};
use super::optim::{Gradients, Optimizer, UpdateOutcome};
use super::rng::derive_key;

mod slots;

// Defined with the learners, which read it; re-exported here, where batches are built.
pub use super::learner::SlotStep;

/// Why a batch was refused (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The batch names a slot outside the set.
    #[error("slot {0} is out of range")]
    SlotOutOfRange(usize),
    /// Slots must be strictly increasing (each slot at most once per step).
    #[error("slots must be strictly increasing; slot {0} is out of order or repeated")]
    SlotOrder(usize),
    /// The token is not in the vocabulary.
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
}

/// What one [`StreamSet::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Number of gradient contributions averaged (0: no update).
    pub contributions: f64,
    /// The optimizer's outcome, when an update was attempted.
    pub update: Option<UpdateOutcome>,
    /// Slots whose learner state was reset after a fault (listed by
    /// [`StreamSet::last_faulted_slots`]); 0 on every healthy step.
    pub faulted: usize,
}

/// The per-stream states of one model in slots, and the scratch of its batched step.
#[derive(Debug, Clone)]
pub struct StreamSet<T: Float> {
    spec: ModelSpec,
    capacity: usize,
    /// `capacity × (k·n)` states.
    state: Array2<T>,
    position: Vec<u64>,
    sign_key: Vec<u64>,
    /// Advances of each slot ever (never reset): the counter of its random signs, so that a
    /// new sequence after a reset draws new signs.
    sign_counter: Vec<u64>,
    learner: Learner<T>,
    scratch: Scratch<T>,
    grad: Gradients<T>,
    /// Slots reset by the last fault recovery, and those of them restarted (non-finite state);
    /// preallocated to the capacity.
    faulted: Vec<usize>,
    restarted: Vec<usize>,
    /// Inputs of an [`StreamSet::advance_states`] whose learner part has not run yet.
    pending_learner: Option<usize>,
    /// Gradient contributions that resets outside `score` (in `advance`, or [`StreamSet::reset`])
    /// flushed into `grad` (TBPTT's scored windows), summed and counted by the next `score`.
    carried: f64,
}

#[derive(Debug, Clone)]
struct Scratch<T> {
    /// Rows `[h; 1]` of the scored inputs, `capacity × (n + 1)`.
    h1: Array2<T>,
    /// Logits, then `softmax − onehot` (zero rows for inputs that do not learn), `capacity × vocab`.
    err: Array2<T>,
    /// `∂L/∂h` of each input, `capacity × n`.
    delta_h: Array2<T>,
    /// States before the advance, `capacity × (k·n)`.
    prev: Array2<T>,
    /// Pre-activations, `capacity × (r·n)`.
    z: Array2<T>,
    /// Element-wise derivatives `D`, `capacity × (k·r·n)`.
    d: Array2<T>,
    /// Element-wise carry, `capacity × (k·k·n)`.
    carry: Array2<T>,
    /// Losses in nats of the scored inputs.
    loss: Vec<f64>,
}

impl<T: Float> StreamSet<T> {
    /// A set of `capacity` slots, every one at the start of a sequence.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        assert!(capacity > 0, "a stream set needs at least one slot");
        let (n, r, k, vocab) = (spec.n, spec.r, spec.k, spec.vocab);
        let s = k * n;
        let seed = spec.config.seed;
        Self {
            spec: spec.clone(),
            capacity,
            state: Array2::zeros((capacity, s)),
            position: vec![0; capacity],
            sign_counter: vec![0; capacity],
            sign_key: (0..capacity as u64).map(|b| derive_key(seed, b)).collect(),
            learner: Learner::new(spec, capacity),
            scratch: Scratch {
                h1: Array2::zeros((capacity, n + 1)),
                err: Array2::zeros((capacity, vocab)),
                delta_h: Array2::zeros((capacity, n)),
                prev: Array2::zeros((capacity, s)),
                z: Array2::zeros((capacity, r * n)),
                d: Array2::zeros((capacity, k * r * n)),
                carry: Array2::zeros((capacity, k * k * n)),
                loss: vec![0.0; capacity],
            },
            grad: Gradients::zeros(spec),
            faulted: Vec::with_capacity(capacity),
            restarted: Vec::with_capacity(capacity),
            pending_learner: None,
            carried: 0.0,
        }
    }

    /// The model spec the set was built for.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens consumed by a slot since its last reset.
    pub fn position(&self, slot: usize) -> u64 {
        self.position[slot]
    }

    /// The state vector of a slot (`[h]`, or `[c; h]` for LSTM).
    pub fn state(&self, slot: usize) -> &[T] {
        self.state.row(slot).to_slice().expect("state rows are contiguous")
    }

    /// `h` of a slot.
    pub fn hidden(&self, slot: usize) -> &[T] {
        &self.state(slot)[self.spec.h_offset()..]
    }

    /// The key of a slot's random signs; signs depend on `(key, sign counter)` only, so a stream
    /// that keeps its key and counter gets the same signs whatever slot or batch it is stepped in.
    pub fn sign_key(&self, slot: usize) -> u64 {
        self.sign_key[slot]
    }

    /// Sets a slot's sign key (e.g. derived from the model seed and the stream's name).
    pub fn set_sign_key(&mut self, slot: usize, key: u64) {
        self.sign_key[slot] = key;
    }

    /// How many advances a slot has made in its lifetime (resets do not rewind it): the counter
    /// of its next random signs.
    pub fn sign_counter(&self, slot: usize) -> u64 {
        self.sign_counter[slot]
    }

    /// Restores a slot's sign counter (e.g. from a checkpoint).
    pub fn set_sign_counter(&mut self, slot: usize, counter: u64) {
        self.sign_counter[slot] = counter;
    }

    /// The gradient averaged by the last [`StreamSet::score`] that had inputs. Between a reset
    /// outside `score` ([`StreamSet::advance`], [`StreamSet::reset`]) that carried a TBPTT window
    /// and the next score it holds that window's unaveraged sum instead: apply the optimizer
    /// right after a score.
    pub fn gradients(&self) -> &Gradients<T> {
        &self.grad
    }

    /// The learner state (for inspection by tests and checkpoints).
    pub fn learner(&self) -> &Learner<T> {
        &self.learner
    }

    /// Mutable learner state (forced signs in oracle tests).
    pub fn learner_mut(&mut self) -> &mut Learner<T> {
        &mut self.learner
    }

    /// Starts a new sequence in a slot: state, position and learner factors to zero (the sign
    /// counter runs on, so the new sequence draws fresh signs). Like a reset inside
    /// [`StreamSet::advance`], it must not drop the losses TBPTT's window has already scored:
    /// they are backpropagated now with `params` into [`StreamSet::gradients`] and counted by
    /// the next [`StreamSet::score`] ([`StreamSet::carried`]; [`StreamSet::apply_carried`] applies
    /// them at once). Other learners ignore `params`.
    pub fn reset(&mut self, params: &Params<T>, slot: usize) {
        self.assert_no_pending_learner();
        if self.position[slot] != 0 {
            self.carry_sequence(params, slot);
        }
        self.restart(slot);
    }

    /// Empties a slot whose stream lives on elsewhere ([`StreamSet::export_slot`], e.g. evicted)
    /// or never existed: as [`StreamSet::reset`], but nothing is carried, since an exported TBPTT
    /// window is flushed wherever it is imported.
    pub fn vacate(&mut self, slot: usize) {
        self.assert_no_pending_learner();
        self.restart(slot);
    }

    /// State, position and learner factors of a slot to zero, nothing carried.
    fn restart(&mut self, slot: usize) {
        self.state.row_mut(slot).fill(T::zero());
        self.position[slot] = 0;
        self.learner.reset(slot);
    }

    /// Gradient contributions that resets outside [`StreamSet::score`] carried into
    /// [`StreamSet::gradients`] (TBPTT's scored windows), waiting for the next score.
    pub fn carried(&self) -> f64 {
        self.carried
    }

    /// Applies the carried contributions ([`StreamSet::carried`]) now, averaged, as one update:
    /// for a caller that cannot let them wait for the next score (e.g. its saved state does not
    /// hold them). `None` when nothing is carried.
    pub fn apply_carried(
        &mut self,
        params: &mut Params<T>,
        optimizer: &mut Optimizer<T>,
    ) -> Option<UpdateOutcome> {
        self.assert_no_pending_learner();
        let carried = std::mem::take(&mut self.carried);
        if carried == 0.0 {
            return None;
        }
        if carried != 1.0 {
            self.grad.scale(T::from_f64_rounded(1.0 / carried));
        }
        optimizer.step(params, &self.grad, carried)
    }

    /// Writes the slot's next-token distribution `softmax(V [h; 1])` into `probs` (length vocab).
    pub fn predict(&self, params: &Params<T>, slot: usize, probs: &mut [T]) {
        let n = self.spec.n;
        let h = self.hidden(slot);
        for (o, p) in probs.iter_mut().enumerate() {
            let row = params.v.row(o);
            let mut acc = row[n];
            for j in 0..n {
                acc = acc + row[j] * h[j];
            }
            *p = acc;
        }
        softmax_in_place(probs);
    }

    fn validate(&self, inputs: &[SlotStep]) -> Result<(), StepError> {
        let mut last: Option<usize> = None;
        for x in inputs {
            if x.slot >= self.capacity {
                return Err(StepError::SlotOutOfRange(x.slot));
            }
            if last.is_some_and(|l| l >= x.slot) {
                return Err(StepError::SlotOrder(x.slot));
            }
            last = Some(x.slot);
            if x.token as usize >= self.spec.vocab {
                return Err(StepError::TokenOutOfRange { token: x.token, vocab: self.spec.vocab });
            }
        }
        if inputs.len() > self.capacity {
            return Err(StepError::SlotOutOfRange(self.capacity));
        }
        Ok(())
    }

    /// Phase 1: applies resets, scores every input's token (losses in nats into `losses`), and
    /// leaves the averaged gradient estimate in [`StreamSet::gradients`] (with the TBPTT windows
    /// that resets inside [`StreamSet::advance`] flushed since the last score). Returns the
    /// number of gradient contributions averaged (0 when nothing learns).
    pub fn score(
        &mut self,
        params: &Params<T>,
        inputs: &[SlotStep],
        losses: &mut [f64],
    ) -> Result<f64, StepError> {
        self.assert_no_pending_learner();
        self.validate(inputs)?;
        assert!(losses.len() >= inputs.len(), "losses buffer too short");
        let nb = inputs.len();
        if nb == 0 {
            return Ok(0.0);
        }
        let n = self.spec.n;
        let mut finished = std::mem::take(&mut self.carried);
        if finished == 0.0 {
            self.grad.clear();
        }
        for x in inputs.iter().filter(|x| x.reset) {
            if self.position[x.slot] != 0 {
                let state = self.state.row(x.slot);
                let state = state.as_slice().expect("contiguous");
                finished += self.learner.finish_sequence(&self.spec, params, x.slot, state, &mut self.grad);
            }
            self.restart(x.slot);
        }
        let hoff = self.spec.h_offset();
        let sc = &mut self.scratch;
        for (i, x) in inputs.iter().enumerate() {
            let mut row = sc.h1.row_mut(i);
            row.slice_mut(s![..n]).assign(&self.state.slice(s![x.slot, hoff..]));
            row[n] = T::one();
        }
        gemm(
            T::one(),
            sc.h1.slice(s![..nb, ..]),
            params.v.t(),
            T::zero(),
            sc.err.slice_mut(s![..nb, ..]),
            Par::Pool,
        );
        let learners = inputs.iter().filter(|x| x.learn).count();
        {
            let err_rows = SlotRows::new(&mut sc.err);
            let loss_ptr = SlotRows::new_vec(&mut sc.loss);
            for_each_input(nb, |i| {
                let x = inputs[i];
                // SAFETY: each task owns row `i` of the logits and entry `i` of the losses.
                let (row, loss) = unsafe { (err_rows.row(i), loss_ptr.row(i)) };
                let logits = &mut row[..];
                let target_logit = logits[x.token as usize].to_f64_lossless();
                loss[0] = softmax_in_place(logits) - target_logit;
                if x.learn {
                    logits[x.token as usize] = logits[x.token as usize] - T::one();
                } else {
                    logits.fill(T::zero());
                }
            });
        }
        losses[..nb].copy_from_slice(&sc.loss[..nb]);
        // TBPTT must see every scored token (its windows count advances, learned or not).
        if self.spec.learner() == LearnerKind::Frozen
            || (learners == 0 && self.learner.immediate_readout_gradient())
        {
            return Ok(finished);
        }
        // The readout gradient `errᵀ [h; 1]` must not see the state of an input that does not
        // learn: its zero error times a non-finite state would poison the batch.
        for (i, _) in inputs.iter().enumerate().filter(|(_, x)| !x.learn) {
            sc.h1.row_mut(i).fill(T::zero());
        }
        let h1 = sc.h1.slice(s![..nb, ..]);
        let err = sc.err.slice(s![..nb, ..]);
        let v_h = params.v.slice(s![.., ..n]);
        // TBPTT takes `∂L/∂h` and the readout gradient inside its windows' backward pass.
        if self.learner.immediate_readout_gradient() {
            gemm(T::one(), err, v_h, T::zero(), sc.delta_h.slice_mut(s![..nb, ..]), Par::Pool);
            gemm(T::one(), err.t(), h1, T::zero(), self.grad.v.view_mut(), Par::Pool);
        }
        let contributions = finished
            + self.learner.gradient(
                &self.spec,
                params,
                inputs,
                sc.delta_h.view(),
                err,
                h1,
                &self.state,
                &mut self.grad,
            );
        if contributions > 0.0 && contributions != 1.0 {
            let c = T::from_f64_rounded(1.0 / contributions);
            self.grad.scale(c);
        }
        Ok(contributions)
    }

    /// Phase 3: every input's slot consumes its token, with the weights as they are now.
    /// An input's `reset` applies here too, so that `advance` alone is correct; after `score`
    /// the slot is already at its start and the reset changes nothing.
    /// Same as [`StreamSet::advance_states`] then [`StreamSet::advance_learner`]. A reset here
    /// (not already applied by `score`) backpropagates the losses TBPTT's window has scored into
    /// [`StreamSet::gradients`], which the next `score` counts and averages with its own.
    pub fn advance(&mut self, params: &Params<T>, inputs: &[SlotStep]) -> Result<(), StepError> {
        self.advance_states(params, inputs)?;
        self.advance_learner(params, inputs);
        Ok(())
    }

    /// Phase 3, first half: every input's state consumes its token (the cell's forward pass), so
    /// that [`StreamSet::hidden`] and [`StreamSet::predict`] already give the new predictions.
    /// The learner's half, the costliest part of a KF-RTRL or exact RTRL step, is left to
    /// [`StreamSet::advance_learner`], which must come next with the same weights and inputs:
    /// a server can answer in between while the learner's update still runs.
    ///
    /// # Panics
    /// If the learner's half of the previous advance is still pending.
    pub fn advance_states(&mut self, params: &Params<T>, inputs: &[SlotStep]) -> Result<(), StepError> {
        self.assert_no_pending_learner();
        self.validate(inputs)?;
        for x in inputs {
            if x.reset && self.position[x.slot] != 0 {
                self.reset(params, x.slot);
            }
        }
        let nb = inputs.len();
        if nb == 0 {
            return Ok(());
        }
        let spec = &self.spec;
        let (n, hoff) = (spec.n, spec.h_offset());
        let sc = &mut self.scratch;
        for (i, x) in inputs.iter().enumerate() {
            sc.prev.row_mut(i).assign(&self.state.row(x.slot));
        }
        // z = W_h h_prev + W[:, token] + W[:, bias] for all inputs at once.
        let hprev = sc.prev.slice(s![..nb, hoff..hoff + n]);
        gemm(T::one(), hprev, params.w_h(spec).t(), T::zero(), sc.z.slice_mut(s![..nb, ..]), Par::Pool);
        let bias = params.w.column(spec.bias_col());
        let cell = spec.cell();
        {
            let zs = SlotRows::new(&mut sc.z);
            let ds = SlotRows::new(&mut sc.d);
            let carries = SlotRows::new(&mut sc.carry);
            let states = SlotRows::new(&mut self.state);
            let prev = &sc.prev;
            let w = &params.w;
            for_each_input(nb, |i| {
                let x = inputs[i];
                // SAFETY: each task owns row `i` of the scratch and the state row of its slot
                // (slots are distinct within a batch).
                let (z, d, carry, next) =
                    unsafe { (zs.row(i), ds.row(i), carries.row(i), states.row(x.slot)) };
                let col = w.column(x.token as usize);
                for (q, zq) in z.iter_mut().enumerate() {
                    *zq = *zq + col[q] + bias[q];
                }
                cell.forward(n, z, prev.row(i).as_slice().expect("contiguous"), next, d, carry);
            });
        }
        for x in inputs {
            self.position[x.slot] += 1;
        }
        self.pending_learner = Some(nb);
        Ok(())
    }

    /// Phase 3, second half: the learner's influence estimates follow the states that
    /// [`StreamSet::advance_states`] just advanced (`params` and `inputs` must be the same);
    /// nothing to do when no advance is pending.
    ///
    /// # Panics
    /// If `inputs` is not as long as the pending advance's.
    pub fn advance_learner(&mut self, params: &Params<T>, inputs: &[SlotStep]) {
        let Some(nb) = self.pending_learner.take() else { return };
        assert_eq!(nb, inputs.len(), "advance_learner needs the inputs of advance_states");
        let sc = &self.scratch;
        let step = StepInputs {
            inputs,
            prev: sc.prev.slice(s![..nb, ..]),
            d: sc.d.slice(s![..nb, ..]),
            carry: sc.carry.slice(s![..nb, ..]),
            sign_counter: &self.sign_counter,
            sign_key: &self.sign_key,
        };
        self.learner.advance(&self.spec, params, &step);
        for x in inputs {
            self.sign_counter[x.slot] += 1;
        }
    }

    /// Whether [`StreamSet::advance_learner`] has work left from the last
    /// [`StreamSet::advance_states`].
    pub fn learner_pending(&self) -> bool {
        self.pending_learner.is_some()
    }

    /// Before a reset outside `score`: TBPTT's window holds losses already scored, which the
    /// reset must not drop; they are backpropagated now into `grad` and counted by the next
    /// [`StreamSet::score`] (a reset inside `score` adds them to that score's own gradient).
    fn carry_sequence(&mut self, params: &Params<T>, slot: usize) {
        if self.spec.learner() != LearnerKind::Tbptt {
            return;
        }
        if self.carried == 0.0 {
            // `grad` still holds the last score's gradient, already applied.
            self.grad.clear();
        }
        let state = self.state.row(slot);
        let state = state.as_slice().expect("contiguous");
        self.carried += self.learner.finish_sequence(&self.spec, params, slot, state, &mut self.grad);
    }

    fn assert_no_pending_learner(&self) {
        assert!(
            self.pending_learner.is_none(),
            "the learner's half of the last advance is pending: call advance_learner first"
        );
    }

    /// One full online step: score, update the weights with `optimizer` (if anything learned),
    /// recover from faults ([`StreamSet::recover_from_faults`]), advance. `losses` receives each
    /// input's loss in nats.
    pub fn step(
        &mut self,
        params: &mut Params<T>,
        optimizer: &mut Optimizer<T>,
        inputs: &[SlotStep],
        losses: &mut [f64],
    ) -> Result<StepReport, StepError> {
        let report = self.step_states(params, optimizer, inputs, losses)?;
        self.advance_learner(params, inputs);
        Ok(report)
    }

    /// [`StreamSet::step`] up to [`StreamSet::advance_states`]: the new predictions are ready,
    /// the learner's half of the advance is pending ([`StreamSet::advance_learner`] with the
    /// same `params` and `inputs` completes the step).
    pub fn step_states(
        &mut self,
        params: &mut Params<T>,
        optimizer: &mut Optimizer<T>,
        inputs: &[SlotStep],
        losses: &mut [f64],
    ) -> Result<StepReport, StepError> {
        let contributions = self.score(params, inputs, losses)?;
        let update = optimizer.step(params, &self.grad, contributions);
        let faulted = self.recover_from_faults(params, inputs, &losses[..inputs.len()], update);
        self.advance_states(params, inputs)?;
        Ok(StepReport { contributions, update, faulted })
    }
}

/// Replaces logits by their softmax and returns `ln Σ_o exp(x_o)` (accumulated in f64), so that
/// the loss of token `y` is `returned − x_y` without ever taking the log of a rounded probability.
fn softmax_in_place<T: Float>(x: &mut [T]) -> f64 {
    let max = x.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        let e = (*v - max).exp();
        *v = e;
        sum += e.to_f64_lossless();
    }
    let inv = T::from_f64_rounded(1.0 / sum);
    for v in x.iter_mut() {
        *v = *v * inv;
    }
    max.to_f64_lossless() + sum.ln()
}
