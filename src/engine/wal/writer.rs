//! The writer thread: group commit of the worker's batches, syncs per the [`FsyncPolicy`], then
//! the batches' completions.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::record::MAGIC;
use super::segment_name;

/// When the log is synced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every group of batches, before their replies: an acknowledged request survives a
    /// power loss.
    Always,
    /// At most this often: a crash of the machine may lose the last interval's acknowledged
    /// requests (a crash of the process loses nothing: the data is in the page cache).
    Interval(Duration),
    /// Never (the operating system writes back when it likes).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    /// `always`, `never`, `interval` (100 ms) or `interval:<ms>`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            "interval" => Ok(Self::Interval(Duration::from_millis(100))),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Self::Interval(Duration::from_millis(ms))),
                _ => Err(format!("`{s}`: expected always, never, interval or interval:<ms>")),
            },
        }
    }
}

/// What runs once a batch is on disk (per the policy): `Ok` or the write error.
pub type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

enum Message {
    Batch {
        bytes: Vec<u8>,
        completions: Vec<Completion>,
    },
    /// Close the current segment and continue in a new one starting at `first_seq`.
    Rotate {
        first_seq: u64,
        /// Told once everything before the rotation is written and synced.
        done: Completion,
    },
    /// Sync, then run the completion (a barrier: everything sent before is on disk).
    Sync(Completion),
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn create_segment(dir: &Path, first_seq: u64) -> std::io::Result<BufWriter<File>> {
    let path = dir.join(segment_name(first_seq));
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    sync_dir(dir);
    Ok(BufWriter::with_capacity(1 << 20, file))
}

/// The log's writer thread.
pub struct WalWriter {
    tx: Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

/// Counters the writer reports to the model's metrics.
pub trait WalObserver: Send + 'static {
    /// A sync took this long.
    fn synced(&self, seconds: f64);
    /// Bytes written.
    fn wrote(&self, bytes: usize);
    /// A write, sync or rotation failed; the log refuses everything after. Called once, before
    /// the completions of the failed batch run.
    fn failed(&self, error: &str);
}

impl WalWriter {
    /// Starts the writer on a new segment of `dir` beginning at `first_seq`.
    pub fn start(
        dir: &Path,
        first_seq: u64,
        policy: FsyncPolicy,
        name: &str,
        observer: impl WalObserver,
    ) -> std::io::Result<Self> {
        let file = create_segment(dir, first_seq)?;
        let (tx, rx) = channel();
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("wal-{name}"))
            .spawn(move || write_loop(dir, file, rx, policy, observer))?;
        Ok(Self { tx, thread: Some(thread) })
    }

    /// Queues a batch of records; `completions` run once it is written (and synced, per the
    /// policy), in order, or with the error if the log failed.
    pub fn append(&self, bytes: Vec<u8>, completions: Vec<Completion>) {
        if let Err(e) = self.tx.send(Message::Batch { bytes, completions }) {
            // The writer is gone (it only stops when dropped): fail the completions.
            if let Message::Batch { completions, .. } = e.0 {
                for c in completions {
                    c(Err("the write-ahead log is closed".into()));
                }
            }
        }
    }

    /// Continues the log in a new segment starting at `first_seq` (at a checkpoint); `done` is
    /// told once everything appended before is written and synced (a checkpoint must hold no
    /// step whose record could still fail), or with the error.
    pub fn rotate(&self, first_seq: u64, done: Completion) {
        if let Err(e) = self.tx.send(Message::Rotate { first_seq, done })
            && let Message::Rotate { done, .. } = e.0
        {
            done(Err("the write-ahead log is closed".into()));
        }
    }

