//! Boot with a data directory: the server answers `/healthz` at once but `/readyz` only once every
//! model is restored, and the checkpoint route writes a file whose reply matches its schema.

use std::path::Path;
use std::time::Duration;

use crate::support::binary::temp_dir;
use kfrtrl::api::{AppState, ServerConfig, StartError, serve};
use kfrtrl::engine::{Durability, Engine, EngineLimits, EngineMetrics, ModelDefinition, checkpoint};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn durability(dir: &Path) -> Durability {
    Durability { checkpoint_interval: None, stream_idle_ttl: None, ..Durability::new(dir) }
}

/// The bytes and file name of a fresh model's first checkpoint.
async fn checkpoint_of(name: &str) -> (String, Vec<u8>) {
    let dir = temp_dir("source");
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let engine = Engine::with_durability(EngineLimits::default(), metrics, durability(&dir));
    let def = ModelDefinition { hidden: 8, vocab_size: 16, ..ModelDefinition::with_defaults(name, 4) };
    engine.create_model(def).await.unwrap();
    engine.shutdown().await;
    let (_, path) = checkpoint::list(&dir.join("models").join(name)).unwrap().pop().unwrap();
    (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_every_model_is_restored() {
    let (file, bytes) = checkpoint_of("m").await;
    let dir = temp_dir("fifo");
    let model_dir = dir.join("models/m");
    std::fs::create_dir_all(&model_dir).unwrap();
    // The checkpoint is a named pipe: restoring blocks on it until the test writes the bytes, so
    // the server is observably "loading" for as long as the test wants.
    let fifo = model_dir.join(&file);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());

    let config =
        ServerConfig { models: Vec::new(), durability: Some(durability(&dir)), ..Default::default() };
    let state = AppState::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
    for _ in 0..5 {
        assert_eq!(get("/healthz").await.unwrap().status(), 200, "live while loading");
        let ready = get("/readyz").await.unwrap();
        assert_eq!(ready.status(), 503, "not ready while a model is being restored");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Regression: `/v1` answered during the restore, so the model being restored looked
    // missing (404), and creating it raced the restore. (Checked after the restore is let go,
    // so that a failure cannot leave it blocked on the pipe.)
    let create = http.post(format!("http://{addr}/v1/models")).json(&json!({"name": "m"})).send();
    let mut while_loading = Vec::new();
    for response in [get("/v1/models/m").await.unwrap(), create.await.unwrap()] {
        let retry_after = response.headers().contains_key("retry-after");
        let status = response.status().as_u16();
        let problem: Value = response.json().await.unwrap();
        while_loading.push((status, retry_after, problem["type"].clone()));
    }
    assert!(!state.is_ready());

    let writer = std::thread::spawn(move || std::fs::write(&fifo, bytes).unwrap());
    tokio::time::timeout(Duration::from_secs(30), state.wait_ready()).await.expect("ready after the restore");
    writer.join().unwrap();
    for answer in while_loading {
        assert_eq!(answer, (503, true, json!("urn:kfrtrl:problem:not-ready")), "a /v1 request while loading");
    }
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let models: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(models["models"][0]["name"], "m", "{models}");

    // An on-demand checkpoint: a new file, described by a reply valid against its schema.
    let reply = http.post(format!("http://{addr}/v1/models/m/checkpoint")).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let reply: Value = reply.json().await.unwrap();
    let schema: Value =
        serde_json::from_str(include_str!("../../proto-schemas/checkpoint_reply.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    assert!(validator.is_valid(&reply), "{reply}");
    assert!(Path::new(reply["path"].as_str().unwrap()).is_file());
    let missing = http.post(format!("http://{addr}/v1/models/nope/checkpoint")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let problem: Value = missing.json().await.unwrap();
    assert_eq!(problem["type"], json!("urn:kfrtrl:problem:unknown-model"));

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_data_directory_refuses_checkpoints_with_409() {
    let config = ServerConfig {
        models: vec![kfrtrl::engine::ModelRequest {
            name: "m".into(),
            hidden: Some(8),
            ..Default::default()
        }],
        ..Default::default()
    };
    let state = AppState::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    state.wait_ready().await;
    let reply =
        reqwest::Client::new().post(format!("http://{addr}/v1/models/m/checkpoint")).send().await.unwrap();
    assert_eq!(reply.status(), 409);
    let problem: Value = reply.json().await.unwrap();
    assert_eq!(problem["type"], json!("urn:kfrtrl:problem:not-durable"));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A write-ahead log that fails (a full disk) takes its model out of service: its changes get
/// 503 storage-failure, it reads as `failed`, and `/readyz` says why, until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_ahead_log_shows_in_readyz_and_the_model_state() {
    let dir = temp_dir("wal-full");
    let config = ServerConfig {
        models: vec![crate::support::model("m", 16, 8)],
        durability: Some(durability(&dir)),
        ..Default::default()
    };
    let server = crate::support::TestServer::start(config).await;
    let tokens = |stream: &str| {
        server
            .http
            .post(server.url(&format!("/v1/models/m/streams/{stream}/tokens")))
            .json(&json!({"tokens": [1, 2]}))
    };
    assert_eq!(server.send(tokens("a")).await.status, 200);
    let first = server.send(server.http.post(server.url("/v1/models/m/checkpoint"))).await;
    assert_eq!(first.status, 200);
    // Every segment the next checkpoint could start is a device that refuses writes.
    assert!(Path::new("/dev/full").exists(), "this test needs the device /dev/full");
    let next_seq = first.body["next_seq"].as_u64().unwrap();
    for seq in next_seq + 1..next_seq + 64 {
        let segment = dir.join("models/m").join(kfrtrl::engine::wal::segment_name(seq));
        std::os::unix::fs::symlink("/dev/full", segment).unwrap();
    }
    assert_eq!(server.send(tokens("a")).await.status, 200);
    let _ = server.send(server.http.post(server.url("/v1/models/m/checkpoint"))).await;
    let refused = server.send(tokens("b")).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["type"], json!("urn:kfrtrl:problem:storage-failure"));
    let ready = server.send(server.http.get(server.url("/readyz"))).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body["detail"].as_str().unwrap().contains("its storage failed"), "{}", ready.body);
    let info = server.send(server.http.get(server.url("/v1/models/m"))).await;
    assert_eq!(info.status, 200);
    server.schemas.check("ModelInfo", &info.body);
    assert_eq!(info.body["state"], json!("failed"));
    assert_eq!(server.send(server.http.get(server.url("/healthz"))).await.status, 200, "still live");
    // No final checkpoint of a failed model: not a clean stop (issue 19.9).
    let stopped = server.stop_result().await;
    assert!(
        matches!(stopped, Err(StartError::Stop(ref r)) if r.contains("storage had failed")),
        "{stopped:?}"
    );
}
