//! The offline tools, on top of the core, the engine and the API: corpora and the online training
//! loop behind `kfrtrl train`, the step-throughput benchmark behind `kfrtrl bench`, the paper's
//! experiments (gradient variance, copy task) behind `kfrtrl experiment`, and the load generator
//! behind `kfrtrl load` and `kfrtrl feed`, which drive a running server over HTTP or WebSocket,
//! and the move of models between servers behind `kfrtrl migrate`.

pub mod bench;
pub mod corpus;
pub mod experiment;
pub mod load;
pub mod migrate;
pub mod train;
