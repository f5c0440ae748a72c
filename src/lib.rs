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
//! - [`engine`]: models and streams in memory; one worker thread per model owns its weights and
//!   steps the queued tokens of all its streams as one batch. Its checkpoints and write-ahead log
//!   live beside it, and [`engine::model_file`], the on-disk format of a trained model
//!   (safetensors + JSON) that checkpoints and `kfrtrl train --save` share.
//! - [`api`]: the HTTP and WebSocket server on the engine (`kfrtrl serve`): routes, validation,
//!   problem+json errors, metrics, health.
//! - [`tools`]: the offline tools on top: corpora and the online training loop (`kfrtrl train`),
//!   the throughput benchmark (`kfrtrl bench`), the paper's experiments (`kfrtrl experiment`) and
//!   the load generator (`kfrtrl load`, which drives a running server).
//!
//! A model's weights are shared and read-only during a step's forward pass; every stream owns its
//! state (hidden state and learner factors) in a slot of a [`core::StreamSet`].

pub mod api;
pub mod core;
pub mod engine;
pub mod tools;
