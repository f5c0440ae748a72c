//! The engine's durability in operation: what a restore counts and keeps, models that cannot be
//! restored or whose log fails, periodic and final checkpoints, eviction and its limits.

use super::*;

/// The values of the samples of `metric` for `model` in a registry's text exposition.
fn samples(registry: &prometheus::Registry, metric: &str, model: &str) -> Vec<f64> {
    let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&format!("model=\"{model}\"")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Regression: replaying the log at boot counted the replayed steps again in the new process's
/// counters, and a restored model's checkpoint age restarted at the boot although the replayed
/// steps were in no checkpoint; and (issue 19.9) no checkpoint was taken after a replay, so the
/// boot time grew with every crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_counts_no_replayed_work_and_keeps_the_checkpoints_age() {
    let dir = temp_dir("restore-metrics");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let x = TokenInput { tokens: vec![1, 2, 3], learn: true, reset: false, top_k: 1, return_losses: false };
    e.tokens("m", "a", x, Mode::Consume).await.unwrap();
    // A crash: the first checkpoint and the log.
    let crash = temp_dir("restore-metrics-crash");
    copy_dir(&dir, &crash);
    e.shutdown().await;
    let (_, path) = checkpoint::list(&crash.join("models/m")).unwrap().pop().unwrap();
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();
    let written = written.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::register(&registry).unwrap();
    let r = Engine::with_durability(EngineLimits::default(), metrics, durability(&crash));
    r.restore().await.unwrap();
    assert_eq!(r.model("m").unwrap().stats.symbols_seen, 3, "the replay restored the steps");
    assert_eq!(samples(&registry, "kfrtrl_symbols_total", "m").iter().sum::<f64>(), 0.0, "but counts none");
    assert_eq!(samples(&registry, "kfrtrl_optimizer_updates_total", "m"), [0.0]);
    assert_eq!(samples(&registry, "kfrtrl_active_streams", "m"), [1.0]);
    assert!(samples(&registry, "kfrtrl_loss_bits_avg", "m")[0] > 0.0);
    // The replayed steps went into a checkpoint written right after the replay (issue 19.9: the
    // log's replay grew with every crash): the age is that checkpoint's, and the next boot
    // replays nothing.
    let (seq, newest) = checkpoint::list(&crash.join("models/m")).unwrap().pop().unwrap();
    assert_ne!(newest, path, "a checkpoint after the replay");
    assert_eq!(seq, r.snapshot("m").await.unwrap().next_seq, "it covers the whole log");
    let newest = std::fs::metadata(&newest).unwrap().modified().unwrap();
    let newest = newest.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(newest > written);
    let age = samples(&registry, "kfrtrl_checkpoint_last_success_timestamp_seconds", "m");
    // Taken when the write succeeded, a moment after the file's time.
    assert!((0.0..1.0).contains(&(age[0] - newest)), "{age:?} against {newest}");
    r.shutdown().await;
}

/// Regression: restoring stopped at the first model that could not be loaded, and the server
/// then refused to start, although the others were fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_that_cannot_be_restored_is_skipped_and_the_others_serve() {
    let dir = temp_dir("restore-skip");
    let e = engine(&dir);
    let big = ModelDefinition { hidden: 48, ..definition("big", LearnerKind::KfRtrl, 8) };
    let small = definition("small", LearnerKind::KfRtrl, 8);
    let bytes = |d: &ModelDefinition| {
        let spec = e.check_definition(d).unwrap();
        kfrtrl::engine::estimate_model_bytes(&spec, d.max_streams + 1)
    };
    let (big_bytes, small_bytes) = (bytes(&big), bytes(&small));
    assert!(small_bytes < big_bytes);
    for def in [big, small] {
        e.create_model(def).await.unwrap();
    }
    let x = TokenInput { tokens: vec![1, 2], learn: true, reset: false, top_k: 1, return_losses: false };
    e.tokens("small", "s", x.clone(), Mode::Consume).await.unwrap();
    let before = e.snapshot("small").await.unwrap();
    e.shutdown().await;
    // Restarted with a size limit the big model no longer fits ("big" sorts first).
    let limits = EngineLimits { max_model_bytes: small_bytes as u64, ..EngineLimits::default() };
    let registry = prometheus::Registry::new();
    let r = Engine::with_durability(limits, EngineMetrics::register(&registry).unwrap(), durability(&dir));
    assert_eq!(r.restore().await.unwrap(), vec!["small".to_owned()]);
    let flagged = |model| samples(&registry, "kfrtrl_model_not_restored", model);
    assert_eq!((flagged("big"), flagged("small")), (vec![1.0], vec![]), "for the alert");
    assert_same(&before, &r.snapshot("small").await.unwrap());
    assert_eq!(r.tokens("small", "s", x, Mode::Consume).await.unwrap().position, 4);
    // The skipped model's directory is kept, and its name is not given away.
    assert!(!checkpoint::list(&dir.join("models/big")).unwrap().is_empty());
    let taken = r.create_model(definition("big", LearnerKind::KfRtrl, 8)).await;
    assert!(matches!(taken, Err(EngineError::Storage(_))), "{taken:?}");
    r.shutdown().await;
}

