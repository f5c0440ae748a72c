//! `GET /v1/models/{model}/streams/{stream}/ws`: a WebSocket on one stream.
//!
//! Each client text message is a tokens request; each server text message is its reply, in the
//! order of the requests. A request consumes its tokens unless it says `"predict": true`, which
//! evaluates them on a copy of the stream's state like `POST .../predict`. The client may pipeline: the reader submits each request to the engine
//! as soon as it arrives (so they queue in order on the stream) and the writer sends the replies
//! in order, with at most `ws_max_in_flight` requests outstanding (beyond that the reader stops
//! reading, which pushes back on the client through TCP). A request that fails (bad JSON, a
//! token outside the vocabulary, a full queue, ...) is answered in its place by a problem
//! object, and the connection stays open. The server closes the connection with 1009 when a
//! message exceeds the size limit, with 1002 on a protocol error, and with 1001 when it shuts
//! down (after the replies in flight).
//!
//! Each connection holds one of the server's `max_websockets` permits and counts as work in
//! progress for the drain. When the client offers the subprotocol `kfrtrl.v1` (browsers must, to
//! send their key as the subprotocol `kfrtrl.bearer.<key>`), the server selects it.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::AppState;
use super::admission::WorkGuard;
use super::auth::WS_PROTOCOL;
use super::problem::{ApiError, ApiResult};
use super::routes::PathParams;
use super::wire::{TokensRequest, parse_json};
use crate::engine::{Mode, PendingReply, TokensReply};

/// The upgrade handler: checks the model, the stream name and the connection limit before
/// switching protocols.
pub async fn upgrade(
    State(state): State<AppState>,
    PathParams((model, stream)): PathParams<(String, String)>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = ws.map_err(|e| ApiError::upgrade_required(e.body_text()))?;
    state.engine().definition(&model)?;
    let inner = &state.inner;
    let Ok(permit) = inner.admission.websockets.clone().try_acquire_owned() else {
        return Err(ApiError::overloaded("WebSocket connections", inner.limits.max_websockets));
    };
    let work = inner.admission.work.begin();
    let max_message = inner.limits.max_body_bytes;
    Ok(ws
        .protocols([WS_PROTOCOL])
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            serve_socket(socket, state, model, stream, work).await;
            drop(permit);
        })
        .into_response())
}

/// The close code for a failed read: 1009 when the message or frame was too large.
fn read_failure(error: axum::Error) -> (u16, &'static str) {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match error.into_inner().downcast::<WsError>().map(|e| *e) {
        Ok(WsError::Capacity(_)) => (close_code::SIZE, "message too large"),
        Ok(WsError::Utf8(_)) => (close_code::INVALID, "text message is not UTF-8"),
        _ => (close_code::PROTOCOL, "protocol error"),
    }
}

/// A reply in the writer's queue.
enum Outgoing {
    Pending(PendingReply<TokensReply>),
    Ready(String),
    Close(u16, &'static str),
}

fn problem_text(error: &ApiError) -> String {
    error.to_json().to_string()
}

async fn serve_socket(socket: WebSocket, state: AppState, model: String, stream: String, _work: WorkGuard) {
    let gauge = state.inner.http.websocket_connections.clone();
    gauge.inc();
    let (mut sink, mut source) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(state.inner.limits.ws_max_in_flight.max(1));
    let mut draining = state.inner.draining.subscribe();

    let reader = async {
        loop {
            let message = tokio::select! {
                message = source.next() => message,
                () = super::until_draining(&mut draining) => {
                    let _ = tx.send(Outgoing::Close(close_code::AWAY, "server shutting down")).await;
                    break;
                }
            };
            let outgoing = match message {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    let (code, reason) = read_failure(e);
                    let _ = tx.send(Outgoing::Close(code, reason)).await;
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    Outgoing::Ready(problem_text(&ApiError::unsupported_message()))
                }
                Some(Ok(Message::Text(text))) => match submit(&state, &model, &stream, text.as_bytes()) {
                    Ok(pending) => Outgoing::Pending(pending),
                    Err(e) => Outgoing::Ready(problem_text(&e)),
                },
            };
            if tx.send(outgoing).await.is_err() {
                break;
            }
        }
        drop(tx);
    };

    let writer = async {
        while let Some(outgoing) = rx.recv().await {
            let text = match outgoing {
                Outgoing::Ready(text) => text,
                Outgoing::Pending(pending) => match pending.wait().await {
                    Ok(reply) => serde_json::to_string(&reply).unwrap_or_else(|e| {
                        problem_text(&ApiError::internal(format!("cannot encode the reply: {e}")))
                    }),
                    Err(e) => problem_text(&ApiError::from(e)),
                },
                Outgoing::Close(code, reason) => {
                    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            };
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        // Dropping the receiver makes the reader stop at its next message.
        rx.close();
        let _ = sink.close().await;
    };

    tokio::join!(reader, writer);
    gauge.dec();
}

fn submit(
    state: &AppState,
    model: &str,
    stream: &str,
    text: &[u8],
) -> Result<PendingReply<TokensReply>, ApiError> {
    let request: TokensRequest = parse_json(text)?;
    let engine = state.engine();
    let definition = engine.definition(model)?;
    let mode = request.mode(Mode::Consume);
    let input = request.into_input(&definition, engine.limits().max_tokens_per_request)?;
    Ok(engine.submit(model, stream, input, mode)?)
}
