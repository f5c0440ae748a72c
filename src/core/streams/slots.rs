//! What happens to whole slots of a [`StreamSet`]: fault recovery after a step (the slots at
//! fault found and reset), and moving a slot's complete state out, in, or to another slot.

use ndarray::{ArrayView2, s};

use super::StreamSet;
use crate::core::float::{Float, all_finite};
use crate::core::learner::SlotStep;
use crate::core::linalg::{Par, gemm};
use crate::core::model::{LearnerKind, Params};
use crate::core::optim::UpdateOutcome;
use crate::core::slot_state::{SlotState, SlotStateError, SlotStateLayout, names};

impl<T: Float> StreamSet<T> {
    /// After [`StreamSet::score`] of `inputs` (losses in `losses`) and the optimizer's `update`:
    /// when the update was refused as non-finite or a loss is not finite, finds the slots at
    /// fault and resets their learner state, so that one stream's fault neither persists nor
    /// stops the others from learning (KF-RTRL.md §8). Returns how many slots were reset; they are
    /// listed by [`StreamSet::last_faulted_slots`]. Healthy steps cost one pass over `losses`.
    ///
    /// A slot is at fault when its loss, its cell state, its learner state, its readout error or
    /// (for the learners whose estimate has no side effects: KF-RTRL, UORO, exact RTRL) its own
    /// gradient contribution, recomputed alone, is not finite. When a refused update cannot be
    /// traced to any slot, every slot of the batch is reset. A slot whose cell state is not
    /// finite is restarted as by [`StreamSet::vacate`] (listed by
    /// [`StreamSet::last_restarted_slots`]): nothing else could make it finite again, and its
    /// learner state, just discarded, has nothing left to carry. The weights
    /// are never touched here; after a refused update [`StreamSet::gradients`] is unspecified.
    pub fn recover_from_faults(
        &mut self,
        params: &Params<T>,
        inputs: &[SlotStep],
        losses: &[f64],
        update: Option<UpdateOutcome>,
    ) -> usize {
        self.faulted.clear();
        self.restarted.clear();
        let refused = update == Some(UpdateOutcome::NonFinite);
        if !refused && losses.iter().all(|l| l.is_finite()) {
            return 0;
        }
        self.find_faulted_slots(params, inputs, losses, refused);
        if refused && self.faulted.is_empty() {
            self.faulted.extend(inputs.iter().map(|x| x.slot));
        }
        for i in 0..self.faulted.len() {
            let slot = self.faulted[i];
            self.learner.discard(slot);
            if !all_finite(self.state.row(slot)) {
                self.restart(slot);
                self.restarted.push(slot);
            }
        }
        self.faulted.len()
    }

    /// The rare path of [`StreamSet::recover_from_faults`]: pushes the slots at fault.
    fn find_faulted_slots(&mut self, params: &Params<T>, inputs: &[SlotStep], losses: &[f64], refused: bool) {
        let Self { spec, state, learner, scratch: sc, grad, faulted, .. } = self;
        let recompute =
            refused && learner.immediate_readout_gradient() && spec.learner() != LearnerKind::Frozen;
        for (i, x) in inputs.iter().enumerate() {
            let mut at_fault = !losses[i].is_finite()
                || !all_finite(state.row(x.slot))
                || !learner.slot_is_finite(x.slot)
                || (refused && x.learn && !(all_finite(sc.err.row(i)) && all_finite(sc.delta_h.row(i))));
            if !at_fault && recompute && x.learn {
                // Finite factors can still overflow in the product: recompute this input's
                // contribution alone (`grad` is garbage after a refused update anyway).
                grad.clear();
                let rows = s![i..i + 1, ..];
                let (err, h1, delta_h) = (sc.err.slice(rows), sc.h1.slice(rows), sc.delta_h.slice(rows));
                gemm(T::one(), err.t(), h1, T::zero(), grad.v.view_mut(), Par::Pool);
                learner.gradient(spec, params, &inputs[i..i + 1], delta_h, err, h1, state, grad);
                at_fault = !grad.norm().is_finite();
            }
            if at_fault {
                faulted.push(x.slot);
            }
        }
    }