/// Regression: after its write-ahead log failed (a full disk), a model went on stepping the
/// requests it answered with a storage failure, and a later checkpoint saved their effects, so
/// a client's retry was learned twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_log_failure_the_model_refuses_changes_and_the_disk_keeps_what_was_acknowledged() {
    let dir = temp_dir("wal-fails");
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::register(&registry).unwrap();
    let e = Engine::with_durability(EngineLimits::default(), metrics, durability(&dir));
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 2, return_losses: false };
    e.tokens("m", "a", x(vec![1, 2, 3]), Mode::Consume).await.unwrap();
    e.tokens("m", "b", x(vec![1]), Mode::Consume).await.unwrap();
    let acknowledged = e.snapshot("m").await.unwrap();
    // Every segment the next checkpoint could start is a device that refuses every write.
    assert!(Path::new("/dev/full").exists(), "this test needs the device /dev/full");
    let model_dir = dir.join("models/m");
    let segments: Vec<_> = (acknowledged.next_seq..acknowledged.next_seq + 64)
        .map(|seq| model_dir.join(wal::segment_name(seq)))
        .collect();
    for segment in &segments {
        std::os::unix::fs::symlink("/dev/full", segment).unwrap();
    }
    // Requests in flight around the failing rotation: those answered Ok must survive, those
    // answered with the error must not (the rotation syncs what came before it).
    let in_flight: Vec<_> =
        (0..3).map(|_| e.submit("m", "c", x(vec![7, 8]), Mode::Consume).unwrap()).collect();
    // The checkpoint itself may or may not be written, depending on when the rotation fails.
    let _ = e.checkpoint("m").await;
    let mut acknowledged_c = 0;
    for pending in in_flight {
        if let Ok(reply) = pending.wait().await {
            acknowledged_c = reply.position;
        }
    }
    let failed = e.tokens("m", "a", x(vec![4, 5]), Mode::Consume).await;
    assert!(matches!(failed, Err(EngineError::Storage(_))), "{failed:?}");
    assert_eq!(e.model("m").unwrap().state, ModelState::Failed);
    assert_eq!(e.failed_models().len(), 1);
    let position = e.stream_info("m", "a").await.unwrap().position;
    // From now on nothing changes: refused at once, or failed by the worker without a step.
    for _ in 0..3 {
        let refused = e.submit("m", "a", x(vec![6]), Mode::Consume);
        assert!(matches!(refused, Err(EngineError::Storage(ref r)) if r.contains("restart")), "{refused:?}");
    }
    assert!(matches!(e.delete_stream("m", "b").await, Err(EngineError::Storage(_))));
    assert!(matches!(e.checkpoint("m").await, Err(EngineError::Storage(_))));
    let info = e.stream_info("m", "a").await.unwrap();
    assert_eq!(info.position, position, "reads still work and show no change");
    assert_eq!(samples(&registry, "kfrtrl_wal_failures_total", "m"), [1.0]);
    let newest_before = checkpoint::list(&model_dir).unwrap().last().unwrap().0;
    e.shutdown().await;
    assert_eq!(
        checkpoint::list(&model_dir).unwrap().last().unwrap().0,
        newest_before,
        "no final checkpoint of a model whose memory holds unlogged steps"
    );
    // The disk is freed and the server restarts: it holds exactly what was acknowledged.
    for segment in &segments {
        std::fs::remove_file(segment).unwrap();
    }
    let (r, after) = restored(&dir, "m").await;
    let position =
        |name: &str| after.stream_slots.iter().find(|s| s.meta.name == name).map(|s| s.meta.position);
    assert_eq!((position("a"), position("b")), (Some(3), Some(1)));
    // Stream c holds its acknowledged tokens, and of the first request answered with the error
    // at most a part (never all of it: its reply waits for its last token's record).
    let c = position("c").unwrap_or(0);
    assert!((acknowledged_c..acknowledged_c + 2).contains(&c), "c at {c}, {acknowledged_c} acknowledged");
    assert_eq!(after.optimizer.steps, acknowledged.optimizer.steps + c, "one step per token of c");
    assert_eq!(r.model("m").unwrap().state, ModelState::Ready);
    assert_eq!(r.tokens("m", "a", x(vec![4]), Mode::Consume).await.unwrap().position, 4);
    r.shutdown().await;
}

