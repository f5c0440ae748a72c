//! Hostile input, property-tested against one real server on 127.0.0.1:0: arbitrary bytes,
//! arbitrary JSON, near-valid messages with wrong types, huge numbers and deep nesting, as HTTP
//! bodies of every POST route and as WebSocket messages. Every reply is a 2xx that validates
//! against its schema or a 4xx problem+json that validates against the problem schema; never a
//! 5xx, never a dropped WebSocket; and the server keeps answering afterwards.

use futures_util::SinkExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Number, Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestServer, model};
use kfrtrl::api::{Limits, ServerConfig};

const MAX_BODY: usize = 16 << 10;

fn server_config() -> ServerConfig {
    let limits = Limits {
        max_body_bytes: MAX_BODY,
        max_tokens_per_request: 512,
        queue_tokens: 1 << 16,
        max_models: 4,
        max_hidden: 32,
        max_parameters: 200_000,
        max_model_bytes: 32 << 20,
        max_streams: 8,
        ..Limits::default()
    };
    ServerConfig { limits, models: vec![model("bytes", 256, 8), model("ids", 10, 4)], ..Default::default() }
}

/// Numbers a parser may choke on: boundaries of every integer type, floats, exponents.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-300i64..300).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            i64::MIN as f64,
            u64::MAX as f64,
            1e300,
            -1e300,
            0.5,
            -0.0,
            f64::MIN_POSITIVE,
            4294967296.0,
        ])
        .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Field names of the messages, plus a few that are not.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "tokens",
            "text",
            "learn",
            "reset",
            "top_k",
            "return_losses",
            "predict",
            "name",
            "vocab_size",
            "hidden",
            "cell",
            "learner",
            "optimizer",
            "lr",
            "max_streams",
            "tbptt_window",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,10}",
    ]
}

/// A tokens request with each field either right, wrong-typed or out of range.
fn tokens_request() -> impl Strategy<Value = Value> {
    let tokens = prop_oneof![
        prop::collection::vec((0i64..300).prop_map(Value::from), 0..40).prop_map(Value::Array),
        prop::collection::vec(number(), 0..8).prop_map(Value::Array),
        json_value(),
    ];
    let flag = prop_oneof![any::<bool>().prop_map(Value::from), json_value()];
    (
        prop::option::of(tokens),
        prop::option::of(prop_oneof![".{0,40}".prop_map(Value::from), json_value()]),
        prop::option::of(flag.clone()),
        prop::option::of(flag.clone()),
        prop::option::of(prop_oneof![(0u64..300).prop_map(Value::from), number()]),
        prop::option::of(flag.clone()),
        prop::option::of(flag),
    )
        .prop_map(|(tokens, text, learn, reset, top_k, losses, predict)| {
            let mut m = Map::new();
            let fields =
                [("tokens", tokens), ("text", text), ("learn", learn), ("reset", reset), ("top_k", top_k)];
            for (k, v) in fields.into_iter().chain([("return_losses", losses), ("predict", predict)]) {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        })
}

/// A tokens request that every model accepts (ids below 10), with random options.
fn valid_tokens_request() -> impl Strategy<Value = Value> {
    (prop::collection::vec(0u32..10, 1..20), any::<bool>(), any::<bool>(), 0u32..20, any::<bool>()).prop_map(
        |(tokens, learn, reset, top_k, losses)| {
            json!({"tokens": tokens, "learn": learn, "reset": reset, "top_k": top_k, "return_losses": losses})
        },
    )
}

/// A model definition the server accepts, with random fields.
fn valid_model_request() -> impl Strategy<Value = Value> {
    (
        "[a-z][a-z0-9]{0,6}",
        2u32..50,
        1u32..16,
        prop::sample::select(vec!["tanh", "rhn", "lstm"]),
        prop::sample::select(vec!["kf-rtrl", "uoro", "rtrl", "tbptt", "frozen"]),
        prop::sample::select(vec!["adam", "sgd"]),
        1u32..8,
    )
        .prop_map(|(name, vocab, hidden, cell, learner, optimizer, streams)| {
            json!({"name": name, "vocab_size": vocab, "hidden": hidden, "cell": cell, "learner": learner,
                   "optimizer": optimizer, "lr": 0.01, "max_streams": streams, "tbptt_window": 4})
        })
}

/// A model definition with each field either right, wrong-typed or out of range.
fn model_request() -> impl Strategy<Value = Value> {
    let name = prop_oneof!["[a-z][a-z0-9]{0,6}".prop_map(Value::from), json_value()];
    let size = prop_oneof![(0u64..40).prop_map(Value::from), number(), json_value()];
    let kind = |names: Vec<&'static str>| {
        prop_oneof![prop::sample::select(names).prop_map(Value::from), ".{0,8}".prop_map(Value::from)]
    };
    (
        prop::option::of(name),
        prop::option::of(prop_oneof![(0u64..400).prop_map(Value::from), number()]),
        prop::option::of(size.clone()),
        prop::option::of(kind(vec!["tanh", "rhn", "lstm"])),
        prop::option::of(kind(vec!["kf-rtrl", "uoro", "rtrl", "tbptt", "frozen"])),
        prop::option::of(kind(vec!["adam", "sgd"])),
        prop::option::of(number()),
        prop::option::of(size.clone()),
        prop::option::of(size),
    )
        .prop_map(|(name, vocab, hidden, cell, learner, optimizer, lr, streams, window)| {
            let fields = [
                ("name", name),
                ("vocab_size", vocab),
                ("hidden", hidden),
                ("cell", cell),
                ("learner", learner),
                ("optimizer", optimizer),
                ("lr", lr),
                ("max_streams", streams),
                ("tbptt_window", window),
            ];
            Value::Object(fields.into_iter().filter_map(|(k, v)| Some((k.to_owned(), v?))).collect())
        })
}

