//! The write-ahead log of one model: every operation that changes the model's state (a batched
//! step, a stream opened, closed, copied, evicted or reloaded), numbered, checksummed, appended
//! in order before the replies that depend on it are sent.
//!
//! Operations are deterministic given the state they start from (signs come from counter-based
//! RNG keys held in the state), so replaying the log past a checkpoint rebuilds the exact state
//! the model had, bit for bit.
//!
//! On disk: segment files `wal-<first seq, 20 digits>.log` in the model's directory. A segment
//! starts with [`MAGIC`], then records `[payload length: u32][hash: u64][seq: u64][payload]`
//! (little-endian; the hash covers the sequence number and the payload). A new segment starts at
//! every checkpoint; segments that only hold records older than the oldest kept checkpoint are
//! deleted. A record cut short or damaged (a torn write at a crash) ends the log: it and
//! everything after it are dropped, never applied, and the file is truncated to its valid prefix.
//!
//! The [`WalWriter`] thread does the IO with group commit: it takes every batch the worker has
//! queued, writes them together, syncs per the [`FsyncPolicy`], and only then runs the batches'
//! completions (which send the replies), so the worker keeps stepping while the disk syncs.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::SlotStep;

/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"KFWAL\0\0\x01";
const HEADER: usize = 4 + 8 + 8;
/// Largest payload accepted when reading (a batch of 65,537 inputs is about 600 kB).
const MAX_PAYLOAD: usize = 64 << 20;

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

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new stream takes a free slot.
    Open {
        /// The slot.
        slot: u32,
        /// The stream's name.
        name: String,
    },
    /// A stream is forgotten; its slot is freed.
    Close {
        /// The slot.
        slot: u32,
    },
    /// A slot's complete state is copied into another (a predict's scratch copy).
    Copy {
        /// From.
        src: u32,
        /// To.
        dst: u32,
    },
    /// One batched step.
    Step(Vec<SlotStep>),
    /// A stream's state is written to its file `generation` and its slot freed.
    Evict {
        /// The slot.
        slot: u32,
        /// The file's generation.
        generation: u64,
    },
    /// An evicted stream comes back into a free slot from its file.
    Load {
        /// The slot.
        slot: u32,
        /// The file's generation.
        generation: u64,
        /// The stream's name.
        name: String,
    },
    /// An evicted stream is forgotten.
    Forget {
        /// The stream's name.
        name: String,
    },
}

const OPEN: u8 = 1;
const CLOSE: u8 = 2;
const COPY: u8 = 3;
const STEP: u8 = 4;
const EVICT: u8 = 5;
const LOAD: u8 = 6;
const FORGET: u8 = 7;

impl Event {
    /// Appends the event's payload to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Event::Open { slot, name } => {
                out.push(OPEN);
                out.extend_from_slice(&slot.to_le_bytes());
                put_name(out, name);
            }
            Event::Close { slot } => {
                out.push(CLOSE);
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Event::Copy { src, dst } => {
                out.push(COPY);
                out.extend_from_slice(&src.to_le_bytes());
                out.extend_from_slice(&dst.to_le_bytes());
            }
            Event::Step(inputs) => encode_step(inputs, out),
            Event::Evict { slot, generation } => {
                out.push(EVICT);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Event::Load { slot, generation, name } => {
                out.push(LOAD);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                put_name(out, name);
            }
            Event::Forget { name } => {
                out.push(FORGET);
                put_name(out, name);
            }
        }
    }

    fn decode(payload: &[u8]) -> Option<Event> {
        let mut r = Reader(payload);
        let event = match r.u8()? {
            OPEN => Event::Open { slot: r.u32()?, name: r.name()? },
            CLOSE => Event::Close { slot: r.u32()? },
            COPY => Event::Copy { src: r.u32()?, dst: r.u32()? },
            STEP => {
                let count = r.u32()? as usize;
                if count > payload.len() / 9 {
                    return None;
                }
                let mut inputs = Vec::with_capacity(count);
                for _ in 0..count {
                    let (slot, token, flags) = (r.u32()?, r.u32()?, r.u8()?);
                    if flags > 3 {
                        return None;
                    }
                    inputs.push(SlotStep {
                        slot: slot as usize,
                        token,
                        learn: flags & 1 != 0,
                        reset: flags & 2 != 0,
                    });
                }
                Event::Step(inputs)
            }
            EVICT => Event::Evict { slot: r.u32()?, generation: r.u64()? },
            LOAD => Event::Load { slot: r.u32()?, generation: r.u64()?, name: r.name()? },
            FORGET => Event::Forget { name: r.name()? },
            _ => return None,
        };
        r.0.is_empty().then_some(event)
    }
}

