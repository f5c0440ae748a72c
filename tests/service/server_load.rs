//! The load generator ([`kfrtrl::tools::load`]) against a real server in-process on 127.0.0.1:0: eight
//! streams for about a second over HTTP and over WebSocket, with a sane report each time; and a
//! short soak with an API key, reporting every interval with the server's memory; and a soak whose
//! WebSockets the server closes mid-run, which ends with a report instead of waiting for ever.
//! Fake servers check when the measured window starts and what a held-up soak interval reports.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use kfrtrl::api::{ApiKey, AppState, ServerConfig, StartError, serve};
use kfrtrl::engine::ModelRequest;
use kfrtrl::tools::load::{LoadConfig, LoadReport, Protocol, run, run_with};

/// A server on 127.0.0.1:0 serving one model, `small`, once it is ready: its address, the
/// sender that stops it and its task.
async fn start_server(
    hidden: usize,
    api_key: Option<&str>,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<Result<(), StartError>>) {
    let model = ModelRequest { name: "small".into(), hidden: Some(hidden), ..Default::default() };
    let api_key = api_key.map(|key| ApiKey::new(key).unwrap());
    let state = AppState::new(ServerConfig { models: vec![model], api_key, ..Default::default() }).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    state.wait_ready().await;
    (addr, stop, server)
}

/// Serves a fake server's routes on 127.0.0.1:0: its address and its task.
async fn serve_fake(app: axum::Router) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(async move { axum::serve(listener, app).await }))
}

/// A run of one second on 8 streams of `small` over HTTP, one token per request.
fn base_config(addr: SocketAddr) -> LoadConfig {
    LoadConfig {
        url: format!("http://{addr}"),
        model: "small".into(),
        streams: 8,
        tokens_per_message: 1,
        protocol: Protocol::Http,
        pipeline: 1,
        duration: Duration::from_secs(1),
        stream_prefix: "load".into(),
        report_every: None,
        server_pid: None,
        api_key: None,
    }
}

