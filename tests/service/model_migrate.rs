//! `kfrtrl migrate` (issue 18.3) through its library function, between two servers on loopback:
//! under live traffic no acknowledged token is lost; a move cut off after its import is finished
//! by a rerun; a refused import leaves the model whole and serving on the source; the source's
//! delete is conditional on the exported content (`If-Match`), so a model that changed since is
//! not deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kfrtrl::api::{Limits, ServerConfig};
use kfrtrl::engine::Durability;
use kfrtrl::tools::migrate::{Endpoints, migrate};
use serde_json::json;

use crate::support::binary::temp_dir;
use crate::support::{TestServer, model};

fn server(dir: &std::path::Path, models: &[&str]) -> ServerConfig {
    ServerConfig {
        limits: Limits { max_stored_streams: 64, ..Limits::default() },
        models: models.iter().map(|name| model(name, 256, 8)).collect(),
        durability: Some(Durability::new(dir)),
        ..Default::default()
    }
}

fn ends(from: &TestServer, to: &TestServer) -> Endpoints {
    Endpoints {
        from: from.url(""),
        to: to.url(""),
        api_key: None,
        timeout: Duration::from_secs(30),
        verify_export: true,
    }
}

/// A client that sends 8-byte requests to one stream, to the source until the model is gone
/// from it, then to the target, as a router would after the move; counts what was acknowledged.
async fn client(
    http: reqwest::Client,
    urls: [String; 2],
    stream: String,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let (mut acknowledged, mut refused, mut at) = (0u64, 0u64, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let url = format!("{}/v1/models/m/streams/{stream}/tokens", urls[at]);
        let reply = http.post(&url).json(&json!({"text": "abcdefgh"})).send().await.unwrap();
        match reply.status().as_u16() {
            200 => {
                let body: serde_json::Value = reply.json().await.unwrap();
                acknowledged += body["consumed"].as_u64().unwrap();
            }
            503 => {
                let body: serde_json::Value = reply.json().await.unwrap();
                assert_eq!(body["type"], "urn:kfrtrl:problem:model-frozen", "{body}");
                refused += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            404 if at == 0 => at = 1,
            404 => {
                // Between the delete on the source and nothing: the target has it first.
                panic!("the model is on neither server");
            }
            other => panic!("unexpected {other}: {}", reply.text().await.unwrap()),
        }
    }
    (acknowledged, refused)
}

#[tokio::test]
async fn a_model_moved_under_load_keeps_every_acknowledged_token() {
    let (source_dir, target_dir) = (temp_dir("migrate-src"), temp_dir("migrate-dst"));
    let source = TestServer::start(server(&source_dir, &["m"])).await;
    let target = TestServer::start(server(&target_dir, &[])).await;
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    let tasks: Vec<_> = streams
        .iter()
        .map(|s| {
            let urls = [source.url(""), target.url("")];
            tokio::spawn(client(source.http.clone(), urls, s.clone(), stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http = reqwest::Client::new();
    let moved = migrate(&http, &ends(&source, &target), "m").await.expect("moved");
    assert_eq!(moved.outcome, "moved");
    assert!(moved.frozen_seconds <= moved.seconds);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = BTreeMap::new();
    let mut refused = 0;
    for (stream, task) in streams.iter().zip(tasks) {
        let (ack, refusals) = task.await.unwrap();
        acknowledged.insert(stream.clone(), ack);
        refused += refusals;
    }
    assert_eq!(source.get("/v1/models/m").await.status, 404, "the source let go of it");
    for (stream, ack) in &acknowledged {
        let info = target.get(&format!("/v1/models/m/streams/{stream}")).await;
        assert_eq!(info.body["position"].as_u64(), Some(*ack), "stream {stream}: {}", info.body);
    }
    let total: u64 = acknowledged.values().sum();
    assert_eq!(target.get("/v1/models/m").await.body["stats"]["symbols_seen"].as_u64(), Some(total));
    eprintln!(
        "moved {} bytes in {:.3} s, frozen {:.3} s, {refused} requests refused",
        moved.bytes, moved.seconds, moved.frozen_seconds
    );
    source.stop().await;
    target.stop().await;
    let _ = std::fs::remove_dir_all(source_dir);
    let _ = std::fs::remove_dir_all(target_dir);
}

#[tokio::test]
async fn a_cut_off_move_is_finished_by_a_rerun_and_a_refused_one_leaves_the_source_serving() {
    let (source_dir, target_dir) = (temp_dir("migrate-rerun-src"), temp_dir("migrate-rerun-dst"));
    let source = TestServer::start(server(&source_dir, &["m"])).await;
    let limits = Limits { max_hidden: 8, ..server(&target_dir, &[]).limits };
    let target = TestServer::start(ServerConfig { limits, ..server(&target_dir, &[]) }).await;
    source.tokens("m", "a", json!({"text": "some bytes"})).await;

    // Cut off after the import: frozen and exported on the source, imported on the target.
    assert_eq!(source.post("/v1/models/m/freeze", &json!({})).await.status, 200);
    let export =
        source.http.get(source.url("/v1/models/m/snapshot")).send().await.unwrap().bytes().await.unwrap();
    let put =
        target.http.put(target.url("/v1/models/m/snapshot")).body(export.to_vec()).send().await.unwrap();
    assert_eq!(put.status(), 201);
    let http = reqwest::Client::new();
    let finished = migrate(&http, &ends(&source, &target), "m").await.expect("finished");
    assert_eq!(finished.outcome, "finished");
    assert_eq!(source.get("/v1/models/m").await.status, 404);
    assert_eq!(target.get("/v1/models/m/streams/a").await.body["position"], 10);
    let again = migrate(&http, &ends(&source, &target), "m").await.expect_err("nothing left to move");
    assert!(again.reason.contains("on the target already"), "{again}");

    // A model the target refuses (its hidden size is past the target's limit): the source keeps
    // it, thawed, and the target holds nothing.
    let big = json!({"name": "big", "vocab_size": 256, "hidden": 16, "max_streams": 4});
    assert_eq!(source.post("/v1/models", &big).await.status, 201);
    source.tokens("big", "b", json!({"text": "x"})).await;
    let refused = migrate(&http, &ends(&source, &target), "big").await.expect_err("refused");
    assert!(refused.reason.contains("import: 422"), "{refused}");
    let info = source.get("/v1/models/big").await;
    assert_eq!(info.body["state"], "ready", "{}", info.body);
    source.tokens("big", "b", json!({"text": "y"})).await;
    assert_eq!(target.get("/v1/models/big").await.status, 404);
    source.stop().await;
    target.stop().await;
    let _ = std::fs::remove_dir_all(source_dir);
    let _ = std::fs::remove_dir_all(target_dir);
}

#[tokio::test]
async fn a_conditional_delete_spares_a_model_that_changed_since_its_export() {
    let dir = temp_dir("migrate-if-match");
    let source = TestServer::start(server(&dir, &["m"])).await;
    source.tokens("m", "a", json!({"text": "before"})).await;
    let exported = source.http.get(source.url("/v1/models/m/snapshot")).send().await.unwrap();
    let old = exported.headers()["etag"].to_str().unwrap().to_owned();
    source.tokens("m", "a", json!({"text": "after"})).await;

    let started = Instant::now();
    let refused = source.send(source.http.delete(source.url("/v1/models/m")).header("if-match", &old)).await;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (412, Some("urn:kfrtrl:problem:precondition-failed")),
        "{}",
        refused.body
    );
    let info = source.get("/v1/models/m").await;
    assert_eq!(info.body["state"], "ready", "a model that was not frozen is thawed again: {}", info.body);
    source.tokens("m", "a", json!({"text": "still serving"})).await;

    let current = source.http.get(source.url("/v1/models/m/snapshot")).send().await.unwrap();
    let tag = current.headers()["etag"].to_str().unwrap().to_owned();
    let deleted = source.send(source.http.delete(source.url("/v1/models/m")).header("if-match", &tag)).await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    source.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
