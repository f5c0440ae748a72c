//! The status page and the API it relies on, against a real server on 127.0.0.1:0: the embedded
//! page and its assets, `GET /v1/models/{model}/streams` (validated against the served schema),
//! and WebSocket requests with `predict: true`, which must learn nothing and change nothing.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use kfrtrl::api::{AppState, Limits, ServerConfig, StartError, serve};
use kfrtrl::engine::ModelRequest;

struct TestServer {
    addr: SocketAddr,
    http: reqwest::Client,
    openapi: Value,
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), StartError>>,
}

impl TestServer {
    async fn start() -> Self {
        let model = |name: &str, vocab| ModelRequest {
            name: name.into(),
            vocab_size: Some(vocab),
            hidden: Some(8),
            // An update at every step, so that the updates can be counted token by token.
            tokens_per_update: Some(1),
            ..Default::default()
        };
        let config = ServerConfig {
            limits: Limits { max_streams: 16, ..Limits::default() },
            models: vec![model("bytes", 256), model("ids", 11)],
            ..Default::default()
        };
        let state = AppState::new(config).expect("valid config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        state.wait_ready().await;
        let http = reqwest::Client::new();
        let openapi =
            http.get(format!("http://{addr}/openapi.json")).send().await.unwrap().json().await.unwrap();
        Self { addr, http, openapi, shutdown, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Checks `value` against a message schema of the served OpenAPI document.
    fn check(&self, schema: &str, value: &Value) {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": format!("#/components/schemas/{schema}"),
            "components": self.openapi["components"],
        });
        let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {schema}: {e}"));
        let errors: Vec<String> = validator.iter_errors(value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{schema} does not validate {value}: {errors:?}");
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        if !status.is_success() {
            self.check("Problem", &body);
        }
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn metric(&self, line_prefix: &str) -> f64 {
        let text = self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .unwrap_or_else(|| panic!("no metric {line_prefix} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_and_its_assets_are_served_from_the_binary() {
    let server = TestServer::start().await;
    let page = server.http.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "no CDN: every asset is ours");

    let mut script = String::new();
    for (path, content_type) in [
        ("/status/app.js", "text/javascript; charset=utf-8"),
        ("/status/style.css", "text/css; charset=utf-8"),
    ] {
        assert!(html.contains(&format!("\"{path}\"")), "the page loads {path}");
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        let body = response.text().await.unwrap();
        assert!(body.len() > 500, "{path} is the real asset");
        if path.ends_with(".js") {
            script = body;
        }
    }
    // Every element the script looks up by id exists in the page.
    let ids: Vec<&str> = script.split("$(\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
    assert!(ids.len() >= 8, "{ids:?}");
    for id in ids {
        assert!(html.contains(&format!("id=\"{id}\"")), "the page has no element #{id}");
    }
    // The script speaks the real API.
    for call in ["/v1/models", "/streams?limit=", "predict: true", "/ws"] {
        assert!(script.contains(call), "the script uses {call}");
    }
    let (status, problem) = server.get("/status/missing.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["type"], "urn:kfrtrl:problem:not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_listed_busiest_first_with_a_limit() {
    let server = TestServer::start().await;
    let (status, empty) = server.get("/v1/models/bytes/streams").await;
    assert_eq!(status, StatusCode::OK);
    server.check("StreamList", &empty);
    assert_eq!(empty, json!({"model": "bytes", "total": 0, "streams": []}));

    for (stream, text) in [("short", "ab"), ("long", "abcdefgh"), ("middle", "abcd"), ("tie", "abcd")] {
        let (status, reply) =
            server.post(&format!("/v1/models/bytes/streams/{stream}/tokens"), json!({"text": text})).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let (status, all) = server.get("/v1/models/bytes/streams").await;
    assert_eq!(status, StatusCode::OK);
    server.check("StreamList", &all);
    let names: Vec<&str> =
        all["streams"].as_array().unwrap().iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(names, ["long", "middle", "tie", "short"], "most tokens first, ties by name");
    assert_eq!(all["total"], 4);
    assert_eq!(all["streams"][0]["position"], 8);
    assert_eq!(all["streams"][0]["symbols_learned"], 8);

    let (_, two) = server.get("/v1/models/bytes/streams?limit=2").await;
    server.check("StreamList", &two);
    assert_eq!(two["total"], 4, "total counts every stream");
    assert_eq!(two["streams"].as_array().unwrap().len(), 2);
    assert_eq!(two["streams"][1]["stream"], "middle");
    let (_, none) = server.get("/v1/models/bytes/streams?limit=0").await;
    assert_eq!(none["streams"], json!([]));
    let (_, other) = server.get("/v1/models/ids/streams").await;
    assert_eq!(other["total"], 0, "streams belong to their model");

    for (path, status, problem) in [
        ("/v1/models/nope/streams", StatusCode::NOT_FOUND, "unknown-model"),
        ("/v1/models/bytes/streams?limit=ten", StatusCode::UNPROCESSABLE_ENTITY, "invalid-request"),
        ("/v1/models/bytes/streams?limit=-1", StatusCode::UNPROCESSABLE_ENTITY, "invalid-request"),
        ("/v1/models/bytes/streams?top=3", StatusCode::UNPROCESSABLE_ENTITY, "invalid-request"),
    ] {
        let (got, body) = server.get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(body["type"], format!("urn:kfrtrl:problem:{problem}"), "{path}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_predict_learns_nothing_and_matches_the_predict_route() {
    let server = TestServer::start().await;
    let url = format!("ws://{}/v1/models/bytes/streams/typist/ws", server.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut exchange = async |request: Value| -> Value {
        server.check("TokensRequest", &request);
        socket.send(Message::Text(request.to_string().into())).await.unwrap();
        loop {
            match socket.next().await.expect("a reply").unwrap() {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    };

    // A predict on a stream that does not exist yet is answered by a problem in its place.
    let missing = exchange(json!({"text": "hello", "predict": true})).await;
    server.check("Problem", &missing);
    assert_eq!(missing["type"], "urn:kfrtrl:problem:unknown-stream");
    assert_eq!(missing["status"], 404);

    let created = exchange(json!({"text": "to be or not to be", "top_k": 0})).await;
    server.check("TokensReply", &created);
    assert_eq!(created["position"], 18);
    let updates = server.metric(r#"kfrtrl_optimizer_updates_total{model="bytes"}"#).await;
    assert_eq!(updates, 18.0);

    let request =
        json!({"text": " that is", "predict": true, "reset": true, "top_k": 6, "return_losses": true});
    let predicted = exchange(request.clone()).await;
    server.check("TokensReply", &predicted);
    assert_eq!(predicted["position"], 18, "a predict does not move the stream");
    assert_eq!(predicted["consumed"], 8);
    assert_eq!(predicted["predictions"].as_array().unwrap().len(), 6);
    let again = exchange(request.clone()).await;
    assert_eq!(again, predicted, "nothing changed between two predicts");

    let mut http_request = request.clone();
    http_request.as_object_mut().unwrap().remove("predict");
    let (status, over_http) = server.post("/v1/models/bytes/streams/typist/predict", http_request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(over_http, predicted, "the WebSocket predict is the predict route");
    let (status, via_tokens) = server.post("/v1/models/bytes/streams/typist/tokens", request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(via_tokens, predicted, "`predict` means the same on the tokens route");

    assert_eq!(server.metric(r#"kfrtrl_optimizer_updates_total{model="bytes"}"#).await, updates);
    assert_eq!(server.metric(r#"kfrtrl_symbols_total{mode="learn",model="bytes"}"#).await, 18.0);
    assert_eq!(server.metric(r#"kfrtrl_symbols_total{mode="predict",model="bytes"}"#).await, 32.0);
    let (_, info) = server.get("/v1/models/bytes/streams/typist").await;
    assert_eq!(info["position"], 18);

    // Learning still works on the same connection, and the prediction follows the new weights.
    let learned = exchange(json!({"text": " that is", "reset": true, "top_k": 0})).await;
    assert_eq!(learned["position"], 26);
    let after = exchange(json!({"text": " that is", "predict": true, "reset": true, "top_k": 6})).await;
    assert_ne!(after["predictions"], predicted["predictions"], "learning moved the weights");
    assert_eq!(server.metric(r#"kfrtrl_optimizer_updates_total{model="bytes"}"#).await, 26.0);
    server.stop().await;
}
