//! Moving models between running servers (`kfrtrl migrate`), over their HTTP API only:
//! freeze the model on the source (its changes get 503 `model-frozen` with `Retry-After`),
//! export its snapshot, import it on the target, check that the target holds the same state
//! (its own export has the source's content digest), then delete it on the source.
//!
//! A failure at any step leaves the model whole on one side: before the target holds a verified
//! copy, the target's copy (if any) is deleted and the source is thawed; after it, the source
//! stays frozen (it refuses changes, so the two cannot part) and the error says to delete it.
//! Rerunning the same command finishes a move that was cut off after the import.

use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde::Serialize;

/// What moving one model did.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    /// The model.
    pub model: String,
    /// What happened: `moved`, or `finished` (a cut-off move whose import had succeeded).
    pub outcome: &'static str,
    /// Size of the snapshot, bytes.
    pub bytes: usize,
    /// Streams it holds.
    pub streams: u64,
    /// Its content digest (the snapshot's `ETag`).
    pub tag: String,
    /// Seconds from the freeze on the source until the target answered the import (and serves
    /// the model): the time its changes were refused.
    pub frozen_seconds: f64,
    /// Seconds of the whole move.
    pub seconds: f64,
}

/// Why a move failed, and where the model is.
#[derive(Debug, thiserror::Error)]
#[error("model `{model}`: {reason}")]
pub struct MigrateError {
    /// The model.
    pub model: String,
    /// What went wrong, and where the model is now.
    pub reason: String,
}

/// The two servers and how to reach them.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Base URL of the source server.
    pub from: String,
    /// Base URL of the target server.
    pub to: String,
    /// Bearer token both servers take, if they have an API key.
    pub api_key: Option<String>,
    /// Longest wait for one request (a snapshot upload included).
    pub timeout: Duration,
    /// Also compare the target's own export with the source's before deleting the source (a
    /// second full serialization; for models that take no traffic during the move).
    pub verify_export: bool,
}

impl Endpoints {
    /// An HTTP client for the endpoints.
    pub fn client(&self) -> Result<Client, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = &self.api_key {
            let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "the API key is not a valid header value".to_string())?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Client::builder().default_headers(headers).timeout(self.timeout).build().map_err(|e| e.to_string())
    }
}

struct Step<'a> {
    client: &'a Client,
    model: &'a str,
}

impl Step<'_> {
    fn fail(&self, reason: impl Into<String>) -> MigrateError {
        MigrateError { model: self.model.to_owned(), reason: reason.into() }
    }

    fn url(&self, base: &str, suffix: &str) -> String {
        format!("{}/v1/models/{}{suffix}", base.trim_end_matches('/'), self.model)
    }

    /// Sends a request; returns the status, the `ETag` and the body.
    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Reply, MigrateError> {
        let response = request.send().await.map_err(|e| self.fail(format!("{what}: {e}")))?;
        let status = response.status();
        let tag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body =
            response.bytes().await.map_err(|e| self.fail(format!("{what}: reading the reply: {e}")))?;
        Ok(Reply { status, tag, body: body.to_vec() })
    }

    /// Sends a request that must answer `want`.
    async fn expect(
        &self,
        request: reqwest::RequestBuilder,
        want: StatusCode,
        what: &str,
    ) -> Result<Reply, MigrateError> {
        let reply = self.send(request, what).await?;
        if reply.status != want {
            return Err(self.fail(format!("{what}: {} {}", reply.status, reply.detail())));
        }
        Ok(reply)
    }

    async fn exists(&self, base: &str) -> Result<bool, MigrateError> {
        let reply = self.send(self.client.get(self.url(base, "")), &format!("GET {base}")).await?;
        match reply.status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => Err(self.fail(format!("GET {base}: {other} {}", reply.detail()))),
        }
    }

    async fn tag(&self, base: &str) -> Result<(String, Vec<u8>), MigrateError> {
        let reply =
            self.expect(self.client.get(self.url(base, "/snapshot")), StatusCode::OK, "export").await?;
        let tag = reply.tag.ok_or_else(|| self.fail("the export has no ETag"))?;
        Ok((tag, reply.body))
    }
}

/// An export whose body is still to be read.
struct OpenExport {
    tag: String,
    size: u64,
    response: reqwest::Response,
}

impl Step<'_> {
    /// Starts the export: its status, tag and size, the body left in the response.
    async fn open_export(&self, base: &str) -> Result<OpenExport, MigrateError> {
        let response = self
            .client
            .get(self.url(base, "/snapshot"))
            .send()
            .await
            .map_err(|e| self.fail(format!("export: {e}")))?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            let reply = Reply { status, tag: None, body };
            return Err(self.fail(format!("export: {status} {}", reply.detail())));
        }
        let tag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let tag = tag.ok_or_else(|| self.fail("the export has no ETag"))?;
        let size = response.content_length().ok_or_else(|| self.fail("the export has no Content-Length"))?;
        Ok(OpenExport { tag, size, response })
    }
}

struct Reply {
    status: StatusCode,
    tag: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    /// The problem's `detail`, or the body as text.
    fn detail(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).chars().take(300).collect())
    }

    fn streams(&self) -> u64 {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["stats"]["streams"].as_u64())
            .unwrap_or(0)
    }
}

