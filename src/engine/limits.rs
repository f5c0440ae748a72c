//! The engine's limits: queues, per-request and per-model caps, and the server-wide memory and
//! disk budgets.

/// Limits that bound the engine's memory and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLimits {
    /// Token requests queued per model (waiting or in progress) before new ones are refused.
    pub queue_requests: usize,
    /// Tokens queued per model before new requests are refused.
    pub queue_tokens: usize,
    /// Token requests queued per stream before new ones to it are refused. A stream consumes
    /// one token per step, so without a share one client pipelining into one stream could keep
    /// the model's whole queue full and every other stream refused.
    pub queue_requests_per_stream: usize,
    /// Tokens queued per stream before new requests to it are refused.
    pub queue_tokens_per_stream: usize,
    /// Most tokens in one request.
    pub max_tokens_per_request: usize,
    /// Most models in the server.
    pub max_models: usize,
    /// Largest estimated memory of one model (weights, optimizer, all stream slots), in bytes.
    pub max_model_bytes: u64,
    /// Largest estimated memory of all models together, in bytes: a model that would take the
    /// server past it is refused at creation ([`EngineError::MemoryBudget`]).
    pub max_total_model_bytes: u64,
    /// Streams per model when a definition does not say (resident at once; more are evicted).
    pub default_max_streams: usize,
    /// Streams per model, resident and evicted together (durable engines evict idle streams to
    /// disk; this bounds the disk and the bookkeeping).
    pub max_stored_streams: usize,
    /// Threads of each model's pool, the worker's own included: the most cores one model's step
    /// uses at once.
    pub model_threads: usize,
    /// Disk that the evicted streams of all models may take together, in bytes (estimated per
    /// stream file; see [`EvictedBytes`]).
    pub max_evicted_bytes: u64,
}

/// A stream's default share of a model's queue of `queue` requests or tokens: a quarter of it,
/// never below `floor` (one request, or the largest one).
pub fn stream_share(queue: usize, floor: usize) -> usize {
    (queue / 4).max(floor)
}

/// Three quarters of the machine's memory (`MemTotal` of `/proc/meminfo`, or of a cgroup limit
/// below it), or 16 GiB where neither can be read: what the models may take together, leaving
/// the rest to queues, replies, the page cache and the system.
pub fn default_memory_budget() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let cgroup =
        std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|t| t.trim().parse::<u64>().ok());
    let total = match (meminfo, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) => m,
        (None, Some(c)) => c,
        (None, None) => 16 << 30,
    };
    total / 4 * 3
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            queue_requests: 4096,
            queue_tokens: 1 << 20,
            queue_requests_per_stream: stream_share(4096, 1),
            queue_tokens_per_stream: stream_share(1 << 20, 65_536),
            max_tokens_per_request: 65_536,
            max_models: 16,
            max_model_bytes: 4 << 30,
            max_total_model_bytes: default_memory_budget(),
            default_max_streams: 256,
            max_stored_streams: 100_000,
            model_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_evicted_bytes: 8 << 30,
        }
    }
}
