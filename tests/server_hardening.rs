//! Regressions of issue 19 (a hostile run and a newcomer run of main), each named after the bug
//! it pins down, through real processes and sockets.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::binary::{Binary, temp_dir};

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
