//! Request messages as they arrive on the wire, their parsing (with a problem per failure mode)
//! and their validation into the engine's types. Replies are the engine's own serializable types.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::problem::ApiError;
use crate::engine::{EngineError, Mode, ModelDefinition, TokenInput};

/// Default number of next-token predictions in a reply.
pub const DEFAULT_TOP_K: usize = 5;

/// Most next-token predictions a request may ask for: a reply lists them all, so a large
/// vocabulary must not let one request make a multi-megabyte reply.
pub const MAX_TOP_K: usize = 1024;

/// A tokens request: `{"tokens": [..]}` or `{"text": ".."}` with options.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensRequest {
    /// Token ids.
    #[serde(default, deserialize_with = "present")]
    pub tokens: Option<Vec<i64>>,
    /// UTF-8 text, read as bytes (byte-level models only).
    #[serde(default, deserialize_with = "present")]
    pub text: Option<String>,
    /// Whether the tokens train the weights (default true).
    #[serde(default = "yes")]
    pub learn: bool,
    /// Whether the stream starts a new sequence first (default false).
    #[serde(default)]
    pub reset: bool,
    /// Number of next-token predictions (default 5, at most [`MAX_TOP_K`], capped at the
    /// vocabulary size).
    #[serde(default, deserialize_with = "present")]
    pub top_k: Option<usize>,
    /// Whether the reply lists every token's loss (default false).
    #[serde(default)]
    pub return_losses: bool,
    /// Whether the tokens are only evaluated, on a copy of the stream's state, as by
    /// `POST .../predict` (default false). It lets a WebSocket client predict without learning.
    #[serde(default)]
    pub predict: bool,
}

fn yes() -> bool {
    true
}

/// An optional field that, when present, holds a value: `null` is refused as the contract
/// says (a missing field takes the default).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl TokensRequest {
    /// The engine mode of the request: `Predict` when it asks for `predict`, else `default`.
    pub fn mode(&self, default: Mode) -> Mode {
        if self.predict { Mode::Predict } else { default }
    }

    /// Checks the request against the model and turns it into the engine's input.
    pub fn into_input(self, model: &ModelDefinition, max_tokens: usize) -> Result<TokenInput, ApiError> {
        let tokens = match (self.tokens, self.text) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_request("send either `tokens` or `text`, not both"));
            }
            (None, None) => {
                return Err(ApiError::invalid_request("send `tokens` (an array of ids) or `text`"));
            }
            (None, Some(text)) => {
                if !model.byte_level() {
                    return Err(ApiError::text_not_allowed(&model.name, model.vocab_size));
                }
                text.into_bytes().into_iter().map(u32::from).collect::<Vec<u32>>()
            }
            (Some(ids), None) => {
                if ids.len() > max_tokens {
                    return Err(EngineError::TooManyTokens { count: ids.len(), limit: max_tokens }.into());
                }
                let vocab = model.vocab_size;
                let mut tokens = Vec::with_capacity(ids.len());
                for (index, &token) in ids.iter().enumerate() {
                    match u32::try_from(token) {
                        Ok(t) if (t as usize) < vocab => tokens.push(t),
                        _ => return Err(EngineError::TokenOutOfRange { index, token, vocab }.into()),
                    }
                }
                tokens
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput.into());
        }
        let top_k = self.top_k.unwrap_or(DEFAULT_TOP_K);
        if top_k > MAX_TOP_K {
            return Err(ApiError::invalid_request(format!("top_k must be at most {MAX_TOP_K}")));
        }
        if tokens.len() > max_tokens {
            return Err(EngineError::TooManyTokens { count: tokens.len(), limit: max_tokens }.into());
        }
        Ok(TokenInput {
            tokens,
            learn: self.learn,
            reset: self.reset,
            top_k: top_k.min(model.vocab_size),
            return_losses: self.return_losses,
        })
    }
}

fn classify(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::malformed_json(e.to_string()),
        Category::Data if e.to_string().starts_with("unknown field") => {
            ApiError::unknown_field(e.to_string())
        }
        Category::Data => ApiError::invalid_request(e.to_string()),
    }
}

/// Rewrites every number with no fractional part (`5.0`, `1e3`) as an integer, as JSON Schema's
/// `integer` reads them; returns whether anything changed.
fn integral_numbers(value: &mut Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let integer = if f.fract() != 0.0 || !f.is_finite() {
                None
            } else if (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
                Some(Value::from(f as i64))
            } else if (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                Some(Value::from(f as u64))
            } else {
                None
            };
            integer.map(|i| *value = i).is_some()
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, v| integral_numbers(v) | changed),
        Value::Object(map) => map.values_mut().fold(false, |changed, v| integral_numbers(v) | changed),
        _ => false,
    }
}

/// Parses a JSON message, telling malformed JSON, unknown fields and invalid content apart.
/// Integers may be written as integral floats (`5.0`, `1e3`), as JSON Schema allows; that
/// slower path only runs when the direct parse fails.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match serde_json::from_slice(bytes) {
        Ok(message) => Ok(message),
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            let mut value: Value = serde_json::from_slice(bytes).map_err(classify)?;
            if integral_numbers(&mut value) {
                serde_json::from_value(value).map_err(classify)
            } else {
                Err(classify(e))
            }
        }
        Err(e) => Err(classify(e)),
    }
}

