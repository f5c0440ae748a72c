//! `kfrtrl feed`: streams a file or standard input, byte by byte, into one stream of a running
//! server's byte-level model over a WebSocket, with several messages in flight, and shows the
//! stream learning: a progress bar with the live bits per byte and throughput, and a summary at
//! the end (`--json` for a machine). The bits per byte of a whole feed are the stream's
//! prequential code length, its compressed size under the model.
//!
//! Resumption: a stream's `position` says how many tokens it has consumed, so the feed starts
//! there (skipping that many bytes of the input) unless `--from-start`; rerun the same command
//! after an interruption and only the rest is sent. A broken connection or a refused message
//! (a full queue, a drain) mid-run is handled the same way: reconnect, read the position,
//! continue. (A message refused in the middle of a pipeline leaves a gap: the server consumes the
//! ones after it, as the WebSocket protocol says. The bytes the stream skipped that way are not
//! sent again; a smaller `--pipeline` makes that rarer.)

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use kfrtrl::tools::load::{Ws, connect_ws};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Flags of `kfrtrl feed`.
#[derive(Debug, Args)]
pub struct FeedArgs {
    /// The file to feed; `-` or none: standard input.
    input: Option<PathBuf>,
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The model (byte-level: a vocabulary of 256).
    #[arg(long, default_value = "default")]
    model: String,
    /// The stream.
    #[arg(long)]
    stream: String,
    /// Bytes per message.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    chunk: u32,
    /// Messages in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pipeline: u32,
    /// Send the input from its first byte, whatever the stream's position.
    #[arg(long)]
    from_start: bool,
    /// Reconnections allowed after a broken connection or a refused message.
    #[arg(long, default_value_t = 10)]
    retries: u32,
    /// Bearer token of a server with an API key [env: KFRTRL_API_KEY].
    #[arg(long)]
    api_key: Option<String>,
    /// Print the summary as JSON on standard output (and no progress bar).
    #[arg(long)]
    json: bool,
}

/// What a feed did.
#[derive(Debug, Default)]
struct Tally {
    /// Bytes the stream had consumed before this feed (skipped in the input).
    skipped: u64,
    /// Bytes consumed by the stream during this feed.
    fed: u64,
    /// Their summed loss in bits (each scored before the model learned from it).
    bits: f64,
    /// Reconnections.
    reconnects: u32,
}

/// Runs the feed.
pub fn run(args: FeedArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(feed(args))
}

