//! The service suite in one test binary: the HTTP and WebSocket API over real sockets on
//! 127.0.0.1:0, the wire contract, limits and hostile input, durability across crashes and
//! restarts, shutdown, the command line and the container's entry point.
//!
//! One binary rather than one per file, for the build's sake (see `tests/numerics/main.rs`).

mod support;

mod cli_usage;
mod deploy_image;
mod durability_boot;
mod durability_crash;
mod durability_engine;
mod engine_predict;
mod model_migrate;
mod model_transfer;
mod models_by_path;
mod server_api;
mod server_binary;
mod server_hardening;
mod server_hostile;
mod server_limits;
mod server_load;
mod server_shutdown;
mod server_status;
