//! Durability of the engine through its public API: checkpoints and the write-ahead log restore
//! a model bit for bit (weights, optimizer moments, every stream's state and factors, counters),
//! a torn log tail is dropped, a damaged newest checkpoint falls back to the previous one,
//! checkpoints change nothing the model does next, eviction loses nothing, and an injected
//! non-finite factor never reaches the weights.
//!
//! A "crash" is simulated by copying the data directory while the engine runs, after every
//! request has been answered: with fsync `always` the copy holds exactly what a killed process
//! would leave on disk (the real-process SIGKILL test is `durability_crash.rs`).

use std::path::Path;
use std::sync::Arc;

use crate::support::binary::temp_dir;
use kfrtrl::core::{CellKind, LearnerKind};
use kfrtrl::engine::model_file;
use kfrtrl::engine::{
    Durability, Engine, EngineError, EngineLimits, EngineMetrics, Mode, ModelDefinition, ModelSnapshot,
    ModelState, TokenInput, TokensReply, checkpoint, wal,
};

mod operations;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn durability(dir: &Path) -> Durability {
    Durability { checkpoint_interval: None, stream_idle_ttl: None, ..Durability::new(dir) }
}

fn engine_with(d: Durability, limits: EngineLimits) -> Arc<Engine> {
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    Arc::new(Engine::with_durability(limits, metrics, d))
}

fn engine(dir: &Path) -> Arc<Engine> {
    engine_with(durability(dir), EngineLimits::default())
}

fn definition(name: &str, learner: LearnerKind, max_streams: usize) -> ModelDefinition {
    ModelDefinition {
        vocab_size: 24,
        cell: CellKind::Rhn,
        hidden: 10,
        learner,
        tbptt_window: 5,
        ok_rank: 3,
        lr: 0.01,
        // The default margin belongs to the learners that carry an influence.
        influence_margin: learner.carries_influence().then_some(kfrtrl::core::model::DEFAULT_MODEL_MARGIN),
        // An update at every step (the defaults' schedule waits for 8 tokens and more).
        tokens_per_update: 1,
        tokens_per_update_ramp: 0,
        tokens_per_update_start: 1,
        ..ModelDefinition::with_defaults(name, max_streams)
    }
}

/// A small deterministic generator for the traffic.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn input(rng: &mut Lcg, vocab: u64) -> TokenInput {
    let len = 1 + rng.below(6) as usize;
    TokenInput {
        tokens: (0..len).map(|_| rng.below(vocab) as u32).collect(),
        learn: rng.below(5) != 0,
        reset: rng.below(8) == 0,
        top_k: 3,
        return_losses: true,
    }
}

