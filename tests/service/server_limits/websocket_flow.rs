//! WebSocket flow control end to end: the in-flight bounds, clients that stop reading or go
//! silent are dropped, a slow but steady reader is kept, and none can hold the drain.

use super::*;

/// The value of one series of the server's `/metrics` (`name{labels}` exactly as exposed).
async fn metric_value(server: &TestServer, series: &str) -> Option<f64> {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Regression: a request stayed "in flight" only until the engine answered it, so finished
/// replies a slow reader had not taken piled up without bound (and up to `ws_max_in_flight + 2`
/// requests were queued); there was no bound in tokens at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_holds_at_most_its_in_flight_requests_and_tokens() {
    for (max_requests, max_tokens, per_request, queued) in [(2, 65_536, 1, 2), (8, 3, 2, 2)] {
        let limits = Limits {
            ws_max_in_flight: max_requests,
            ws_max_in_flight_tokens: max_tokens,
            max_streams: 16,
            ..Limits::default()
        };
        let server =
            TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
                .await;
        let hold = server.state.engine().hold("m").unwrap();
        let url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
        let (socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut sink, mut source) = socket.split();
        let requests = 5;
        let sender = tokio::spawn(async move {
            for _ in 0..requests {
                let message = json!({"tokens": vec![1; per_request]}).to_string();
                sink.send(Message::text(message)).await.unwrap();
            }
            sink
        });
        let queued_tokens = || server.state.engine().model("m").unwrap().stats.queued_tokens;
        eventually("the first requests to be queued", async || queued_tokens() == queued).await;
        // What was in flight would have grown past the bound by now, had the reader kept going.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(queued_tokens(), queued, "{max_requests} requests, {max_tokens} tokens in flight at most");
        drop(hold);
        for i in 1..=requests {
            let reply: Value =
                serde_json::from_str(source.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
            server.schemas.check("TokensReply", &reply);
            assert_eq!(reply["position"], i * per_request, "{reply}");
        }
        let _sink = sender.await.unwrap();
        server.stop().await;
    }
}

type ClientSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket on stream `w` of model `m` with a small receive buffer, so that replies it does
/// not read fill the connection quickly.
async fn small_buffer_websocket(server: &TestServer) -> ClientSocket {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(server.addr).await.unwrap();
    let url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
    tokio_tungstenite::client_async(url, tcp).await.unwrap().0
}

/// Sends requests whose replies list 1,024 predictions each (tens of kB) until the server stops
/// taking them.
async fn flood(mut sink: futures_util::stream::SplitSink<ClientSocket, Message>) {
    for _ in 0..2000 {
        if sink.send(Message::text(r#"{"tokens": [1], "top_k": 1024}"#)).await.is_err() {
            break;
        }
    }
}

/// Regression: a client that sent requests and never read the replies blocked the server's
/// writes for ever, so its connection, its permit and the drain were held until the shutdown
/// deadline, which then skipped the final checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_stops_reading_is_dropped_and_the_server_still_drains() {
    let limits = Limits { ws_idle_timeout_secs: 1.0, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 4096, 4)], ..Default::default() })
            .await;
    let (sink, _source) = small_buffer_websocket(&server).await.split();
    let flood = tokio::spawn(flood(sink));
    eventually("the server to give the reader up", async || {
        metric_value(&server, r#"kfrtrl_websocket_closes_total{reason="write_timeout"}"#).await == Some(1.0)
    })
    .await;
    assert_eq!(metric_value(&server, "kfrtrl_websocket_connections").await, Some(0.0));
    flood.abort();
    server.stop().await;
}

