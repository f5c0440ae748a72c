//! `kfrtrl migrate`: moves models from one running server to another (see
//! `kfrtrl::tools::migrate`), one after the other, and says what each move did.

use std::time::Duration;

use clap::Args;
use kfrtrl::tools::migrate::{Endpoints, migrate};

/// Flags of `kfrtrl migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Base URL of the server that holds the models.
    #[arg(long)]
    from: String,
    /// Base URL of the server to move them to.
    #[arg(long)]
    to: String,
    /// The models to move.
    #[arg(required = true)]
    models: Vec<String>,
    /// Bearer token both servers take [env: KFRTRL_API_KEY].
    #[arg(long)]
    api_key: Option<String>,
    /// Longest wait for one request, seconds (a snapshot's upload included).
    #[arg(long, default_value_t = 300.0)]
    timeout_secs: f64,
    /// Also compare the target's own export of each model with the source's before deleting it
    /// there (a second full serialization; for models that take no traffic during the move).
    #[arg(long)]
    verify_export: bool,
    /// One JSON object per model on standard output.
    #[arg(long)]
    json: bool,
}

/// Runs `kfrtrl migrate`; fails after the first model that could not be moved.
pub fn run(args: MigrateArgs) -> Result<(), String> {
    let timeout = Duration::try_from_secs_f64(args.timeout_secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| format!("--timeout-secs must be positive and finite (got {})", args.timeout_secs))?;
    let api_key = args.api_key.or_else(|| std::env::var("KFRTRL_API_KEY").ok());
    let ends =
        Endpoints { from: args.from, to: args.to, api_key, timeout, verify_export: args.verify_export };
    let client = ends.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    for model in &args.models {
        let moved = runtime.block_on(migrate(&client, &ends, model)).map_err(|e| e.to_string())?;
        if args.json {
            println!("{}", serde_json::to_string(&moved).map_err(|e| e.to_string())?);
        } else {
            println!(
                "{}: {} ({} streams, {} bytes, digest {}) in {:.3} s, serving on the target {:.3} s after the freeze",
                moved.model,
                moved.outcome,
                moved.streams,
                moved.bytes,
                moved.tag,
                moved.seconds,
                moved.frozen_seconds
            );
        }
    }
    Ok(())
}
