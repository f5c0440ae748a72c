//! `GET /v1/models/{model}/streams/{stream}/ws`: a WebSocket on one stream.
//!
//! Each client text message is a tokens request; each server text message is its reply, in the
//! order of the requests. A request consumes its tokens unless it says `"predict": true`, which
//! evaluates them on a copy of the stream's state like `POST .../predict`. The client may
//! pipeline: the reader submits each request to the engine as soon as it arrives (so they queue
//! in order on the stream) and the writer sends the replies in order. A request is in flight
//! from the moment it is read until its reply is written; with `ws_max_in_flight` requests or
//! `ws_max_in_flight_tokens` tokens in flight the reader stops reading, which pushes back on the
//! client through TCP, and the replies a slow reader has not taken stay bounded. A request that
//! fails (bad JSON, a token outside the vocabulary, a full queue, ...) is answered in its place
//! by a problem object, and the connection stays open.
//!
//! The server sends a Ping every half of `ws_idle_timeout_secs`. It drops a connection that
//! shows no sign of life for that long (no frame from the client, not even the Pong, and no
//! reply taken) while the server waits to read, or whose write takes that long; once the server
//! drains, the connection's remaining writes must all end within half the shutdown timeout. So
//! dead peers and clients that stop reading (or read slowly) free their permits and cannot hold
//! a drain to its deadline. It closes with 1009 when a message exceeds the size limit, 1007 on
//! text that is not UTF-8, 1002 on a protocol error, and 1001 when it shuts down (after the
//! replies in flight) or the connection was idle. Requests read before the client closed take
//! effect even though their replies can no longer be sent: the stream's `position` tells. Once
//! the server stops taking requests it still reads, and drops, what the client sends, so that
//! its close is not turned into a reset by unread data.
//!
//! Each connection holds one of the server's `max_websockets` permits and counts as work in
//! progress for the drain. When the client offers the subprotocol `kfrtrl.v1` (browsers must, to
//! send their key as the subprotocol `kfrtrl.bearer.<key>`), the server selects it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;

use super::AppState;
use super::admission::WorkGuard;
use super::auth::WS_PROTOCOL;
use super::problem::{ApiError, ApiResult};
use super::routes::PathParams;
use super::wire::{TokensRequest, parse_json};
use crate::engine::{Mode, PendingReply, TokenInput, TokensReply};

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

/// Why a connection ended: the `reason` label of `kfrtrl_websocket_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed or the connection broke.
    Client,
    Shutdown,
    IdleTimeout,
    WriteTimeout,
    MessageTooLarge,
    InvalidUtf8,
    ProtocolError,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Shutdown => "shutdown",
            End::IdleTimeout => "idle_timeout",
            End::WriteTimeout => "write_timeout",
            End::MessageTooLarge => "message_too_large",
            End::InvalidUtf8 => "invalid_utf8",
            End::ProtocolError => "protocol_error",
        }
    }

    /// The close frame the server sends; none when the peer is gone or does not read.
    fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::Shutdown => (close_code::AWAY, "server shutting down"),
            End::IdleTimeout => (close_code::AWAY, "idle timeout"),
            End::MessageTooLarge => (close_code::SIZE, "message too large"),
            End::InvalidUtf8 => (close_code::INVALID, "text message is not UTF-8"),
            End::ProtocolError => (close_code::PROTOCOL, "protocol error"),
            End::Client | End::WriteTimeout => return None,
        };
        Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })
    }
}

/// How a failed read ends the connection.
fn read_failure(error: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match error.into_inner().downcast::<WsError>().map(|e| *e) {
        Ok(WsError::Capacity(_)) => End::MessageTooLarge,
        Ok(WsError::Utf8(_)) => End::InvalidUtf8,
        Ok(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_)) => End::Client,
        _ => End::ProtocolError,
    }
}

/// What the writer sends next.
enum Outgoing {
    /// The reply to a request, in the request's turn.
    Reply { read_at: Instant, body: Body, in_flight: InFlight },
    /// The reader stopped: after the replies before it, the writer closes.
    End(End),
}

enum Body {
    Pending(PendingReply<TokensReply>),
    Problem(ApiError),
}

/// The share of the connection's in-flight budget a request holds until its reply is written.
struct InFlight {
    _request: OwnedSemaphorePermit,
    _tokens: Option<OwnedSemaphorePermit>,
}

/// Keeps `kfrtrl_websocket_connections` right however the connection's task ends.
struct Open(IntGauge);

