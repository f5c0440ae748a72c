//! Optional bearer-token authentication of the `/v1` routes: the server's key, how a request
//! presents it (`Authorization: Bearer <key>`, or, for browsers' WebSockets, which cannot set
//! headers, the subprotocol `kfrtrl.bearer.<key>`), and a comparison in constant time.
//!
//! The key never reaches a log line: its `Debug` is redacted and no error message quotes it.

use std::fmt;
use std::sync::Arc;

use axum::http::{HeaderMap, header};

use super::problem::ApiError;

/// The WebSocket subprotocol the server selects; a browser offers it next to the bearer one,
/// because a browser drops a connection whose reply selects none of the offered subprotocols.
pub const WS_PROTOCOL: &str = "kfrtrl.v1";

/// Prefix of the WebSocket subprotocol that carries the key.
pub const WS_BEARER_PREFIX: &str = "kfrtrl.bearer.";

/// The server's API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Characters of an HTTP token (RFC 9110 `tchar`): a key made of them fits unchanged in an
/// `Authorization` header and in a `Sec-WebSocket-Protocol` value.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl ApiKey {
    /// Shortest key accepted: guessing must stay out of reach.
    pub const MIN_LEN: usize = 16;

    /// Checks a key: at least [`ApiKey::MIN_LEN`] characters, all HTTP token characters
    /// (letters, digits and `!#$%&'*+-.^_`|~`; base64url or hex keys qualify).
    pub fn new(key: &str) -> Result<Self, String> {
        if key.len() < Self::MIN_LEN {
            return Err(format!("the API key must have at least {} characters", Self::MIN_LEN));
        }
        if !key.bytes().all(is_tchar) {
            return Err("the API key may only hold letters, digits and !#$%&'*+-.^_`|~".to_owned());
        }
        Ok(Self(key.into()))
    }

    /// Whether `candidate` is the key, in time that depends on the key's length only.
    fn matches(&self, candidate: &[u8]) -> bool {
        let key = self.0.as_bytes();
        let mut diff = u8::from(key.len() != candidate.len());
        for (i, &k) in key.iter().enumerate() {
            diff |= k ^ candidate.get(i).copied().unwrap_or(!k);
        }
        std::hint::black_box(diff) == 0
    }

    /// Checks the credentials of a request: `Ok` when one of them is the key, else the 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let mut presented = false;
        for value in headers.get_all(header::AUTHORIZATION) {
            let value = value.as_bytes();
            if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
                presented = true;
                if self.matches(value[7..].trim_ascii()) {
                    return Ok(());
                }
            }
        }
        for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
            for protocol in value.as_bytes().split(|&b| b == b',') {
                if let Some(token) = protocol.trim_ascii().strip_prefix(WS_BEARER_PREFIX.as_bytes()) {
                    presented = true;
                    if self.matches(token) {
                        return Ok(());
                    }
                }
            }
        }
        Err(ApiError::unauthorized(presented))
    }
}

/// Whether a path is under `/v1` (the routes that need the key when one is set).
pub fn is_api_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn keys_are_long_header_tokens() {
        assert!(ApiKey::new("short").is_err());
        assert!(ApiKey::new("with space in the middle").is_err());
        assert!(ApiKey::new("comma,separated,is,not,a,token").is_err());
        assert!(ApiKey::new("bm90IGEgcmVhbCBrZXk_-.~").is_ok());
        assert_eq!(format!("{:?}", ApiKey::new("0123456789abcdef").unwrap()), "ApiKey(<redacted>)");
    }

    #[test]
    fn a_request_presents_the_key_as_a_bearer_header_or_subprotocol() {
        let key = ApiKey::new("0123456789abcdef").unwrap();
        let ok = |h: HeaderMap| key.check(&h).is_ok();
        let slug_wrong = |h: HeaderMap| {
            let e = key.check(&h).unwrap_err();
            assert_eq!(e.slug(), "unauthorized");
            e.to_json()["detail"].as_str().unwrap().contains("wrong")
        };
        assert!(ok(headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdef")])));
        assert!(ok(headers(&[(header::AUTHORIZATION, "bearer  0123456789abcdef ")])));
        assert!(ok(headers(&[(
            header::SEC_WEBSOCKET_PROTOCOL,
            "kfrtrl.v1, kfrtrl.bearer.0123456789abcdef"
        )])));
        assert!(ok(headers(&[
            (header::AUTHORIZATION, "Bearer nope"),
            (header::AUTHORIZATION, "Bearer 0123456789abcdef"),
        ])));
        assert!(!slug_wrong(HeaderMap::new()));
        assert!(!slug_wrong(headers(&[(header::AUTHORIZATION, "Basic 0123456789abcdef")])));
        assert!(slug_wrong(headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcde")])));
        assert!(slug_wrong(headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdefg")])));
        assert!(slug_wrong(headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdeF")])));
        assert!(slug_wrong(headers(&[(header::SEC_WEBSOCKET_PROTOCOL, "kfrtrl.bearer.x")])));
    }

    #[test]
    fn only_v1_paths_are_guarded() {
        for path in ["/v1", "/v1/models", "/v1/models/a/streams/b/ws"] {
            assert!(is_api_path(path), "{path}");
        }
        for path in ["/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/v10", "/v1x/models"] {
            assert!(!is_api_path(path), "{path}");
        }
    }
}