/// A step's payload, written without building an [`Event`] (the worker's hot path).
pub fn encode_step(inputs: &[SlotStep], out: &mut Vec<u8>) {
    out.push(STEP);
    out.extend_from_slice(&(inputs.len() as u32).to_le_bytes());
    for x in inputs {
        out.extend_from_slice(&(x.slot as u32).to_le_bytes());
        out.extend_from_slice(&x.token.to_le_bytes());
        out.push(u8::from(x.learn) | (u8::from(x.reset) << 1));
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn name(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn record_hash(seq: u64, payload: &[u8]) -> u64 {
    crate::engine::checksum::checksum([seq.to_le_bytes().as_slice(), payload])
}

/// Records being assembled by the worker, handed to the writer as one batch.
#[derive(Debug, Default)]
pub struct RecordBuf {
    bytes: Vec<u8>,
    payload: Vec<u8>,
    records: usize,
}

impl RecordBuf {
    /// Appends a record with sequence number `seq` whose payload `fill` writes.
    pub fn push(&mut self, seq: u64, fill: impl FnOnce(&mut Vec<u8>)) {
        self.payload.clear();
        fill(&mut self.payload);
        self.bytes.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&record_hash(seq, &self.payload).to_le_bytes());
        self.bytes.extend_from_slice(&seq.to_le_bytes());
        self.bytes.extend_from_slice(&self.payload);
        self.records += 1;
    }

    /// Appends an event.
    pub fn push_event(&mut self, seq: u64, event: &Event) {
        self.push(seq, |out| event.encode(out));
    }

    /// Whether no record is waiting.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Takes the assembled bytes, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.records = 0;
        std::mem::take(&mut self.bytes)
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

/// The name of the segment whose first record is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

/// The segments in `dir`, by first sequence number.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "wal-", ".log")
}

/// The files `<prefix><number><suffix>` in `dir` (anything else ignored), by number.
pub(crate) fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) =
            name.strip_prefix(prefix).and_then(|s| s.strip_suffix(suffix)).and_then(|s| s.parse().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
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

/// The records of the log in `dir` from sequence number `from` on, in order. Stops at the first
/// record that is cut short, damaged or out of sequence: that record and the rest of its
/// segment are truncated away (and later segments deleted), so they can never be applied.
pub fn read_from(dir: &Path, from: u64) -> std::io::Result<ReadLog> {
    let mut events = Vec::new();
    let mut next = from;
    let mut dropped_bytes = 0u64;
    let segments = segments(dir)?;
    let mut broken = false;
    for (i, (first, path)) in segments.iter().enumerate() {
        if broken {
            dropped_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(path)?;
            continue;
        }
        // Segments wholly before `from` are skipped (they will be pruned).
        if let Some((later, _)) = segments.get(i + 1)
            && *later <= from
        {
            continue;
        }
        if *first > next {
            // A gap: the records between are missing, so nothing after can be applied.
            broken = true;
            dropped_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(path)?;
            continue;
        }
        let bytes = std::fs::read(path)?;
        let mut at = MAGIC.len();
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            at = 0;
            broken = true;
        }
        let mut seq = *first;
        while !broken && at < bytes.len() {
            let Some((record_seq, payload, len)) = parse_record(&bytes[at..]) else {
                broken = true;
                break;
            };
            if record_seq != seq {
                broken = true;
                break;
            }
            if seq >= next {
                match Event::decode(payload) {
                    Some(event) => events.push(event),
                    None => {
                        broken = true;
                        break;
                    }
                }
                next = seq + 1;
            }
            seq += 1;
            at += len;
        }
        if broken {
            dropped_bytes += (bytes.len() - at) as u64;
            let file = OpenOptions::new().write(true).open(path)?;
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
    }
    Ok(ReadLog { events, next_seq: next, dropped_bytes })
}

fn parse_record(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    if bytes.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let hash = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD || bytes.len() < HEADER + len {
        return None;
    }
    let payload = &bytes[HEADER..HEADER + len];
    (record_hash(seq, payload) == hash).then_some((seq, payload, HEADER + len))
}

/// What [`read_from`] found.
#[derive(Debug)]
pub struct ReadLog {
    /// The events from the requested sequence number on.
    pub events: Vec<Event>,
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// Bytes of torn or damaged records dropped.
    pub dropped_bytes: u64,
}

/// Deletes the segments that only hold records before `keep_from`.
pub fn prune(dir: &Path, keep_from: u64) -> std::io::Result<()> {
    let segments = segments(dir)?;
    for (i, (_, path)) in segments.iter().enumerate() {
        if let Some((next_first, _)) = segments.get(i + 1)
            && *next_first <= keep_from
        {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl WalObserver for Quiet {
        fn synced(&self, _: f64) {}
        fn wrote(&self, _: usize) {}
        fn failed(&self, _: &str) {}
    }

    /// Counts what the writer reports.
    #[derive(Clone, Default)]
    struct Counting {
        syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }
    impl WalObserver for Counting {
        fn synced(&self, _: f64) {
            self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn wrote(&self, _: usize) {}
        fn failed(&self, error: &str) {
            self.failures.lock().unwrap().push(error.to_owned());
        }
    }

    /// Appends one record and returns what its completion was told.
    fn append_one(w: &WalWriter, seq: u64) -> Result<(), String> {
        let mut buf = RecordBuf::default();
        buf.push_event(seq, &Event::Forget { name: format!("s{seq}") });
        let (tx, rx) = std::sync::mpsc::channel();
        w.append(buf.take(), vec![Box::new(move |r| tx.send(r).unwrap())]);
        rx.recv().unwrap()
    }

    fn sample() -> Vec<Event> {
        vec![
            Event::Open { slot: 3, name: "s-1".into() },
            Event::Step(vec![
                SlotStep { slot: 3, token: 255, learn: true, reset: true },
                SlotStep { slot: 9, token: 0, learn: false, reset: false },
            ]),
            Event::Copy { src: 3, dst: 9 },
            Event::Evict { slot: 3, generation: 7 },
            Event::Load { slot: 4, generation: 7, name: "s-1".into() },
            Event::Close { slot: 4 },
            Event::Forget { name: "gone".into() },
        ]
    }

    fn write(dir: &Path, first: u64, events: &[Event]) {
        let w = WalWriter::start(dir, first, FsyncPolicy::Always, "t", Quiet).unwrap();
        let mut buf = RecordBuf::default();
        for (i, e) in events.iter().enumerate() {
            buf.push_event(first + i as u64, e);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        w.append(buf.take(), vec![Box::new(move |r| tx.send(r).unwrap())]);
        assert_eq!(rx.recv().unwrap(), Ok(()));
    }

    /// Regression: under the interval policy a write was synced only when a later record
    /// arrived, so the last acknowledged writes before a quiet spell stayed unsynced for as
    /// long as it lasted.
    #[test]
    fn an_interval_policy_syncs_the_last_write_without_further_traffic() {
        let dir = tempdir("interval");
        let observer = Counting::default();
        let policy = FsyncPolicy::Interval(Duration::from_millis(20));
        let w = WalWriter::start(&dir, 0, policy, "t", observer.clone()).unwrap();
        let synced = || observer.syncs.load(std::sync::atomic::Ordering::SeqCst);
        for seq in 0..2 {
            append_one(&w, seq).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while synced() <= seq as usize && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(synced(), seq as usize + 1, "write {seq} is synced once, with nothing after it");
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(synced(), 2, "nothing new written: no sync");
        // And at most once per interval: writes answered within one are not synced each.
        let dir = tempdir("interval-long");
        let observer = Counting::default();
        let policy = FsyncPolicy::Interval(Duration::from_secs(30));
        let w = WalWriter::start(&dir, 0, policy, "t", observer.clone()).unwrap();
        for seq in 0..5 {
            append_one(&w, seq).unwrap();
        }
        assert_eq!(
            observer.syncs.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no sync within the interval"
        );
    }

    /// Regressions: a failed write or rotation (as opposed to a failed sync) was never reported,
    /// so the model went on as if its log were healthy; and a batch written and synced in the
    /// same group as a rotation that then failed was answered with the error although it was
    /// on disk, to be replayed at the next start.
    #[test]
    fn a_failed_rotation_answers_what_it_synced_and_fails_every_later_batch() {
        assert!(Path::new("/dev/full").exists(), "this test needs the device /dev/full");
        let dir = tempdir("rotation-fails");
        let observer = Counting::default();
        let w = WalWriter::start(&dir, 0, FsyncPolicy::Always, "t", observer.clone()).unwrap();
        append_one(&w, 0).unwrap();
        // The next segment's file is a device that refuses every write (a full disk).
        let next = dir.join(segment_name(2));
        std::os::unix::fs::symlink("/dev/full", &next).unwrap();
        // Batch 1 and the rotation after it, sent together so that they usually share a group.
        let mut buf = RecordBuf::default();
        buf.push_event(1, &Event::Forget { name: "s1".into() });
        let (tx, rx) = std::sync::mpsc::channel();
        let batch_tx = tx.clone();
        w.append(buf.take(), vec![Box::new(move |r| batch_tx.send(("batch", r)).unwrap())]);
        w.rotate(2, Box::new(move |r| tx.send(("rotation", r)).unwrap()));
        let answers: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(answers, [("batch", Ok(())), ("rotation", Ok(()))], "both are on disk before the failure");
        for seq in 2..5 {
            let outcome = append_one(&w, seq);
            assert!(outcome.as_ref().is_err_and(|e| e.contains("rotation failed")), "{outcome:?}");
        }
        let failures = observer.failures.lock().unwrap().clone();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("rotation failed"), "{failures:?}");
        drop(w);
        // What was answered is what a restart replays, and the segment holds nothing else.
        let mut answered = RecordBuf::default();
        answered.push_event(0, &Event::Forget { name: "s0".into() });
        answered.push_event(1, &Event::Forget { name: "s1".into() });
        let segment = std::fs::metadata(dir.join(segment_name(0))).unwrap().len();
        assert_eq!(segment, (MAGIC.len() + answered.take().len()) as u64);
        std::fs::remove_file(&next).unwrap();
        let log = read_from(&dir, 0).unwrap();
        assert_eq!(log.events.len(), 2);
        assert_eq!(log.next_seq, 2);
    }

    #[test]
    fn events_round_trip_through_a_segment() {
        let dir = tempdir("roundtrip");
        write(&dir, 5, &sample());
        let log = read_from(&dir, 5).unwrap();
        assert_eq!(log.events, sample());
        assert_eq!(log.next_seq, 12);
        assert_eq!(read_from(&dir, 8).unwrap().events, sample()[3..]);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_truncated_at_every_cut() {
        let dir = tempdir("torn");
        write(&dir, 0, &sample());
        let path = dir.join(segment_name(0));
        let full = std::fs::read(&path).unwrap();
        let whole = read_from(&dir, 0).unwrap().events.len();
        assert_eq!(whole, 7);
        // Every possible cut inside the last record drops exactly that record.
        let last_start = {
            let mut at = MAGIC.len();
            for _ in 0..6 {
                at += parse_record(&full[at..]).unwrap().2;
            }
            at
        };
        for cut in last_start..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let log = read_from(&dir, 0).unwrap();
            assert_eq!(log.events, sample()[..6], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start as u64);
        }
        // A flipped bit in the middle drops that record and everything after it.
        let mut damaged = full.clone();
        damaged[MAGIC.len() + HEADER + 2] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        assert!(read_from(&dir, 0).unwrap().events.is_empty());
    }

    #[test]
    fn later_segments_continue_and_prune_keeps_what_is_needed() {
        let dir = tempdir("segments");
        let events = sample();
        write(&dir, 0, &events[..3]);
        write(&dir, 3, &events[3..]);
        assert_eq!(read_from(&dir, 0).unwrap().events, events);
        assert_eq!(read_from(&dir, 4).unwrap().events, events[4..]);
        prune(&dir, 2).unwrap();
        assert_eq!(segments(&dir).unwrap().len(), 2);
        prune(&dir, 3).unwrap();
        assert_eq!(segments(&dir).unwrap().len(), 1);
        assert_eq!(read_from(&dir, 3).unwrap().events, events[3..]);
    }

    #[test]
    fn a_gap_between_segments_ends_the_log() {
        let dir = tempdir("gap");
        let events = sample();
        write(&dir, 0, &events[..2]);
        write(&dir, 4, &events[4..]);
        let log = read_from(&dir, 0).unwrap();
        assert_eq!(log.events, events[..2]);
        assert_eq!(log.next_seq, 2);
        assert_eq!(segments(&dir).unwrap().len(), 1);
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("interval:250".parse(), Ok(FsyncPolicy::Interval(Duration::from_millis(250))));
        assert!("interval:0".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kfrtrl-wal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
