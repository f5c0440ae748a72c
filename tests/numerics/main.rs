//! The numerics suite in one test binary: the learners against exact oracles (finite differences,
//! full BPTT, enumeration of every sign path), determinism, faults, the model file, and the
//! offline tools (train, experiment) run as a user would.
//!
//! One binary rather than one per file: each test binary links every dependency again, and that
//! linking was most of `cargo test`'s first build. The allocation-counting test stays in a binary
//! of its own (`tests/core_no_alloc.rs`), since its global allocator would count everyone's.

mod core_determinism;
mod core_exact_gradients;
mod core_faults;
mod core_kf_rtrl;
mod core_ok;
mod core_regressions;
mod core_slot_state;
mod core_split_step;
mod experiment_copy;
mod experiment_variance;
mod influence_decay;
mod learners_batched;
mod model_file;
mod pending_update;
mod train_files;
mod train_reports;
mod uoro_step;
