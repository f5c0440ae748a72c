//! The HTTP and WebSocket API against a real server running in-process on 127.0.0.1:0, with real
//! HTTP (reqwest) and WebSocket (tokio-tungstenite) clients. Every JSON reply is validated against
//! the schemas of the server's own `/openapi.json` (built from `proto-schemas/`).

use std::collections::HashMap;
use std::f64::consts::LN_2;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Reply, TestServer, model};

use kfrtrl::api::{Limits, SCHEMAS, ServerConfig};
use kfrtrl::core::rng::derive_key;
use kfrtrl::core::{CellKind, Optimizer, Params, SlotStep, StreamSet};
use kfrtrl::engine::{ModelRequest, stream_label};

mod learning;

/// Waits for a condition, checking it every few milliseconds, failing after 20 s.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn config(models: Vec<ModelRequest>) -> ServerConfig {
    ServerConfig { limits: Limits { max_streams: 16, ..Limits::default() }, models, ..Default::default() }
}

#[test]
fn every_schema_file_is_a_valid_2020_12_schema() {
    for (name, file, text) in SCHEMAS {
        let schema: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema", "{file}");
        jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{name} ({file}): {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_with_its_schema() {
    let server = TestServer::start(config(vec![model("bytes", 256, 8)])).await;

    for (path, status) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let r = server.get(path).await;
        assert_eq!(r.status, StatusCode::OK.as_u16());
        server.schemas.check("Health", &r.body);
        assert_eq!(r.body["status"], status);
    }

    // Models: create, list, describe.
    let create = json!({"name": "small", "vocab_size": 7, "hidden": 4, "cell": "tanh", "learner": "uoro",
                        "optimizer": "sgd", "lr": 0.05, "clip": 0.0, "seed": 9, "max_streams": 3,
                        "tokens_per_update": 4, "tokens_per_update_ramp": 2, "update_unit": "tokens"});
    server.schemas.check("ModelConfig", &create);
    let r = server.post("/v1/models", &create).await;
    assert_eq!(r.status, StatusCode::CREATED.as_u16(), "{}", r.body);
    assert_eq!(r.headers["location"], "/v1/models/small");
    server.schemas.check("ModelInfo", &r.body);
    assert_eq!(r.body["config"]["learner"], "uoro");
    assert_eq!(r.body["config"]["max_streams"], 3);
    assert_eq!(
        (&r.body["config"]["tokens_per_update"], &r.body["config"]["tokens_per_update_ramp"]),
        (&json!(4), &json!(2))
    );
    assert_eq!(r.body["config"]["update_unit"], "tokens");
    assert_eq!(r.body["state"], "ready");
    let r = server.get("/v1/models").await;
    server.schemas.check("ModelList", &r.body);
    let names: Vec<&str> =
        r.body["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bytes", "small"]);
    let r = server.get("/v1/models/bytes").await;
    server.schemas.check("ModelInfo", &r.body);
    assert_eq!(r.body["config"]["cell"], "rhn", "server defaults fill the missing fields");
    assert_eq!(r.body["config"]["lr"], kfrtrl::core::model::DEFAULT_MODEL_LR);
    assert_eq!(r.body["config"]["learner"], "ok");

    // Tokens: text on a byte-level model, losses on request, printable predictions as text.
    let a = server
        .tokens("bytes", "alpha-stream", json!({"text": "hello", "return_losses": true, "top_k": 300}))
        .await;
    assert_eq!((a["position"].as_u64(), a["consumed"].as_u64()), (Some(5), Some(5)));
    assert_eq!(a["model"], "bytes");
    assert_eq!(a["stream"], "alpha-stream");
    let losses: Vec<f64> = a["losses_bits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 5);
    let mean = losses.iter().sum::<f64>() / 5.0;
    assert!((mean - a["mean_loss_bits"].as_f64().unwrap()).abs() < 1e-12);
    assert!((losses[0] - 8.0).abs() < 0.1, "a fresh model is near-uniform: {}", losses[0]);
    let predictions = a["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 256, "top_k is capped at the vocabulary");
    let total: f64 = predictions.iter().map(|p| p["prob"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4);
    assert!(predictions.windows(2).all(|w| w[0]["prob"].as_f64() >= w[1]["prob"].as_f64()));
    // Issue 19.12: predictions of non-printable bytes carried no text; now an escaped form.
    for p in predictions {
        let token = p["token"].as_u64().unwrap();
        let text = p["text"].as_str().unwrap_or_else(|| panic!("every byte has a text: {p}"));
        let want = match token {
            0x20..0x7f => char::from(token as u8).to_string(),
            0x0a => "\\n".to_owned(),
            0x09 => "\\t".to_owned(),
            0x0d => "\\r".to_owned(),
            _ => format!("\\x{token:02x}"),
        };
        assert_eq!(text, want, "{p}");
    }
    let b = server.tokens("bytes", "alpha-stream", json!({"tokens": [104, 105], "learn": false})).await;
    assert_eq!((b["position"].as_u64(), b["consumed"].as_u64()), (Some(7), Some(2)));
    assert!(b.get("losses_bits").is_none());
    assert_eq!(b["predictions"].as_array().unwrap().len(), 5, "top_k defaults to 5");
    let c = server.tokens("bytes", "alpha-stream", json!({"text": "abc", "reset": true, "top_k": 0})).await;
    assert_eq!(c["position"], 10, "position counts every token since the stream was created");
    assert_eq!(c["predictions"], json!([]));

    // Predict: the same reply shape, the position unchanged.
    let r = server.post("/v1/models/bytes/streams/alpha-stream/predict", &json!({"text": "xyz"})).await;
    assert_eq!(r.status, StatusCode::OK.as_u16(), "{}", r.body);
    server.schemas.check("TokensReply", &r.body);
    assert_eq!((r.body["position"].as_u64(), r.body["consumed"].as_u64()), (Some(10), Some(3)));

    // Streams: describe, forget.
    let r = server.get("/v1/models/bytes/streams/alpha-stream").await;
    server.schemas.check("StreamInfo", &r.body);
    assert_eq!(r.body["position"], 10);
    assert_eq!(r.body["sequence_position"], 3, "the reset restarted the sequence");
    assert_eq!(r.body["symbols_learned"], 8);
    assert_eq!(r.body["queued_tokens"], 0);
    let r = server.get("/v1/models/bytes").await;
    server.schemas.check("ModelInfo", &r.body);
    let stats = &r.body["stats"];
    assert_eq!((stats["symbols_seen"].as_u64(), stats["symbols_learned"].as_u64()), (Some(10), Some(8)));
    assert_eq!(stats["symbols_predicted"], 3);
    assert_eq!(stats["streams"], 1);
    assert_eq!(stats["optimizer_updates"], 8);
    assert!(stats["loss_bits_avg"].as_f64().unwrap() > 0.0);
    let r = server.delete("/v1/models/bytes/streams/alpha-stream").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT.as_u16());
    let r = server.get("/v1/models/bytes/streams/alpha-stream").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND.as_u16());
    assert_eq!(r.body["type"], "urn:kfrtrl:problem:unknown-stream");
    let again = server.tokens("bytes", "alpha-stream", json!({"text": "a"})).await;
    assert_eq!(again["position"], 1, "a forgotten stream starts over");

    // The other model: tokens, then delete it.
    let r = server.tokens("small", "x", json!({"tokens": [0, 6, 3]})).await;
    assert_eq!(r["predictions"][0].get("text"), None, "no text for a non-byte model");
    let r = server.delete("/v1/models/small").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT.as_u16());
    let r = server.get("/v1/models/small").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND.as_u16());
    assert_eq!(r.body["type"], "urn:kfrtrl:problem:unknown-model");

    // Metrics: every family, route templates as labels, no stream names.
    let text = server.metrics().await;
    for family in [
        "kfrtrl_symbols_total",
        "kfrtrl_loss_bits_bucket",
        "kfrtrl_loss_bits_avg",
        "kfrtrl_top1_accuracy_avg",
        "kfrtrl_optimizer_updates_total",
        "kfrtrl_gradient_norm",
        "kfrtrl_nonfinite_updates_total",
        "kfrtrl_batch_size_bucket",
        "kfrtrl_step_duration_seconds_bucket",
        "kfrtrl_queue_depth",
        "kfrtrl_active_streams",
        "kfrtrl_websocket_connections",
        "kfrtrl_http_requests_total",
        "kfrtrl_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "missing {family}");
    }
    assert!(text.contains(
        r#"kfrtrl_http_requests_total{method="POST",route="/v1/models/{model}/streams/{stream}/tokens",status="200"}"#
    ));
    assert!(text.contains(r#"kfrtrl_symbols_total{mode="predict",model="bytes"} 3"#), "{text}");
    assert!(text.contains(r#"kfrtrl_symbols_total{mode="advance",model="bytes"} 2"#));
    assert!(!text.contains("alpha-stream"), "no per-stream labels");
    assert!(!text.contains(r#"model="small""#), "a deleted model's series are gone");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_problem_with_a_stable_type() {
    let limits =
        Limits { max_body_bytes: 4096, max_tokens_per_request: 64, queue_tokens: 1024, ..Limits::default() };
    let server = TestServer::start(ServerConfig {
        limits,
        models: vec![model("bytes", 256, 4), ModelRequest { max_streams: Some(2), ..model("ids", 10, 4) }],
        ..Default::default()
    })
    .await;
    let tokens = "/v1/models/bytes/streams/s/tokens";
    let expect = |r: &Reply, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.body["type"], format!("urn:kfrtrl:problem:{kind}"), "{}", r.body);
        assert!(!r.body["title"].as_str().unwrap().is_empty());
        assert!(!r.body["detail"].as_str().unwrap().is_empty());
    };
    expect(&server.post_raw(tokens, "{\"tokens\": [1,").await, 400, "malformed-json");
    expect(&server.post_raw(tokens, "").await, 400, "malformed-json");
    expect(&server.post(tokens, &json!({"tokens": [1], "learning": true})).await, 400, "unknown-field");
    expect(&server.post(tokens, &json!({"tokens": "abc"})).await, 422, "invalid-request");
    expect(&server.post(tokens, &json!({"tokens": [1], "text": "a"})).await, 422, "invalid-request");
    expect(&server.post(tokens, &json!({"learn": true})).await, 422, "invalid-request");
    expect(&server.post(tokens, &json!({"tokens": [1], "top_k": -1})).await, 422, "invalid-request");
    expect(&server.post(tokens, &json!({"tokens": []})).await, 422, "empty-input");
    expect(&server.post(tokens, &json!({"text": ""})).await, 422, "empty-input");
    let r = server.post(tokens, &json!({"tokens": [1, 2, 256]})).await;
    expect(&r, 422, "token-out-of-range");
    assert_eq!((r.body["index"].as_u64(), r.body["token"].as_u64()), (Some(2), Some(256)));
    expect(&server.post(tokens, &json!({"tokens": [-3]})).await, 422, "token-out-of-range");
    expect(
        &server.post("/v1/models/ids/streams/s/tokens", &json!({"text": "hi"})).await,
        422,
        "text-needs-byte-model",
    );
    let r = server.post(tokens, &json!({"tokens": vec![1; 65]})).await;
    expect(&r, 413, "too-many-tokens");
    assert_eq!(r.body["limit"], 64);
    expect(&server.post(tokens, &json!({"text": "x".repeat(5000)})).await, 413, "body-too-large");
    expect(
        &server.post("/v1/models/nope/streams/s/tokens", &json!({"tokens": [1]})).await,
        404,
        "unknown-model",
    );
    expect(
        &server.post("/v1/models/nope/streams/s/predict", &json!({"tokens": [1]})).await,
        404,
        "unknown-model",
    );
    expect(&server.get("/v1/models/nope").await, 404, "unknown-model");
    expect(&server.delete("/v1/models/nope").await, 404, "unknown-model");
    expect(&server.get("/v1/models/bytes/streams/never").await, 404, "unknown-stream");
    expect(&server.delete("/v1/models/bytes/streams/never").await, 404, "unknown-stream");
    expect(&server.get("/v1/models/bad%20name").await, 400, "invalid-name");
    expect(
        &server.post("/v1/models/bytes/streams/.hidden/tokens", &json!({"tokens": [1]})).await,
        400,
        "invalid-name",
    );
    expect(&server.post("/v1/models", &json!({"name": "a/b"})).await, 400, "invalid-name");
    expect(&server.post("/v1/models", &json!({"name": "bytes"})).await, 409, "duplicate-model");
    expect(&server.post("/v1/models", &json!({"vocab_size": 5})).await, 422, "invalid-request");
    expect(&server.post("/v1/models", &json!({"name": "m", "cell": "gru"})).await, 422, "invalid-request");
    expect(
        &server.post("/v1/models", &json!({"name": "m", "update_unit": "bytes"})).await,
        422,
        "invalid-request",
    );
    expect(&server.post("/v1/models", &json!({"name": "m", "colour": 1})).await, 400, "unknown-field");
    let r = server.post("/v1/models", &json!({"name": "m", "hidden": 0})).await;
    expect(&r, 422, "invalid-config");
    assert_eq!(r.body["field"], "hidden");
    let r = server
        .post("/v1/models", &json!({"name": "m", "tokens_per_update": 1, "tokens_per_update_ramp": 5}))
        .await;
    expect(&r, 422, "invalid-config");
    assert_eq!(r.body["field"], "tokens_per_update_ramp", "a ramp needs more than one token per update");
    let r = server
        .post("/v1/models", &json!({"name": "m", "hidden": 4096, "max_streams": 65536, "learner": "kf-rtrl"}))
        .await;
    expect(&r, 422, "invalid-config");
    assert_eq!(
        r.body["field"], "max_streams",
        "a model beyond the memory limit is refused before allocation"
    );
    expect(&server.get("/v2/nothing").await, 404, "not-found");
    expect(&server.post_raw("/healthz", "").await, 405, "method-not-allowed");
    // The stream limit: a third stream of a two-stream model.
    for s in ["a", "b"] {
        server.tokens("ids", s, json!({"tokens": [1]})).await;
    }
    let r = server.post("/v1/models/ids/streams/c/tokens", &json!({"tokens": [1]})).await;
    expect(&r, 409, "stream-limit");
    assert_eq!(r.body["limit"], 2);
    assert_eq!(server.delete("/v1/models/ids/streams/a").await.status, StatusCode::NO_CONTENT.as_u16());
    server.tokens("ids", "c", json!({"tokens": [1]})).await;

    // Nothing above changed a model beyond the accepted requests.
    let r = server.get("/v1/models/bytes").await;
    assert_eq!(r.body["stats"]["symbols_seen"], 0);
    let r = server.get("/v1/models/ids").await;
    assert_eq!(r.body["stats"]["symbols_seen"], 3);
    assert_eq!(r.body["stats"]["streams"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let limits =
        Limits { queue_requests: 2, queue_tokens: 100, max_tokens_per_request: 100, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
            .await;
    let hold = server.state.engine().hold("m").unwrap();
    let mut waiting = Vec::new();
    for s in ["a", "b"] {
        let (http, url) = (server.http.clone(), server.url(&format!("/v1/models/m/streams/{s}/tokens")));
        waiting.push(tokio::spawn(
            async move { http.post(url).json(&json!({"tokens": [1, 2, 3]})).send().await },
        ));
    }
    eventually("two queued requests", || async { server.queued_tokens("m").await == 6 }).await;
    assert_eq!(server.metric(r#"kfrtrl_queue_depth{model="m"}"#).await, Some(6.0));
    let r = server.post("/v1/models/m/streams/c/tokens", &json!({"tokens": [1]})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE.as_u16());
    assert_eq!(r.body["type"], "urn:kfrtrl:problem:queue-full");
    assert_eq!(r.headers["retry-after"], "1");
    drop(hold);
    for w in waiting {
        let response = w.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The queue drained: the same request now goes through, and so does a large one that would
    // not have fitted next to the others.
    server.tokens("m", "c", json!({"tokens": [1]})).await;
    server.tokens("m", "c", json!({"tokens": vec![1; 100]})).await;

    // Deleting a model fails its queued requests with 404.
    let hold = server.state.engine().hold("m").unwrap();
    let (http, url) = (server.http.clone(), server.url("/v1/models/m/streams/a/tokens"));
    let queued = tokio::spawn(async move { http.post(url).json(&json!({"tokens": [1, 2]})).send().await });
    eventually("a queued request", || async { server.queued_tokens("m").await == 2 }).await;
    assert_eq!(server.delete("/v1/models/m").await.status, StatusCode::NO_CONTENT.as_u16());
    let response = queued.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "urn:kfrtrl:problem:unknown-model");
    drop(hold);
    server.stop().await;
}

/// Regression: one client pipelining into one stream could fill the model's whole queue, and
/// every other stream got 503 until it drained (each stream consumes one token per step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_stream_cannot_fill_its_models_queue() {
    let limits = Limits {
        queue_requests: 64,
        queue_tokens: 1000,
        queue_requests_per_stream: Some(3),
        queue_tokens_per_stream: Some(10),
        max_tokens_per_request: 10,
        ..Limits::default()
    };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
            .await;
    let hold = server.state.engine().hold("m").unwrap();
    let queue = |stream: &str, tokens: Vec<u32>| {
        let (http, url) = (server.http.clone(), server.url(&format!("/v1/models/m/streams/{stream}/tokens")));
        tokio::spawn(async move { http.post(url).json(&json!({ "tokens": tokens })).send().await })
    };
    let mut waiting = vec![queue("busy", vec![1; 6])];
    eventually("six queued tokens", || async { server.queued_tokens("m").await == 6 }).await;

    let r = server.post("/v1/models/m/streams/busy/tokens", &json!({"tokens": [1, 2, 3, 0, 1]})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE.as_u16());
    assert_eq!(r.body["type"], "urn:kfrtrl:problem:queue-full");
    assert_eq!(r.body["limit"], 10);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.body["detail"].as_str().unwrap().contains("stream `busy`"), "{}", r.body);

    // The refusal took nothing: the stream's share still has room for exactly four more, and
    // the other streams have theirs whatever the busy one holds.
    waiting.push(queue("busy", vec![2; 4]));
    waiting.push(queue("other", vec![3; 10]));
    eventually("twenty queued tokens", || async { server.queued_tokens("m").await == 20 }).await;
    let r = server.post("/v1/models/m/streams/busy/tokens", &json!({"tokens": [1]})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE.as_u16());
    assert!(r.body["detail"].as_str().unwrap().contains("10 tokens"), "{}", r.body);

    // Short requests are bounded by their count.
    for _ in 0..3 {
        waiting.push(queue("chatty", vec![0]));
    }
    eventually("23 queued tokens", || async { server.queued_tokens("m").await == 23 }).await;
    let r = server.post("/v1/models/m/streams/chatty/tokens", &json!({"tokens": [0]})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE.as_u16());
    assert_eq!(r.body["limit"], 3);
    assert!(r.body["detail"].as_str().unwrap().contains("3 requests"), "{}", r.body);

    drop(hold);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    for (stream, position) in [("busy", 10), ("other", 10), ("chatty", 3)] {
        let info = server.get(&format!("/v1/models/m/streams/{stream}")).await;
        assert_eq!(info.body["position"], position, "{stream}: the refused tokens were never consumed");
    }
    // Answered requests give their share back.
    server.tokens("m", "busy", json!({"tokens": vec![1; 10]})).await;
    let hold = server.state.engine().hold("m").unwrap();
    let waiting: Vec<_> = (0..3).map(|_| queue("chatty", vec![0])).collect();
    eventually("three queued requests", || async { server.queued_tokens("m").await == 3 }).await;
    drop(hold);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_replies_in_order_to_pipelined_requests() {
    let server = TestServer::start(config(vec![model("bytes", 256, 8)])).await;
    let url = format!("ws://{}/v1/models/bytes/streams/w/ws", server.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    eventually("the connection gauge", || async {
        server.metric("kfrtrl_websocket_connections").await == Some(1.0)
    })
    .await;

    // Pipelined: every request is sent before any reply is read.
    let mut expected: Vec<Result<u64, &str>> = Vec::new();
    let mut position = 0;
    for i in 0..40u64 {
        let (message, outcome) = match i % 10 {
            3 => (Message::text("{not json"), Err("malformed-json")),
            5 => (Message::text(r#"{"tokens":[999]}"#), Err("token-out-of-range")),
            7 => (Message::binary(vec![1u8, 2, 3]), Err("unsupported-message")),
            _ => {
                let n = 1 + i % 4;
                position += n;
                let tokens: Vec<u64> = (0..n).map(|t| 97 + (i + t) % 26).collect();
                (Message::text(json!({"tokens": tokens, "return_losses": true}).to_string()), Ok(position))
            }
        };
        socket.send(message).await.unwrap();
        expected.push(outcome);
    }
    for (i, outcome) in expected.iter().enumerate() {
        let message = crate::support::next_data(&mut socket).await.unwrap().unwrap();
        let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
        match outcome {
            Ok(position) => {
                server.schemas.check("TokensReply", &value);
                assert_eq!(value["position"].as_u64(), Some(*position), "reply {i} out of order: {value}");
            }
            Err(kind) => {
                server.schemas.check("Problem", &value);
                assert_eq!(value["type"], format!("urn:kfrtrl:problem:{kind}"), "reply {i}: {value}");
            }
        }
    }
    // Still open after the problems.
    socket.send(Message::text(r#"{"text":"z"}"#)).await.unwrap();
    let value: Value = serde_json::from_str(
        crate::support::next_data(&mut socket).await.unwrap().unwrap().to_text().unwrap(),
    )
    .unwrap();
    assert_eq!(value["position"].as_u64(), Some(position + 1));

    // WebSocket and HTTP requests to one stream share its queue and position.
    let http = server.tokens("bytes", "w", json!({"tokens": [1]})).await;
    assert_eq!(http["position"].as_u64(), Some(position + 2));

    // Unknown models are refused before the upgrade.
    let missing =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/models/nope/streams/w/ws", server.addr)).await;
    assert!(missing.is_err());

    // (An oversized message closes with 1009: `server_limits.rs`, with a message small enough to
    // leave the socket before the server closes; a 2 MiB one here raced the close into a reset.)

    socket.close(None).await.unwrap();
    eventually("the connection gauge to drop", || async {
        server.metric("kfrtrl_websocket_connections").await == Some(0.0)
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_one_stream_queue_behind_each_other() {
    let server = TestServer::start(config(vec![model("m", 32, 8)])).await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let (http, url) = (server.http.clone(), server.url("/v1/models/m/streams/one/tokens"));
        tasks.push(tokio::spawn(async move {
            let body = json!({"tokens": [i, i + 1, i + 2, i + 3, i + 4]});
            http.post(url).json(&body).send().await.unwrap().json::<Value>().await.unwrap()
        }));
    }
    let mut positions = Vec::new();
    for t in tasks {
        let reply = t.await.unwrap();
        server.schemas.check("TokensReply", &reply);
        positions.push(reply["position"].as_u64().unwrap());
    }
    positions.sort_unstable();
    assert_eq!(
        positions,
        (1..=16).map(|k| 5 * k).collect::<Vec<u64>>(),
        "each request consumed in one piece"
    );
    let r = server.get("/v1/models/m/streams/one").await;
    assert_eq!(r.body["position"], 80);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_are_batched_into_the_weights_of_the_cores_batched_step() {
    let definition = ModelRequest { seed: Some(7), lr: Some(1e-2), ..model("b", 16, 8) };
    let server = TestServer::start(config(vec![definition])).await;
    let (streams, steps) = (6usize, 12usize);
    let tokens: Vec<Vec<u32>> =
        (0..streams).map(|s| (0..steps).map(|t| ((s * 7 + t * t * 3 + 1) % 16) as u32).collect()).collect();

    // Hold the worker so that all requests are queued before the first step: the batches are
    // then known (every stream in every step).
    let hold = server.state.engine().hold("b").unwrap();
    let mut tasks = Vec::new();
    for (s, toks) in tokens.iter().enumerate() {
        let (http, url) = (server.http.clone(), server.url(&format!("/v1/models/b/streams/s{s}/tokens")));
        let body = json!({"tokens": toks, "return_losses": true});
        tasks.push(tokio::spawn(async move {
            http.post(url).json(&body).send().await.unwrap().json::<Value>().await
        }));
    }
    let total = (streams * steps) as u64;
    eventually("every request queued", || async { server.queued_tokens("b").await == total }).await;
    drop(hold);
    let mut replies = Vec::new();
    for t in tasks {
        let reply = t.await.unwrap().unwrap();
        server.schemas.check("TokensReply", &reply);
        replies.push(reply);
    }
    let count = server.metric(r#"kfrtrl_batch_size_count{model="b"}"#).await.unwrap();
    let sum = server.metric(r#"kfrtrl_batch_size_sum{model="b"}"#).await.unwrap();
    assert_eq!((count, sum), (steps as f64, total as f64), "{steps} steps of {streams} streams");
    let ones = server.metric(r#"kfrtrl_batch_size_bucket{model="b",le="1"}"#).await.unwrap();
    assert_eq!(ones, 0.0, "no step ran a single stream");

    // The same batches through the core give bit-identical weights and losses.
    let snapshot = server.state.engine().snapshot("b").await.unwrap();
    let spec = snapshot.definition.model_config().check().unwrap();
    let capacity = snapshot.definition.max_streams + 1;
    let slot_of: HashMap<String, usize> =
        snapshot.stream_slots.iter().map(|s| (s.meta.name.clone(), s.slot)).collect();
    // Keys mix in the order the streams were opened, which the concurrent requests leave open.
    let key_of: HashMap<usize, u64> =
        snapshot.stream_slots.iter().map(|s| (s.slot, s.state.sign_key)).collect();
    for s in &snapshot.stream_slots {
        let by_name = derive_key(spec.config.seed, stream_label(&s.meta.name));
        assert!(
            (0..streams as u64).any(|open| derive_key(by_name, open) == s.state.sign_key),
            "stream {} is keyed by its name and its open",
            s.meta.name
        );
    }
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    let (params, losses) = pool.install(|| {
        let mut params = Params::<f32>::init(&spec);
        let mut optimizer = Optimizer::new(&spec);
        let mut set = StreamSet::<f32>::new(&spec, capacity);
        for (&slot, &key) in &key_of {
            set.set_sign_key(slot, key);
        }
        let mut order: Vec<(usize, usize)> = (0..streams).map(|s| (slot_of[&format!("s{s}")], s)).collect();
        order.sort_unstable();
        let mut losses = vec![vec![0.0; steps]; streams];
        let mut step_losses = vec![0.0; streams];
        for t in 0..steps {
            let inputs: Vec<SlotStep> =
                order.iter().map(|&(slot, s)| SlotStep::learn(slot, tokens[s][t])).collect();
            set.step(&mut params, &mut optimizer, &inputs, &mut step_losses).unwrap();
            for (i, &(_, s)) in order.iter().enumerate() {
                losses[s][t] = step_losses[i] / LN_2;
            }
        }
        (params, losses)
    });
    assert!(params.w == snapshot.params.w && params.v == snapshot.params.v, "weights differ from the core's");
    assert_eq!(snapshot.optimizer.steps, steps as u64);
    for (s, reply) in replies.iter().enumerate() {
        let got: Vec<f64> =
            reply["losses_bits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let stream = reply["stream"].as_str().unwrap();
        let s_index: usize = stream[1..].parse().unwrap();
        assert_eq!(got, losses[s_index], "losses of {stream} (reply {s})");
    }
    server.stop().await;
}
