//! The real `kfrtrl serve` binary as a child process, with its JSON log lines on a channel.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running server process.
pub struct Binary {
    /// The process.
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// Every log line so far, in order (filled by [`Binary::wait_for`] and [`Binary::wait`]).
    pub seen: Vec<Value>,
    logs: mpsc::Receiver<Value>,
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kfrtrl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Binary {
    /// Starts `kfrtrl serve` with JSON logs on 127.0.0.1:0 plus `args` and `env` (no other
    /// `KFRTRL_*` variable), and waits until it is ready.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kfrtrl"));
        command.args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"]).args(args);
        // One data directory per server unless the test names one: servers of concurrent tests
        // must not meet in the default `./data` (one server per directory).
        if !args.contains(&"--data-dir") {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            command.arg("--data-dir").arg(temp_dir(&format!("binary-{n}")));
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KFRTRL_")) {
            command.env_remove(key);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("the kfrtrl binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "message": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut server = Self { child, addr: String::new(), seen: Vec::new(), logs };
        let listening = server.wait_for("listening");
        server.addr = listening["addr"].as_str().expect("the listening line has the address").to_owned();
        server.wait_for("ready");
        server
    }

    /// The next log line with this message.
    pub fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let line = self.logs.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                let _ = self.child.kill();
                panic!("no `{message}` log line; seen: {:?}", self.seen)
            });
            self.seen.push(line.clone());
            if line["message"] == message {
                return line;
            }
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a signal (`TERM`, `INT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (at most `limit`), collecting the rest of its log lines.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.logs.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not exit within {limit:?}; seen: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