    /// Runs `done` once everything appended before is on disk and synced.
    pub fn sync(&self, done: Completion) {
        if let Err(e) = self.tx.send(Message::Sync(done))
            && let Message::Sync(done) = e.0
        {
            done(Err("the write-ahead log is closed".into()));
        }
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        let (tx, _) = channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    dir: PathBuf,
    file: BufWriter<File>,
    rx: Receiver<Message>,
    policy: FsyncPolicy,
    observer: impl WalObserver,
) {
    let mut file = Some(file);
    let mut failed: Option<String> = None;
    let mut last_sync = Instant::now();
    let mut dirty = false;
    // Bytes of the current segment whose batches were answered (or its header), and bytes
    // written since: on a failure the segment is cut back to the former, so that no record of a
    // batch answered with the error can be replayed.
    let mut answered_len = MAGIC.len() as u64;
    let mut written_len = 0u64;
    let mut completions: Vec<Completion> = Vec::new();
    let mut syncs: Vec<Completion> = Vec::new();
    loop {
        // Under an interval policy, written data is synced when its interval ends even if no
        // more records arrive, so at most the last interval is ever at risk.
        let wait = match policy {
            FsyncPolicy::Interval(every) if dirty && failed.is_none() => {
                Some(every.saturating_sub(last_sync.elapsed()))
            }
            _ => None,
        };
        let mut next = match wait {
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            },
        };
        let was_failed = failed.is_some();
        let mut force_sync = false;
        // Group commit: everything queued so far goes out with one sync.
        while let Some(message) = next.take().or_else(|| rx.try_recv().ok()) {
            match message {
                Message::Batch { bytes, completions: c } => {
                    if let (None, Some(w)) = (&failed, file.as_mut()) {
                        match w.write_all(&bytes) {
                            Ok(()) => {
                                observer.wrote(bytes.len());
                                written_len += bytes.len() as u64;
                                dirty = true;
                            }
                            Err(e) => failed = Some(format!("write-ahead log write failed: {e}")),
                        }
                    }
                    completions.extend(c);
                }
                Message::Rotate { first_seq, done } => {
                    let Some(w) = file.as_mut().filter(|_| failed.is_none()) else {
                        done(Err(failed.clone().unwrap_or_default()));
                        continue;
                    };
                    if let Err(e) = w.flush().and_then(|()| w.get_ref().sync_data()) {
                        failed = Some(format!("write-ahead log sync failed: {e}"));
                        done(Err(failed.clone().unwrap_or_default()));
                        continue;
                    }
                    // Everything before the rotation is durable: its batches and the snapshot
                    // that waits for it are answered now, whatever happens to the new segment.
                    for c in completions.drain(..) {
                        c(Ok(()));
                    }
                    done(Ok(()));
                    match create_segment(&dir, first_seq) {
                        Ok(new) => {
                            file = Some(new);
                            dirty = false;
                            answered_len = MAGIC.len() as u64;
                            written_len = 0;
                        }
                        Err(e) => {
                            answered_len += written_len;
                            written_len = 0;
                            failed = Some(format!("write-ahead log rotation failed: {e}"));
                        }
                    }
                }
                Message::Sync(done) => {
                    force_sync = true;
                    syncs.push(done);
                }
            }
            if completions.len() >= 4096 {
                break;
            }
        }
        if let (None, Some(w)) = (&failed, file.as_mut()) {
            let sync = match policy {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval(every) => last_sync.elapsed() >= every,
                FsyncPolicy::Never => false,
            } || force_sync;
            let result = w.flush().and_then(|()| {
                if sync && dirty {
                    let started = Instant::now();
                    w.get_ref().sync_data()?;
                    observer.synced(started.elapsed().as_secs_f64());
                    last_sync = Instant::now();
                    dirty = false;
                }
                Ok(())
            });
            match result {
                Ok(()) => {
                    answered_len += written_len;
                    written_len = 0;
                }
                Err(e) => failed = Some(format!("write-ahead log sync failed: {e}")),
            }
        }
        if !was_failed && let Some(error) = &failed {
            // The unanswered records go: the buffer is dropped unwritten and the segment cut
            // back (best effort: on a failing disk even this may fail, which is why a client
            // told of a storage failure checks its stream's position after the restart).
            if let Some(w) = file.take() {
                let (segment, _unwritten) = w.into_parts();
                let _ = segment.set_len(answered_len).and_then(|()| segment.sync_all());
            }
            // Reported before the completions run, so that whoever learns of the failure from
            // a reply finds the model already marked failed.
            observer.failed(error);
        }
        let outcome = failed.clone().map_or(Ok(()), Err);
        for c in completions.drain(..) {
            c(outcome.clone());
        }
        for c in syncs.drain(..) {
            c(outcome.clone());
        }
    }
    if let (None, Some(mut w)) = (failed, file) {
        let _ = w.flush().and_then(|()| w.get_ref().sync_data());
    }
}
