//! Regressions of issue 19 (a hostile run and a newcomer run of main), each named after the bug
//! it pins down, through real processes and sockets.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::binary::{Binary, temp_dir};
use serde_json::{Value, json};

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Issue 19.1: a second `kfrtrl serve` on the data directory of a running one started, and the
/// two lost each other's acknowledged tokens (each restored the other's older checkpoint and
/// pruned files the other still used). Now the second exits at once with status 2 and says who
/// holds the directory; the first serves on untouched, and once it stops the directory is free.
#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = temp_dir("data-dir-lock");
    let data = dir.to_str().unwrap();
    let mut first = Binary::start(&["--data-dir", data], &[]);
    let client = reqwest::Client::new();
    let url = first.url("/v1/models/default/streams/a/tokens");
    let reply = client.post(&url).json(&json!({ "text": "hello, world" })).send().await.unwrap();
    assert_eq!(reply.status().as_u16(), 200);

    let started = Instant::now();
    let mut second = Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir", data])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while second.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = second.kill();
            panic!("the second server kept running on a data directory in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use by another kfrtrl server"), "{stderr}");
    assert!(stderr.contains(&format!("process {}", first.child.id())), "names the holder: {stderr}");

    let (status, _) = get_json(&client, &first.url("/readyz")).await;
    assert_eq!(status, 200, "the first server is untouched");
    let (_, info) = get_json(&client, &first.url("/v1/models/default/streams/a")).await;
    assert_eq!(info["position"], 12);

    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(60)).success());
    let again = Binary::start(&["--data-dir", data], &[]);
    let (_, info) = get_json(&client, &again.url("/v1/models/default/streams/a")).await;
    assert_eq!(info["position"], 12, "the lock is released with its holder: {info}");
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 19.2: four clients each looping over `POST /v1/models {"name":"churn"}` then
/// `DELETE /v1/models/churn` broke the name: a delete dropped the name before it moved the
/// directory away, a create in between failed to load or lost its directory, deletes answered 204
/// far more often than creates 201, later creates of `churn` were 503 for good, and a restart
/// listed the deleted model again. Now every answer is 201/409 or 204/404, the 204s match the
/// 201s, the directory exists exactly when the model does, and a restart agrees.
#[tokio::test]
async fn racing_create_and_delete_of_one_model_name_stay_consistent() {
    let dir = temp_dir("churn");
    let data = dir.to_str().unwrap();
    let mut server = Binary::start(&["--data-dir", data], &[]);
    let client = reqwest::Client::new();
    let create_url = server.url("/v1/models");
    let model_url = server.url("/v1/models/churn");
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (client, create_url, model_url) = (client.clone(), create_url.clone(), model_url.clone());
        clients.push(tokio::spawn(async move {
            let (mut created, mut deleted) = (0u32, 0u32);
            for _ in 0..60 {
                let body = json!({ "name": "churn", "hidden": 8 });
                let status = client.post(&create_url).json(&body).send().await.unwrap().status().as_u16();
                match status {
                    201 => created += 1,
                    409 => {}
                    other => panic!("create answered {other}"),
                }
                let status = client.delete(&model_url).send().await.unwrap().status().as_u16();
                match status {
                    204 => deleted += 1,
                    404 => {}
                    other => panic!("delete answered {other}"),
                }
            }
            (created, deleted)
        }));
    }
    let (mut created, mut deleted) = (0, 0);
    for c in clients {
        let (c, d) = c.await.unwrap();
        created += c;
        deleted += d;
    }
    let (status, _) = get_json(&client, &model_url).await;
    let exists = status == 200;
    assert!(created > 0, "some creates succeed");
    assert_eq!(created, deleted + u32::from(exists), "each 204 deleted a model a 201 created (GET {status})");
    let model_dir = dir.join("models").join("churn");
    assert_eq!(model_dir.exists(), exists, "the directory exists exactly when the model does");

    // The name still works, and a restart sees what the server saw.
    if !exists {
        let reply =
            client.post(&create_url).json(&json!({ "name": "churn", "hidden": 8 })).send().await.unwrap();
        assert_eq!(reply.status().as_u16(), 201);
    }
    let reply = client.delete(&model_url).send().await.unwrap();
    assert_eq!(reply.status().as_u16(), 204);
    server.signal("TERM");
    assert!(server.wait(Duration::from_secs(60)).success());
    let again = Binary::start(&["--data-dir", data], &[]);
    let (_, models) = get_json(&client, &again.url("/v1/models")).await;
    let names: Vec<&str> =
        models["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default"], "a deleted model stays deleted across a restart");
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 19.9: a stop (SIGTERM) whose final checkpoint failed exited 0, so a supervisor saw a
/// clean stop. Now it exits 2 and says why; the log still holds every acknowledged token.
#[tokio::test]
async fn a_stop_whose_final_checkpoint_fails_exits_non_zero() {
    let dir = temp_dir("final-checkpoint-fails");
    let data = dir.to_str().unwrap();
    let mut server = Binary::start(&["--data-dir", data], &[]);
    let client = reqwest::Client::new();
    let tokens = server.url("/v1/models/default/streams/a/tokens");
    client.post(&tokens).json(&json!({ "text": "abc" })).send().await.unwrap().error_for_status().unwrap();
    let reply = client.post(server.url("/v1/models/default/checkpoint")).send().await.unwrap();
    let info: Value = reply.json().await.unwrap();
    let next_seq = info["next_seq"].as_u64().unwrap();
    client.post(&tokens).json(&json!({ "text": "defg" })).send().await.unwrap().error_for_status().unwrap();
    // Every name the final checkpoint can take is a directory that a file cannot replace.
    let model_dir = dir.join("models/default");
    for seq in next_seq + 1..next_seq + 200 {
        let blocked = model_dir.join(format!("checkpoint-{seq:020}.safetensors"));
        std::fs::create_dir_all(blocked.join("occupied")).unwrap();
    }
    server.signal("TERM");
    let status = server.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{:?}", server.seen.last());
    assert!(
        server.seen.iter().any(|l| l["message"] == "checkpoint failed"),
        "the failure is logged: {:?}",
        server.seen
    );
    for seq in next_seq + 1..next_seq + 200 {
        std::fs::remove_dir_all(model_dir.join(format!("checkpoint-{seq:020}.safetensors"))).unwrap();
    }
    let again = Binary::start(&["--data-dir", data], &[]);
    let (_, info) = get_json(&client, &again.url("/v1/models/default/streams/a")).await;
    assert_eq!(info["position"], 7, "the log kept what the checkpoint could not: {info}");
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads one HTTP/1.1 response head and body (the server answers with `Content-Length`).
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (u16, String, Value) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer without waiting for the body")
            .unwrap();
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if raw.len() >= end + 4 + length || n == 0 {
                let status = text[9..12].parse().unwrap();
                let body = serde_json::from_str(&text[end + 4..]).unwrap_or(Value::Null);
                return (status, head, body);
            }
        }
        assert!(n > 0, "connection closed before a full response: {text}");
    }
}

