//! Where an engine keeps its models (`<data dir>/models/<name>/`) and the lock that makes one
//! server the only writer of a data directory: two servers on one directory would each prune the
//! checkpoints and log segments the other still needs, and restore each other's older state.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::model::valid_name;
use super::wal::FsyncPolicy;

/// Where and how an engine keeps its models durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Durability {
    /// The data directory; models live in `models/<name>/` under it.
    pub data_dir: PathBuf,
    /// When the write-ahead log is synced.
    pub fsync: FsyncPolicy,
    /// Time between periodic checkpoints of a model that changed (`None`: only on demand and at
    /// shutdown).
    pub checkpoint_interval: Option<Duration>,
    /// Checkpoints kept per model (the newest that validates is used at boot).
    pub checkpoint_keep: usize,
    /// Streams idle this long are evicted to disk (`None`: only when a model's slots are full).
    pub stream_idle_ttl: Option<Duration>,
}

impl Durability {
    /// Defaults for a data directory: fsync `always`, a checkpoint every 5 minutes, 3 kept,
    /// streams idle for 10 minutes evicted.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            fsync: FsyncPolicy::Always,
            checkpoint_interval: Some(Duration::from_secs(300)),
            checkpoint_keep: 3,
            stream_idle_ttl: Some(Duration::from_secs(600)),
        }
    }

    pub(crate) fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }

    /// The directory of a model (its name is validated: it is a safe file name).
    pub fn model_dir(&self, model: &str) -> PathBuf {
        debug_assert!(valid_name(model));
        self.models_dir().join(model)
    }
}

/// The exclusive lock of a data directory (an advisory `flock` on `<data dir>/LOCK`, which holds
/// the owner's process id), held until dropped. The kernel releases it when the process dies,
/// so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl Durability {
    /// Takes the data directory's lock, creating the directory if needed; refuses with the
    /// holder's process id when another server (or another engine of this process) holds it.
    pub fn lock(&self) -> Result<DataDirLock, String> {
        let dir = &self.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("data dir {}: {e}", dir.display()))?;
        let path = dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let by = if holder.is_empty() { String::new() } else { format!(" (process {holder})") };
                return Err(format!(
                    "data dir {} is in use by another kfrtrl server{by}: one server per data \
                     directory; stop it or give this one another --data-dir",
                    dir.display()
                ));
            }
            Err(TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(DataDirLock { _file: file })
    }
}

/// The disk that evicted streams take, across every model of the server, against its budget
/// (`EngineLimits::max_evicted_bytes`). Each model's worker accounts its evicted streams at an
/// estimated file size; a new stream that would need one more stream moved to disk past the
/// budget is refused (507 `disk-budget`), and idle streams stay in memory rather than go past it.
#[derive(Debug)]
pub struct EvictedBytes {
    used: AtomicU64,
    budget: u64,
}

impl EvictedBytes {
    /// Nothing used yet.
    pub fn new(budget: u64) -> Self {
        Self { used: AtomicU64::new(0), budget }
    }

    /// Bytes accounted now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Whether `more` bytes would pass the budget.
    pub fn would_exceed(&self, more: u64) -> bool {
        self.used().saturating_add(more) > self.budget
    }

    /// Moves one model's share from `from` to `to` bytes.
    pub(crate) fn adjust(&self, from: u64, to: u64) {
        if to > from {
            self.used.fetch_add(to - from, Ordering::AcqRel);
        } else {
            self.used.fetch_sub(from - to, Ordering::AcqRel);
        }
    }
}
