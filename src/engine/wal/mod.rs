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

mod record;
mod writer;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use record::parse_record;
pub use record::{Event, MAGIC, RecordBuf, encode_step};
pub use writer::{Completion, FsyncPolicy, WalObserver, WalWriter};

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
mod tests;
