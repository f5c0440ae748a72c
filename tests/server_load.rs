//! The load generator ([`kfrtrl::load`]) against a real server in-process on 127.0.0.1:0: eight
//! streams for about a second over HTTP and over WebSocket, with a sane report each time.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use kfrtrl::api::{AppState, ServerConfig, serve};
use kfrtrl::engine::ModelRequest;
use kfrtrl::load::{LoadConfig, LoadReport, Protocol, run};

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
    let model = ModelRequest { name: "small".into(), hidden: Some(32), ..Default::default() };
    let state = AppState::new(ServerConfig { models: vec![model], ..Default::default() }).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    state.wait_ready().await;

    let mut cfg = LoadConfig {
        url: format!("http://{addr}"),
        model: "small".into(),
        streams: 8,
        tokens_per_message: 1,
        protocol: Protocol::Http,
        pipeline: 1,
        duration: Duration::from_secs(1),
        stream_prefix: "load".into(),
    };
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
