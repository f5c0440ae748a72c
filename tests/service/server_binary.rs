//! The real `kfrtrl serve` binary: settings from a TOML file, `KFRTRL_*` variables and flags
//! (flags win), the embedded defaults, the bound address in the `listening` log line, HTTP and
//! WebSocket traffic, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A running server process and its log lines.
struct Server {
    child: Child,
    addr: String,
    logs: mpsc::Receiver<Value>,
}

/// The next message that is not a Ping or a Pong (the server pings every connection).
async fn next_data<S>(socket: &mut S) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match socket.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kfrtrl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Forwards every JSON log line of the server to a channel.
fn read_logs(stderr: ChildStderr) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "message": line }));
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    rx
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kfrtrl"));
        command.arg("serve").args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KFRTRL_")) {
            command.env_remove(key);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("the kfrtrl binary starts");
        let logs = read_logs(child.stderr.take().unwrap());
        let mut server = Self { child, addr: String::new(), logs };
        let listening = server.wait_for("listening");
        server.addr = listening["addr"].as_str().expect("the listening line has the address").to_owned();
        server.wait_for("ready");
        server
    }

    /// The next log line with this message (every log line is JSON with `--log-format json`).
    fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let line = self.logs.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
                let _ = self.child.kill();
                panic!("no `{message}` log line")
            });
            assert!(line.get("level").is_some(), "not a JSON log line: {line}");
            if line["message"] == message {
                return line;
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn terminate(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        self.wait_for("stopped");
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "exit status {exit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_layers_flags_over_environment_over_file() {
    let dir = temp_dir("layers");
    let data = dir.join("data");
    let config = dir.join("kfrtrl.toml");
    std::fs::write(
        &config,
        r#"
listen = "127.0.0.1:1"
log_format = "human"
allowed_origins = ["https://file.example"]

[limits]
max_streams = 5
queue_requests = 64
model_threads = 3

[[models]]
name = "tiny"
hidden = 8
cell = "tanh"

[[models]]
name = "ids"
vocab_size = 10
hidden = 4
max_streams = 2
"#,
    )
    .unwrap();
    // The file says port 1 and human logs; the environment overrides the log format and the
    // stream limit; the flags override the address and the stream limit again.
    let server = Server::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--max-streams",
            "3",
        ],
        &[
            ("KFRTRL_LOG_FORMAT", "json"),
            ("KFRTRL_MAX_STREAMS", "4"),
            ("KFRTRL_QUEUE_TOKENS", "4096"),
            ("KFRTRL_MAX_TOKENS_PER_REQUEST", "1000"),
            ("KFRTRL_MODEL_THREADS", "2"),
            ("KFRTRL_ALLOWED_ORIGINS", "https://env.example, https://other.example"),
        ],
    );
    assert!(data.is_dir(), "the data dir is created");
    // Each model steps in a pool of its own, as wide as the environment says (not the file).
    let pool_threads = |model: &str| {
        let prefix = format!("model-{model}-");
        std::fs::read_dir(format!("/proc/{}/task", server.child.id()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
            .map(|comm| comm.trim_end().to_owned())
            .filter(|comm| comm.starts_with(&prefix))
            .collect::<std::collections::BTreeSet<_>>()
    };
    // A new thread names itself once it runs: wait for the names to settle.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (pool_threads("tiny").len() != 2 || pool_threads("ids").len() != 2)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pool_threads("tiny"), ["model-tiny-0", "model-tiny-1"].map(String::from).into());
    assert_eq!(pool_threads("ids"), ["model-ids-0", "model-ids-1"].map(String::from).into());
    let http = reqwest::Client::new();
    let ready = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let models: Value = http.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let tiny = &models["models"][1];
    assert_eq!(tiny["name"], "tiny");
    assert_eq!(tiny["config"]["hidden"], 8);
    assert_eq!(tiny["config"]["cell"], "tanh");
    assert_eq!(tiny["config"]["max_streams"], 3, "the flag wins over the environment and the file");
    assert_eq!(models["models"][0]["config"]["max_streams"], 2, "a model's own limit wins");

    let reply: Value = http
        .post(server.url("/v1/models/tiny/streams/a/tokens"))
        .body(r#"{"text": "hello"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["position"], 5);
    // The environment's origins replace the file's.
    for (origin, status) in
        [("https://env.example", 200), ("https://other.example", 200), ("https://file.example", 403)]
    {
        let response = http
            .post(server.url("/v1/models/tiny/streams/origins/tokens"))
            .header("origin", origin)
            .body(r#"{"text": "x"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{origin}");
    }

    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/models/tiny/streams/a/ws", server.addr))
            .await
            .unwrap();
    for text in ["a", "bc"] {
        socket.send(Message::text(json!({ "text": text }).to_string())).await.unwrap();
    }
    let mut positions = Vec::new();
    for _ in 0..2 {
        let message = next_data(&mut socket).await.unwrap().unwrap();
        let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
        positions.push(value["position"].as_u64().unwrap());
    }
    assert_eq!(positions, [6, 8]);

    // SIGTERM: the open WebSocket is closed with 1001 and the process exits cleanly.
    let terminate = std::thread::spawn(move || server.terminate());
    match next_data(&mut socket).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    terminate.join().expect("server exited cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_default_model_on_its_defaults() {
    let dir = temp_dir("defaults");
    let data = dir.join("data");
    let server = Server::start(
        &["--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir", data.to_str().unwrap()],
        &[],
    );
    let http = reqwest::Client::new();
    let model: Value = http.get(server.url("/v1/models/default")).send().await.unwrap().json().await.unwrap();
    let config = &model["config"];
    assert_eq!(config["vocab_size"], 256);
    assert_eq!(config["cell"], "rhn");
    assert_eq!(config["hidden"], 128);
    assert_eq!(config["learner"], "ok");
    assert_eq!(config["optimizer"], "adam");
    assert_eq!(config["lr"], kfrtrl::core::model::DEFAULT_MODEL_LR);
    assert_eq!((config["ok_rank"].as_u64(), config["clip_scope"].as_str()), (Some(8), Some("recurrent")));
    assert_eq!((&config["influence_margin"], &config["tokens_per_update"]), (&json!(0.01), &json!(32)));
    assert_eq!(
        (&config["tokens_per_update_ramp"], &config["tokens_per_update_start"]),
        (&json!(600), &json!(8))
    );
    assert_eq!(config["update_unit"], "steps", "each stream an update every 8 to 32 of its tokens");
    let reply: Value = http
        .post(server.url("/v1/models/default/streams/s/tokens"))
        .json(&json!({"text": "Hi!"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["consumed"], 3);
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"kfrtrl_symbols_total{mode="learn",model="default"} 3"#));
    server.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}
