//! The complete state of one stream, taken out of its slot of a [`crate::core::StreamSet`] and put
//! back, bit for bit: what checkpoints, eviction to disk and restore move around.
//!
//! A [`SlotState`] is a few named counters, integer tensors and float tensors. Their names and
//! shapes depend only on the [`ModelSpec`] (see [`SlotStateLayout::of`]), so the states of all
//! streams of a model stack into one tensor per name. Shapes are row-major; `[]` is a scalar.
//!
//! | name | shape | learner | what |
//! |---|---|---|---|
//! | `state` | `[k·n]` | all | the cell state (`[h]`, `[c; h]` for LSTM) |
//! | `kf.u` | `[m]` | kf-rtrl | the input-side factor `u` |
//! | `kf.a` | `[k·n, r·n]` | kf-rtrl | the stored state-side factor, `A = kf.scale · kf.a` |
//! | `kf.scale` | `[]` | kf-rtrl | the lazy scale of `kf.a` |
//! | `kf.last_c` | `[]` | kf-rtrl, gradient before reduction | `s·p2` of the last reduction (0: it was exact) |
//! | `kf.last_h`, `kf.last_d` | `[n]`, `[k·r·n]` | kf-rtrl, gradient before reduction | `h_{t-1}` and `D_t` of the last step |
//! | `kf.last_token` (integer) | `[1]` | kf-rtrl, gradient before reduction | the last step's token |
//! | `ok.u` | `[R+1, m]` | ok:R | the input-side factors; the last is the dropped term |
//! | `ok.a` | `[k·n, (R+1)·r·n]` | ok:R | the state-side factors side by side |
//! | `ok.weight` | `[R+1]` | ok:R | each term's weight in the gradient |
//! | `uoro.s` | `[k·n]` | uoro | the state-side factor `s̃` |
//! | `uoro.theta` | `[r·n, m]` | uoro | `Θ`, with the parameter-side factor `θ̃ = σ Θ` (files without `uoro.scale`: `θ̃` itself) |
//! | `uoro.scale` | `[2]` | uoro | `[σ, ‖Θ‖²]`: the lazy scale and the running squared norm |
//! | `rtrl.g` | `[k·n, r·n·m]` | rtrl | the influence matrix `∂s/∂W` (columns as the entries of `W`) |
//! | `tbptt.prev` | `[K, k·n]` | tbptt:K | the state before each recorded advance of the window |
//! | `tbptt.err` | `[K, vocab]` | tbptt:K | `softmax − onehot` of the token scored after each advance |
//! | `tbptt.tokens` (integer) | `[K]` | tbptt:K | the token of each recorded advance |
//! | `tbptt.len`, `tbptt.scored`, `tbptt.learned` (counters) | | tbptt:K | advances recorded, of them scored, of those learned |
//! | `growth.tangent`, `growth.rate` | `[k·n]`, `[]` | kf-rtrl, ok, rtrl with `influence_margin` | the adaptive decay's unit tangent and running growth rate |
//!
//! TBPTT window entries past `tbptt.len` are exported as zeros (they are never read before being
//! written), so two slots with the same future export the same bits.

use super::model::{LearnerKind, ModelSpec};

/// Everything one slot carries into its future: position, sign stream, state and learner state.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState<T> {
    /// Tokens consumed since the stream's last reset.
    pub position: u64,
    /// Key of the slot's random signs.
    pub sign_key: u64,
    /// Advances in the stream's lifetime (the counter of its next random signs).
    pub sign_counter: u64,
    /// Named learner counters, in layout order.
    pub counters: Vec<(String, u64)>,
    /// Named integer tensors `(name, shape, values)`, in layout order.
    pub indices: Vec<(String, Vec<usize>, Vec<u32>)>,
    /// Named float tensors `(name, shape, row-major values)`, in layout order.
    pub tensors: Vec<(String, Vec<usize>, Vec<T>)>,
}

