//! Cross-origin protection: a page on another site must not make a visitor's browser train,
//! create or delete models.
//!
//! A browser lets any page send a form-like `POST` (no preflight) or open a WebSocket to any
//! server, `localhost` included, and a server without an API key would take it. So a request
//! that changes something (`POST`, `PUT`, `PATCH`, `DELETE`, and the WebSocket handshake) is
//! refused with 403 `cross-origin-request` when the browser says it comes from another origin:
//! `Sec-Fetch-Site` other than `same-origin` or `none` (modern browsers), else an `Origin` whose
//! `host[:port]` is not the request's `Host`. Origins listed in `allowed_origins` (exact
//! `scheme://host[:port]`, or `*` for any) pass. Clients that are not browsers (curl, SDKs, the
//! load tool) send neither header and are not affected. Reads (`GET`) are not checked: without
//! CORS headers the other page cannot see the answer.
//!
//! This does not stop DNS rebinding: a hostile name that resolves to the server's address is the
//! browser's own origin for that name, `Host` included, and its page may then read replies too.
//! Only the API key protects against that (see the README's Authentication section).

use axum::http::{HeaderMap, Method, header};

use super::problem::ApiError;

/// The origins allowed besides the server's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    any: bool,
    origins: Vec<String>,
}

impl AllowedOrigins {
    /// Parses `scheme://host[:port]` entries, or `*` alone; compared without case.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut allowed = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry == "*" {
                allowed.any = true;
                continue;
            }
            let valid = entry.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty()
                    && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    && !rest.is_empty()
                    && !rest.contains(['/', '?', '#', '@', ' '])
            });
            if !valid {
                return Err(format!("allowed origin {entry:?} is not `scheme://host[:port]` or `*`"));
            }
            allowed.origins.push(without_default_port(&entry.to_ascii_lowercase()));
        }
        Ok(allowed)
    }

    /// Parses a comma-separated list (the flag's and the environment's form).
    pub fn parse_list(list: &str) -> Result<Self, String> {
        let entries: Vec<&str> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        Self::new(&entries)
    }

    fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// A browser's `Origin` never names the scheme's default port: `https://x:443` is `https://x`.
fn without_default_port(origin: &str) -> String {
    for (scheme, port) in [("https://", ":443"), ("http://", ":80"), ("wss://", ":443"), ("ws://", ":80")] {
        if origin.starts_with(scheme)
            && let Some(host) = origin.strip_suffix(port)
        {
            return host.to_owned();
        }
    }
    origin.to_owned()
}

/// Whether a request changes something: an unsafe method or a WebSocket handshake.
fn changes_state(method: &Method, headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    upgrade || !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses a state-changing request that a browser sent from another origin.
pub fn check(method: &Method, headers: &HeaderMap, allowed: &AllowedOrigins) -> Result<(), ApiError> {
    if allowed.any || !changes_state(method, headers) {
        return Ok(());
    }
    let text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
    // Browsers send a readable Origin; one that is not text is not taken as absent.
    if headers.get(header::ORIGIN).is_some_and(|v| v.to_str().is_err()) {
        return Err(ApiError::cross_origin("an unreadable origin"));
    }
    let origin = text(header::ORIGIN);
    if origin.is_some_and(|o| allowed.allows(o)) {
        return Ok(());
    }
    let same_origin = match text(header::HeaderName::from_static("sec-fetch-site")) {
        Some(site) => matches!(site, "same-origin" | "none"),
        None => match origin {
            None => true,
            Some(origin) => {
                let host = origin.split_once("://").map(|(_, rest)| rest);
                host.is_some_and(|h| text(header::HOST).is_some_and(|host| host.eq_ignore_ascii_case(h)))
            }
        },
    };
    if same_origin { Ok(()) } else { Err(ApiError::cross_origin(origin.unwrap_or("another site"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().unwrap());
        }
        h
    }

    fn refused(method: Method, pairs: &[(&'static str, &str)], allowed: &AllowedOrigins) -> bool {
        check(&method, &headers(pairs), allowed).is_err()
    }

    #[test]
    fn only_a_browser_request_from_another_origin_that_changes_something_is_refused() {
        let none = AllowedOrigins::default();
        let host = ("host", "127.0.0.1:8080");
        // Not a browser, or the server's own page.
        assert!(!refused(Method::POST, &[host], &none));
        assert!(!refused(Method::POST, &[host, ("origin", "http://127.0.0.1:8080")], &none));
        assert!(!refused(Method::DELETE, &[host, ("origin", "HTTP://127.0.0.1:8080")], &none));
        assert!(!refused(Method::POST, &[host, ("sec-fetch-site", "same-origin")], &none));
        assert!(!refused(Method::POST, &[host, ("sec-fetch-site", "none")], &none));
        // Another site, by Origin or by Sec-Fetch-Site (which wins: a proxy may rewrite Host).
        assert!(refused(Method::POST, &[host, ("origin", "http://evil.example")], &none));
        assert!(refused(Method::PUT, &[host, ("origin", "http://127.0.0.1:9090")], &none));
        assert!(refused(Method::POST, &[host, ("origin", "null")], &none));
        assert!(refused(Method::POST, &[("origin", "http://127.0.0.1:8080")], &none), "no Host");
        assert!(refused(Method::POST, &[host, ("sec-fetch-site", "cross-site")], &none));
        assert!(refused(Method::POST, &[host, ("sec-fetch-site", "same-site")], &none));
        let proxied =
            [("host", "10.0.0.5:8080"), ("origin", "https://ml.example"), ("sec-fetch-site", "same-origin")];
        assert!(!refused(Method::POST, &proxied, &none));
        // A WebSocket handshake is a GET that changes state; other reads are not checked.
        let ws = [host, ("upgrade", "websocket"), ("origin", "http://evil.example")];
        assert!(refused(Method::GET, &ws, &none));
        assert!(!refused(Method::GET, &[host, ("origin", "http://evil.example")], &none));
    }

    #[test]
    fn listed_origins_pass_and_a_star_passes_all() {
        let listed = AllowedOrigins::parse_list(
            " https://ml.example:443 , http://localhost:3000, http://x.example:80",
        )
        .unwrap();
        assert!(!refused(Method::POST, &[("origin", "http://x.example")], &listed), "default port");
        let host = ("host", "127.0.0.1:8080");
        assert!(!refused(
            Method::POST,
            &[host, ("origin", "https://ML.example"), ("sec-fetch-site", "cross-site")],
            &listed
        ));
        assert!(!refused(Method::POST, &[host, ("origin", "http://localhost:3000")], &listed));
        assert!(refused(Method::POST, &[host, ("origin", "http://localhost:3001")], &listed));
        assert!(refused(Method::POST, &[host, ("origin", "https://ml.example.evil")], &listed));
        let any = AllowedOrigins::new(&["*"]).unwrap();
        assert!(!refused(Method::POST, &[host, ("origin", "http://evil.example")], &any));
        for bad in ["ml.example", "https://ml.example/", "https://", "://x", "https://a b", "https://u@x"] {
            assert!(AllowedOrigins::new(&[bad]).is_err(), "{bad}");
        }
        assert_eq!(AllowedOrigins::parse_list("").unwrap(), AllowedOrigins::default());
        let mut unreadable = headers(&[("host", "127.0.0.1:8080")]);
        unreadable.insert("origin", header::HeaderValue::from_bytes(b"http://\xff").unwrap());
        assert!(check(&Method::POST, &unreadable, &AllowedOrigins::default()).is_err());
    }
}