fn check(report: &LoadReport, protocol: Protocol, tokens: usize) {
    assert_eq!(report.protocol, protocol);
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(report.requests > 0 && report.symbols == report.requests * tokens as u64, "{report:?}");
    assert!(report.symbols_per_sec > 0.0 && report.seconds >= 0.9, "{report:?}");
    let l = &report.latency_ms;
    assert!(0.0 < l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
    assert!(l.mean > 0.0 && l.mean <= l.max, "{l:?}");
    let server = report.server.as_ref().expect("step metrics of the model");
    assert!(server.steps > 0.0 && server.mean_step_ms > 0.0, "{server:?}");
    assert!((1.0..=8.0).contains(&server.mean_batch), "{server:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_throughput_and_latency_over_http_and_websocket() {
    let (addr, stop, server) = start_server(32, None).await;
    let mut cfg = base_config(addr);
    let http = run(&cfg).await.unwrap();
    check(&http, Protocol::Http, 1);

    cfg.protocol = Protocol::Ws;
    cfg.tokens_per_message = 4;
    cfg.pipeline = 2;
    let ws = run(&cfg).await.unwrap();
    check(&ws, Protocol::Ws, 4);
    assert_eq!(ws.pipeline, 2);

    cfg.model = "missing".into();
    assert!(run(&cfg).await.is_err(), "an unknown model is an error");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// The requests of a soak's samples, from their rates over their real intervals.
fn interval_requests(report: &LoadReport) -> f64 {
    let mut previous = 0.0;
    let mut sum = 0.0;
    for s in &report.samples {
        sum += s.requests_per_sec * (s.elapsed_seconds - previous);
        previous = s.elapsed_seconds;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_reports_every_interval_with_the_servers_memory() {
    const KEY: &str = "soak-test-key-0123456789";
    let (addr, stop, server) = start_server(16, Some(KEY)).await;
    let mut cfg = LoadConfig {
        streams: 4,
        tokens_per_message: 2,
        protocol: Protocol::Ws,
        pipeline: 2,
        duration: Duration::from_millis(2500),
        stream_prefix: "soak".into(),
        report_every: Some(Duration::from_millis(500)),
        api_key: Some(KEY.into()),
        ..base_config(addr)
    };
    let mut printed = 0;
    let report = run_with(&cfg, |_| printed += 1).await.unwrap();
    check(&report, Protocol::Ws, 2);
    assert!((4..=6).contains(&report.samples.len()), "{:?}", report.samples);
    assert_eq!(printed, report.samples.len());
    assert!(
        interval_requests(&report) <= report.requests as f64 + 0.5,
        "intervals never count a request twice"
    );
    for (i, s) in report.samples.iter().enumerate() {
        assert!(s.symbols_per_sec > 0.0 && s.errors == 0, "{s:?}");
        assert!(s.elapsed_seconds >= 0.5 * (i + 1) as f64 - 0.01, "{s:?}");
        let l = &s.latency_ms;
        assert!(0.0 < l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
        assert!(s.rss_bytes.is_some_and(|b| b > 1 << 20), "rss from /metrics: {s:?}");
    }
    let memory = report.memory.as_ref().expect("memory from /metrics");
    assert!(memory.all_streams_bytes > 1 << 20 && memory.max_bytes >= memory.end_bytes, "{memory:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["samples"].is_array() && json["memory"]["growth"].is_number(), "{json}");

    // The same run without the key is refused by the server.
    cfg.api_key = None;
    assert!(run(&cfg).await.is_err());
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_over_websocket_finishes_when_a_connection_breaks_mid_run() {
    let (addr, stop, server) = start_server(16, None).await;
    let cfg = LoadConfig {
        streams: 4,
        protocol: Protocol::Ws,
        pipeline: 2,
        // Far longer than the guard below: only the broken connections can end the run.
        duration: Duration::from_secs(3600),
        stream_prefix: "broken".into(),
        report_every: Some(Duration::from_millis(100)),
        ..base_config(addr)
    };
    // The first sample comes after the start, so the server shuts down (closing every
    // WebSocket with 1001) while the streams are in their measured window.
    let mut stop = Some(stop);
    let run = run_with(&cfg, |_| {
        if let Some(stop) = stop.take() {
            stop.send(()).unwrap();
        }
    });
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run ends when its connections break")
        .expect("a run whose connections broke mid-run still reports");
    assert!(report.seconds < 3600.0 && !report.samples.is_empty(), "{report:?}");
    assert!(report.errors >= cfg.streams as u64, "every broken stream counts an error: {report:?}");
    let first = report.first_error.as_deref().unwrap_or_default();
    // A close frame, or a reset when the server drops the socket with messages unread.
    assert!(first.contains("/streams/broken-"), "the first error names the broken connection: {first}");
    server.await.unwrap().unwrap();
}

/// What the fake server of [`load_streams_start_only_after_the_servers_metrics_are_read`] saw.
#[derive(Default)]
struct Seen {
    tokens_requests: usize,
    metrics_answered: usize,
    /// Tokens requests after the streams' first ones that came before the run had read
    /// `/metrics` twice (step histograms, then memory).
    early: usize,
}

/// The streams used to start their clocks, deadlines and requests before the run read the
/// server's `/metrics` and started its own clock, which inflated symbols/s and put requests
/// outside the server's window. A fake server checks the order: every stream's first request,
/// both reads of `/metrics`, then the measured requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_streams_start_only_after_the_servers_metrics_are_read() {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::routing::{get, post};
    use kfrtrl::engine::ModelDefinition;

    const STREAMS: usize = 8;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let description = serde_json::json!({ "config": ModelDefinition::with_defaults("fake", 64) });
    let app = Router::new()
        .route("/v1/models/fake", get(move || async move { axum::Json(description) }))
        .route(
            "/v1/models/fake/streams/{stream}/tokens",
            post({
                let seen = seen.clone();
                move || async move {
                    let mut seen = seen.lock().unwrap();
                    seen.tokens_requests += 1;
                    if seen.tokens_requests > STREAMS && seen.metrics_answered < 2 {
                        seen.early += 1;
                    }
                    r#"{"position":1}"#
                }
            }),
        )
        .route(
            "/metrics",
            get({
                let seen = seen.clone();
                // Counted before the answer leaves, so a run that waits for it sees the count.
                move || async move {
                    seen.lock().unwrap().metrics_answered += 1;
                    "process_resident_memory_bytes 1048576\n"
                }
            }),
        );
    let (addr, server) = serve_fake(app).await;

    let cfg = LoadConfig {
        model: "fake".into(),
        streams: STREAMS,
        duration: Duration::from_millis(300),
        stream_prefix: "order".into(),
        ..base_config(addr)
    };
    let report = run(&cfg).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.early, 0, "measured requests reached the server before the run read its metrics");
    assert_eq!(report.requests as usize, seen.tokens_requests - STREAMS, "{report:?}");
    assert_eq!(seen.metrics_answered, 4, "two reads before the window, two after");
    server.abort();
}

/// A soak's rates used to be over the nominal report interval, so an interval the sampler was
/// held up in (a slow read of the server's memory) reported its requests as if answered in a
/// fraction of the time. A fake server holds the first in-window read of `/metrics` until it has
/// answered 2000 more messages, over far more than the 1 ms interval, and closes every
/// WebSocket at the next sample to end the run: the samples' rates over their real intervals add
/// up to no more requests than were answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rates_are_over_each_intervals_real_length() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
    use axum::routing::get;
    use kfrtrl::engine::ModelDefinition;
    use tokio::sync::watch;

    const HELD_FOR: usize = 2000;
    let (answered, _) = watch::channel(0usize);
    let (closing, _) = watch::channel(false);
    let (answered, closing) = (Arc::new(answered), Arc::new(closing));
    let metrics_reads = Arc::new(AtomicUsize::new(0));
    let description = serde_json::json!({ "config": ModelDefinition::with_defaults("fake", 64) });
    let socket = {
        let (answered, closing) = (answered.clone(), closing.clone());
        move |mut ws: WebSocket| async move {
            while let Some(Ok(Message::Text(_))) = ws.recv().await {
                if *closing.borrow() {
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                if ws.send(Message::text(r#"{"position":1}"#)).await.is_err() {
                    return;
                }
                answered.send_modify(|n| *n += 1);
            }
        }
    };
    let app = Router::new()
        .route("/v1/models/fake", get(move || async move { axum::Json(description) }))
        .route(
            "/v1/models/fake/streams/{stream}/ws",
            get(move |upgrade: WebSocketUpgrade| async move { upgrade.on_upgrade(socket) }),
        )
        .route(
            "/metrics",
            get(move || async move {
                // Reads 1 and 2 open the window; read 3 is the first sample's. The streams end
                // only at read 4, after the second sample has taken the held interval's requests.
                match metrics_reads.fetch_add(1, Ordering::SeqCst) {
                    2 => {
                        let mut seen = answered.subscribe();
                        let target = *seen.borrow() + HELD_FOR;
                        seen.wait_for(|&n| n >= target).await.unwrap();
                    }
                    3 => {
                        closing.send_replace(true);
                    }
                    _ => {}
                }
                "process_resident_memory_bytes 1048576\n"
            }),
        );
    let (addr, server) = serve_fake(app).await;

    let cfg = LoadConfig {
        model: "fake".into(),
        streams: 4,
        protocol: Protocol::Ws,
        pipeline: 2,
        // The closed WebSockets end the run.
        duration: Duration::from_secs(3600),
        stream_prefix: "held".into(),
        report_every: Some(Duration::from_millis(1)),
        ..base_config(addr)
    };
    // A guard only.
    let report = tokio::time::timeout(Duration::from_secs(60), run(&cfg)).await.unwrap().unwrap();
    assert!(report.requests as usize >= HELD_FOR, "{report:?}");
    let counted = interval_requests(&report);
    assert!(
        counted <= report.requests as f64 + 0.5,
        "the samples count {counted} requests of {} answered",
        report.requests
    );
    server.abort();
}