/// Regression: a stream whose cell state was not finite scored a NaN loss, which went into its
/// loss sum and averages; JSON has no NaN, so every later checkpoint was refused at boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nonfinite_cell_state_restarts_the_stream_and_later_checkpoints_still_load() {
    let dir = temp_dir("fault-state");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 2, return_losses: false };
    e.tokens("m", "a", x(vec![1, 2, 3]), Mode::Consume).await.unwrap();
    e.shutdown().await;
    edit_newest_checkpoint(&dir.join("models/m"), |file| {
        let state = file.extra.iter_mut().find(|t| t.name == "streams.state").unwrap();
        state.data[0] = f32::NAN;
    });

    let e = engine(&dir);
    e.restore().await.unwrap();
    let with_losses = TokenInput { return_losses: true, ..x(vec![4, 7]) };
    let reply = e.tokens("m", "a", with_losses, Mode::Consume).await.unwrap();
    assert_eq!(reply.learner_resets, 1);
    // Regression: the reply's mean took the NaN in and went out as `null` where the contract
    // promised a number. The faulted token's loss is null and the mean is over the others.
    let losses = reply.losses_bits.clone().unwrap();
    assert!(losses[0].is_none() && losses[1].is_some_and(f64::is_finite), "{losses:?}");
    assert_eq!(reply.mean_loss_bits, losses[1]);
    let info = e.stream_info("m", "a").await.unwrap();
    assert_eq!((info.position, info.sequence_position), (5, 2), "restarted: a new sequence from token 4");
    assert!(info.mean_loss_bits.is_some_and(f64::is_finite), "{info:?}");
    assert!(info.loss_bits_avg.is_some_and(f64::is_finite), "{info:?}");
    assert!(e.model("m").unwrap().stats.loss_bits_avg.is_some_and(f64::is_finite));
    let written = e.checkpoint("m").await.unwrap();
    let reloaded = checkpoint::from_model_file(model_file::load(Path::new(&written.path)).unwrap());
    assert!(reloaded.is_ok(), "the checkpoint after the fault loads: {:?}", reloaded.err());
    // The stream learns normally afterwards.
    let reply = e.tokens("m", "a", x(vec![5, 6]), Mode::Consume).await.unwrap();
    assert_eq!(reply.learner_resets, 0);
    assert!(reply.mean_loss_bits.is_some_and(f64::is_finite));
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_writes_a_final_checkpoint_and_a_deleted_model_leaves_nothing() {
    let dir = temp_dir("final");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    e.create_model(definition("gone", LearnerKind::KfRtrl, 8)).await.unwrap();
    concurrent_traffic(&e, "m", 3, 4, 9).await;
    let before = e.snapshot("m").await.unwrap();
    e.delete_model("gone").await.unwrap();
    e.shutdown().await;
    let newest = checkpoint::list(&dir.join("models/m")).unwrap().pop().unwrap().0;
    assert_eq!(newest, before.next_seq, "the final checkpoint covers everything");
    // Wait for the background removal of the deleted model's directory.
    for _ in 0..100 {
        if !dir.join("models/gone").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (r, after) = restored(&dir, "m").await;
    assert_same(&before, &after);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_streams_are_evicted_after_the_ttl_and_a_stream_cap_bounds_them_all() {
    let dir = temp_dir("dur-ttl");
    let d = Durability { stream_idle_ttl: Some(std::time::Duration::from_millis(100)), ..durability(&dir) };
    let e = engine_with(d, EngineLimits { max_stored_streams: 3, ..EngineLimits::default() });
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 1, return_losses: false };
    e.tokens("m", "idle", x(vec![1, 2]), Mode::Consume).await.unwrap();
    assert!(e.stream_info("m", "idle").await.unwrap().resident);
    let mut evicted = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if !e.stream_info("m", "idle").await.unwrap().resident {
            evicted = true;
            break;
        }
    }
    assert!(evicted, "the idle stream was evicted after its TTL");
    assert_eq!(e.snapshot("m").await.unwrap().evicted.len(), 1);
    let reply = e.tokens("m", "idle", x(vec![3]), Mode::Consume).await.unwrap();
    assert_eq!(reply.position, 3, "loaded back where it was");
    // Three streams at most, resident or evicted.
    e.tokens("m", "b", x(vec![1]), Mode::Consume).await.unwrap();
    e.tokens("m", "c", x(vec![1]), Mode::Consume).await.unwrap();
    let refused = e.tokens("m", "d", x(vec![1]), Mode::Consume).await;
    assert!(matches!(refused, Err(kfrtrl::engine::EngineError::StreamLimit { limit: 3, .. })), "{refused:?}");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_checkpoints_follow_changes_and_boot_ignores_temporary_files() {
    let dir = temp_dir("dur-periodic");
    let d =
        Durability { checkpoint_interval: Some(std::time::Duration::from_millis(100)), ..durability(&dir) };
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::register(&registry).unwrap();
    let e = Arc::new(Engine::with_durability(EngineLimits::default(), metrics, d));
    e.create_model(definition("m", LearnerKind::KfRtrl, 8)).await.unwrap();
    tokio::spawn(e.clone().run_checkpoints());
    concurrent_traffic(&e, "m", 3, 4, 4).await;
    let before = e.snapshot("m").await.unwrap();
    let model_dir = dir.join("models/m");
    let mut covered = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if checkpoint::list(&model_dir).unwrap().last().is_some_and(|(seq, _)| *seq == before.next_seq) {
            covered = true;
            break;
        }
    }
    assert!(covered, "a periodic checkpoint covers the traffic");
    // Nothing changed: no checkpoint is written again (not even over the same file).
    let written = || {
        checkpoint::list(&model_dir)
            .unwrap()
            .into_iter()
            .map(|(seq, path)| (seq, std::fs::metadata(path).unwrap().modified().unwrap()))
            .collect::<Vec<_>>()
    };
    let files = written();
    let checkpointed_at = || samples(&registry, "kfrtrl_checkpoint_last_success_timestamp_seconds", "m")[0];
    let confirmed = checkpointed_at();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(written(), files);
    // Regression: an idle model's checkpoint age grew without bound and tripped the stale
    // checkpoint alert; each periodic check that finds it current now confirms it.
    assert!(checkpointed_at() > confirmed, "an unchanged model counts as checkpointed at each check");
    // A crash in the middle of a write leaves a temporary file: boot ignores it.
    let image = temp_dir("dur-periodic-image");
    copy_dir(&dir, &image);
    std::fs::write(image.join("models/m/.checkpoint-99999999999999999999.safetensors.tmp-1-0"), b"half")
        .unwrap();
    let (r, after) = restored(&image, "m").await;
    assert_same(&before, &after);
    r.shutdown().await;
    e.shutdown().await;
}

