//! The `kfrtrl` binary run exactly as the container image runs it (no Docker engine here): the
//! final stage of `Dockerfile` is read for its entrypoint, command, environment, volume, port,
//! user and health check; the binary then runs with that entrypoint and command, with nothing in
//! its environment but the image's `KFRTRL_*` variables (and the two a `docker run` would
//! override: the address, on loopback here, and the data directory, a fresh folder standing in
//! for the volume). It must serve, answer the image's health check with 0 (1 when it is down),
//! write nothing outside its data directory (it runs from a sandbox folder, so that relative
//! writes show; in Kubernetes the root filesystem is read-only besides), and exit cleanly on SIGTERM as PID 1 would get it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What the final stage of the Dockerfile says about how the binary runs.
#[derive(Debug, Default)]
struct Image {
    binary: String,
    env: BTreeMap<String, String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    volumes: Vec<String>,
    exposed: Vec<u16>,
    user: String,
    workdir: String,
}

/// The Dockerfile's instructions with continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn exec_form(instruction: &str, value: &str) -> Vec<String> {
    serde_json::from_str(value)
        .unwrap_or_else(|_| panic!("{instruction} must use the exec form (a JSON array), not {value}"))
}

fn read_image() -> Image {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let all = instructions(&text);
    let last_from = all.iter().rposition(|(k, _)| k == "FROM").expect("a FROM");
    let mut image = Image::default();
    for (keyword, value) in &all[last_from + 1..] {
        match keyword.as_str() {
            "ENV" => {
                for pair in value.split_whitespace() {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: use KEY=VALUE"));
                    image.env.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
            }
            "ENTRYPOINT" => image.entrypoint = exec_form("ENTRYPOINT", value),
            "CMD" => image.cmd = exec_form("CMD", value),
            "HEALTHCHECK" => {
                let (_, command) = value.split_once("CMD ").expect("HEALTHCHECK ... CMD [..]");
                image.healthcheck = exec_form("HEALTHCHECK CMD", command.trim());
            }
            "VOLUME" => image.volumes = exec_form("VOLUME", value),
            "EXPOSE" => image.exposed = value.split_whitespace().map(|p| p.parse().unwrap()).collect(),
            "USER" => image.user = value.clone(),
            "WORKDIR" => image.workdir = value.clone(),
            // The binary's COPY, not any other file whose path names the project (its docs).
            "COPY" if value.split_whitespace().last().is_some_and(|to| to.ends_with("/bin/kfrtrl")) => {
                image.binary = value.split_whitespace().last().unwrap().to_owned();
            }
            _ => {}
        }
    }
    image
}

/// The command line of a process that the image runs as `argv`, with the image's binary replaced
/// by the one cargo built.
fn command_for(image: &Image, argv: &[String], env: &BTreeMap<String, String>, cwd: &Path) -> Command {
    assert_eq!(argv[0], image.binary, "the image runs its own binary");
    let mut command = Command::new(env!("CARGO_BIN_EXE_kfrtrl"));
    command.args(&argv[1..]).env_clear().envs(env).current_dir(cwd).stdin(Stdio::null());
    command
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every file and folder under `root`, relative to it.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    out.sort();
    out
}

fn healthcheck(image: &Image, env: &BTreeMap<String, String>, cwd: &Path) -> i32 {
    let output = command_for(image, &image.healthcheck, env, cwd).output().unwrap();
    assert!(output.stdout.is_empty() && output.stderr.is_empty(), "--quiet prints nothing");
    output.status.code().expect("the health check exits by itself")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let signal = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(signal.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_dockerfile_runs_the_binary_as_a_non_root_pid_1_configured_by_kfrtrl_variables() {
    let image = read_image();
    assert_eq!(image.binary, "/usr/local/bin/kfrtrl");
    assert_eq!(image.entrypoint, [image.binary.as_str()], "the binary itself is PID 1");
    assert_eq!(image.cmd, ["serve"]);
    assert_eq!(image.healthcheck[1], "healthcheck", "a health check without shell tools");
    assert!(!image.user.is_empty() && !image.user.starts_with('0') && !image.user.starts_with("root"));
    assert!(image.env.keys().all(|k| k.starts_with("KFRTRL_")), "{:?}", image.env);
    assert_eq!(image.volumes, [image.env["KFRTRL_DATA_DIR"].as_str()], "the data directory is the volume");
    assert_eq!(image.workdir, image.env["KFRTRL_DATA_DIR"], "relative paths land in the volume");
    let listen = &image.env["KFRTRL_LISTEN"];
    let (host, port) = listen.rsplit_once(':').unwrap();
    assert_eq!(host, "0.0.0.0", "reachable from outside the container");
    assert_eq!(image.exposed, [port.parse::<u16>().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_as_the_image_runs_it_and_writes_only_its_data_directory() {
    let image = read_image();
    let sandbox = std::env::temp_dir().join(format!("kfrtrl-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&sandbox);
    std::fs::create_dir_all(&sandbox).unwrap();
    let volume = sandbox.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let port = free_loopback_port();
    let mut env = image.env.clone();
    // What `docker run -e` would set: the volume's path here, and loopback (tests never listen
    // on every interface).
    env.insert("KFRTRL_DATA_DIR".into(), volume.display().to_string());
    env.insert("KFRTRL_LISTEN".into(), format!("127.0.0.1:{port}"));
    // The image's own address form: the health check must probe it on loopback.
    let mut probe_env = env.clone();
    probe_env.insert("KFRTRL_LISTEN".into(), format!("0.0.0.0:{port}"));

    assert_eq!(healthcheck(&image, &probe_env, &volume), 1, "nothing listens yet: unhealthy");

    let argv: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
    // Run from the sandbox, not from the volume (the image's WORKDIR): a relative path the
    // binary writes to then shows up outside the volume.
    let mut command = command_for(&image, &argv, &env, &sandbox);
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, logs) = mpsc::channel::<Value>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let parsed = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "not_json": line }));
            if tx.send(parsed).is_err() {
                break;
            }
        }
    });
    let wait_for = |message: &str| loop {
        let line =
            logs.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no `{message}` log"));
        assert!(line.get("not_json").is_none(), "the image logs JSON: {line}");
        if line["message"] == message {
            return line;
        }
    };
    wait_for("ready");
    assert_eq!(healthcheck(&image, &probe_env, &volume), 0, "a ready server is healthy");

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let reply: Value = http
        .post(format!("{base}/v1/models/default/streams/image-test/tokens"))
        .body(r#"{"text": "the image runs"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["position"], 14, "{reply}");
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{port}/v1/models/default/streams/image-test/ws"
    ))
    .await
    .unwrap();
    socket.send(Message::Text(r#"{"text": "!", "predict": true}"#.into())).await.unwrap();
    let Some(Ok(Message::Text(text))) = socket.next().await else { panic!("no WebSocket reply") };
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["position"], 14);
    drop(socket);

    let status = terminate(&mut child);
    assert!(status.success(), "SIGTERM ends the server cleanly: {status:?}");
    assert_eq!(healthcheck(&image, &probe_env, &volume), 1, "a stopped server is unhealthy");

    // Nothing but the volume in the sandbox, the server's working directory.
    let everything = tree(&sandbox);
    assert!(
        everything.iter().all(|p| p.starts_with("volume")),
        "written outside the data directory: {everything:?}"
    );
    let _ = std::fs::remove_dir_all(&sandbox);
}
