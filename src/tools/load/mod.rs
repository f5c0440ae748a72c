//! Load generation against a running server (`kfrtrl load`): `C` concurrent streams, each with
//! its own connection, send tokens requests of `T` tokens for a fixed time, over HTTP (one
//! request at a time per stream) or WebSocket (up to `D` pipelined messages per stream).
//!
//! [`run`] reports the symbols per second, the request latency percentiles (HTTP: per request;
//! WebSocket: per message round trip), and, from the server's `/metrics` read before and after
//! the measured window, the mean step duration and mean batch size the model's worker reached.
//! [`engine_comparison`] then measures the in-process engine's step throughput at that batch
//! size ([`crate::tools::bench`]), the reference for the server's overhead.
//!
//! Every stream first sends one request (creating the stream) before the clock starts, so that
//! stream creation and connection set-up stay out of the numbers. A stream that cannot do so
//! fails the run. A WebSocket that breaks during the window (say, the server shuts down) ends its
//! stream there: its messages in flight count as errors, [`LoadReport::first_error`] names the
//! cause, and the run reports what the other streams and the window so far measured.
//!
//! A soak ([`LoadConfig::report_every`]) runs the same load for minutes and reports every
//! interval: the interval's throughput and latency percentiles, and the server's resident memory
//! (`process_resident_memory_bytes` of its `/metrics`, or `/proc/<pid>/status` of a local
//! server), so that the report shows whether memory stays flat once every stream exists.

mod clients;
mod report;

pub use clients::{Ws, connect_ws};
pub use report::{
    EngineComparison, Latency, LoadConfig, LoadError, LoadReport, Memory, Protocol, Sample, ServerSide,
};

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use clients::{authorized_client, http_stream, ws_stream};

use crate::engine::ModelDefinition;
use crate::tools::bench::{BenchConfig, run as run_bench};

fn server_err(what: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Server(format!("{what}: {e}"))
}

/// Requests answered so far (by every stream of a run, or in one interval of a soak).
#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    requests: u64,
    symbols: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, sent: Instant, outcome: Result<(), String>, tokens: usize) {
        match outcome {
            Ok(()) => {
                self.latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                self.requests += 1;
                self.symbols += tokens as u64;
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn absorb(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.requests += other.requests;
        self.symbols += other.symbols;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The tally every stream records into; a soak's sampler takes it at every interval.
type SharedTally = Arc<Mutex<Tally>>;

fn record(tally: &SharedTally, sent: Instant, outcome: Result<(), String>, tokens: usize) {
    tally.lock().unwrap_or_else(PoisonError::into_inner).record(sent, outcome, tokens);
}

fn take(tally: &SharedTally) -> Tally {
    std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Sorts the latencies and reads their percentiles.
fn percentiles(lat: &mut [f64]) -> Latency {
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    Latency {
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
        max: lat.last().copied().unwrap_or(0.0),
        mean: if lat.is_empty() { 0.0 } else { lat.iter().sum::<f64>() / lat.len() as f64 },
    }
}

/// The value of an unlabelled series of a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn proc_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The server's resident memory: from `/proc` with a pid, else from its `/metrics`.
async fn server_rss(client: &reqwest::Client, base: &str, cfg: &LoadConfig) -> Option<u64> {
    if let Some(pid) = cfg.server_pid {
        return proc_rss(pid);
    }
    let text = client.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    gauge(&text, "process_resident_memory_bytes").map(|v| v as u64)
}

/// A reply body is a tokens reply unless it is a problem object.
fn check_reply(body: &[u8]) -> Result<(), String> {
    if body.windows(11).any(|w| w == b"\"position\":") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
    }
}

/// The sum and count of a histogram of `/metrics` for one model.
fn histogram(text: &str, name: &str, model: &str) -> Option<(f64, f64)> {
    let label = format!("model=\"{model}\"");
    let find = |suffix: &str| {
        let metric = format!("{name}_{suffix}");
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(&metric)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            (labels.starts_with('{') && labels.contains(&label)).then(|| value.parse::<f64>().ok())?
        })
    };
    Some((find("sum")?, find("count")?))
}

/// Step and batch histograms of the model: (step seconds sum, steps, batch sum).
async fn scrape(client: &reqwest::Client, base: &str, model: &str) -> Result<Option<[f64; 3]>, LoadError> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| server_err("GET /metrics", e))?
        .text()
        .await
        .map_err(|e| server_err("GET /metrics", e))?;
    let step = histogram(&text, "kfrtrl_step_duration_seconds", model);
    let batch = histogram(&text, "kfrtrl_batch_size", model);
    Ok(step.zip(batch).map(|((secs, steps), (batch_sum, _))| [secs, steps, batch_sum]))
}