impl<T> SlotState<T> {
    /// The values of a float tensor.
    pub fn tensor(&self, name: &str) -> Option<&[T]> {
        self.tensors.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| v.as_slice())
    }

    /// The values of a float tensor, mutably (fault-injection tests write non-finite values here).
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut Vec<T>> {
        self.tensors.iter_mut().find(|(n, _, _)| n == name).map(|(_, _, v)| v)
    }

    /// The values of an integer tensor.
    pub fn index_tensor(&self, name: &str) -> Option<&[u32]> {
        self.indices.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| v.as_slice())
    }

    /// A counter.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// Bytes of the values (counters and the three scalars at 8 bytes, integers at 4).
    pub fn bytes(&self) -> usize {
        8 * (3 + self.counters.len())
            + 4 * self.indices.iter().map(|(_, _, v)| v.len()).sum::<usize>()
            + std::mem::size_of::<T>() * self.tensors.iter().map(|(_, _, v)| v.len()).sum::<usize>()
    }

    pub(crate) fn empty(position: u64, sign_key: u64, sign_counter: u64) -> Self {
        Self {
            position,
            sign_key,
            sign_counter,
            counters: Vec::new(),
            indices: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub(crate) fn push_tensor(&mut self, name: &str, shape: Vec<usize>, values: Vec<T>) {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        self.tensors.push((name.to_string(), shape, values));
    }
}

/// The names and shapes of a model's [`SlotState`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStateLayout {
    /// Counter names.
    pub counters: Vec<String>,
    /// Integer tensors `(name, shape)`.
    pub indices: Vec<(String, Vec<usize>)>,
    /// Float tensors `(name, shape)`.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl SlotStateLayout {
    /// The layout of every slot of a model.
    pub fn of(spec: &ModelSpec) -> Self {
        let (s, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
        let t = |name: &str, shape: &[usize]| (name.to_string(), shape.to_vec());
        let mut layout =
            Self { counters: Vec::new(), indices: Vec::new(), tensors: vec![t(names::STATE, &[s])] };
        match spec.learner() {
            LearnerKind::KfRtrl => {
                layout.tensors.extend([
                    t(names::KF_U, &[m]),
                    t(names::KF_A, &[s, rn]),
                    t(names::KF_SCALE, &[]),
                ]);
                if spec.config.gradient_before_reduction {
                    layout.tensors.extend([
                        t(names::KF_LAST_C, &[]),
                        t(names::KF_LAST_H, &[spec.n]),
                        t(names::KF_LAST_D, &[spec.k * rn]),
                    ]);
                    layout.indices.push(t(names::KF_LAST_TOKEN, &[1]));
                }
            }
            LearnerKind::Ok => {
                let terms = spec.config.ok_rank + 1;
                layout.tensors.extend([
                    t(names::OK_U, &[terms, m]),
                    t(names::OK_A, &[s, terms * rn]),
                    t(names::OK_WEIGHT, &[terms]),
                ]);
            }
            LearnerKind::Uoro => layout.tensors.extend([
                t(names::UORO_S, &[s]),
                t(names::UORO_THETA, &[rn, m]),
                t(names::UORO_SCALE, &[2]),
            ]),
            LearnerKind::Rtrl => layout.tensors.push(t(names::RTRL_G, &[s, spec.recurrent_params()])),
            LearnerKind::Tbptt => {
                let kw = spec.config.tbptt_window;
                layout
                    .tensors
                    .extend([t(names::TBPTT_PREV, &[kw, s]), t(names::TBPTT_ERR, &[kw, spec.vocab])]);
                layout.indices.push(t(names::TBPTT_TOKENS, &[kw]));
                layout.counters =
                    [names::TBPTT_LEN, names::TBPTT_SCORED, names::TBPTT_LEARNED].map(String::from).to_vec();
            }
            LearnerKind::Frozen => {}
        }
        if spec.config.influence_margin.is_some() {
            layout.tensors.extend([t(names::GROWTH_TANGENT, &[s]), t(names::GROWTH_RATE, &[])]);
        }
        layout
    }

    /// Bytes of one slot's state with float tensors of `float_bytes` each (as [`SlotState::bytes`]).
    pub fn bytes(&self, float_bytes: usize) -> usize {
        let count = |shape: &Vec<usize>| shape.iter().product::<usize>();
        8 * (3 + self.counters.len())
            + 4 * self.indices.iter().map(|(_, s)| count(s)).sum::<usize>()
            + float_bytes * self.tensors.iter().map(|(_, s)| count(s)).sum::<usize>()
    }

    /// Checks that `state` has exactly this layout's names, shapes and value counts.
    pub fn check<T>(&self, state: &SlotState<T>) -> Result<(), SlotStateError> {
        let counters: Vec<&str> = state.counters.iter().map(|(n, _)| n.as_str()).collect();
        check_names("counter", self.counters.iter().map(String::as_str), &counters)?;
        let indices: Vec<(&str, &[usize], usize)> =
            state.indices.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.len())).collect();
        check_tensors("integer tensor", &self.indices, &indices)?;
        let tensors: Vec<(&str, &[usize], usize)> =
            state.tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.len())).collect();
        check_tensors("tensor", &self.tensors, &tensors)
    }
}

