//! `kfrtrl load`: drives a running server with concurrent streams over HTTP or WebSocket
//! ([`kfrtrl::tools::load`]) and prints the throughput, the latency percentiles, the worker's mean step
//! and batch during the run, and, with `--engine`, the in-process engine at that batch size.
//! With `--soak`, it runs for minutes and prints every interval, with the server's memory.

use std::time::Duration;

use clap::Args;

use kfrtrl::tools::load::{LoadConfig, LoadReport, Protocol, Sample, engine_comparison, run_with};

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
    /// Threads of the in-process engine; the server's `--model-threads` compares alike
    /// [default: the server's default on this machine, the cores its runtime leaves].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    engine_threads: Option<u16>,
    /// Threads of the load generator's async runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Soak: run for this many minutes (instead of --seconds), reporting every --report-every
    /// seconds the throughput, latency percentiles and the server's resident memory.
    #[arg(long, value_name = "MINUTES")]
    soak: Option<f64>,
    /// Seconds between two soak reports.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    report_every: f64,
    /// Process id of a local server, to read its resident memory from /proc (without it, from
    /// process_resident_memory_bytes of its /metrics).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Bearer token of a server with an API key [env: KFRTRL_API_KEY].
    #[arg(long)]
    api_key: Option<String>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(s).ok_or_else(|| format!("unknown protocol {s:?} (http, ws)"))
}

pub fn run(args: LoadArgs) -> Result<(), String> {
    let seconds = args.soak.map_or(args.seconds, |minutes| minutes * 60.0);
    if !(seconds > 0.0 && seconds < 1e9) {
        return Err("--seconds and --soak must be positive".into());
    }
    let report_every = match args.soak {
        Some(_) if !(args.report_every > 0.0 && args.report_every < 1e9) => {
            return Err("--report-every must be positive".into());
        }
        Some(_) => Some(Duration::from_secs_f64(args.report_every)),
        None => None,
    };
    let cfg = LoadConfig {
        url: args.url,
        model: args.model,
        streams: args.streams,
        tokens_per_message: args.tokens_per_message,
        protocol: args.protocol,
        pipeline: args.pipeline,
        duration: Duration::from_secs_f64(seconds),
        stream_prefix: args.stream_prefix,
        report_every,
        server_pid: args.server_pid,
        api_key: args.api_key.or_else(|| std::env::var("KFRTRL_API_KEY").ok().filter(|k| !k.is_empty())),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let quiet = args.json;
    let on_sample = |s: &Sample| {
        if !quiet {
            print_sample(s);
        }
    };
    let mut report = runtime.block_on(run_with(&cfg, on_sample)).map_err(|e| e.to_string())?;
    drop(runtime);
    if args.engine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = args.engine_threads.map_or(kfrtrl::api::default_thread_split(cores).1, usize::from);
        engine_comparison(&mut report, 1.0, threads).map_err(|e| e.to_string())?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn print_sample(s: &Sample) {
    let l = &s.latency_ms;
    let rss = s.rss_bytes.map_or_else(|| "?".to_owned(), |b| format!("{:.1}", mib(b)));
    println!(
        "[{:>6.0} s] {:>8.0} symbols/s {:>7.0} req/s  ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}  errors {}  rss {rss} MiB",
        s.elapsed_seconds, s.symbols_per_sec, s.requests_per_sec, l.p50, l.p90, l.p99, l.max, s.errors
    );
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
    if let Some(m) = &r.memory {
        println!(
            "server rss: {:.1} MiB when every stream existed, {:.1} MiB at the end ({:+.1}%), max {:.1} MiB",
            mib(m.all_streams_bytes),
            mib(m.end_bytes),
            100.0 * m.growth,
            mib(m.max_bytes)
        );
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
            "engine in-process at batch {} on {} thread(s): {:.0} symbols/s, step {:.2} ms; server/engine {:.0}%; p99 budget {:.2} ms",
            e.batch,
            e.threads,
            e.symbols_per_sec,
            e.step_ms,
            100.0 * e.server_fraction,
            e.p99_budget_ms
        );
    }
}
