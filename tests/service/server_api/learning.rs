//! Learning through the API: a repetitive stream's loss falls, `predict` changes nothing, and
//! the default model learns `abcdefgh` repeated.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_through_the_api_lowers_the_loss_of_a_repetitive_stream() {
    let definition = ModelRequest { lr: Some(1e-2), cell: Some(CellKind::Rhn), ..model("learn", 256, 16) };
    let server = TestServer::start(config(vec![definition])).await;
    let text = "the cat sat on the mat. ".repeat(40);
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(48).collect();
    let mut means = Vec::new();
    for chunk in &chunks {
        let reply = server.tokens("learn", "rep", json!({"text": std::str::from_utf8(chunk).unwrap()})).await;
        means.push(reply["mean_loss_bits"].as_f64().unwrap());
    }
    let (first, last) = (means[0], means[means.len() - 1]);
    assert!(first > 5.0, "starts near uniform: {means:?}");
    assert!(last < 0.5 * first, "the loss did not fall: {means:?}");
    let r = server.get("/v1/models/learn").await;
    let avg = r.body["stats"]["loss_bits_avg"].as_f64().unwrap();
    assert!(avg < 0.6 * first, "moving average {avg}");
    assert!(r.body["stats"]["top1_accuracy_avg"].as_f64().unwrap() > 0.2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_changes_nothing() {
    let definition = || ModelRequest { seed: Some(3), lr: Some(1e-2), ..model("m", 256, 8) };
    let probed = TestServer::start(config(vec![definition()])).await;
    let control = TestServer::start(config(vec![definition()])).await;
    for server in [&probed, &control] {
        server.tokens("m", "s", json!({"text": "abracadabra "})).await;
        server.tokens("m", "other", json!({"text": "xyz"})).await;
    }
    // Probe one server with predicts (with and without reset, on a known and a new stream).
    for body in [json!({"text": "cadabra"}), json!({"text": "zz", "reset": true, "learn": true})] {
        let r = probed.post("/v1/models/m/streams/s/predict", &body).await;
        assert_eq!(r.status, StatusCode::OK.as_u16(), "{}", r.body);
        probed.schemas.check("TokensReply", &r.body);
        assert_eq!(r.body["position"], 12);
    }
    let r = probed.post("/v1/models/m/streams/fresh/predict", &json!({"tokens": [1, 2]})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND.as_u16(), "a predict does not create a stream");
    assert_eq!(r.body["type"], "urn:kfrtrl:problem:unknown-stream");
    // A predict of one token gives the distribution a real request would be scored against.
    let peek =
        probed.post("/v1/models/m/streams/s/predict", &json!({"text": "a", "return_losses": true})).await;

    let probed_reply =
        probed.tokens("m", "s", json!({"text": "abra", "return_losses": true, "top_k": 10})).await;
    let control_reply =
        control.tokens("m", "s", json!({"text": "abra", "return_losses": true, "top_k": 10})).await;
    assert_eq!(probed_reply, control_reply, "a predict changed the stream or the weights");
    assert_eq!(peek.body["losses_bits"][0], control_reply["losses_bits"][0]);
    let other_p = probed.tokens("m", "other", json!({"text": "q", "return_losses": true})).await;
    let other_c = control.tokens("m", "other", json!({"text": "q", "return_losses": true})).await;
    assert_eq!(other_p, other_c);
    let p = probed.get("/v1/models/m").await.body["stats"].clone();
    let c = control.get("/v1/models/m").await.body["stats"].clone();
    assert_eq!(p["symbols_seen"], c["symbols_seen"]);
    assert_eq!(p["optimizer_updates"], c["optimizer_updates"]);
    assert_eq!(p["symbols_predicted"], 10);
    assert_eq!(p["streams"], c["streams"]);
    probed.stop().await;
    control.stop().await;
}

/// Regression (issue 17): the server's default model did not learn a trivial unbounded stream.
/// `abcdefgh` repeated, one stream, requests of 32 bytes: within 4,800 tokens the default model
/// must put `a` first after `h` with probability at least 0.9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_learns_abcdefgh_repeated() {
    let server = TestServer::start(ServerConfig::default()).await;
    let chunk = "abcdefgh".repeat(4);
    let mut last = Value::Null;
    for _ in 0..4_800 / 32 {
        last = server.tokens("default", "abc", json!({"text": chunk, "top_k": 1})).await;
    }
    let top = &last["predictions"][0];
    eprintln!("after 4,800 tokens: {top} (mean loss of the last request {} bits)", last["mean_loss_bits"]);
    assert_eq!(top["text"], "a", "the prediction after `h`: {last}");
    assert!(top["prob"].as_f64().unwrap() >= 0.9, "{top}");
    server.stop().await;
}
