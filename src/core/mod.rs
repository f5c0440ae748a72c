//! Pure numerics on ndarray: cells, readout, learners, optimizers and a counter-based RNG.
//! No IO, no async, no JSON: everything here is a function of its inputs and a seed.

pub mod cell;
pub mod float;
pub mod kinds;
pub mod learner;
pub mod linalg;
pub mod model;
pub mod optim;
pub mod params;
pub mod pending;
pub mod probe;
pub mod rng;
pub mod slot_state;
pub mod streams;

pub use cell::CellKind;
pub use float::Float;
pub use learner::{KfStrategy, Learner};
pub use model::{LearnerKind, ModelConfig, ModelSpec, OptimizerKind, Params};
pub use optim::{Gradients, Optimizer, OptimizerStateError, UpdateOutcome};
pub use slot_state::{SlotState, SlotStateError, SlotStateLayout};
pub use streams::{SlotStep, StepError, StepReport, StreamSet};