/// Regression: a peer that vanished (or never answers) held its connection and its permit for
/// ever: the server sent no pings and had no idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_peer_is_dropped_after_the_idle_timeout() {
    let limits =
        Limits { ws_idle_timeout_secs: 2.0, max_websockets: 1, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 16, 4)], ..Default::default() })
            .await;
    let url = format!("ws://{}/v1/models/m/streams/w/ws", server.addr);
    // Never polled again: it reads no Ping and so answers none.
    let (_silent, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    eventually("the silent peer to be dropped", async || {
        metric_value(&server, r#"kfrtrl_websocket_closes_total{reason="idle_timeout"}"#).await == Some(1.0)
    })
    .await;
    // Its permit is back; a client that answers the pings outlives the timeout.
    let (mut live, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(5000) {
        match tokio::time::timeout(Duration::from_millis(100), live.next()).await {
            Err(_) | Ok(Some(Ok(Message::Ping(_)))) => {}
            other => panic!("the live client was dropped: {other:?}"),
        }
    }
    live.send(Message::text(r#"{"tokens": [1]}"#)).await.unwrap();
    let reply = loop {
        match live.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            Message::Ping(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reply["position"], 1, "{reply}");
    // Counted once the write completes, which the client may see first.
    eventually("the reply to be counted", async || {
        metric_value(&server, r#"kfrtrl_websocket_replies_total{status="200"}"#).await == Some(1.0)
    })
    .await;
    live.close(None).await.unwrap();
    server.stop().await;
}

/// Regression: the idle timer only saw frames from the client, so a client that took large
/// replies steadily but slowly, sending nothing meanwhile, was dropped as idle: the server's
/// pings queued behind the reply being written, so no Pong could come back either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_reads_slowly_but_steadily_is_not_idle() {
    let limits = Limits { ws_idle_timeout_secs: 1.5, max_streams: 16, ..Limits::default() };
    let server =
        TestServer::start(ServerConfig { limits, models: vec![model("m", 4096, 4)], ..Default::default() })
            .await;
    let mut socket = small_buffer_websocket(&server).await;
    // Tens of kB per reply, read one every 20 ms: the replies take a few idle timeouts to
    // deliver, and the client sends nothing until it has them all.
    let requests = 200;
    for _ in 0..requests {
        socket.send(Message::text(r#"{"tokens": [1], "top_k": 1024}"#)).await.unwrap();
    }
    let started = Instant::now();
    for i in 1..=requests {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let message = crate::support::next_data(&mut socket)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("reply {i} after {:?}: {e}", started.elapsed()));
        let reply: Value = serde_json::from_str(message.to_text().unwrap())
            .unwrap_or_else(|e| panic!("reply {i}: {e}: {message:?}"));
        assert_eq!(reply["position"], i, "{reply}");
    }
    assert!(started.elapsed() > Duration::from_secs(3), "the replies took {:?}", started.elapsed());
    socket.send(Message::text(r#"{"tokens": [1]}"#)).await.unwrap();
    let message = crate::support::next_data(&mut socket).await.unwrap().unwrap();
    let reply: Value = serde_json::from_str(message.to_text().unwrap())
        .unwrap_or_else(|e| panic!("the connection was dropped: {e}: {message:?}"));
    assert_eq!(reply["position"], requests + 1, "{reply}");
    assert_eq!(metric_value(&server, r#"kfrtrl_websocket_closes_total{reason="idle_timeout"}"#).await, None);
    socket.close(None).await.unwrap();
    server.stop().await;
}

/// Regression: during a drain a write to a client that stopped reading could take the whole
/// idle timeout (60 s by default), longer than the shutdown timeout (30 s), so such a client
/// held the drain to its deadline and the models missed their final checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_stops_reading_cannot_hold_the_drain_to_its_deadline() {
    let server = TestServer::start(ServerConfig {
        limits: Limits { max_streams: 16, ..Limits::default() },
        shutdown_timeout: Duration::from_secs(6),
        models: vec![model("m", 4096, 4)],
        ..Default::default()
    })
    .await;
    let (sink, _source) = small_buffer_websocket(&server).await.split();
    let flood = tokio::spawn(flood(sink));
    // The replies stop being counted once the client's buffers are full and a write blocks.
    let replies = async || {
        metric_value(&server, r#"kfrtrl_websocket_replies_total{status="200"}"#).await.unwrap_or(0.0)
    };
    let mut last = -1.0;
    eventually("a write to block", async || {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = replies().await;
        std::mem::replace(&mut last, now) == now && now > 0.0
    })
    .await;
    assert_eq!(metric_value(&server, "kfrtrl_websocket_connections").await, Some(1.0));
    // `stop` fails unless the drain completes within the shutdown timeout.
    server.stop().await;
    flood.abort();
}