/// A body as bytes: arbitrary bytes, deep nesting, or one of the JSON strategies.
fn body(structured: BoxedStrategy<Value>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (1usize..3000, any::<bool>()).prop_map(|(depth, array)| {
            let (open, close) = if array { ("[", "]") } else { ("{\"a\":", "}") };
            format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
        }),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        structured.clone().prop_map(|v| v.to_string().into_bytes()),
        structured.prop_map(|v| v.to_string().into_bytes()),
    ]
}

fn check_reply(server: &TestServer, status: u16, body: &Value, ok_schema: &str) -> Result<(), TestCaseError> {
    prop_assert!(status < 500, "server error {status}: {body}");
    if (200..300).contains(&status) {
        let errors = server.schemas.errors(ok_schema, body);
        prop_assert!(errors.is_empty(), "{ok_schema}: {body}: {errors:?}");
    } else {
        // `TestServer::reply` checked the content type and the problem schema.
        prop_assert!((400..500).contains(&status), "{status}: {body}");
    }
    Ok(())
}

/// Still alive and still right after the storm: health, a valid request, no 5xx in the metrics.
async fn still_serving(server: &TestServer) {
    let r = server.send(server.http.get(server.url("/healthz"))).await;
    assert_eq!(r.status, 200);
    let r = server
        .send(
            server
                .http
                .post(server.url("/v1/models/bytes/streams/after/tokens"))
                .json(&json!({"text": "ok"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    server.schemas.check("TokensReply", &r.body);
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kfrtrl_http_requests_total") && l.contains("status=\"5"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

#[test]
fn hostile_http_bodies_get_schema_valid_replies_and_never_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(TestServer::start(server_config()));
    let routes = prop::sample::select(vec![
        ("/v1/models/bytes/streams/s/tokens", "TokensReply"),
        ("/v1/models/ids/streams/s/tokens", "TokensReply"),
        ("/v1/models/bytes/streams/s/predict", "TokensReply"),
        ("/v1/models", "ModelInfo"),
    ]);
    let structured = prop_oneof![
        2 => tokens_request(),
        2 => model_request(),
        1 => valid_tokens_request(),
        3 => valid_model_request(),
    ]
    .boxed();
    let cases = (routes, body(structured), prop::option::of(".{0,20}"));
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    runner(300)
        .run(&cases, |((path, schema), body, content_type)| {
            runtime.block_on(async {
                let mut request = server.http.post(server.url(path)).body(body);
                if let Some(content_type) = content_type
                    && let Ok(value) = reqwest::header::HeaderValue::from_str(&content_type)
                {
                    request = request.header("content-type", value);
                }
                let r = server.send(request).await;
                *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                check_reply(&server, r.status, &r.body, schema)?;
                if r.status == 201 {
                    // Keep room under the model limit for the next case.
                    let name = r.body["name"].as_str().unwrap().to_owned();
                    let deleted =
                        server.send(server.http.delete(server.url(&format!("/v1/models/{name}")))).await;
                    prop_assert_eq!(deleted.status, 204);
                }
                Ok(())
            })
        })
        .unwrap();
    // The strategies reach both sides: accepted requests and created models, and refusals
    // (each of these has well over 99.99% odds per run; 413 is rarer and tested elsewhere).
    let statuses = statuses.into_inner().unwrap();
    for status in [200, 201, 400, 422] {
        assert!(statuses.contains_key(&status), "no {status} among {statuses:?}");
    }
    runtime.block_on(still_serving(&server));
    runtime.block_on(server.stop());
}

/// A WebSocket message: text (arbitrary, JSON, near-valid) or binary.
fn ws_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,64}".prop_map(Message::text),
        json_value().prop_map(|v| Message::text(v.to_string())),
        tokens_request().prop_map(|v| Message::text(v.to_string())),
        valid_tokens_request().prop_map(|v| Message::text(v.to_string())),
        (1usize..3000).prop_map(|depth| Message::text(format!("{}{}", "[".repeat(depth), "]".repeat(depth)))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::binary),
    ]
}

#[test]
fn hostile_websocket_messages_get_one_valid_reply_each_and_the_socket_stays_open() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(TestServer::start(server_config()));
    let url = format!("ws://{}/v1/models/bytes/streams/w/ws", server.addr);
    let (socket, _) = runtime.block_on(tokio_tungstenite::connect_async(&url)).unwrap();
    let socket = std::sync::Mutex::new(socket);
    let (accepted, refused) = (std::sync::atomic::AtomicU32::new(0), std::sync::atomic::AtomicU32::new(0));
    runner(200)
        .run(&prop::collection::vec(ws_message(), 1..6), |messages| {
            let mut socket = socket.lock().unwrap();
            runtime.block_on(async {
                let count = messages.len();
                for message in messages {
                    socket.send(message).await.unwrap();
                }
                for i in 0..count {
                    let reply = match crate::support::next_data(&mut *socket).await {
                        Some(Ok(Message::Text(text))) => text,
                        other => return Err(TestCaseError::fail(format!("reply {i}: {other:?}"))),
                    };
                    let value: Value = serde_json::from_str(reply.as_str())
                        .map_err(|e| TestCaseError::fail(format!("reply {i} is not JSON: {e}: {reply}")))?;
                    let tally = if value.get("type").is_some() { &refused } else { &accepted };
                    tally.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if value.get("type").is_some() {
                        let errors = server.schemas.errors("Problem", &value);
                        prop_assert!(errors.is_empty(), "{value}: {errors:?}");
                        let status = value["status"].as_u64().unwrap_or(0);
                        prop_assert!((400..500).contains(&status), "{value}");
                    } else {
                        let errors = server.schemas.errors("TokensReply", &value);
                        prop_assert!(errors.is_empty(), "{value}: {errors:?}");
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    assert!(accepted.into_inner() > 0 && refused.into_inner() > 0, "both replies and problems");
    let mut socket = socket.into_inner().unwrap();
    runtime.block_on(async {
        socket.send(Message::text(r#"{"text": "still open"}"#)).await.unwrap();
        let reply: Value = serde_json::from_str(
            crate::support::next_data(&mut socket).await.unwrap().unwrap().to_text().unwrap(),
        )
        .unwrap();
        server.schemas.check("TokensReply", &reply);
        socket.close(None).await.unwrap();
        still_serving(&server).await;
    });
    runtime.block_on(server.stop());
}
