//! Limits, bearer authentication and name validation, end to end through a real server on
//! 127.0.0.1:0: every refusal is a problem+json reply with its stable type (and the header the
//! case calls for), nothing refused changes a model, and the server keeps serving.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::{Reply, TestServer, model};
use kfrtrl::api::{AllowedOrigins, ApiKey, Limits, ServerConfig};

mod websocket_flow;

const KEY: &str = "s3cret-Key_0123456789";

fn expect(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["type"], format!("urn:kfrtrl:problem:{kind}"), "{}", r.body);
}

async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One raw HTTP/1.1 request, byte for byte as given (no client-side path normalisation):
/// the status and the body.
async fn raw(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, String, Value) {
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

async fn model_stats(server: &TestServer, model: &str) -> Value {
    let r = server.send(server.http.get(server.url(&format!("/v1/models/{model}")))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["stats"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_size_body_token_and_model_count_limits_refuse_with_problems() {
    let limits = Limits {
        max_body_bytes: 4096,
        max_tokens_per_request: 64,
        queue_tokens: 1024,
        max_models: 2,
        max_hidden: 64,
        max_parameters: 50_000,
        max_model_bytes: 8 << 20,
        max_streams: 16,
        ..Limits::default()
    };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 256, 8)], ..Default::default() })
            .await;
    let post = |path: &str, body: Value| server.http.post(server.url(path)).json(&body);
    let tokens = "/v1/models/m/streams/s/tokens";

    let r = server.send(post(tokens, json!({"text": "x".repeat(5000)}))).await;
    expect(&r, 413, "body-too-large");
    let r = server.send(post("/v1/models", json!({"name": "big", "lr": 0.1, "pad": "x".repeat(5000)}))).await;
    expect(&r, 413, "body-too-large");
    let r = server.send(post(tokens, json!({"tokens": vec![1; 65]}))).await;
    expect(&r, 413, "too-many-tokens");
    assert_eq!(r.body["limit"], 64);
    let r = server.send(post(tokens, json!({"text": "y".repeat(65)}))).await;
    expect(&r, 413, "too-many-tokens");

    let r = server.send(post("/v1/models", json!({"name": "wide", "hidden": 65}))).await;
    expect(&r, 422, "invalid-config");
    assert_eq!(r.body["field"], "hidden");
    assert!(r.body["detail"].as_str().unwrap().contains("64"), "{}", r.body);
    let r = server
        .send(post(
            "/v1/models",
            json!({"name": "many", "vocab_size": 1000, "hidden": 60, "learner": "kf-rtrl"}),
        ))
        .await;
    expect(&r, 422, "invalid-config");
    assert!(r.body["detail"].as_str().unwrap().contains("parameters"), "{}", r.body);
    let r =
        server.send(post("/v1/models", json!({"name": "slots", "hidden": 64, "max_streams": 60000}))).await;
    expect(&r, 422, "invalid-config");
    assert_eq!(r.body["field"], "max_streams", "the memory estimate refuses it before allocation");

    let r = server
        .send(post("/v1/models", json!({"name": "w0", "hidden": 4, "learner": "uoro", "tbptt_window": 0})))
        .await;
    expect(&r, 422, "invalid-config");
    assert_eq!(r.body["field"], "tbptt_window", "every reply echoes it: it must be in the contract's range");

    let r = server.send(post("/v1/models", json!({"name": "second", "hidden": 4}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.send(post("/v1/models", json!({"name": "third", "hidden": 4}))).await;
    expect(&r, 409, "model-limit");
    assert_eq!(r.body["limit"], 2);
    let r = server.send(server.http.get(server.url("/v1/models"))).await;
    assert_eq!(r.body["models"].as_array().unwrap().len(), 2);

    // None of it touched the model; a fitting request still goes through.
    assert_eq!(model_stats(&server, "m").await["symbols_seen"], 0);
    let r = server.send(post(tokens, json!({"text": "fits"}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop().await;
}

#[test]
fn model_size_limits_apply_to_the_configured_models_too() {
    let limits = Limits { max_hidden: 16, ..Limits::default() };
    let config = ServerConfig { limits, models: vec![model("wide", 256, 32)], ..Default::default() };
    let error = kfrtrl::api::AppState::new(config).err().expect("refused");
    assert!(error.to_string().contains("hidden"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_gets_503_and_its_tokens_still_count() {
    let limits = Limits { request_timeout_secs: 0.3, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
            .await;
    let hold = server.state.engine().hold("m").unwrap();
    let started = Instant::now();
    let r = server
        .send(
            server.http.post(server.url("/v1/models/m/streams/s/tokens")).json(&json!({"tokens": [1, 2, 3]})),
        )
        .await;
    expect(&r, 503, "timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.body["detail"].as_str().unwrap().contains("position"), "{}", r.body);
    drop(hold);
    // The request stayed queued and was consumed: the stream's position says so.
    eventually("the queued request to be consumed", async || {
        let r = server.send(server.http.get(server.url("/v1/models/m/streams/s"))).await;
        r.status == 200 && r.body["position"] == 3
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_websockets_past_their_limits_are_shed_with_503() {
    let limits =
        Limits { max_concurrent_requests: 2, max_websockets: 1, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
            .await;
    let hold = server.state.engine().hold("m").unwrap();
    let mut waiting = Vec::new();
    for s in ["a", "b"] {
        let request = server.http.post(server.url(&format!("/v1/models/m/streams/{s}/tokens")));
        waiting.push(tokio::spawn(request.json(&json!({"tokens": [1]})).send()));
    }
    eventually("two requests in progress", async || {
        server.state.engine().model("m").unwrap().stats.queued_tokens == 2
    })
    .await;
    let r = server.send(server.http.get(server.url("/v1/models"))).await;
    expect(&r, 503, "overloaded");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.body["limit"], 2);
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} stays open under load");
    }
    drop(hold);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(server.send(server.http.get(server.url("/v1/models"))).await.status, 200);

    // One WebSocket at a time; the second is refused before the upgrade, the first still works.
    let ws_url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
    let (mut first, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    match tokio_tungstenite::connect_async(&ws_url).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            server.schemas.check_problem(503, &body);
            assert_eq!(body["type"], "urn:kfrtrl:problem:overloaded");
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    first.send(Message::text(r#"{"tokens": [1]}"#)).await.unwrap();
    let reply: Value = serde_json::from_str(first.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    server.schemas.check("TokensReply", &reply);
    first.close(None).await.unwrap();
    eventually("the permit to come back", async || tokio_tungstenite::connect_async(&ws_url).await.is_ok())
        .await;

    // A plain GET of a WebSocket route, and an oversized message.
    let r = server.send(server.http.get(server.url("/v1/models/m/streams/w/ws"))).await;
    expect(&r, 426, "upgrade-required");
    assert_eq!(r.headers["upgrade"], "websocket");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_closes_with_1009_and_a_reason() {
    let limits = Limits { max_body_bytes: 4096, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 256, 4)], ..Default::default() })
            .await;
    let url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    socket.send(Message::text(json!({"text": "x".repeat(5000)}).to_string())).await.unwrap();
    match socket.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1009);
            assert_eq!(frame.reason.as_str(), "message too large");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(model_stats(&server, "m").await["symbols_seen"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_every_v1_route_needs_it_and_probes_stay_open() {
    let config = ServerConfig {
        models: vec![model("m", 256, 4)],
        api_key: Some(ApiKey::new(KEY).unwrap()),
        ..Default::default()
    };
    let server = TestServer::start(config).await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} needs no key");
    }
    let requests = [
        server.http.get(server.url("/v1/models")),
        server.http.get(server.url("/v1/models/m")),
        server.http.delete(server.url("/v1/models/m")),
        server.http.post(server.url("/v1/models")).json(&json!({"name": "x", "hidden": 4})),
        server.http.post(server.url("/v1/models/m/streams/s/tokens")).json(&json!({"text": "hi"})),
        server.http.post(server.url("/v1/models/m/streams/s/predict")).json(&json!({"text": "hi"})),
        server.http.get(server.url("/v1/models/m/streams/s")),
        server.http.get(server.url("/v1/no/such/route")),
    ];
    for request in requests {
        let missing = request.try_clone().unwrap();
        let r = server.send(missing).await;
        expect(&r, 401, "unauthorized");
        assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="kfrtrl""#);
        let r = server.send(request.bearer_auth("s3cret-Key_0123456780")).await;
        expect(&r, 401, "unauthorized");
        assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="kfrtrl", error="invalid_token""#);
        assert!(!r.body.to_string().contains("s3cret"), "the key is never echoed");
    }
    // Nothing refused reached the engine.
    let stats = server.state.engine().model("m").unwrap().stats;
    assert_eq!((stats.symbols_seen, stats.symbols_predicted, stats.streams), (0, 0, 0));
    assert_eq!(server.state.engine().models().len(), 1);

    let r = server
        .send(
            server
                .http
                .post(server.url("/v1/models/m/streams/s/tokens"))
                .bearer_auth(KEY)
                .json(&json!({"text": "hi"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    server.schemas.check("TokensReply", &r.body);

    // WebSocket: refused without a key; accepted with the header or with the subprotocol, and
    // the reply selects `kfrtrl.v1`, never echoing the key.
    let url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
    match tokio_tungstenite::connect_async(&url).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    let mut with_header = url.as_str().into_client_request().unwrap();
    with_header.headers_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(with_header).await.unwrap();
    socket.send(Message::text(r#"{"text": "a"}"#)).await.unwrap();
    let reply: Value =
        serde_json::from_str(socket.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(reply["position"], 1);
    socket.close(None).await.unwrap();

    let mut browser_like = url.as_str().into_client_request().unwrap();
    let offered = format!("kfrtrl.v1, kfrtrl.bearer.{KEY}");
    browser_like.headers_mut().insert("sec-websocket-protocol", offered.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(browser_like).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "kfrtrl.v1");
    socket.send(Message::text(r#"{"text": "b"}"#)).await.unwrap();
    let reply: Value =
        serde_json::from_str(socket.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(reply["position"], 2);
    socket.close(None).await.unwrap();

    let mut wrong = url.as_str().into_client_request().unwrap();
    wrong.headers_mut().insert("sec-websocket-protocol", "kfrtrl.v1, kfrtrl.bearer.guess".parse().unwrap());
    match tokio_tungstenite::connect_async(wrong).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    server.stop().await;
}

/// Regression: without an API key, any web page a user visited could train, create or delete
/// models on a server it reached (`localhost` included): a form-like POST needs no preflight,
/// a WebSocket none at all, and the server never looked at where a request came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_request_from_another_origin_cannot_change_a_model() {
    let config = ServerConfig {
        limits: Limits { max_streams: 16, ..Limits::default() },
        models: vec![model("m", 16, 4)],
        allowed_origins: AllowedOrigins::new(&["https://dashboard.example"]).unwrap(),
        ..Default::default()
    };
    let server = TestServer::start(config).await;
    let own = format!("http://{}", server.addr);
    let tokens = server.url("/v1/models/m/streams/s/tokens");
    let post = |headers: &[(&str, &str)]| {
        let mut request =
            server.http.post(&tokens).header("content-type", "text/plain").body(r#"{"tokens": [1]}"#);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
    };
    for refused in [
        &[("origin", "http://evil.example")][..],
        &[("origin", "null")],
        &[("origin", own.as_str()), ("sec-fetch-site", "cross-site")],
        &[("sec-fetch-site", "same-site")],
    ] {
        let r = server.send(post(refused)).await;
        expect(&r, 403, "cross-origin-request");
    }
    let missing = server.send(server.http.get(server.url("/v1/models/m/streams/s"))).await;
    expect(&missing, 404, "unknown-stream");
    let evil = [("origin", "http://evil.example")];
    let deleted =
        server.send(server.http.delete(server.url("/v1/models/m")).header(evil[0].0, evil[0].1)).await;
    expect(&deleted, 403, "cross-origin-request");
    // Reads are not checked: without CORS headers the other page cannot see them.
    let read = server.send(server.http.get(server.url("/v1/models/m")).header(evil[0].0, evil[0].1)).await;
    assert_eq!(read.status, 200, "{}", read.body);

    // The server's own pages, listed origins and clients that are not browsers are served.
    let mut position = 0;
    for allowed in [
        &[][..],
        &[("origin", own.as_str())],
        &[("sec-fetch-site", "same-origin")],
        &[("origin", "https://dashboard.example"), ("sec-fetch-site", "cross-site")],
    ] {
        let r = server.send(post(allowed)).await;
        assert_eq!(r.status, 200, "{allowed:?}: {}", r.body);
        position += 1;
        assert_eq!(r.body["position"], position, "{}", r.body);
    }

    let url = format!("ws://{}/v1/models/m/streams/s/ws", server.addr);
    let mut cross = url.as_str().into_client_request().unwrap();
    cross.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(cross).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    let mut same = url.as_str().into_client_request().unwrap();
    same.headers_mut().insert("origin", own.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(same).await.unwrap();
    socket.send(Message::text(r#"{"tokens": [1]}"#)).await.unwrap();
    let reply: Value = serde_json::from_str(
        crate::support::next_data(&mut socket).await.unwrap().unwrap().to_text().unwrap(),
    )
    .unwrap();
    assert_eq!(reply["position"], position + 1, "{reply}");
    socket.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_path_tricks_are_refused_before_the_engine() {
    let server = TestServer::start(ServerConfig {
        limits: Limits { max_streams: 16, ..Limits::default() },
        models: vec![model("m", 256, 4)],
        ..Default::default()
    })
    .await;
    let long = "x".repeat(65);
    let streams = [
        "..",
        "%2e%2e",
        ".hidden",
        "..%2F..%2Fetc%2Fpasswd",
        "a%2Fb",
        "a%5Cb",
        "a%00b",
        "%00",
        "%C3%A9t%C3%A9",
        "%E2%80%AE",
        "a%20b",
        "%FF",
        long.as_str(),
    ];
    for stream in streams {
        for (method, route) in [("POST", "tokens"), ("POST", "predict"), ("GET", "ws")] {
            let path = format!("/v1/models/m/streams/{stream}/{route}");
            let (status, _, body) = raw(&server, method, &path, r#"{"text": "a"}"#).await;
            assert_eq!(status, 400, "{path}: {body}");
            server.schemas.check_problem(400, &body);
            assert_eq!(body["type"], "urn:kfrtrl:problem:invalid-name", "{path}: {body}");
        }
        for method in ["GET", "DELETE"] {
            let path = format!("/v1/models/m/streams/{stream}");
            let (status, _, body) = raw(&server, method, &path, "").await;
            assert_eq!((status, &body["type"]), (400, &json!("urn:kfrtrl:problem:invalid-name")), "{path}");
        }
        let path = format!("/v1/models/{stream}/streams/s/tokens");
        let (status, _, body) = raw(&server, "POST", &path, r#"{"text": "a"}"#).await;
        assert_eq!((status, &body["type"]), (400, &json!("urn:kfrtrl:problem:invalid-name")), "{path}");
    }
    for name in ["..", "a/b", "a\u{0}b", "été", "", &long] {
        let body = json!({"name": name, "hidden": 4}).to_string();
        let (status, _, reply) = raw(&server, "POST", "/v1/models", &body).await;
        assert_eq!((status, &reply["type"]), (400, &json!("urn:kfrtrl:problem:invalid-name")), "{name:?}");
    }
    let stats = model_stats(&server, "m").await;
    assert_eq!((stats["symbols_seen"].as_u64(), stats["streams"].as_u64()), (Some(0), Some(0)));
    assert_eq!(server.state.engine().models().len(), 1);
    server.stop().await;
}
