//! Models created by the name in the path (`PUT /v1/models/{model}`), so that a proxy hashing
//! the path routes a model's creation to the server that will hold it: created once, idempotent
//! when retried with the same definition, refused when the definition differs or the body names
//! another model, and a retry is not refused by the model limit its own model takes up.

use kfrtrl::api::{Limits, ServerConfig};
use serde_json::json;

use crate::support::{TestServer, model};

#[tokio::test]
async fn put_creates_a_model_by_path_and_is_idempotent() {
    let limits = Limits { max_models: 2, max_hidden: 32, ..Limits::default() };
    let server = TestServer::start(ServerConfig {
        limits,
        models: vec![model("first", 256, 8)],
        ..Default::default()
    })
    .await;

    // Created: 201, Location, the definition as put (the name from the path).
    let created = server.put("/v1/models/ids", &json!({"vocab_size": 10, "hidden": 4, "cell": "tanh"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.headers["location"], "/v1/models/ids");
    server.schemas.check("ModelInfo", &created.body);
    assert_eq!(created.body["name"], "ids");
    assert_eq!(created.body["config"]["hidden"], 4);

    // It learns like any model.
    let learned = server.post("/v1/models/ids/streams/s/tokens", &json!({"tokens": [1, 2, 3]})).await;
    assert_eq!(learned.status, 200, "{}", learned.body);

    // Retried, with or without the name: 200 and the same model, its stream still there. The
    // server is at its limit of two models, which must not refuse a retry.
    for body in [
        json!({"vocab_size": 10, "hidden": 4, "cell": "tanh"}),
        json!({"name": "ids", "vocab_size": 10, "hidden": 4, "cell": "tanh"}),
    ] {
        let again = server.put("/v1/models/ids", &body).await;
        assert_eq!(again.status, 200, "{}", again.body);
        server.schemas.check("ModelInfo", &again.body);
        assert_eq!(again.body["stats"]["streams"], 1, "{}", again.body);
    }

    // Another definition under the same name: 409, and the model is unchanged.
    let other = server.put("/v1/models/ids", &json!({"vocab_size": 10, "hidden": 6, "cell": "tanh"})).await;
    assert_eq!(
        (other.status, other.body["type"].as_str()),
        (409, Some("urn:kfrtrl:problem:duplicate-model")),
        "{}",
        other.body
    );
    assert_eq!(server.get("/v1/models/ids").await.body["config"]["hidden"], 4);

    // A body naming another model, a bad path name, a body that is not an object.
    let named = server.put("/v1/models/ids", &json!({"name": "other", "vocab_size": 10})).await;
    assert_eq!(
        (named.status, named.body["type"].as_str()),
        (422, Some("urn:kfrtrl:problem:invalid-request")),
        "{}",
        named.body
    );
    let bad = server.put("/v1/models/bad%20name", &json!({})).await;
    assert_eq!(
        (bad.status, bad.body["type"].as_str()),
        (400, Some("urn:kfrtrl:problem:invalid-name")),
        "{}",
        bad.body
    );
    let array = server.put("/v1/models/x", &json!([1])).await;
    assert!(array.status == 400 || array.status == 422, "{} {}", array.status, array.body);

    // A new name past the model limit: 409 model-limit, nothing created.
    let third = server.put("/v1/models/third", &json!({"vocab_size": 10, "hidden": 4})).await;
    assert_eq!(
        (third.status, third.body["type"].as_str()),
        (409, Some("urn:kfrtrl:problem:model-limit")),
        "{}",
        third.body
    );
    assert_eq!(server.get("/v1/models/third").await.status, 404);
    server.stop().await;
}