impl Open {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When the peer last showed it is alive: a frame read from it, or a reply it took. Sent pings
/// do not count, since a dead peer's kernel buffer takes them too.
struct Liveness {
    since: Instant,
    last_ms: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Self { since: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        self.since.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The writer's time limits: each write may take `idle`; once the server drains, every write
/// and the closing handshake must end within `drain_budget` of the moment the drain was seen,
/// one deadline for the whole connection, so that a client reading just fast enough to beat a
/// per-write limit cannot stretch the drain either.
struct WriteLimits {
    idle: Duration,
    drain_budget: Duration,
    draining: watch::Receiver<bool>,
    drain_deadline: Option<tokio::time::Instant>,
}

impl WriteLimits {
    /// The drain's deadline, set the first time the drain is seen.
    fn drain_deadline(&mut self) -> Option<tokio::time::Instant> {
        if self.drain_deadline.is_none() && *self.draining.borrow() {
            self.drain_deadline = Some(tokio::time::Instant::now() + self.drain_budget);
        }
        self.drain_deadline
    }

    /// When an operation started now must end.
    fn deadline_from_now(&mut self) -> tokio::time::Instant {
        let idle = tokio::time::Instant::now() + self.idle;
        self.drain_deadline().map_or(idle, |drain| drain.min(idle))
    }

    /// Sends a Ping within the limits.
    async fn ping(&mut self, sink: &mut SplitSink<WebSocket, Message>) -> Result<(), End> {
        self.write(sink, Message::Ping(Default::default())).await
    }

    /// Writes one message within the limits: a peer that does not take it by then is given up.
    async fn write(&mut self, sink: &mut SplitSink<WebSocket, Message>, message: Message) -> Result<(), End> {
        let deadline = self.deadline_from_now();
        let send = sink.send(message);
        tokio::pin!(send);
        let sent = if self.drain_deadline.is_some() {
            tokio::time::timeout_at(deadline, &mut send).await
        } else {
            tokio::select! {
                sent = &mut send => Ok(sent),
                () = tokio::time::sleep_until(deadline) => return Err(End::WriteTimeout),
                () = super::until_draining(&mut self.draining) => {
                    let deadline = self.deadline_from_now().min(deadline);
                    tokio::time::timeout_at(deadline, &mut send).await
                }
            }
        };
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Client),
            Err(_) => Err(End::WriteTimeout),
        }
    }
}

async fn serve_socket(socket: WebSocket, state: AppState, model: String, stream: String, _work: WorkGuard) {
    let http = state.inner.http.clone();
    let open = Open::new(http.websocket_connections.clone());
    let limits = &state.inner.limits;
    let idle = limits.ws_idle_timeout();
    let mut writes = WriteLimits {
        idle,
        drain_budget: state.inner.shutdown_timeout / 2,
        draining: state.inner.draining.subscribe(),
        drain_deadline: None,
    };
    let liveness = Liveness::new();
    let requests = Arc::new(Semaphore::new(limits.ws_max_in_flight));
    let token_budget = limits.ws_max_in_flight_tokens;
    let tokens = Arc::new(Semaphore::new(token_budget));
    let (mut sink, mut source) = socket.split();
    // Unbounded, because the semaphores bound it; so the reader can always queue its `End`.
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut draining = state.inner.draining.subscribe();

    let end = {
        let reader = async {
            let end = loop {
                // Without a free request permit the server does not read: that is the backpressure.
                let request = tokio::select! {
                    biased;
                    () = super::until_draining(&mut draining) => break End::Shutdown,
                    permit = requests.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break End::Shutdown,
                    },
                };
                let message = match next_message(&mut source, &mut draining, idle, &liveness).await {
                    Ok(message) => message,
                    Err(end) => break end,
                };
                let read_at = Instant::now();
                let (body, tokens_held) = match message {
                    Message::Text(text) => match parse(&state, &model, text.as_bytes()) {
                        Ok((input, mode)) => {
                            // A request larger than the budget waits until it is alone.
                            let want = input.tokens.len().min(token_budget);
                            let held = tokens.clone().acquire_many_owned(want as u32).await.ok();
                            let body = match state.engine().submit(&model, &stream, input, mode) {
                                Ok(pending) => Body::Pending(pending),
                                Err(e) => Body::Problem(e.into()),
                            };
                            (body, held)
                        }
                        Err(e) => (Body::Problem(e), None),
                    },
                    _ => (Body::Problem(ApiError::unsupported_message()), None),
                };
                let in_flight = InFlight { _request: request, _tokens: tokens_held };
                if tx.send(Outgoing::Reply { read_at, body, in_flight }).is_err() {
                    break End::Client;
                }
            };
            if end != End::Client {
                let _ = tx.send(Outgoing::End(end));
                // Reads on (and drops) what the client sends until it closes: data left unread
                // when the socket closes turns the close into a reset, which can cost the client
                // the last replies and the close frame.
                while let Some(Ok(message)) = source.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
            end
        };
        let writer = async {
            // `interval` refuses a zero period, which a tiny configured timeout would give.
            let ping_every = (idle / 2).max(Duration::from_millis(1));
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
            ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let writes = &mut writes;
            loop {
                // Pings first, so that a steady flow of replies cannot hold them back.
                let outgoing = tokio::select! {
                    biased;
                    _ = ping.tick() => {
                        if let Err(end) = writes.ping(&mut sink).await {
                            return end;
                        }
                        continue;
                    }
                    outgoing = rx.recv() => outgoing,
                };
                let Some(outgoing) = outgoing else { return End::Client };
                let (read_at, body, in_flight) = match outgoing {
                    Outgoing::End(end) => {
                        if let Some(frame) = end.close_frame() {
                            let _ = writes.write(&mut sink, Message::Close(Some(frame))).await;
                        }
                        return end;
                    }
                    Outgoing::Reply { read_at, body, in_flight } => (read_at, body, in_flight),
                };
                let (status, text) = match body {
                    Body::Problem(e) => (e.status(), problem_text(&e)),
                    Body::Pending(pending) => {
                        let answer = pending.wait();
                        tokio::pin!(answer);
                        // Pings go on while the engine works on the request.
                        let answer = loop {
                            tokio::select! {
                                biased;
                                _ = ping.tick() => {
                                    if let Err(end) = writes.ping(&mut sink).await {
                                        return end;
                                    }
                                }
                                answer = &mut answer => break answer,
                            }
                        };
                        match answer.map_err(ApiError::from).and_then(|reply| {
                            serde_json::to_string(&reply)
                                .map_err(|e| ApiError::internal(format!("cannot encode the reply: {e}")))
                        }) {
                            Ok(text) => (StatusCode::OK, text),
                            Err(e) => (e.status(), problem_text(&e)),
                        }
                    }
                };
                if status.is_server_error() {
                    tracing::warn!(%model, %stream, status = status.as_u16(), "websocket request failed");
                }
                if let Err(end) = writes.write(&mut sink, Message::Text(text.into())).await {
                    return end;
                }
                liveness.touch();
                http.websocket_replies.with_label_values(&[status.as_str()]).inc();
                http.websocket_reply_durations.observe(read_at.elapsed().as_secs_f64());
                drop(in_flight);
            }
        };
        tokio::pin!(reader, writer);
        let mut reader_done = false;
        let end = tokio::select! {
            // The writer gave up (or closed): the reader goes with it.
            end = &mut writer => end,
            end = &mut reader => {
                reader_done = true;
                match end {
                    // The peer is gone: replies still due could not be delivered.
                    End::Client => End::Client,
                    // The writer's failure to send to a client that has closed meanwhile is
                    // not why the connection ended.
                    _ => match writer.await {
                        End::WriteTimeout => End::WriteTimeout,
                        _ => end,
                    },
                }
            }
        };
        // The server closed: the reader takes the client's answering Close, briefly.
        if !reader_done && end.close_frame().is_some() {
            let _ = tokio::time::timeout(CLOSE_GRACE.min(idle), &mut reader).await;
        }
        end
    };
    // Completes the closing handshake (tungstenite queued its answer to the client's Close).
    if end != End::WriteTimeout {
        let _ = tokio::time::timeout_at(writes.deadline_from_now(), sink.close()).await;
    }
    // Before the count goes up, so that whoever sees the close counted sees the gauge down too.
    drop(open);
    http.websocket_closes.with_label_values(&[end.label()]).inc();
    tracing::debug!(%model, %stream, reason = end.label(), "websocket closed");
}

/// How long the server waits for the client's answer to its Close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The next data message; pings and pongs only show that the peer is alive.
async fn next_message(
    source: &mut SplitStream<WebSocket>,
    draining: &mut watch::Receiver<bool>,
    idle: Duration,
    liveness: &Liveness,
) -> Result<Message, End> {
    loop {
        let quiet_left = idle.saturating_sub(liveness.quiet_for());
        if quiet_left.is_zero() {
            return Err(End::IdleTimeout);
        }
        let message = tokio::select! {
            biased;
            () = super::until_draining(draining) => return Err(End::Shutdown),
            message = source.next() => message,
            () = tokio::time::sleep(quiet_left) => continue,
        };
        liveness.touch();
        match message {
            None | Some(Ok(Message::Close(_))) => return Err(End::Client),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                return Err(read_failure(e));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Ok(message),
        }
    }
}

fn problem_text(error: &ApiError) -> String {
    error.to_json().to_string()
}

/// Parses and checks a request against the model.
fn parse(state: &AppState, model: &str, text: &[u8]) -> Result<(TokenInput, Mode), ApiError> {
    let request: TokensRequest = parse_json(text)?;
    let engine = state.engine();
    let definition = engine.definition(model)?;
    let mode = request.mode(Mode::Consume);
    let input = request.into_input(&definition, engine.limits().max_tokens_per_request)?;
    Ok((input, mode))
}
