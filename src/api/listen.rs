//! The accept loop: HTTP/1.1 connections served by hyper with the deadline a public server needs
//! on every request head. Without it an idle connection, one that sends half a request head, or
//! a kept-alive one that never sends the next request, stays open forever, and a thousand of
//! them exhaust the process's file descriptors (issue 19.3). The deadline starts when hyper
//! waits for a request head, so it also closes a connection left idle before or between
//! requests. A WebSocket, once upgraded, is the handler's (it pings and times out on its own).
//!
//! On shutdown it stops accepting, asks every connection to finish its request in progress and
//! close, and returns once they have.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::parse_errors::ProblemReplies;

/// Serves `router` on `listener` until `stop` completes, then drains the open connections.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    stop: impl Future<Output = ()> + Send,
) {
    // Connections watch `stopping` for the signal and hold `open` until they end.
    let (stopping, stop_signal) = watch::channel(());
    let (all_closed, open) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors, for one: back off rather than spin.
                    tracing::error!(%error, "accept error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Replies are small writes answered by the client's next request: without TCP_NODELAY,
        // Nagle's algorithm may hold a reply back until the previous one is acknowledged.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let (stopping, open) = (stopping.clone(), open.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            let mut connection = pin!(
                builder.serve_connection(TokioIo::new(ProblemReplies::new(tcp)), service).with_upgrades()
            );
            let mut signalled = pin!(stopping.closed());
            let mut closing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    () = &mut signalled, if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    drop(stop_signal);
    drop(open);
    all_closed.closed().await;
}
