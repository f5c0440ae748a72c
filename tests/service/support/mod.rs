//! Shared by the hardening tests: an in-process server on 127.0.0.1:0 and the wire schemas of
//! its own `/openapi.json`, to check that every reply is what the contract says.

#![allow(dead_code)]

pub mod binary;

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use kfrtrl::api::{AppState, ServerConfig, StartError, serve};
use kfrtrl::engine::ModelRequest;

/// Schemas the replies are checked against, by component name.
pub struct Schemas {
    validators: HashMap<String, jsonschema::Validator>,
}

impl Schemas {
    /// Every schema of `components/schemas` of an OpenAPI document.
    pub fn from_openapi(doc: &Value) -> Self {
        let components = doc["components"].clone();
        let mut validators = HashMap::new();
        for name in doc["components"]["schemas"].as_object().expect("components/schemas").keys() {
            let schema = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$ref": format!("#/components/schemas/{name}"),
                "components": components,
            });
            let validator =
                jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("schema {name}: {e}"));
            validators.insert(name.clone(), validator);
        }
        Self { validators }
    }

    /// The schema violations of `value` (empty when it validates).
    pub fn errors(&self, name: &str, value: &Value) -> Vec<String> {
        let validator = self.validators.get(name).unwrap_or_else(|| panic!("no schema {name}"));
        validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect()
    }

    /// Panics unless `value` validates against schema `name`.
    pub fn check(&self, name: &str, value: &Value) {
        let errors = self.errors(name, value);
        assert!(errors.is_empty(), "{name} does not validate {value}: {errors:?}");
    }

    /// Panics unless `value` is a problem object with this status.
    pub fn check_problem(&self, status: u16, value: &Value) {
        self.check("Problem", value);
        assert_eq!(value["status"], status, "{value}");
    }
}

/// A server running in-process until [`TestServer::stop`].
pub struct TestServer {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state (engine, readiness).
    pub state: AppState,
    /// A client without credentials.
    pub http: reqwest::Client,
    /// The schemas of its `/openapi.json`.
    pub schemas: Schemas,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), StartError>>,
}

/// An HTTP reply: status, headers and body (JSON when it parses, else a string).
pub struct Reply {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: Value,
}

impl TestServer {
    /// Starts a server and waits until its models are loaded.
    pub async fn start(config: ServerConfig) -> Self {
        let state = AppState::new(config).expect("valid config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        state.wait_ready().await;
        let http = reqwest::Client::new();
        let doc: Value =
            http.get(format!("http://{addr}/openapi.json")).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let schemas = Schemas::from_openapi(&doc);
        Self { addr, state, http, schemas, shutdown: Some(tx), task }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Reads a response; a 4xx or 5xx must be a problem+json object with the same status.
    pub async fn reply(&self, response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 400 {
            assert_eq!(headers["content-type"], "application/problem+json", "{status} {body}");
            self.schemas.check_problem(status, &body);
        }
        Reply { status, headers, body }
    }

    /// Sends a request built from the server's client.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        self.reply(request.send().await.unwrap()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// `POST path` with a raw body.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        self.send(self.http.post(self.url(path)).body(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(self.url(path))).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Posts tokens and checks the request and the reply against the schemas.
    pub async fn tokens(&self, model: &str, stream: &str, body: Value) -> Value {
        self.schemas.check("TokensRequest", &body);
        let r = self.post(&format!("/v1/models/{model}/streams/{stream}/tokens"), &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        self.schemas.check("TokensReply", &r.body);
        r.body
    }

    /// The Prometheus exposition.
    pub async fn metrics(&self) -> String {
        self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// The value of one metric series (`name{labels}` exactly as exposed), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
    }

    /// Tokens queued in a model, from its card.
    pub async fn queued_tokens(&self, model: &str) -> u64 {
        let r = self.get(&format!("/v1/models/{model}")).await;
        r.body["stats"]["queued_tokens"].as_u64().unwrap()
    }

    /// Stops the server and checks that it drained cleanly.
    pub async fn stop(self) {
        self.stop_result().await.expect("server stopped cleanly");
    }

    /// Stops the server and returns how its stop went.
    pub async fn stop_result(mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap()
    }
}

/// A small model definition.
pub fn model(name: &str, vocab: usize, hidden: usize) -> ModelRequest {
    ModelRequest {
        name: name.into(),
        vocab_size: Some(vocab),
        hidden: Some(hidden),
        max_streams: Some(16),
        // An update at every step (the defaults wait for 8 tokens and more), so that tests can
        // count updates and compare weights step by step.
        tokens_per_update: Some(1),
        ..Default::default()
    }
}

/// The next message that is not a Ping or a Pong: the server pings every connection (every half
/// of `ws_idle_timeout_secs`), and a test that runs long enough sees them.
pub async fn next_data<S>(socket: &mut S) -> Option<Result<Message, WsError>>
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    use futures_util::StreamExt;
    loop {
        match socket.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}