/// The stable names of a [`SlotState`]'s entries.
pub mod names {
    /// The cell state.
    pub const STATE: &str = "state";
    /// KF-RTRL's `u`.
    pub const KF_U: &str = "kf.u";
    /// KF-RTRL's stored `A`.
    pub const KF_A: &str = "kf.a";
    /// KF-RTRL's lazy scale of `A`.
    pub const KF_SCALE: &str = "kf.scale";
    /// KF-RTRL's `s·p2` of the last reduction.
    pub const KF_LAST_C: &str = "kf.last_c";
    /// KF-RTRL's `h_{t-1}` of the last step.
    pub const KF_LAST_H: &str = "kf.last_h";
    /// KF-RTRL's `D_t` of the last step.
    pub const KF_LAST_D: &str = "kf.last_d";
    /// KF-RTRL's token of the last step.
    pub const KF_LAST_TOKEN: &str = "kf.last_token";
    /// OK's input-side factors.
    pub const OK_U: &str = "ok.u";
    /// OK's state-side factors.
    pub const OK_A: &str = "ok.a";
    /// OK's gradient weights.
    pub const OK_WEIGHT: &str = "ok.weight";
    /// UORO's `s̃`.
    pub const UORO_S: &str = "uoro.s";
    /// UORO's `Θ` (`θ̃ = σ Θ`; files without [`UORO_SCALE`] hold `θ̃` itself).
    pub const UORO_THETA: &str = "uoro.theta";
    /// UORO's `[σ, ‖Θ‖²]`.
    pub const UORO_SCALE: &str = "uoro.scale";
    /// The adaptive decay's unit tangent (`influence_margin`).
    pub const GROWTH_TANGENT: &str = "growth.tangent";
    /// The adaptive decay's running growth rate.
    pub const GROWTH_RATE: &str = "growth.rate";
    /// Exact RTRL's influence matrix.
    pub const RTRL_G: &str = "rtrl.g";
    /// TBPTT's states before each advance of the window.
    pub const TBPTT_PREV: &str = "tbptt.prev";
    /// TBPTT's readout errors.
    pub const TBPTT_ERR: &str = "tbptt.err";
    /// TBPTT's tokens.
    pub const TBPTT_TOKENS: &str = "tbptt.tokens";
    /// TBPTT's recorded advances.
    pub const TBPTT_LEN: &str = "tbptt.len";
    /// TBPTT's scored advances.
    pub const TBPTT_SCORED: &str = "tbptt.scored";
    /// TBPTT's learned advances.
    pub const TBPTT_LEARNED: &str = "tbptt.learned";
}

/// Why a [`SlotState`] was refused (the slot was left unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotStateError {
    /// The slot is not in the set.
    #[error("slot {slot} is out of range (capacity {capacity})")]
    SlotOutOfRange {
        /// The slot.
        slot: usize,
        /// Slots in the set.
        capacity: usize,
    },
    /// An entry of the model's layout is missing.
    #[error("the {kind} {name:?} is missing")]
    Missing {
        /// `counter`, `tensor` or `integer tensor`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// An entry that is not in the model's layout, or one given twice.
    #[error("the {kind} {name:?} is not in this model's slot layout or appears twice")]
    Unexpected {
        /// `counter`, `tensor` or `integer tensor`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A tensor of the wrong shape.
    #[error("the tensor {name:?} has shape {found:?}; this model needs {expected:?}")]
    Shape {
        /// Its name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The given shape.
        found: Vec<usize>,
    },
    /// A tensor whose number of values does not match its shape.
    #[error("the tensor {name:?} has {found} values; its shape needs {expected}")]
    Length {
        /// Its name.
        name: String,
        /// Values the shape needs.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// A counter or integer that no slot of this model can hold.
    #[error("{name} = {value} is invalid: {reason}")]
    Value {
        /// The counter or integer tensor.
        name: String,
        /// The value.
        value: u64,
        /// The constraint it breaks.
        reason: String,
    },
}

fn check_names<'a>(
    kind: &'static str,
    expected: impl Iterator<Item = &'a str> + Clone,
    found: &[&str],
) -> Result<(), SlotStateError> {
    for (i, name) in found.iter().enumerate() {
        if !expected.clone().any(|e| e == *name) || found[..i].contains(name) {
            return Err(SlotStateError::Unexpected { kind, name: name.to_string() });
        }
    }
    if let Some(name) = expected.clone().find(|e| !found.contains(e)) {
        return Err(SlotStateError::Missing { kind, name: name.to_string() });
    }
    Ok(())
}

fn check_tensors(
    kind: &'static str,
    expected: &[(String, Vec<usize>)],
    found: &[(&str, &[usize], usize)],
) -> Result<(), SlotStateError> {
    let names: Vec<&str> = found.iter().map(|f| f.0).collect();
    check_names(kind, expected.iter().map(|(n, _)| n.as_str()), &names)?;
    for (name, shape) in expected {
        let &(_, found_shape, len) = found.iter().find(|f| f.0 == name).expect("names checked");
        if found_shape != shape.as_slice() {
            return Err(SlotStateError::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: found_shape.to_vec(),
            });
        }
        let want: usize = shape.iter().product();
        if len != want {
            return Err(SlotStateError::Length { name: name.clone(), expected: want, found: len });
        }
    }
    Ok(())
}