async fn feed(args: FeedArgs) -> Result<(), String> {
    let key = args.api_key.clone().or_else(|| std::env::var("KFRTRL_API_KEY").ok().filter(|k| !k.is_empty()));
    let base = args.url.trim_end_matches('/').to_owned();
    let stream_path = format!("/v1/models/{}/streams/{}", args.model, args.stream);
    let total = match &args.input {
        Some(path) if path.as_os_str() != "-" => std::fs::metadata(path).ok().map(|m| m.len()),
        _ => None,
    };
    let mut input: Box<dyn Read> = match &args.input {
        Some(path) if path.as_os_str() != "-" => {
            Box::new(std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        _ => Box::new(std::io::stdin().lock()),
    };
    let http = reqwest::Client::new();
    let mut offset = 0u64; // bytes of the input consumed by the stream
    let mut tally = Tally::default();
    let start = position(&http, &base, &stream_path, key.as_deref()).await?;
    if !args.from_start {
        tally.skipped = skip(&mut input, start)?;
        offset = tally.skipped;
        if tally.skipped < start {
            return finish(&args, &tally, 0.0, total, "the stream is already past the end of the input");
        }
    }
    let bar = progress_bar(&args, total, offset);
    let started = Instant::now();
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new(); // read, not yet acknowledged
    let mut exhausted = false;
    let mut recent_bits = None::<f64>;
    let ws_url = format!("{}{stream_path}/ws", base.replacen("http", "ws", 1));
    'connect: loop {
        let mut ws = match connect_ws(&ws_url, key.as_deref()).await {
            Ok(ws) => ws,
            Err(e) if tally.reconnects < args.retries => {
                tally.reconnects += 1;
                bar.println(format!("reconnecting: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        // Everything read and not acknowledged is (re)sent on this connection.
        let mut in_flight = 0usize;
        let mut next_to_send = 0usize;
        let interruption: Value = loop {
            let mut broken = None;
            while in_flight < args.pipeline as usize {
                if next_to_send == pending.len() {
                    if exhausted {
                        break;
                    }
                    let mut chunk = vec![0u8; args.chunk as usize];
                    let n = read_full(&mut input, &mut chunk)?;
                    chunk.truncate(n);
                    if n == 0 {
                        exhausted = true;
                        break;
                    }
                    pending.push_back(chunk);
                }
                let tokens: Vec<u32> = pending[next_to_send].iter().map(|&b| u32::from(b)).collect();
                let message = json!({ "tokens": tokens, "top_k": 1 }).to_string();
                if let Err(e) = ws.send(Message::text(message)).await {
                    broken = Some(e.to_string());
                    break;
                }
                next_to_send += 1;
                in_flight += 1;
            }
            if let Some(e) = broken {
                bar.println(format!("connection broken: {e}"));
                break Value::Null;
            }
            if in_flight == 0 {
                let _ = ws.close(None).await;
                break 'connect;
            }
            let reply = match next_text(&mut ws).await {
                Ok(reply) => reply,
                Err(e) => {
                    bar.println(format!("connection broken: {e}"));
                    break Value::Null;
                }
            };
            match reply["consumed"].as_u64() {
                Some(n) if n as usize == pending[0].len() => {
                    pending.pop_front();
                    in_flight -= 1;
                    next_to_send -= 1;
                    offset += n;
                    tally.fed += n;
                    let bits = reply["mean_loss_bits"].as_f64().unwrap_or(0.0) * n as f64;
                    tally.bits += bits;
                    let per_byte = bits / n as f64;
                    recent_bits = Some(recent_bits.map_or(per_byte, |r| 0.95 * r + 0.05 * per_byte));
                    bar.set_position(offset);
                    bar.set_message(format!(
                        "{:.3} bits/byte recent, {:.3} over the feed",
                        recent_bits.unwrap_or(0.0),
                        tally.bits / tally.fed as f64
                    ));
                }
                _ => {
                    bar.println(format!(
                        "refused: {}",
                        reply["detail"].as_str().unwrap_or(&reply.to_string())
                    ));
                    break reply;
                }
            }
        };
        // Interrupted: continue from what the stream consumed, on a new connection.
        drop(ws);
        if tally.reconnects >= args.retries {
            return Err(format!("gave up after {} reconnections", tally.reconnects));
        }
        tally.reconnects += 1;
        let wait = interruption["retry_after"].as_u64().unwrap_or(1).min(30);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        resync(&http, &base, &stream_path, key.as_deref(), &mut pending, &mut offset, &mut tally).await?;
    }
    bar.finish_and_clear();
    finish(&args, &tally, started.elapsed().as_secs_f64(), total, "")
}

/// After an interruption: drops from `pending` what the stream consumed meanwhile (its position
/// moved past `offset`), counting it as fed without a loss (its reply was lost).
async fn resync(
    http: &reqwest::Client,
    base: &str,
    stream_path: &str,
    key: Option<&str>,
    pending: &mut VecDeque<Vec<u8>>,
    offset: &mut u64,
    tally: &mut Tally,
) -> Result<(), String> {
    let now = position(http, base, stream_path, key).await?;
    let mut ahead = now.saturating_sub(*offset);
    while ahead > 0 {
        let Some(front) = pending.front_mut() else { break };
        let n = (front.len() as u64).min(ahead);
        front.drain(..n as usize);
        if front.is_empty() {
            pending.pop_front();
        }
        *offset += n;
        tally.fed += n;
        ahead -= n;
    }
    Ok(())
}

/// The stream's position (0 when it does not exist yet).
async fn position(
    http: &reqwest::Client,
    base: &str,
    stream_path: &str,
    key: Option<&str>,
) -> Result<u64, String> {
    let mut request = http.get(format!("{base}{stream_path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let reply = request.send().await.map_err(|e| format!("{base}: {e}"))?;
    match reply.status().as_u16() {
        404 => {
            let problem: Value = reply.json().await.unwrap_or(Value::Null);
            if problem["type"] == "urn:kfrtrl:problem:unknown-stream" {
                Ok(0)
            } else {
                Err(format!("{stream_path}: {}", problem["detail"].as_str().unwrap_or("not found")))
            }
        }
        200 => {
            let info: Value = reply.json().await.map_err(|e| e.to_string())?;
            info["position"].as_u64().ok_or_else(|| format!("no position in {info}"))
        }
        status => {
            let problem: Value = reply.json().await.unwrap_or(Value::Null);
            Err(format!("{stream_path}: {status} {}", problem["detail"].as_str().unwrap_or("")))
        }
    }
}

/// The next text message as JSON.
async fn next_text(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).map_err(|e| e.to_string()),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed by the server: {frame:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed".into()),
        }
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the input: {e}")),
        }
    }
    Ok(n)
}

/// Skips `count` bytes of the input; returns how many there were.
fn skip(input: &mut dyn Read, count: u64) -> Result<u64, String> {
    std::io::copy(&mut input.take(count), &mut std::io::sink()).map_err(|e| format!("reading the input: {e}"))
}

fn progress_bar(args: &FeedArgs, total: Option<u64>, at: u64) -> indicatif::ProgressBar {
    if args.json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total),
        None => indicatif::ProgressBar::no_length(),
    };
    let template = if total.is_some() {
        "{bytes}/{total_bytes} {bar:30} {bytes_per_sec} eta {eta} · {msg}"
    } else {
        "{bytes} {bytes_per_sec} · {msg}"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("a valid template"));
    bar.set_position(at);
    bar
}

fn finish(
    args: &FeedArgs,
    tally: &Tally,
    seconds: f64,
    total: Option<u64>,
    note: &str,
) -> Result<(), String> {
    let bits_per_byte = (tally.fed > 0).then(|| tally.bits / tally.fed as f64);
    let summary = json!({
        "model": args.model,
        "stream": args.stream,
        "skipped_bytes": tally.skipped,
        "fed_bytes": tally.fed,
        "input_bytes": total,
        "seconds": seconds,
        "bytes_per_sec": if seconds > 0.0 { tally.fed as f64 / seconds } else { 0.0 },
        "bits_per_byte": bits_per_byte,
        "compressed_bytes": tally.bits / 8.0,
        "reconnects": tally.reconnects,
    });
    if args.json {
        println!("{summary}");
    } else {
        if !note.is_empty() {
            eprintln!("{note}");
        }
        eprintln!(
            "fed {} bytes to {}/{} in {seconds:.1} s ({:.0} bytes/s){}; {}",
            tally.fed,
            args.model,
            args.stream,
            summary["bytes_per_sec"].as_f64().unwrap_or(0.0),
            if tally.skipped > 0 {
                format!(", after skipping the {} it had consumed", tally.skipped)
            } else {
                String::new()
            },
            match bits_per_byte {
                Some(b) => format!("{b:.4} bits per byte ({:.0} bytes compressed)", tally.bits / 8.0),
                None => "nothing to learn".into(),
            }
        );
    }
    Ok(())
}
