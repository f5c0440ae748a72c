//! The streams' clients: one HTTP client or WebSocket per stream, its warm-up request, and its
//! requests until the window ends.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::{LoadConfig, LoadError, SharedTally, check_reply, record};

/// An HTTP client that sends the API key, if any, with every request.
pub(super) fn authorized_client(cfg: &LoadConfig) -> Result<reqwest::Client, LoadError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &cfg.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| LoadError::Config("the API key is not a valid header value".into()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().default_headers(headers).build().map_err(|e| LoadError::Config(e.to_string()))
}

/// Answers `ready` with the outcome of a stream's first request, then waits for the start and
/// returns the connection with the window's deadline; `None` when the run is abandoned before
/// it starts (another stream could not start).
async fn start_after<T>(
    warm_up: Result<T, String>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    mut start: watch::Receiver<Option<Instant>>,
) -> Option<(T, Instant)> {
    let (answer, conn) = match warm_up {
        Ok(conn) => (Ok(()), Some(conn)),
        Err(e) => (Err(e), None),
    };
    let _ = ready.send(answer);
    drop(ready);
    let conn = conn?;
    let deadline = (*start.wait_for(Option::is_some).await.ok()?)?;
    Some((conn, deadline))
}

/// One HTTP stream: a warm-up request, the start, then requests back to back until the end (a
/// failed request counts as an error and the stream goes on).
pub(super) async fn http_stream(
    url: &str,
    body: String,
    cfg: &LoadConfig,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    start: watch::Receiver<Option<Instant>>,
    tally: &SharedTally,
) {
    let client = match authorized_client(cfg) {
        Ok(client) => client,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let send = |client: &reqwest::Client| {
        let request = client.post(url).header("content-type", "application/json").body(body.clone());
        async move {
            let response = request.send().await.map_err(|e| format!("POST {url}: {e}"))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| format!("POST {url}: {e}"))?;
            match check_reply(&bytes) {
                Ok(()) if status.is_success() => Ok(()),
                Ok(()) => Err(format!("{status}")),
                Err(e) => Err(format!("{status}: {e}")),
            }
        }
    };
    let warm_up = send(&client).await;
    let Some(((), deadline)) = start_after(warm_up, ready, start).await else {
        return;
    };
    while Instant::now() < deadline {
        let sent = Instant::now();
        let outcome = send(&client).await;
        record(tally, sent, outcome, cfg.tokens_per_message);
    }
}

/// Opens a WebSocket to `url`, with the bearer key when there is one (also `kfrtrl feed`'s).
pub async fn connect_ws(url: &str, api_key: Option<&str>) -> Result<Ws, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().map_err(|e| format!("{url}: {e}"))?;
    if let Some(key) = api_key {
        let value = format!("Bearer {key}").parse().map_err(|_| "the API key is not a valid header value")?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| format!("{url}: {e}"))?;
    Ok(ws)
}

/// Connects a WebSocket and sends its first message.
async fn ws_connect(url: &str, body: &str, cfg: &LoadConfig) -> Result<Ws, String> {
    let mut ws = connect_ws(url, cfg.api_key.as_deref()).await?;
    ws.send(Message::text(body)).await.map_err(|e| format!("{url}: {e}"))?;
    next_reply(&mut ws, url).await??;
    Ok(ws)
}

/// One WebSocket stream: a warm-up message, the start, then up to `pipeline` messages in
/// flight until the end; replies come back in order. A broken connection ends the stream, its
/// messages in flight and the one it could not send counted as errors.
pub(super) async fn ws_stream(
    url: &str,
    body: String,
    cfg: &LoadConfig,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    start: watch::Receiver<Option<Instant>>,
    tally: &SharedTally,
) {
    let Some((mut ws, deadline)) = start_after(ws_connect(url, &body, cfg).await, ready, start).await else {
        return;
    };
    let mut in_flight = std::collections::VecDeque::with_capacity(cfg.pipeline);
    let broken = 'run: loop {
        while in_flight.len() < cfg.pipeline && Instant::now() < deadline {
            let sent = ws.send(Message::text(body.clone())).await;
            in_flight.push_back(Instant::now());
            if let Err(e) = sent {
                break 'run Some(format!("{url}: {e}"));
            }
        }
        let Some(&sent) = in_flight.front() else { break None };
        match next_reply(&mut ws, url).await {
            Ok(outcome) => {
                in_flight.pop_front();
                record(tally, sent, outcome, cfg.tokens_per_message);
            }
            Err(e) => break Some(e),
        }
    };
    match broken {
        None => {
            let _ = ws.close(None).await;
        }
        Some(e) => {
            for sent in in_flight {
                record(tally, sent, Err(e.clone()), cfg.tokens_per_message);
            }
        }
    }
}

/// A client WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message: `Ok(outcome)` for a reply (a problem object is a failed request), `Err`
/// when the connection broke.
async fn next_reply(ws: &mut Ws, url: &str) -> Result<Result<(), String>, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(check_reply(text.as_bytes())),
            Some(Ok(Message::Close(frame))) => return Err(format!("{url}: closed by the server: {frame:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("{url}: {e}")),
            None => return Err(format!("{url}: closed")),
        }
    }
}
