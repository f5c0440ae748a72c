//! Crash recovery of the real `kfrtrl serve` binary: a client drives several streams (with
//! `learn` and `reset` flags, periodic and on-demand checkpoints, and eviction, since two slots
//! serve four streams) while the server is killed with SIGKILL at random moments, twenty times.
//! After each restart every acknowledged token is there, a request cut off by the kill has taken
//! effect exactly as far as its stream's `position` says, and nothing else happened. At the end,
//! the recovered server's `predict` replies are identical, to the last bit, to those of a control
//! engine that received exactly the acknowledged requests (plus the parts of cut-off requests
//! that took effect).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::binary::{Binary, temp_dir};
use kfrtrl::engine::{Engine, EngineLimits, EngineMetrics, Mode, ModelDefinition, TokenInput};
use serde_json::{Value, json};

const STREAMS: usize = 4;
const KILLS: usize = 20;

/// The server with two slots for four streams (eviction), a checkpoint every second, data in `dir`.
fn start(dir: &Path, config: &Path) -> Binary {
    let (dir, config) = (dir.to_str().unwrap(), config.to_str().unwrap());
    let server = Binary::start(
        &[
            "--max-streams",
            "2",
            "--checkpoint-interval-secs",
            "1",
            "--stream-idle-ttl-secs",
            "0",
            "--data-dir",
            dir,
            "--config",
            config,
        ],
        &[],
    );
    let errors: Vec<&serde_json::Value> = server.seen.iter().filter(|l| l["level"] == "ERROR").collect();
    assert!(errors.is_empty(), "the server logged errors while booting: {errors:?}");
    server
}

/// A request as the control engine will replay it.
#[derive(Debug, Clone)]
struct Sent {
    stream: usize,
    tokens: Vec<u32>,
    learn: bool,
    reset: bool,
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn positions(client: &reqwest::Client, server: &Binary) -> Vec<u64> {
    let mut out = Vec::new();
    for s in 0..STREAMS {
        let info: Value = client
            .get(server.url(&format!("/v1/models/m/streams/s{s}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(info["position"].as_u64().unwrap_or_else(|| panic!("stream s{s}: {info}")));
    }
    out
}

async fn send(client: &reqwest::Client, server: &Binary, r: &Sent) -> Result<Value, reqwest::Error> {
    let body = json!({ "tokens": r.tokens, "learn": r.learn, "reset": r.reset, "top_k": 1 });
    let reply = client
        .post(server.url(&format!("/v1/models/m/streams/s{}/tokens", r.stream)))
        .json(&body)
        .send()
        .await?;
    assert!(reply.status().is_success(), "status {}", reply.status());
    reply.json().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_lose_no_acknowledged_request() {
    let dir = temp_dir("crash-data");
    let config = dir.with_extension("toml");
    std::fs::write(&config, "[[models]]\nname = \"m\"\ncell = \"rhn\"\nhidden = 12\nlr = 0.01\n").unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut rng = Lcg(2024);
    let mut acked: Vec<Sent> = Vec::new();
    let mut expected = [0u64; STREAMS];

    let mut server = start(&dir, &config);
    for s in 0..STREAMS {
        let first = Sent { stream: s, tokens: vec![b'a' as u32 + s as u32], learn: true, reset: false };
        send(&client, &server, &first).await.unwrap();
        expected[s] += 1;
        acked.push(first);
    }
    let mut cut_requests = 0;
    for kill in 0..KILLS {
        let pid = server.child.id();
        let delay = 30 + rng.below(400);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        });
        let mut in_flight = None;
        loop {
            if rng.below(12) == 0 {
                if client.post(server.url("/v1/models/m/checkpoint")).send().await.is_err() {
                    break;
                }
                continue;
            }
            let len = 1 + rng.below(24) as usize;
            let r = Sent {
                stream: rng.below(STREAMS as u64) as usize,
                tokens: (0..len).map(|_| rng.below(256) as u32).collect(),
                learn: rng.below(5) != 0,
                reset: rng.below(10) == 0,
            };
            match send(&client, &server, &r).await {
                Ok(reply) => {
                    expected[r.stream] += len as u64;
                    assert_eq!(reply["position"].as_u64(), Some(expected[r.stream]));
                    acked.push(r);
                }
                Err(_) => {
                    in_flight = Some(r);
                    break;
                }
            }
        }
        killer.join().unwrap();
        let status = server.child.wait().unwrap();
        assert!(!status.success(), "kill {kill}: the server was killed");
        server = start(&dir, &config);
        let now = positions(&client, &server).await;
        for s in 0..STREAMS {
            let extra = now[s] - expected[s];
            match &in_flight {
                Some(r) if r.stream == s => {
                    assert!(
                        extra as usize <= r.tokens.len(),
                        "kill {kill}: stream s{s} has {extra} extra tokens"
                    );
                    if extra > 0 {
                        cut_requests += 1;
                        acked.push(Sent { tokens: r.tokens[..extra as usize].to_vec(), ..r.clone() });
                        expected[s] = now[s];
                    }
                }
                _ => assert_eq!(extra, 0, "kill {kill}: stream s{s} moved without a request"),
            }
        }
    }

    // The recovered server against a control engine fed exactly what took effect.
    let definition: Value =
        client.get(server.url("/v1/models/m")).send().await.unwrap().json().await.unwrap();
    let definition: ModelDefinition = serde_json::from_value(definition["config"].clone()).unwrap();
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let control = Engine::new(EngineLimits::default(), metrics);
    control.create_model(ModelDefinition { max_streams: 8, ..definition }).await.unwrap();
    for r in &acked {
        let input = TokenInput {
            tokens: r.tokens.clone(),
            learn: r.learn,
            reset: r.reset,
            top_k: 1,
            return_losses: false,
        };
        control.tokens("m", &format!("s{}", r.stream), input, Mode::Consume).await.unwrap();
    }
    let probe: Vec<u32> = b"the quick brown fox".iter().map(|&b| u32::from(b)).collect();
    let body = json!({ "tokens": probe, "top_k": 8, "return_losses": true });
    let mut differences = 0;
    let mut replies = Vec::new();
    for s in 0..STREAMS {
        let stream = format!("s{s}");
        let recovered: Value = client
            .post(server.url(&format!("/v1/models/m/streams/{stream}/predict")))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        replies.push(recovered.clone());
        let input =
            TokenInput { tokens: probe.clone(), learn: true, reset: false, top_k: 8, return_losses: true };
        let expected =
            serde_json::to_value(control.tokens("m", &stream, input, Mode::Predict).await.unwrap()).unwrap();
        if recovered != expected {
            differences += 1;
            eprintln!("stream {stream}:\n recovered {recovered}\n control   {expected}");
        }
    }
    // A graceful stop writes a final checkpoint; the restarted server is the same server.
    let _ = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status();
    assert!(server.child.wait().unwrap().success(), "SIGTERM exits 0");
    let mut server = start(&dir, &config);
    assert_eq!(positions(&client, &server).await, expected.to_vec());
    for (s, before) in replies.iter().enumerate() {
        let url = server.url(&format!("/v1/models/m/streams/s{s}/predict"));
        let after: Value = client.post(url).json(&body).send().await.unwrap().json().await.unwrap();
        assert_eq!(&after, before, "stream s{s} after a graceful restart");
    }
    let _ = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status();
    let _ = server.child.wait();
    eprintln!("{KILLS} kills, {} acknowledged requests, {cut_requests} cut off part-way", acked.len());
    assert_eq!(differences, 0, "predict replies differ from the control's");
    control.shutdown().await;
}