/// Issue 19.9: a `Content-Length` over the body limit waited for the body before its 413, and
/// an over-long path got 414 with an empty body. Now both are problem+json answered from the
/// request head, the 413 before a byte of the body is sent.
#[tokio::test]
async fn an_oversized_content_length_gets_413_at_once_and_a_long_path_gets_a_414_problem() {
    use tokio::io::AsyncWriteExt;
    let server = Binary::start(&["--max-body-bytes", "4096"], &[]);
    let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let head = "POST /v1/models/default/streams/a/tokens HTTP/1.1\r\nHost: x\r\n\
                Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut tcp).await;
    assert_eq!(status, 413, "{head}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert_eq!(body["type"], "urn:kfrtrl:problem:body-too-large");
    assert_eq!(body["limit"], 4096);

    let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let path = format!("/v1/models/{}", "x".repeat(10_000));
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut tcp).await;
    assert_eq!(status, 414, "{head}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert_eq!(body["type"], "urn:kfrtrl:problem:uri-too-long");

    // Past hyper's own limit (64 KiB; the 100 kB path), where hyper answered 414 with an
    // empty body: the problem object too, on a fresh connection and on a kept-alive one.
    let long = format!("GET /v1/models/{} HTTP/1.1\r\nHost: x\r\n\r\n", "y".repeat(100_000));
    let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    tcp.write_all(long.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut tcp).await;
    assert_eq!(status, 414, "{head}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert_eq!(
        (body["type"].as_str(), body["status"].as_u64()),
        (Some("urn:kfrtrl:problem:uri-too-long"), Some(414))
    );
    let mut kept = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut kept).await.0, 200);
    kept.write_all(long.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut kept).await;
    assert_eq!((status, body["type"].as_str()), (414, Some("urn:kfrtrl:problem:uri-too-long")), "{head}");

    // A body within the limit is still read and served.
    let reply = reqwest::Client::new()
        .post(server.url("/v1/models/default/streams/a/tokens"))
        .json(&json!({ "text": "ok" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
}

/// Waits until the server closes `tcp` (a read returns 0 or an error), at most `limit`.
async fn closed_within(tcp: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Issue 19.3: idle connections, half-sent request heads and idle kept-alive connections stayed
/// open forever (still open after 300 s), so 1,100 of them exhausted the file descriptors and
/// every route timed out. Now each is closed once the header read deadline passes, and the
/// server keeps answering meanwhile.
#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_at_the_header_read_deadline() {
    use tokio::io::AsyncWriteExt;
    let server = Binary::start(&["--header-read-timeout", "1"], &[]);
    let connect = || tokio::net::TcpStream::connect(&server.addr);
    let mut idle = connect().await.unwrap();
    let mut half = connect().await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut kept = connect().await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (status, _, _) = read_response(&mut kept).await;
    assert_eq!(status, 200);
    let (status, _) = get_json(&reqwest::Client::new(), &server.url("/healthz")).await;
    assert_eq!(status, 200, "served meanwhile");
    for (what, tcp) in [("idle", &mut idle), ("half-sent head", &mut half), ("kept alive", &mut kept)] {
        assert!(closed_within(tcp, Duration::from_secs(5)).await, "{what}: still open after 5 s");
    }
}

/// Issue 19.4: 600 connections each sending one body byte every 3 s took all 512 request
/// permits for the whole request timeout, and normal clients got 503 `overloaded`. Now a body
/// is read before its request takes a permit, within its own deadline (408 `body-timeout`).
#[tokio::test]
async fn slow_bodies_hold_no_request_permit() {
    use tokio::io::AsyncWriteExt;
    let server = Binary::start(&["--max-concurrent-requests", "4", "--body-read-timeout", "2"], &[]);
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let head = "POST /v1/models/default/streams/slow/tokens HTTP/1.1\r\nHost: x\r\n\
                    Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
        tcp.write_all(head.as_bytes()).await.unwrap();
        slow.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let reply = client
            .post(server.url(&format!("/v1/models/default/streams/fast{i}/tokens")))
            .json(&json!({ "text": "quick" }))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status().as_u16(), 200, "a normal client is served while bodies trickle");
        for tcp in &mut slow {
            tcp.write_all(b" ").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for tcp in &mut slow {
        let (status, head, body) = read_response(tcp).await;
        assert_eq!(status, 408, "{head}");
        assert_eq!(body["type"], "urn:kfrtrl:problem:body-timeout");
    }
}

/// Issue 19.6: nothing bounded the models' memory together: the per-model cap allowed 16 models
/// of 4 GiB on a 24 GiB machine. Now a server-wide budget (`--max-total-model-bytes`, unset three
/// quarters of the machine's memory) refuses, at creation, the model that would pass it, with
/// 507 `memory-budget`; deleting a model makes room again.
#[tokio::test]
async fn models_past_the_server_memory_budget_are_refused_with_507() {
    use kfrtrl::engine::{ModelDefinition, estimate_model_bytes};
    let one = |name: &str| ModelDefinition {
        hidden: 64,
        max_streams: 16,
        ..ModelDefinition::with_defaults(name, 16)
    };
    let bytes =
        |d: &ModelDefinition| estimate_model_bytes(&d.model_config().check().unwrap(), d.max_streams + 1);
    let default_model = ModelDefinition::with_defaults("default", 256);
    // Room for the default model and two small ones, not three.
    let budget = bytes(&default_model) + 2 * bytes(&one("a")) + bytes(&one("a")) / 2;
    let server = Binary::start(&["--max-total-model-bytes", &budget.to_string()], &[]);
    let client = reqwest::Client::new();
    let create = |name: &str| {
        client
            .post(server.url("/v1/models"))
            .json(&json!({ "name": name, "hidden": 64, "max_streams": 16 }))
            .send()
    };
    assert_eq!(create("a").await.unwrap().status().as_u16(), 201);
    assert_eq!(create("b").await.unwrap().status().as_u16(), 201);
    let refused = create("c").await.unwrap();
    assert_eq!(refused.status().as_u16(), 507);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "urn:kfrtrl:problem:memory-budget", "{problem}");
    assert_eq!(problem["limit"], (budget >> 20) as u64);
    let (status, _) = get_json(&client, &server.url("/v1/models/c")).await;
    assert_eq!(status, 404, "nothing of the refused model remains");
    assert_eq!(client.delete(server.url("/v1/models/a")).send().await.unwrap().status().as_u16(), 204);
    assert_eq!(create("c").await.unwrap().status().as_u16(), 201, "room again after a delete");
}

/// Issue 19.11: there was no easy way to stream a real file into a model and watch it learn.
/// `kfrtrl feed` streams a file over a WebSocket, reports the bits per byte, and, run again after
/// an interruption, sends only what the stream has not consumed.
#[tokio::test]
async fn kfrtrl_feed_streams_a_file_and_resumes_at_the_streams_position() {
    let server = Binary::start(&[], &[]);
    let dir = temp_dir("feed");
    let text: Vec<u8> = b"the cat sat on the mat. ".repeat(100);
    let (head, whole) = (dir.join("head.txt"), dir.join("whole.txt"));
    std::fs::write(&head, &text[..600]).unwrap();
    std::fs::write(&whole, &text).unwrap();
    let feed = |file: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
            .args(["feed", "--url", &server.url(""), "--stream", "cat", "--chunk", "64", "--json"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // An interrupted feed: its first 600 bytes.
    let first = feed(&head);
    assert_eq!((first["skipped_bytes"].as_u64(), first["fed_bytes"].as_u64()), (Some(0), Some(600)));
    let uniform = first["bits_per_byte"].as_f64().unwrap();
    assert!(uniform > 0.0 && uniform < 8.5, "{first}");
    // Rerun on the whole file: only the rest is sent, and the repeated text is learned.
    let rest = feed(&whole);
    assert_eq!(rest["skipped_bytes"], 600, "{rest}");
    assert_eq!(rest["fed_bytes"].as_u64(), Some(text.len() as u64 - 600), "{rest}");
    assert!(rest["bits_per_byte"].as_f64().unwrap() < uniform, "it learns: {first} then {rest}");
    let (_, info) = get_json(&reqwest::Client::new(), &server.url("/v1/models/default/streams/cat")).await;
    assert_eq!(info["position"].as_u64(), Some(text.len() as u64));
    // Nothing left: a third run sends nothing.
    assert_eq!(feed(&whole)["fed_bytes"], 0);
    let _ = std::fs::remove_dir_all(dir);
}