/// Concurrent traffic on `streams` streams (so batches mix streams); returns when all is answered.
async fn concurrent_traffic(engine: &Arc<Engine>, model: &str, streams: usize, requests: usize, seed: u64) {
    let mut tasks = Vec::new();
    for s in 0..streams {
        let engine = engine.clone();
        let model = model.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(seed * 1000 + s as u64);
            for _ in 0..requests {
                let mode = if rng.below(6) == 0 { Mode::Predict } else { Mode::Consume };
                let x = input(&mut rng, 24);
                match engine.tokens(&model, &format!("s{s}"), x, mode).await {
                    Ok(_) => {}
                    Err(kfrtrl::engine::EngineError::UnknownStream { .. }) if mode == Mode::Predict => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Bitwise equality of two snapshots (f32 `==` would call NaN unequal and -0 equal to 0).
fn assert_same(a: &ModelSnapshot, b: &ModelSnapshot) {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(a.definition, b.definition);
    assert_eq!(bits(a.params.w.as_slice().unwrap()), bits(b.params.w.as_slice().unwrap()), "weights w");
    assert_eq!(bits(a.params.v.as_slice().unwrap()), bits(b.params.v.as_slice().unwrap()), "weights v");
    assert_eq!(a.optimizer.steps, b.optimizer.steps);
    assert_eq!(a.optimizer, b.optimizer, "optimizer moments");
    assert_eq!(a.stream_slots.len(), b.stream_slots.len());
    for (x, y) in a.stream_slots.iter().zip(&b.stream_slots) {
        assert_eq!((x.slot, &x.meta), (y.slot, &y.meta));
        assert_eq!(x.state.position, y.state.position);
        assert_eq!((x.state.sign_key, x.state.sign_counter), (y.state.sign_key, y.state.sign_counter));
        assert_eq!(x.state.counters, y.state.counters);
        assert_eq!(x.state.indices, y.state.indices);
        for ((n1, s1, v1), (n2, s2, v2)) in x.state.tensors.iter().zip(&y.state.tensors) {
            assert_eq!((n1, s1), (n2, s2));
            assert_eq!(bits(v1), bits(v2), "stream {} tensor {n1}", x.meta.name);
        }
    }
    assert_eq!(a.free, b.free);
    assert_eq!(a.next_seq, b.next_seq);
    assert_eq!(a.opened_streams, b.opened_streams);
    assert_eq!(a.evicted, b.evicted);
    assert_eq!(a.stats, b.stats);
}

async fn restored(dir: &Path, model: &str) -> (Arc<Engine>, ModelSnapshot) {
    let e = engine(dir);
    let names = e.restore().await.unwrap();
    assert_eq!(names, vec![model.to_owned()]);
    let s = e.snapshot(model).await.unwrap();
    (e, s)
}

/// The same sequential requests on two engines give bit-identical replies.
async fn same_future(a: &Engine, b: &Engine, model: &str, streams: usize, seed: u64) {
    let mut rng = Lcg(seed);
    for _ in 0..12 {
        let s = format!("s{}", rng.below(streams as u64));
        let x = input(&mut rng, 24);
        let mode = if rng.below(3) == 0 { Mode::Predict } else { Mode::Consume };
        let ra = a.tokens(model, &s, x.clone(), mode).await;
        let rb = b.tokens(model, &s, x, mode).await;
        assert_eq!(reply_bits(&ra), reply_bits(&rb));
    }
}

fn reply_bits(r: &Result<TokensReply, kfrtrl::engine::EngineError>) -> String {
    match r {
        Ok(r) => {
            let probs: Vec<(u32, u64)> = r.predictions.iter().map(|p| (p.token, p.prob.to_bits())).collect();
            let losses: Vec<Option<u64>> =
                r.losses_bits.iter().flatten().map(|l| l.map(f64::to_bits)).collect();
            format!(
                "{} {:?} {:?} {:?} {}",
                r.position,
                r.mean_loss_bits.map(f64::to_bits),
                losses,
                probs,
                r.learner_resets
            )
        }
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_alone_restores_a_model_bit_for_bit_for_every_learner() {
    for (i, learner) in
        [LearnerKind::KfRtrl, LearnerKind::Ok, LearnerKind::Uoro, LearnerKind::Tbptt, LearnerKind::Rtrl]
            .into_iter()
            .enumerate()
    {
        let dir = temp_dir(&format!("log-{i}"));
        let e = engine(&dir);
        e.create_model(definition("m", learner, 8)).await.unwrap();
        concurrent_traffic(&e, "m", 5, 12, i as u64).await;
        let before = e.snapshot("m").await.unwrap();
        assert!(before.optimizer.steps > 0, "{learner:?} learned");
        // Only the first checkpoint exists: everything since comes from the log.
        assert_eq!(checkpoint::list(&dir.join("models/m")).unwrap().len(), 1);
        let crash = temp_dir(&format!("log-{i}-crash"));
        copy_dir(&dir, &crash);
        let (r, after) = restored(&crash, "m").await;
        assert_same(&before, &after);
        same_future(&e, &r, "m", 5, 77).await;
        r.shutdown().await;
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_then_the_log_restore_bit_for_bit_and_old_segments_are_pruned() {
    let dir = temp_dir("ckpt");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    for round in 0..4 {
        concurrent_traffic(&e, "m", 4, 6, 10 + round).await;
        let info = e.checkpoint("m").await.unwrap();
        assert!(info.bytes > 0 && info.streams > 0);
    }
    concurrent_traffic(&e, "m", 4, 6, 20).await;
    let model_dir = dir.join("models/m");
    assert_eq!(checkpoint::list(&model_dir).unwrap().len(), 3, "keeps the newest 3");
    let oldest = checkpoint::list(&model_dir).unwrap()[0].0;
    for (first, _) in wal::segments(&model_dir).unwrap().iter().skip(1) {
        assert!(*first > oldest);
    }
    let before = e.snapshot("m").await.unwrap();
    let crash = temp_dir("ckpt-crash");
    copy_dir(&dir, &crash);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&before, &after);
    same_future(&e, &r, "m", 4, 5).await;

    // The newest checkpoint damaged: the previous one and the longer log give the same state.
    let crash2 = temp_dir("ckpt-crash2");
    copy_dir(&dir, &crash2);
    let newest = checkpoint::list(&crash2.join("models/m")).unwrap().pop().unwrap().1;
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&newest, bytes).unwrap();
    let now = e.snapshot("m").await.unwrap();
    let (r2, after2) = restored(&crash2, "m").await;
    assert_same(&now, &after2);
    r2.shutdown().await;
    r.shutdown().await;
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn taking_checkpoints_changes_nothing_the_model_does_next() {
    let (d1, d2) = (temp_dir("noop-a"), temp_dir("noop-b"));
    let (a, b) = (engine(&d1), engine(&d2));
    for e in [&a, &b] {
        e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    }
    let mut rng = Lcg(3);
    for i in 0..40 {
        let s = format!("s{}", rng.below(3));
        let x = input(&mut rng, 24);
        let ra = a.tokens("m", &s, x.clone(), Mode::Consume).await;
        let rb = b.tokens("m", &s, x, Mode::Consume).await;
        assert_eq!(reply_bits(&ra), reply_bits(&rb));
        if i % 7 == 0 {
            b.checkpoint("m").await.unwrap();
        }
    }
    assert_same(&a.snapshot("m").await.unwrap(), &b.snapshot("m").await.unwrap());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_last_record_is_dropped_and_the_state_is_the_one_before_it() {
    let dir = temp_dir("torn");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    concurrent_traffic(&e, "m", 3, 5, 1).await;
    let before = e.snapshot("m").await.unwrap();
    let image = temp_dir("torn-image");
    copy_dir(&dir, &image);
    let model_dir = image.join("models/m");
    let (_, segment) = wal::segments(&model_dir).unwrap().pop().unwrap();
    let logged = std::fs::metadata(&segment).unwrap().len();
    // One more step, then keep only part of its record: a write torn by the crash.
    let x = TokenInput { tokens: vec![5, 6, 7], learn: true, reset: false, top_k: 1, return_losses: false };
    e.tokens("m", "s0", x, Mode::Consume).await.unwrap();
    let (_, live_segment) = wal::segments(&dir.join("models/m")).unwrap().pop().unwrap();
    let full = std::fs::read(&live_segment).unwrap();
    assert!(full.len() as u64 > logged + 30);
    std::fs::write(&segment, &full[..logged as usize + 30]).unwrap();
    let (r, after) = restored(&image, "m").await;
    assert_same(&before, &after);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), logged, "the torn tail is truncated");
    r.shutdown().await;
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicted_streams_come_back_exactly_and_delete_forgets_them() {
    let (d1, d2) = (temp_dir("evict-a"), temp_dir("evict-b"));
    // Two resident slots for five streams: most requests evict one stream and load another.
    let small = engine(&d1);
    let large = engine(&d2);
    small.create_model(definition("m", LearnerKind::KfRtrl, 2)).await.unwrap();
    large.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let mut rng = Lcg(11);
    for _ in 0..60 {
        let s = format!("s{}", rng.below(5));
        let x = input(&mut rng, 24);
        let mode = if rng.below(4) == 0 { Mode::Predict } else { Mode::Consume };
        let ra = small.tokens("m", &s, x.clone(), mode).await;
        let rb = large.tokens("m", &s, x, mode).await;
        assert_eq!(reply_bits(&ra), reply_bits(&rb));
    }
    let snap = small.snapshot("m").await.unwrap();
    assert_eq!(snap.stream_slots.len(), 2);
    assert_eq!(snap.evicted.len(), 3);
    let listed = small.list_streams("m").await.unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed.iter().filter(|s| !s.resident).count(), 3);
    // Restored from the log, evictions and loads included.
    let crash = temp_dir("evict-crash");
    copy_dir(&d1, &crash);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&snap, &after);
    r.shutdown().await;
    // Deleting an evicted stream forgets it.
    let gone = snap.evicted.keys().next().unwrap().clone();
    small.delete_stream("m", &gone).await.unwrap();
    assert!(small.stream_info("m", &gone).await.is_err());
    let x = TokenInput { tokens: vec![1], learn: false, reset: false, top_k: 1, return_losses: false };
    assert_eq!(small.tokens("m", &gone, x, Mode::Consume).await.unwrap().position, 1, "a new stream");
    small.shutdown().await;
    large.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_injected_nonfinite_factor_never_reaches_the_weights() {
    let dir = temp_dir("fault");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 2, return_losses: false };
    for s in ["a", "b"] {
        e.tokens("m", s, x(vec![1, 2, 3]), Mode::Consume).await.unwrap();
    }
    e.shutdown().await;
    // Poison stream a's Kronecker factor in the checkpoint (the checksum is recomputed: this is
    // a fault in the state, not a damaged file).
    edit_newest_checkpoint(&dir.join("models/m"), |file| {
        let snap = checkpoint::from_model_file(file.clone()).unwrap();
        let row = snap.stream_slots.iter().position(|s| s.meta.name == "a").unwrap();
        let a = file.extra.iter_mut().find(|t| t.name == "streams.kf.a").unwrap();
        let per: usize = a.shape[1..].iter().product();
        a.data[row * per + 3] = f32::NAN;
    });

    let e = engine(&dir);
    e.restore().await.unwrap();
    let weights = e.snapshot("m").await.unwrap();
    // Streams a and b share one batched step.
    let hold = e.hold("m").unwrap();
    let pending_a = e.submit("m", "a", x(vec![4]), Mode::Consume).unwrap();
    let pending_b = e.submit("m", "b", x(vec![4]), Mode::Consume).unwrap();
    drop(hold);
    let (reply, reply_b) = (pending_a.wait().await.unwrap(), pending_b.wait().await.unwrap());
    assert_eq!(reply.learner_resets, 1, "the reply says the learner was reset");
    assert_eq!(reply_b.learner_resets, 0, "only the stream at fault is reset");
    let after = e.snapshot("m").await.unwrap();
    assert_eq!(after.params, weights.params, "the update was skipped");
    assert_eq!(after.optimizer.steps, weights.optimizer.steps);
    assert_eq!(after.stats.stream_faults, 1);
    assert_eq!(after.stats.nonfinite_updates, weights.stats.nonfinite_updates + 1);
    let info = e.stream_info("m", "a").await.unwrap();
    assert_eq!((info.learner_resets, info.position), (1, 4));
    assert_eq!(e.stream_info("m", "b").await.unwrap().learner_resets, 0);
    let b_before = weights.stream_slots.iter().find(|s| s.meta.name == "b").unwrap();
    let b_after = after.stream_slots.iter().find(|s| s.meta.name == "b").unwrap();
    assert_eq!(b_after.state.position, b_before.state.position + 1, "b advanced normally");
    // Stream b was untouched, and the model learns again at once.
    let reply = e.tokens("m", "a", x(vec![5, 6]), Mode::Consume).await.unwrap();
    assert_eq!(reply.learner_resets, 0);
    let later = e.snapshot("m").await.unwrap();
    assert_eq!(later.optimizer.steps, after.optimizer.steps + 2);
    assert!(later.params.w.iter().all(|w| w.is_finite()));
    e.shutdown().await;
}

/// Closing a TBPTT stream used to drop the losses its unfinished window had scored. They are now
/// applied as an update of their own at the close, which the log replays and a checkpoint taken
/// right after holds: both restore bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_a_tbptt_stream_applies_its_scored_window_and_restores_bit_for_bit() {
    let dir = temp_dir("tbptt-close");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::Tbptt, 4)).await.unwrap();
    // Three tokens in a window of 5: the first scores from the zero state (a readout-only update),
    // the next two are scored into the window, which is not yet full.
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 2, return_losses: false };
    e.tokens("m", "a", x(vec![1, 2, 3]), Mode::Consume).await.unwrap();
    e.tokens("m", "b", x(vec![4, 5]), Mode::Consume).await.unwrap();
    let before = e.snapshot("m").await.unwrap();
    e.delete_stream("m", "a").await.unwrap();
    let closed = e.snapshot("m").await.unwrap();
    assert_eq!(closed.optimizer.steps, before.optimizer.steps + 1, "the close applies the window");
    assert_eq!(closed.stats.optimizer_updates, before.stats.optimizer_updates + 1);
    assert_ne!(closed.params.w, before.params.w, "the recurrent weights learn from the window");
    let crash = temp_dir("tbptt-close-log");
    copy_dir(&dir, &crash);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&closed, &after);
    r.shutdown().await;
    // A checkpoint right after the close, then more traffic (a new stream under the old name).
    e.checkpoint("m").await.unwrap();
    e.tokens("m", "a", x(vec![6, 7]), Mode::Consume).await.unwrap();
    e.delete_stream("m", "b").await.unwrap();
    let now = e.snapshot("m").await.unwrap();
    let crash = temp_dir("tbptt-close-ckpt");
    copy_dir(&dir, &crash);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&now, &after);
    same_future(&e, &r, "m", 3, 9).await;
    r.shutdown().await;
    e.shutdown().await;
}

