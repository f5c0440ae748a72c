//! Problem+json for the request heads hyper refuses before any route sees them. A request target
//! longer than 64 KiB fails hyper's own parser, which answers `414 URI Too Long` with an empty
//! body and closes; no hook of hyper's reaches that reply. So the connection's writes pass
//! through [`ProblemReplies`], which recognises that exact reply (hyper's internal error replies
//! are the only ones with an empty body and no content type; every reply of ours carries a body)
//! and writes the problem object in its place (issue 19.9).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::problem::ApiError;

/// The start of hyper's reply to a request target past its parser's limit.
const HYPER_URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\n";

/// hyper's limit on the request target (its parser refuses longer ones).
const HYPER_URI_LIMIT: usize = 65_534;

/// A connection whose writes of hyper's bodiless `414` are replaced by a problem+json reply.
pub(crate) struct ProblemReplies<S> {
    inner: S,
    /// The replacement still to write, and how much of it is written.
    pending: Vec<u8>,
    written: usize,
}

impl<S> ProblemReplies<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner, pending: Vec::new(), written: 0 }
    }
}

/// The reply written instead of hyper's: the same status, the problem object, and `close`.
fn uri_too_long_reply() -> Vec<u8> {
    let problem = ApiError::new(
        axum::http::StatusCode::URI_TOO_LONG,
        "uri-too-long",
        "Request target too long",
        format!("the request target has more than {HYPER_URI_LIMIT} bytes"),
    )
    .with("limit", HYPER_URI_LIMIT);
    let body = problem.to_json().to_string();
    let mut reply = format!(
        "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(body.as_bytes());
    reply
}

/// Whether `buf` is hyper's own bodiless `414`.
fn is_hyper_uri_too_long(buf: &[u8]) -> bool {
    buf.starts_with(HYPER_URI_TOO_LONG) && {
        let head = String::from_utf8_lossy(buf).to_ascii_lowercase();
        head.contains("\r\ncontent-length: 0\r\n") && !head.contains("\r\ncontent-type:")
    }
}

impl<S: AsyncWrite + Unpin> ProblemReplies<S> {
    /// Writes what is left of the replacement; ready once all of it is written.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ProblemReplies<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ProblemReplies<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if is_hyper_uri_too_long(buf) {
            self.pending = uri_too_long_reply();
            self.written = 0;
            // hyper's reply counts as written; the replacement goes out now or on the next
            // write, flush or shutdown.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // One buffer per write: hyper then hands each reply head over whole, which is what the
    // recognition above reads.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_414_is_recognised() {
        let hyper = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 10:03:22 GMT\r\n\r\n";
        assert!(is_hyper_uri_too_long(hyper));
        let ours = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n";
        assert!(!is_hyper_uri_too_long(ours));
        assert!(!is_hyper_uri_too_long(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        let reply = String::from_utf8(uri_too_long_reply()).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["type"], "urn:kfrtrl:problem:uri-too-long");
        assert_eq!(problem["status"], 414);
    }
}
