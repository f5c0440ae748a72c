//! Unit tests of the log: writer, records, torn tails and pruning.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::record::HEADER;
use super::*;
use crate::core::SlotStep;

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
    assert_eq!(observer.syncs.load(std::sync::atomic::Ordering::SeqCst), 0, "no sync within the interval");
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