/// Runs the load and reports it (without the engine comparison).
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    run_with(cfg, |_| {}).await
}

/// [`run`], calling `on_sample` with every interval of a soak as it ends.
pub async fn run_with(cfg: &LoadConfig, mut on_sample: impl FnMut(&Sample)) -> Result<LoadReport, LoadError> {
    if cfg.streams == 0 || cfg.tokens_per_message == 0 || cfg.pipeline == 0 {
        return Err(LoadError::Config("streams, tokens per message and pipeline must be positive".into()));
    }
    if cfg.report_every.is_some_and(|d| d.is_zero()) {
        return Err(LoadError::Config("the report interval must be positive".into()));
    }
    let base = cfg.url.trim_end_matches('/').to_owned();
    let Some(authority) = base.strip_prefix("http://") else {
        return Err(LoadError::Config(format!("--url must start with http:// (got {base})")));
    };
    let ws_base = format!("ws://{authority}");
    let client = authorized_client(cfg)?;
    let response = client
        .get(format!("{base}/v1/models/{}", cfg.model))
        .send()
        .await
        .map_err(|e| server_err("GET model", e))?;
    if !response.status().is_success() {
        return Err(LoadError::Server(format!("GET /v1/models/{}: {}", cfg.model, response.status())));
    }
    let info: serde_json::Value = response.json().await.map_err(|e| server_err("model description", e))?;
    let definition: ModelDefinition =
        serde_json::from_value(info["config"].clone()).map_err(|e| server_err("model config", e))?;
    let vocab = definition.vocab_size as u32;

    // Each stream says once whether its first request went through, then waits for the start,
    // which carries the window's one deadline. No rendezvous after that: a stream that breaks
    // during the window has nobody to wait for.
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (start_tx, start_rx) = watch::channel(None);
    let tally = SharedTally::default();
    let mut tasks = Vec::with_capacity(cfg.streams);
    for i in 0..cfg.streams {
        let path = format!("/v1/models/{}/streams/{}-{i}", cfg.model, cfg.stream_prefix);
        // Each stream cycles through the alphabet from its own offset.
        let tokens: Vec<u32> =
            (0..cfg.tokens_per_message).map(|j| (97 + ((i + j) % 26) as u32) % vocab).collect();
        let body = serde_json::json!({ "tokens": tokens, "top_k": 1 }).to_string();
        let (ready, start, cfg, tally) = (ready_tx.clone(), start_rx.clone(), cfg.clone(), tally.clone());
        let url = match cfg.protocol {
            Protocol::Http => format!("{base}{path}/tokens"),
            Protocol::Ws => format!("{ws_base}{path}/ws"),
        };
        tasks.push(tokio::spawn(async move {
            match cfg.protocol {
                Protocol::Http => http_stream(&url, body, &cfg, ready, start, &tally).await,
                Protocol::Ws => ws_stream(&url, body, &cfg, ready, start, &tally).await,
            }
        }));
    }
    // Every stream drops its sender once it has answered, so a task that ended without
    // answering (a panic) shows as a short count instead of a wait for ever.
    drop(ready_tx);
    let mut ready = 0;
    while let Some(answer) = ready_rx.recv().await {
        // Returning drops the start signal: the streams waiting for it end.
        answer.map_err(LoadError::Server)?;
        ready += 1;
    }
    if ready < cfg.streams {
        return Err(LoadError::Server(format!(
            "{} stream task(s) ended before their first request",
            cfg.streams - ready
        )));
    }
    // The server is read before the streams go and the clock starts as they go, so that the
    // window of `/metrics`, the throughput's seconds and every stream's deadline are one.
    let before = scrape(&client, &base, &cfg.model).await?;
    let rss_all_streams = server_rss(&client, &base, cfg).await;
    let start = Instant::now();
    start_tx.send_replace(Some(start + cfg.duration));
    let streams_done = async {
        let mut failure = None;
        for task in tasks {
            if let Err(e) = task.await {
                failure = failure.or(Some(format!("stream task: {e}")));
            }
        }
        failure
    };
    tokio::pin!(streams_done);
    let mut total = Tally::default();
    let mut samples = Vec::new();
    let failure = if let Some(every) = cfg.report_every {
        let mut ticker = tokio::time::interval_at((start + every).into(), every);
        // A tick held up (by a slow read of the server's memory, say) is not followed by a burst
        // of short catch-up intervals; each interval's rates are over its real length anyway.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut previous = start;
        loop {
            tokio::select! {
                failure = &mut streams_done => break failure,
                _ = ticker.tick() => {
                    let mut window = take(&tally);
                    let now = Instant::now();
                    let interval = now.duration_since(previous).as_secs_f64();
                    previous = now;
                    let sample = Sample {
                        elapsed_seconds: now.duration_since(start).as_secs_f64(),
                        symbols_per_sec: window.symbols as f64 / interval,
                        requests_per_sec: window.requests as f64 / interval,
                        errors: window.errors,
                        latency_ms: percentiles(&mut window.latencies),
                        rss_bytes: server_rss(&client, &base, cfg).await,
                    };
                    on_sample(&sample);
                    samples.push(sample);
                    total.absorb(window);
                }
            }
        }
    } else {
        streams_done.await
    };
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = failure {
        return Err(LoadError::Server(e));
    }
    total.absorb(take(&tally));
    // The server may be gone by now (a broken WebSocket ended the run): the report keeps what
    // was measured, without the server's side.
    let after = scrape(&client, &base, &cfg.model).await.ok().flatten();
    let rss_end = server_rss(&client, &base, cfg).await;
    let server = before.zip(after).and_then(|(b, a)| {
        let steps = a[1] - b[1];
        (steps > 0.0).then(|| ServerSide {
            steps,
            mean_step_ms: (a[0] - b[0]) / steps * 1e3,
            mean_batch: (a[2] - b[2]) / steps,
        })
    });
    let memory = rss_all_streams.zip(rss_end).map(|(all_streams, end)| {
        let max = samples.iter().filter_map(|s| s.rss_bytes).chain([all_streams, end]).max().unwrap_or(end);
        Memory {
            all_streams_bytes: all_streams,
            end_bytes: end,
            max_bytes: max,
            growth: end as f64 / all_streams as f64 - 1.0,
        }
    });
    Ok(LoadReport {
        protocol: cfg.protocol,
        model: cfg.model.clone(),
        hidden: definition.hidden,
        streams: cfg.streams,
        tokens_per_message: cfg.tokens_per_message,
        pipeline: if cfg.protocol == Protocol::Http { 1 } else { cfg.pipeline },
        seconds,
        requests: total.requests,
        symbols: total.symbols,
        symbols_per_sec: total.symbols as f64 / seconds,
        requests_per_sec: total.requests as f64 / seconds,
        errors: total.errors,
        first_error: total.first_error,
        latency_ms: percentiles(&mut total.latencies),
        server,
        samples,
        memory,
        engine: None,
        definition: Some(definition),
    })
}

/// Measures the in-process engine at the server's mean batch size (blocking: run it while the
/// server is idle) and fills `report.engine`.
pub fn engine_comparison(report: &mut LoadReport, rep_seconds: f64, threads: usize) -> Result<(), LoadError> {
    let (Some(server), Some(definition)) = (&report.server, &report.definition) else {
        return Err(LoadError::Server("no step metrics for the model: nothing to compare".into()));
    };
    let batch = (server.mean_batch.round() as usize).max(1);
    let cfg = BenchConfig { model: definition.model_config(), batch, reps: 3, rep_seconds };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| LoadError::Config(format!("cannot build the thread pool: {e}")))?;
    let r = pool.install(|| run_bench(&cfg)).map_err(|e| LoadError::Config(e.to_string()))?;
    let step_ms = batch as f64 / r.tokens_per_sec * 1e3;
    report.engine = Some(EngineComparison {
        batch,
        threads: threads.max(1),
        symbols_per_sec: r.tokens_per_sec,
        step_ms,
        server_fraction: report.symbols_per_sec / r.tokens_per_sec,
        p99_budget_ms: 2.0 * step_ms + 1.0,
    });
    Ok(())
}
