//! The per-token loop allocates nothing: after a warm-up, batched steps of every learner and
//! cell run with zero heap allocations of our own (counted by a global allocator wrapper). The
//! GEMM backend's per-call packing buffers are counted separately and only bounded: the `gemm`
//! crate allocates them on every call by design.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kfrtrl::core::{
    CellKind, LearnerKind, ModelConfig, Optimizer, OptimizerKind, Params, SlotStep, StreamSet,
};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static BACKEND_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        if kfrtrl::core::linalg::in_gemm_backend() {
            BACKEND_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        } else {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_steps_allocate_nothing() {
    // Steps run on a pool thread, as in `train`, `bench` and the engine's workers: rayon's
    // injector (used by calls from outside the pool) allocates a block every few dozen jobs.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        every_pool_thread_has_stolen_a_job();
        steady_state_steps_allocate_nothing_in_pool();
    });
}

/// A pool thread's first steal registers it with the work-stealing deque's epoch collector, two
/// allocations made once per thread for the life of the pool. On a busy machine the second
/// thread could make its first steal only during the measured steps of the first case that
/// forks (KF-RTRL, n = 16, B = 24), which failed the test though no step allocates (seen with
/// a training run beside the tests). Here the second thread must steal: the first spins until
/// the job it forked has run elsewhere.
fn every_pool_thread_has_stolen_a_job() {
    let ran_elsewhere = AtomicBool::new(false);
    let started = std::time::Instant::now();
    rayon::join(
        || {
            while !ran_elsewhere.load(Ordering::Acquire) && started.elapsed().as_secs() < 30 {
                std::hint::spin_loop();
            }
        },
        || ran_elsewhere.store(true, Ordering::Release),
    );
    assert!(ran_elsewhere.load(Ordering::Acquire), "the pool's second thread never stole the job");
}

fn steady_state_steps_allocate_nothing_in_pool() {
    // One test function, so that no other test's allocations are counted.
    let learners = [
        LearnerKind::KfRtrl,
        LearnerKind::Ok,
        LearnerKind::Uoro,
        LearnerKind::Rtrl,
        LearnerKind::Tbptt,
        LearnerKind::Frozen,
    ];
    let mut report = Vec::new();
    for cell in CellKind::ALL {
        for learner in learners {
            // (16, 24): enough window entries (24 × 3) for TBPTT to split its rows over the pool;
            // (8, 200): windows flushed in two chunks side by side.
            for (hidden, batch) in [(4, 1), (8, 5), (16, 24), (128, 3), (8, 200)] {
                if learner == LearnerKind::Rtrl && hidden > 8 {
                    continue;
                }
                let spec = ModelConfig {
                    vocab_size: 11,
                    cell,
                    hidden,
                    learner,
                    tbptt_window: 3,
                    ok_rank: 3,
                    optimizer: OptimizerKind::Adam,
                    ..ModelConfig::default()
                }
                .check()
                .unwrap();
                let mut params = Params::<f32>::init(&spec);
                let mut opt = Optimizer::new(&spec);
                let mut set = StreamSet::<f32>::new(&spec, batch);
                let mut losses = vec![0.0; batch];
                let mut inputs: Vec<SlotStep> = (0..batch).map(|b| SlotStep::learn(b, 0)).collect();
                let mut run = |steps: usize, from: usize| {
                    for t in from..from + steps {
                        for (b, x) in inputs.iter_mut().enumerate() {
                            x.token = ((t * 7 + b * 3) % 11) as u32;
                            x.reset = t % 17 == 16 && b == 0;
                            x.learn = t % 5 != 3;
                        }
                        // Every other step leaves the last slot idle.
                        let n = if t % 2 == 0 { batch } else { batch.max(2) - 1 };
                        set.step(&mut params, &mut opt, &inputs[..n], &mut losses).unwrap();
                    }
                };
                run(10, 0);
                ALLOCATIONS.store(0, Ordering::Relaxed);
                BACKEND_ALLOCATIONS.store(0, Ordering::Relaxed);
                COUNTING.store(true, Ordering::Relaxed);
                run(40, 10);
                COUNTING.store(false, Ordering::Relaxed);
                let backend = BACKEND_ALLOCATIONS.load(Ordering::Relaxed);
                // At most a few packing buffers per GEMM call, a handful of calls per step.
                assert!(
                    backend <= 40 * (8 + 2 * batch),
                    "{cell} {learner} n={hidden}: {backend} backend allocations"
                );
                report.push((cell, learner, hidden, batch, ALLOCATIONS.load(Ordering::Relaxed)));
            }
        }
    }
    let bad: Vec<_> = report.iter().filter(|r| r.4 > 0).collect();
    assert!(bad.is_empty(), "allocations in steady-state steps (cell, learner, n, B, count): {bad:?}");
}
