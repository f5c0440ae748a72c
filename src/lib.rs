//! # kfrtrl
//!
//! Online next-token learning from live token streams with Kronecker-Factored Real-Time Recurrent
//! Learning (KF-RTRL; Mujika, Meier & Steger, NeurIPS 2018).
//!
//! Layers, dependencies pointing down only:
//! - [`core`]: pure numerics. Cells ([`core::CellKind`]: tanh, RHN, LSTM), the softmax readout,
//!   learners ([`core::LearnerKind`]: KF-RTRL, UORO, exact RTRL, truncated BPTT, frozen),
//!   optimizers, a counter-based RNG, and [`core::StreamSet`], which steps many streams of one
//!   model as one batch.
//! - [`corpus`] and [`train`]: corpora and the online training loop behind `kfrtrl train`.
//! - [`bench`]: the throughput benchmark behind `kfrtrl bench`.
//! - [`engine`]: models and streams in memory; one worker thread per model owns its weights and
//!   steps the queued tokens of all its streams as one batch.
//! - [`api`]: the HTTP and WebSocket server on the engine (`kfrtrl serve`): routes, validation,
//!   problem+json errors, metrics, health.
//! - [`load`]: the load generator behind `kfrtrl load` (drives a running server over HTTP or
//!   WebSocket and compares it with the in-process engine).
//! - [`experiment`]: the paper's experiments (gradient variance, copy task) behind
//!   `kfrtrl experiment`.
//! - [`model_file`]: the on-disk format of a trained model (safetensors + JSON), shared by
//!   `kfrtrl train --save` and the server's checkpoints.
//!
//! A model's weights are shared and read-only during a step's forward pass; every stream owns its
//! state (hidden state and learner factors) in a slot of a [`core::StreamSet`].

pub mod api;
pub mod bench;
pub mod core;
pub mod corpus;
pub mod engine;
pub mod experiment;
pub mod load;
pub mod model_file;
pub mod train;
