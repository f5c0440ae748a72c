//! `kfrtrl load`: drives a running server with concurrent streams over HTTP or WebSocket
//! ([`kfrtrl::load`]) and prints the throughput, the latency percentiles, the worker's mean step
//! and batch during the run, and, with `--engine`, the in-process engine at that batch size.

use std::time::Duration;

use clap::Args;

use kfrtrl::load::{LoadConfig, LoadReport, Protocol, engine_comparison, run as run_load};

/// Flags of `kfrtrl load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The model to load.
    #[arg(long, default_value = "default")]
    model: String,
    /// Concurrent streams, one connection each.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Tokens per request (HTTP) or message (WebSocket).
    #[arg(long, default_value_t = 16)]
    tokens_per_message: usize,
    /// Transport: http or ws.
    #[arg(long, default_value = "ws", value_parser = parse_protocol)]
    protocol: Protocol,
    /// Messages in flight per WebSocket (HTTP sends one request at a time per stream).
    #[arg(long, default_value_t = 2)]
    pipeline: usize,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Stream names are `{prefix}-{i}`.
    #[arg(long, default_value = "load")]
    stream_prefix: String,
    /// Also measure the in-process engine at the batch size the server reached (after the load,
    /// in this process; the server should be otherwise idle).
    #[arg(long)]
    engine: bool,
    /// Threads of the load generator's async runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(s).ok_or_else(|| format!("unknown protocol {s:?} (http, ws)"))
}

pub fn run(args: LoadArgs) -> Result<(), String> {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err("--seconds must be positive".into());
    }
    let cfg = LoadConfig {
        url: args.url,
        model: args.model,
        streams: args.streams,
        tokens_per_message: args.tokens_per_message,
        protocol: args.protocol,
        pipeline: args.pipeline,
        duration: Duration::from_secs_f64(args.seconds),
        stream_prefix: args.stream_prefix,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let mut report = runtime.block_on(run_load(&cfg)).map_err(|e| e.to_string())?;
    drop(runtime);
    if args.engine {
        engine_comparison(&mut report, 1.0).map_err(|e| e.to_string())?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &LoadReport) {
    let l = &r.latency_ms;
    println!(
        "{:?} model {} (n={}) streams {} tokens/msg {} pipeline {}: {:.0} symbols/s, {:.0} req/s, {} errors over {:.1} s",
        r.protocol,
        r.model,
        r.hidden,
        r.streams,
        r.tokens_per_message,
        r.pipeline,
        r.symbols_per_sec,
        r.requests_per_sec,
        r.errors,
        r.seconds
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}",
        l.p50, l.p90, l.p99, l.max, l.mean
    );
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    if let Some(s) = &r.server {
        println!(
            "server: {:.0} steps, mean step {:.2} ms, mean batch {:.1}; p99 budget 2·step+1 = {:.2} ms",
            s.steps,
            s.mean_step_ms,
            s.mean_batch,
            2.0 * s.mean_step_ms + 1.0
        );
    }
    if let Some(e) = &r.engine {
        println!(
            "engine in-process at batch {}: {:.0} symbols/s, step {:.2} ms; server/engine {:.0}%; p99 budget {:.2} ms",
            e.batch,
            e.symbols_per_sec,
            e.step_ms,
            100.0 * e.server_fraction,
            e.p99_budget_ms
        );
    }
}
