//! The status page at `/`: static HTML, CSS and JavaScript from `assets/status/`, compiled into
//! the binary (no build step, no CDN). The page only uses the public API: `/v1/models`,
//! `/v1/models/{model}/streams` and the stream WebSocket with `predict: true`.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../../assets/status/index.html");
const APP_JS: &str = include_str!("../../assets/status/app.js");
const STYLE_CSS: &str = include_str!("../../assets/status/style.css");

/// The page may load only its own assets and talk only to its own origin (WebSocket included).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // The assets change with the binary; revalidating is cheap and never shows a stale page.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /status/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /status/style.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}