/// Regression (issue 19.7): more new streams at once than the model has slots got 409
/// `stream-limit` ("delete a stream first") although eviction could make room a moment later.
/// Now the excess gets the retryable `SlotsBusy` (HTTP 503 `slots-busy` with Retry-After), and
/// the same requests succeed when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_new_streams_at_once_than_slots_get_a_retryable_slots_busy_not_a_stream_limit() {
    let dir = temp_dir("slots-busy");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 2)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 1, return_losses: false };
    let hold = e.hold("m").unwrap();
    let pending: Vec<_> =
        (0..5).map(|s| e.submit("m", &format!("s{s}"), x(vec![1, 2, 3]), Mode::Consume).unwrap()).collect();
    drop(hold);
    let mut busy = Vec::new();
    for (s, p) in pending.into_iter().enumerate() {
        match p.wait().await {
            Ok(reply) => assert_eq!(reply.position, 3),
            Err(EngineError::SlotsBusy { limit: 2, .. }) => busy.push(s),
            Err(other) => panic!("s{s}: {other:?}"),
        }
    }
    assert_eq!(busy, [2, 3, 4], "two slots, two streams placed, the rest busy");
    for s in busy {
        let reply = e.tokens("m", &format!("s{s}"), x(vec![1, 2, 3]), Mode::Consume).await.unwrap();
        assert_eq!(reply.position, 3, "s{s} succeeds when retried (an idle stream is moved to disk)");
    }
    assert_eq!(e.list_streams("m").await.unwrap().len(), 5);
    e.shutdown().await;
}