    /// The slots reset by the last [`StreamSet::step`] (or [`StreamSet::recover_from_faults`])
    /// after a fault, in batch order; empty after a healthy step.
    pub fn last_faulted_slots(&self) -> &[usize] {
        &self.faulted
    }

    /// Of [`StreamSet::last_faulted_slots`], those whose cell state was not finite, restarted
    /// from the start of a sequence (position 0).
    pub fn last_restarted_slots(&self) -> &[usize] {
        &self.restarted
    }

    /// The names and shapes of every slot's [`SlotState`]: a function of the spec only.
    pub fn slot_state_layout(&self) -> SlotStateLayout {
        SlotStateLayout::of(&self.spec)
    }

    /// Everything a slot carries into its future (position, sign key and counter, state, learner
    /// state exactly as stored), for checkpoints and eviction. Allocates (not for the per-token
    /// loop). Panics if `slot` is out of range.
    pub fn export_slot(&self, slot: usize) -> SlotState<T> {
        self.assert_no_pending_learner();
        let mut out = SlotState::empty(self.position[slot], self.sign_key[slot], self.sign_counter[slot]);
        out.push_tensor(names::STATE, vec![self.spec.state_len()], self.state(slot).to_vec());
        self.learner.export_slot(slot, &mut out);
        out
    }

    /// Overwrites a slot with an exported state, which may come from any slot of any set of the
    /// same spec: afterwards the slot evolves bit for bit as the exported one would have. Every
    /// name, shape and counter is checked first (any float value is accepted, non-finite
    /// included); on error the slot is unchanged. Oracle hooks (forced signs) go back to the RNG.
    pub fn import_slot(&mut self, slot: usize, state: &SlotState<T>) -> Result<(), SlotStateError> {
        self.assert_no_pending_learner();
        if slot >= self.capacity {
            return Err(SlotStateError::SlotOutOfRange { slot, capacity: self.capacity });
        }
        let upgraded = crate::core::learner::uoro_legacy_state(&self.spec, state);
        let state = upgraded.as_ref().unwrap_or(state);
        self.slot_state_layout().check(state)?;
        self.learner.check_import(&self.spec, state)?;
        let row = state.tensor(names::STATE).expect("checked layout");
        self.state.row_mut(slot).as_slice_mut().expect("contiguous").copy_from_slice(row);
        self.position[slot] = state.position;
        self.sign_key[slot] = state.sign_key;
        self.sign_counter[slot] = state.sign_counter;
        self.learner.import_slot(slot, state);
        Ok(())
    }

    /// Views of all states (`capacity × k·n`), for snapshots.
    pub fn states(&self) -> ArrayView2<'_, T> {
        self.state.view()
    }

    /// Copies another slot's complete state (hidden state, position, sign key and counter,
    /// learner factors) into `dst`: a move (a fork that learns should get its own sign key, or its
    /// noise correlates with the original's; a fork that is only evaluated wants
    /// [`StreamSet::copy_slot_for_evaluation`]). Allocates (not for the per-token loop).
    pub fn copy_slot(&mut self, src: usize, dst: usize) {
        if self.copy_cell_state(src, dst) {
            self.learner.copy_slot(src, dst);
        }
    }

    /// Copies a slot's hidden state, position and signs into `dst` with an empty learner state,
    /// for a fork that is only evaluated (`learn` false): its steps give the same losses and
    /// predictions as the original's would, and nothing it scores can reach the weights (a
    /// copied TBPTT window would hold the original's learned losses, flushed at the fork's
    /// next reset or full window).
    pub fn copy_slot_for_evaluation(&mut self, src: usize, dst: usize) {
        if self.copy_cell_state(src, dst) {
            self.learner.discard(dst);
        }
    }

    /// Copies the hidden state, position and signs of `src` into `dst`; false if they are the
    /// same slot (nothing to do).
    fn copy_cell_state(&mut self, src: usize, dst: usize) -> bool {
        self.assert_no_pending_learner();
        if src == dst {
            return false;
        }
        let row = self.state.row(src).to_owned();
        self.state.row_mut(dst).assign(&row);
        self.position[dst] = self.position[src];
        self.sign_key[dst] = self.sign_key[src];
        self.sign_counter[dst] = self.sign_counter[src];
        true
    }
}