/// A JSON object's fields as a message, refusing `null` members (a missing field takes the
/// default; `null` is not a value of any field). For messages whose type is not ours to
/// annotate, such as the engine's model definition.
pub fn from_object<T: DeserializeOwned>(mut value: Value) -> Result<T, ApiError> {
    if let Value::Object(map) = &value
        && let Some((field, _)) = map.iter().find(|(_, v)| v.is_null())
    {
        return Err(ApiError::invalid_request(format!(
            "`{field}` must not be null; leave it out for the default"
        )));
    }
    match serde_json::from_value(value.clone()) {
        Ok(message) => Ok(message),
        Err(e) if integral_numbers(&mut value) => serde_json::from_value(value).map_err(|_| classify(e)),
        Err(e) => Err(classify(e)),
    }
}

/// A JSON request body, whatever its content type (so that plain `curl -d` works), with every
/// failure as a problem: 413 past the body limit, 400 for malformed JSON or unknown fields, 422
/// for content that does not fit the message.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "Body too large",
                    rejection.body_text(),
                )
            } else {
                ApiError::invalid_request(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vocab: usize) -> ModelDefinition {
        ModelDefinition { vocab_size: vocab, ..ModelDefinition::with_defaults("m", 4) }
    }

    #[test]
    fn parse_errors_are_classified() {
        let slug = |s: &str| parse_json::<TokensRequest>(s.as_bytes()).unwrap_err().slug();
        assert_eq!(slug("{"), "malformed-json");
        assert_eq!(slug("nope"), "malformed-json");
        assert_eq!(slug(r#"{"tokens":[1],"bogus":1}"#), "unknown-field");
        assert_eq!(slug(r#"{"tokens":"abc"}"#), "invalid-request");
        assert_eq!(slug(r#"{"tokens":[1.5]}"#), "invalid-request");
        assert_eq!(slug(r#"{"tokens":null}"#), "invalid-request");
        assert_eq!(slug(r#"{"text":"a","top_k":null}"#), "invalid-request");
        assert_eq!(slug(r#"{"tokens":[1.0],"bogus":1}"#), "unknown-field");
    }

    #[test]
    fn integers_may_be_written_as_integral_floats() {
        let request: TokensRequest = parse_json(br#"{"tokens":[1.0, 2e1, -3.0],"top_k":4.0}"#).unwrap();
        assert_eq!(request.tokens, Some(vec![1, 20, -3]));
        assert_eq!(request.top_k, Some(4));
        let model: crate::engine::ModelRequest =
            from_object(serde_json::json!({"name": "m", "hidden": 8.0, "seed": 1e3, "lr": 1})).unwrap();
        assert_eq!((model.hidden, model.seed, model.lr), (Some(8), Some(1000), Some(1.0)));
        let slug = |v: Value| from_object::<crate::engine::ModelRequest>(v).unwrap_err().slug();
        assert_eq!(slug(serde_json::json!({"name": "m", "hidden": null})), "invalid-request");
        assert_eq!(slug(serde_json::json!({"name": "m", "hidden": 8.5})), "invalid-request");
        assert_eq!(slug(serde_json::json!({"name": "m", "colour": 1.0})), "unknown-field");
    }

    #[test]
    fn validation_checks_vocab_text_and_sizes() {
        let req = |s: &str| parse_json::<TokensRequest>(s.as_bytes()).unwrap();
        let slug = |s: &str, vocab| req(s).into_input(&model(vocab), 4).unwrap_err().slug();
        assert_eq!(slug(r#"{"tokens":[5]}"#, 5), "token-out-of-range");
        assert_eq!(slug(r#"{"tokens":[-1]}"#, 5), "token-out-of-range");
        assert_eq!(slug(r#"{"text":"a"}"#, 5), "text-needs-byte-model");
        assert_eq!(slug(r#"{"tokens":[]}"#, 5), "empty-input");
        assert_eq!(slug(r#"{"text":""}"#, 256), "empty-input");
        assert_eq!(slug(r#"{"tokens":[1,1,1,1,1]}"#, 5), "too-many-tokens");
        assert_eq!(slug(r#"{"text":"abcde"}"#, 256), "too-many-tokens");
        assert_eq!(slug(r#"{"text":"a","tokens":[1]}"#, 256), "invalid-request");
        let input = req(r#"{"text":"hé","top_k":1000,"learn":false}"#).into_input(&model(256), 4).unwrap();
        assert_eq!(input.tokens, vec![104, 0xc3, 0xa9]);
        assert_eq!(input.top_k, 256);
        assert!(!input.learn && !input.reset && !input.return_losses);
        assert_eq!(req(r#"{"tokens":[1]}"#).into_input(&model(5), 4).unwrap().top_k, 5);
        assert_eq!(req(r#"{"tokens":[1],"top_k":1024}"#).into_input(&model(5000), 4).unwrap().top_k, 1024);
        let refused = req(r#"{"tokens":[1],"top_k":1025}"#).into_input(&model(5000), 4).unwrap_err();
        assert_eq!((refused.status().as_u16(), refused.slug()), (422, "invalid-request"));
    }
}