/// Regression (issue 19.8): a failed eviction write (a full disk) was answered 409
/// `stream-limit` while `/readyz` stayed 200. It is a storage failure: the request gets
/// `Storage` (503), the model refuses changes like after a failed log write, and a restart
/// holds every acknowledged token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_eviction_write_is_a_storage_failure_not_a_stream_limit() {
    let dir = temp_dir("evict-fails");
    let e = engine(&dir);
    e.create_model(definition("m", LearnerKind::KfRtrl, 2)).await.unwrap();
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 1, return_losses: false };
    e.tokens("m", "a", x(vec![1, 2]), Mode::Consume).await.unwrap();
    e.tokens("m", "b", x(vec![3]), Mode::Consume).await.unwrap();
    // Where evicted streams go, a file that is not a directory: every stream write fails.
    let streams = dir.join("models/m/streams");
    assert!(!streams.exists());
    std::fs::write(&streams, b"not a directory").unwrap();
    let refused = e.tokens("m", "c", x(vec![4]), Mode::Consume).await;
    assert!(matches!(refused, Err(EngineError::Storage(ref r)) if r.contains("evict")), "{refused:?}");
    assert_eq!(e.model("m").unwrap().state, ModelState::Failed);
    assert_eq!(e.failed_models().len(), 1, "not ready");
    let refused = e.submit("m", "a", x(vec![5]), Mode::Consume);
    assert!(matches!(refused, Err(EngineError::Storage(_))), "{refused:?}");
    e.shutdown().await;
    std::fs::remove_file(&streams).unwrap();
    let (r, after) = restored(&dir, "m").await;
    let position =
        |name: &str| after.stream_slots.iter().find(|s| s.meta.name == name).map(|s| s.meta.position);
    assert_eq!((position("a"), position("b"), position("c")), (Some(2), Some(1), None));
    r.shutdown().await;
}

/// Regression (issue 19.5): one client could fill the disk through eviction (133,784 bytes per
/// evicted stream, 100,000 stored streams per model allowed, about 1,000 new streams a second).
/// Now the evicted streams of all models share a disk budget: a new stream that would need one
/// more stream moved to disk past it gets `DiskBudget` (HTTP 507), forgetting streams makes
/// room, and a deleted model gives its share back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_streams_past_the_disk_budget_of_evicted_streams_are_refused() {
    let x = |t: Vec<u32>| TokenInput { tokens: t, learn: true, reset: false, top_k: 1, return_losses: false };
    // The estimated file of one evicted stream, measured on an engine without a real budget.
    let probe_dir = temp_dir("disk-budget-probe");
    let probe = engine(&probe_dir);
    probe.create_model(definition("m", LearnerKind::KfRtrl, 1)).await.unwrap();
    probe.tokens("m", "a", x(vec![1]), Mode::Consume).await.unwrap();
    probe.tokens("m", "b", x(vec![1]), Mode::Consume).await.unwrap();
    let per_stream = probe.evicted_bytes().used();
    assert!(per_stream > 1000, "one stream evicted: {per_stream}");
    probe.delete_model("m").await.unwrap();
    // Once its worker has stopped (in the background).
    for _ in 0..200 {
        if probe.evicted_bytes().used() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(probe.evicted_bytes().used(), 0, "a deleted model gives its share back");
    probe.shutdown().await;

    let dir = temp_dir("disk-budget");
    let limits =
        EngineLimits { max_evicted_bytes: 2 * per_stream + per_stream / 2, ..EngineLimits::default() };
    let e = engine_with(durability(&dir), limits);
    e.create_model(definition("m", LearnerKind::KfRtrl, 1)).await.unwrap();
    for s in ["a", "b", "c"] {
        e.tokens("m", s, x(vec![1, 2]), Mode::Consume).await.unwrap();
    }
    assert_eq!(e.evicted_bytes().used(), 2 * per_stream, "a and b on disk");
    let refused = e.tokens("m", "d", x(vec![1]), Mode::Consume).await;
    assert!(matches!(refused, Err(EngineError::DiskBudget { .. })), "{refused:?}");
    // An evicted stream still comes back (one in, one out), and a forgotten one makes room.
    assert_eq!(e.tokens("m", "a", x(vec![3]), Mode::Consume).await.unwrap().position, 3);
    e.delete_stream("m", "b").await.unwrap();
    assert_eq!(e.tokens("m", "d", x(vec![1]), Mode::Consume).await.unwrap().position, 1);
    assert_eq!(e.list_streams("m").await.unwrap().len(), 3);
    e.shutdown().await;
}
