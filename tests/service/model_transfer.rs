//! Moving a model between servers (issue 18.2): a frozen model refuses changes with 503 and
//! `Retry-After`; its snapshot (evicted streams included) imported on another server continues
//! bit for bit like a control that never moved, survives the new server's restart, and a
//! damaged, truncated, foreign or oversized file is refused with a problem and changes nothing.

use kfrtrl::api::{Limits, ServerConfig};
use kfrtrl::engine::Durability;
use kfrtrl::engine::model_file::{self, ModelFile};
use serde_json::{Value, json};

use crate::support::binary::temp_dir;
use crate::support::{TestServer, model};

/// A byte model with two resident slots, so that a third stream is evicted to disk.
fn config(dir: Option<&std::path::Path>) -> ServerConfig {
    let mut m = model("m", 256, 8);
    m.max_streams = Some(2);
    ServerConfig {
        limits: Limits { max_stored_streams: 8, ..Limits::default() },
        models: vec![m],
        durability: dir.map(Durability::new),
        ..Default::default()
    }
}

async fn feed(server: &TestServer, stream: &str, text: &str) -> Value {
    let body = json!({"text": text, "top_k": 3, "return_losses": true});
    server.tokens("m", stream, body).await
}

async fn snapshot(server: &TestServer, model: &str) -> (Vec<u8>, String) {
    let response = server.http.get(server.url(&format!("/v1/models/{model}/snapshot"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/octet-stream");
    let tag = response.headers()["etag"].to_str().unwrap().to_owned();
    (response.bytes().await.unwrap().to_vec(), tag)
}

async fn upload(server: &TestServer, model: &str, bytes: Vec<u8>) -> crate::support::Reply {
    server.send(server.http.put(server.url(&format!("/v1/models/{model}/snapshot"))).body(bytes)).await
}

#[tokio::test]
async fn a_moved_model_continues_bit_for_bit_like_one_that_never_moved() {
    let (source_dir, target_dir, control_dir) =
        (temp_dir("move-src"), temp_dir("move-dst"), temp_dir("move-ctl"));
    let source = TestServer::start(config(Some(&source_dir))).await;
    let control = TestServer::start(config(Some(&control_dir))).await;
    let texts =
        [("a", "the quick brown fox "), ("b", "jumps over the lazy dog "), ("c", "abcdefgh abcdefgh ")];
    for (stream, text) in texts {
        assert_eq!(feed(&source, stream, text).await, feed(&control, stream, text).await);
    }
    let streams = source.get("/v1/models/m/streams").await;
    assert_eq!(streams.body["total"], 3, "{}", streams.body);
    assert_eq!(
        source.get("/v1/models/m").await.body["stats"]["resident_streams"],
        2,
        "one stream is on disk"
    );

    // Frozen: reads work, every change is refused with a retryable 503.
    let frozen = source.post("/v1/models/m/freeze", &json!({})).await;
    assert_eq!((frozen.status, frozen.body["state"].as_str()), (200, Some("frozen")), "{}", frozen.body);
    source.schemas.check("ModelInfo", &frozen.body);
    let refused = source.post("/v1/models/m/streams/a/tokens", &json!({"text": "x"})).await;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (503, Some("urn:kfrtrl:problem:model-frozen")),
        "{}",
        refused.body
    );
    assert_eq!(refused.headers["retry-after"], "1");
    let predict = source.post("/v1/models/m/streams/a/predict", &json!({"text": "x"})).await;
    assert_eq!(predict.status, 503, "{}", predict.body);
    assert_eq!(source.delete("/v1/models/m/streams/b").await.status, 503);
    assert_eq!(source.get("/v1/models/m/streams/a").await.status, 200);

    let (bytes, tag) = snapshot(&source, "m").await;
    let (again, again_tag) = snapshot(&source, "m").await;
    assert_eq!(tag, again_tag, "a frozen model exports the same state twice");
    assert!(bytes.len() == again.len(), "the same size too");

    // Imported on another server: 201 with the snapshot's tag; its own export is the same file.
    let target = TestServer::start(ServerConfig { models: vec![], ..config(Some(&target_dir)) }).await;
    let imported = upload(&target, "m", bytes.clone()).await;
    assert_eq!(imported.status, 201, "{}", imported.body);
    assert_eq!(imported.headers["location"], "/v1/models/m");
    assert_eq!(imported.headers["etag"].to_str().unwrap(), tag);
    target.schemas.check("ModelInfo", &imported.body);
    assert_eq!(imported.body["stats"]["streams"], 3, "{}", imported.body);
    assert_eq!(snapshot(&target, "m").await.1, tag, "the imported state exports byte for byte what came in");
    // A second import under the same name is refused; the model is unchanged.
    let twice = upload(&target, "m", bytes.clone()).await;
    assert_eq!(
        (twice.status, twice.body["type"].as_str()),
        (409, Some("urn:kfrtrl:problem:duplicate-model"))
    );

    // The source lets go of it.
    assert_eq!(source.delete("/v1/models/m").await.status, 204);
    source.stop().await;

    // Every stream, the evicted one included, continues exactly like the control's.
    for (stream, text) in texts.iter().rev() {
        assert_eq!(feed(&target, stream, text).await, feed(&control, stream, text).await, "stream {stream}");
    }
    // A new stream too: its random signs depend on the model's count of opened streams.
    assert_eq!(feed(&target, "d", "new").await, feed(&control, "d", "new").await);

    // The import was durable: the target restarts with it.
    target.stop().await;
    let target = TestServer::start(ServerConfig { models: vec![], ..config(Some(&target_dir)) }).await;
    for (stream, text) in texts {
        assert_eq!(feed(&target, stream, text).await, feed(&control, stream, text).await, "after restart");
    }
    assert_eq!(snapshot(&target, "m").await.1, snapshot(&control, "m").await.1);

    // Thawed, a model takes changes again.
    let thawed = control.delete("/v1/models/m/freeze").await;
    assert_eq!((thawed.status, thawed.body["state"].as_str()), (200, Some("ready")));
    target.stop().await;
    control.stop().await;
    for dir in [source_dir, target_dir, control_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn a_thawed_model_serves_again_and_an_in_memory_server_refuses_streams_on_disk() {
    let dir = temp_dir("move-thaw");
    let source = TestServer::start(config(Some(&dir))).await;
    for stream in ["a", "b", "c"] {
        feed(&source, stream, "hello").await;
    }
    assert_eq!(source.post("/v1/models/m/freeze", &json!({})).await.status, 200);
    let (bytes, _) = snapshot(&source, "m").await;
    let thawed = source.delete("/v1/models/m/freeze").await;
    assert_eq!((thawed.status, thawed.body["state"].as_str()), (200, Some("ready")), "{}", thawed.body);
    feed(&source, "a", "again").await;

    // Without a data directory there is nowhere to keep the evicted stream: 422, nothing created.
    let memory = TestServer::start(ServerConfig { models: vec![], ..config(None) }).await;
    let refused = upload(&memory, "m", bytes).await;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (422, Some("urn:kfrtrl:problem:invalid-snapshot")),
        "{}",
        refused.body
    );
    assert_eq!(memory.get("/v1/models/m").await.status, 404);

    // A model whose streams are all resident moves into memory, under another name.
    let small = json!({"name": "s", "vocab_size": 256, "hidden": 8, "max_streams": 4});
    assert_eq!(source.post("/v1/models", &small).await.status, 201);
    feed_model(&source, "s", "x", "resident only").await;
    let (bytes, tag) = snapshot(&source, "s").await;
    let renamed = upload(&memory, "copy", bytes).await;
    assert_eq!((renamed.status, renamed.body["name"].as_str()), (201, Some("copy")), "{}", renamed.body);
    let next = json!({"text": "more", "top_k": 2});
    let from_copy = memory.tokens("copy", "x", next.clone()).await;
    let from_source = source.tokens("s", "x", next).await;
    assert_eq!(from_copy["predictions"], from_source["predictions"]);
    assert_eq!(from_copy["mean_loss_bits"], from_source["mean_loss_bits"]);
    assert_ne!(snapshot(&memory, "copy").await.1, tag, "it learned since");
    memory.stop().await;
    source.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn feed_model(server: &TestServer, model: &str, stream: &str, text: &str) {
    server.tokens(model, stream, json!({"text": text})).await;
}

#[tokio::test]
async fn a_damaged_truncated_foreign_or_oversized_snapshot_is_refused_and_changes_nothing() {
    let source_dir = temp_dir("move-bad-src");
    let target_dir = temp_dir("move-bad-dst");
    let source = TestServer::start(config(Some(&source_dir))).await;
    for stream in ["a", "b", "c"] {
        feed(&source, stream, "some text").await;
    }
    let (bytes, _) = snapshot(&source, "m").await;
    let limits = Limits { max_snapshot_bytes: bytes.len() as u64, ..config(None).limits };
    let target =
        TestServer::start(ServerConfig { models: vec![], limits, ..config(Some(&target_dir)) }).await;

    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let truncated = bytes[..bytes.len() - 100].to_vec();
    let foreign = model_file::to_bytes(
        &ModelFile::init(&kfrtrl::core::ModelConfig { hidden: 8, ..Default::default() }).unwrap(),
    )
    .unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("damaged", damaged),
        ("truncated", truncated),
        ("a trained model file, not a server snapshot", foreign),
        ("json", br#"{"vocab_size": 256}"#.to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, body) in cases {
        let refused = upload(&target, "m", body).await;
        assert_eq!(
            (refused.status, refused.body["type"].as_str()),
            (422, Some("urn:kfrtrl:problem:invalid-snapshot")),
            "{what}: {}",
            refused.body
        );
        assert_eq!(target.get("/v1/models/m").await.status, 404, "{what}");
        assert!(!target_dir.join("models").join("m").exists(), "{what}: nothing left on disk");
    }
    let mut oversized = bytes.clone();
    oversized.push(0);
    let refused = upload(&target, "m", oversized).await;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (413, Some("urn:kfrtrl:problem:body-too-large"))
    );
    let bad_name = upload(&target, "-bad", bytes.clone()).await;
    assert_eq!(bad_name.status, 400, "{}", bad_name.body);

    // The intact file still imports after all of that.
    assert_eq!(upload(&target, "m", bytes).await.status, 201);
    target.stop().await;
    source.stop().await;
    let _ = std::fs::remove_dir_all(source_dir);
    let _ = std::fs::remove_dir_all(target_dir);
}