/// A stream's signs used to be keyed by its name alone from counter 0, so a stream closed and
/// reopened under the same name replayed exactly the same signs. Each open now mixes in the
/// model's count of opens: the same tokens on the same weights give different factors, and the
/// log and a checkpoint restore the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_reopened_under_its_name_draws_new_signs_and_restores_bit_for_bit() {
    let dir = temp_dir("reopen");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 4)).await.unwrap();
    // Predict-only tokens: the weights stay put, so only the signs can tell the sessions apart.
    let x = TokenInput {
        tokens: vec![3, 1, 4, 1, 5, 9, 2, 6],
        learn: false,
        reset: false,
        top_k: 1,
        return_losses: false,
    };
    let session = || async {
        e.tokens("m", "a", x.clone(), Mode::Consume).await.unwrap();
        let snap = e.snapshot("m").await.unwrap();
        e.delete_stream("m", "a").await.unwrap();
        let a = snap.stream_slots.into_iter().find(|s| s.meta.name == "a").unwrap();
        (snap.params, a.state)
    };
    let (w1, first) = session().await;
    let (w2, second) = session().await;
    assert_eq!(w1, w2, "nothing learned");
    assert_eq!((first.position, second.position), (8, 8));
    assert_eq!((first.sign_counter, second.sign_counter), (8, 8));
    assert_ne!(first.sign_key, second.sign_key, "a reopened stream must get a new sign key");
    let factors =
        |s: &kfrtrl::core::SlotState<f32>| s.tensor(kfrtrl::core::slot_state::names::KF_A).unwrap().to_vec();
    assert_ne!(factors(&first), factors(&second), "the second session replayed the first one's signs");
    assert_eq!(first.tensor("state"), second.tensor("state"), "same weights and tokens, same states");

    // Open it a third time, checkpoint, open a fourth: the log alone and the checkpoint + log
    // both restore the same keys.
    e.tokens("m", "a", x.clone(), Mode::Consume).await.unwrap();
    let crash = temp_dir("reopen-log");
    copy_dir(&dir, &crash);
    let live = e.snapshot("m").await.unwrap();
    assert_eq!(live.opened_streams, 3);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&live, &after);
    r.shutdown().await;
    e.checkpoint("m").await.unwrap();
    e.delete_stream("m", "a").await.unwrap();
    e.tokens("m", "a", x.clone(), Mode::Consume).await.unwrap();
    let live = e.snapshot("m").await.unwrap();
    let crash = temp_dir("reopen-ckpt");
    copy_dir(&dir, &crash);
    let (r, after) = restored(&crash, "m").await;
    assert_same(&live, &after);
    assert_eq!(after.opened_streams, 4);
    let keys = [first.sign_key, second.sign_key, live.stream_slots[0].state.sign_key];
    assert!(keys[2] != keys[0] && keys[2] != keys[1], "{keys:?}");
    same_future(&e, &r, "m", 2, 4).await;
    r.shutdown().await;
    e.shutdown().await;
}

/// Rewrites the newest checkpoint of a model (its checksum recomputed: a fault in the state,
/// not a damaged file).
fn edit_newest_checkpoint(model_dir: &Path, edit: impl FnOnce(&mut model_file::ModelFile)) {
    let (_, path) = checkpoint::list(model_dir).unwrap().pop().unwrap();
    let mut file = model_file::load(&path).unwrap();
    edit(&mut file);
    model_file::save(&path, &file).unwrap();
}