/// Moves `model` from `ends.from` to `ends.to` (see the module's docs).
pub async fn migrate(client: &Client, ends: &Endpoints, model: &str) -> Result<Migration, MigrateError> {
    let step = Step { client, model };
    let started = Instant::now();
    let (on_source, on_target) = (step.exists(&ends.from).await?, step.exists(&ends.to).await?);
    match (on_source, on_target) {
        (false, false) => return Err(step.fail("it exists on neither server")),
        (false, true) => return Err(step.fail("it is on the target already, and not on the source")),
        (true, true) => return finish(&step, ends, started).await,
        (true, false) => {}
    }
    step.expect(client.post(step.url(&ends.from, "/freeze")), StatusCode::OK, "freeze").await?;
    let frozen_at = Instant::now();
    let thaw = || async {
        // Best effort: the error being reported matters more than a failed thaw.
        let _ = client.delete(step.url(&ends.from, "/freeze")).send().await;
    };
    // The export's body flows into the import's as it arrives: never held here, and the
    // target receives while the source still sends.
    let exported = match step.open_export(&ends.from).await {
        Ok(exported) => exported,
        Err(e) => {
            thaw().await;
            return Err(e);
        }
    };
    let (tag, size) = (exported.tag, exported.size);
    let upload = client
        .put(step.url(&ends.to, "/snapshot"))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(exported.response.bytes_stream()));
    let imported = match step.expect(upload, StatusCode::CREATED, "import").await {
        Ok(reply) => reply,
        Err(e) => {
            thaw().await;
            return Err(MigrateError { reason: format!("{}; the source keeps it, thawed", e.reason), ..e });
        }
    };
    let serving_after = frozen_at.elapsed().as_secs_f64();
    let streams = imported.streams();
    // The target validated the file's checksum and loaded exactly it: its tag is the content it
    // holds. With `verify_export`, also its own export (a full serialization on the target, for
    // a model that takes no traffic meanwhile): the restore reproduced the model to the bit.
    let verified = match (&imported.tag, ends.verify_export) {
        (Some(t), _) if *t != tag => Err(format!("the target loaded digest {t}, the source exported {tag}")),
        (None, _) => Err("the import's reply has no ETag".to_string()),
        (Some(_), false) => Ok(()),
        (Some(_), true) => match step.tag(&ends.to).await {
            Ok((target_tag, _)) if target_tag == tag => Ok(()),
            Ok((target_tag, _)) => {
                Err(format!("the target's copy exports digest {target_tag}, the source's {tag}"))
            }
            Err(e) => Err(e.reason),
        },
    };
    if let Err(reason) = verified {
        let _ = client.delete(step.url(&ends.to, "")).send().await;
        thaw().await;
        return Err(
            step.fail(format!("{reason}; the target's copy was deleted and the source keeps it, thawed"))
        );
    }
    delete_source(&step, ends, &tag).await?;
    Ok(Migration {
        model: model.to_owned(),
        outcome: "moved",
        bytes: usize::try_from(size).unwrap_or(usize::MAX),
        streams,
        tag,
        frozen_seconds: serving_after,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A model on both servers: a move that was cut off after its import. Finished only when the
/// source is frozen (nothing changed it since) and both hold the same content.
async fn finish(step: &Step<'_>, ends: &Endpoints, started: Instant) -> Result<Migration, MigrateError> {
    let info = step.expect(step.client.get(step.url(&ends.from, "")), StatusCode::OK, "GET source").await?;
    let frozen = serde_json::from_slice::<serde_json::Value>(&info.body)
        .is_ok_and(|v| v["state"].as_str() == Some("frozen"));
    let ((source_tag, bytes), (target_tag, _)) = (step.tag(&ends.from).await?, step.tag(&ends.to).await?);
    if !frozen || source_tag != target_tag {
        return Err(step.fail(
            "it exists on both servers with different states (or the source is not frozen); \
             delete the copy you do not want, then rerun",
        ));
    }
    delete_source(step, ends, &source_tag).await?;
    Ok(Migration {
        model: step.model.to_owned(),
        outcome: "finished",
        bytes: bytes.len(),
        streams: info.streams(),
        tag: source_tag,
        frozen_seconds: 0.0,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Deletes the model on the source if it still holds the content `tag` (`If-Match`).
async fn delete_source(step: &Step<'_>, ends: &Endpoints, tag: &str) -> Result<(), MigrateError> {
    let request = step.client.delete(step.url(&ends.from, "")).header(reqwest::header::IF_MATCH, tag);
    let deleted = step.send(request, "delete on the source").await;
    match deleted {
        Ok(reply) if reply.status == StatusCode::NO_CONTENT || reply.status == StatusCode::NOT_FOUND => {
            Ok(())
        }
        Ok(reply) => Err(step.fail(format!(
            "the target holds a verified copy, but the delete on the source failed ({} {}); it stays \
             frozen there: rerun to finish",
            reply.status,
            reply.detail()
        ))),
        Err(e) => Err(step.fail(format!(
            "the target holds a verified copy, but the delete on the source failed ({}); it stays frozen \
             there: rerun to finish",
            e.reason
        ))),
    }
}
