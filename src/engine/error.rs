//! Why the engine refused or failed a call: every variant is a client-visible outcome, which the
//! API maps to one problem type.

/// Why the engine refused or failed a call. Every variant is a client-visible outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// No model by that name.
    #[error("model `{0}` does not exist")]
    UnknownModel(String),
    /// No stream by that name in the model.
    #[error("stream `{stream}` of model `{model}` does not exist")]
    UnknownStream {
        /// The model.
        model: String,
        /// The stream.
        stream: String,
    },
    /// A model by that name exists already.
    #[error("model `{0}` exists already")]
    DuplicateModel(String),
    /// The server holds its maximum number of models.
    #[error("the server holds its maximum of {0} models; delete one first")]
    ModelLimit(usize),
    /// A model or stream name does not match the naming rule.
    #[error("invalid {what} name `{name}`: names match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$")]
    InvalidName {
        /// `model` or `stream`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// A model definition was refused.
    #[error("invalid model config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A request without tokens.
    #[error("the request has no tokens")]
    EmptyInput,
    /// A token outside the model's vocabulary.
    #[error("token {token} at index {index} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange {
        /// Position in the request.
        index: usize,
        /// The token.
        token: i64,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A request with too many tokens.
    #[error("the request has {count} tokens; the limit is {limit}")]
    TooManyTokens {
        /// Tokens in the request.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The model's queue is full; the client should retry later.
    #[error("the queue of model `{0}` is full; retry later")]
    QueueFull(String),
    /// The stream's share of its model's queue is full; the client should retry later.
    #[error(
        "stream `{stream}` of model `{model}` would have more than {limit} {unit} queued; \
         retry once its queued requests are answered"
    )]
    StreamQueueFull {
        /// The model.
        model: String,
        /// The stream.
        stream: String,
        /// What the share counts: `"requests"` or `"tokens"`.
        unit: &'static str,
        /// How many of them a stream may have queued.
        limit: usize,
    },
    /// The model holds its maximum number of streams.
    #[error("model `{model}` holds its maximum of {limit} streams; delete a stream first")]
    StreamLimit {
        /// The model.
        model: String,
        /// Its stream limit.
        limit: usize,
    },
    /// A new stream would need one more stream moved to disk past the server's budget for
    /// evicted streams.
    #[error(
        "a new stream of model `{model}` needs an idle stream moved to disk, but the evicted streams \
         of the server fill their budget of {budget} MiB: delete streams or retry later"
    )]
    DiskBudget {
        /// The model.
        model: String,
        /// The budget, MiB.
        budget: u64,
    },
    /// The model would take the server's models past their memory budget.
    #[error(
        "model `{model}` would need about {requested} MiB; the server's models hold {used} MiB of \
         a budget of {budget} MiB: delete a model, or lower hidden or max_streams"
    )]
    MemoryBudget {
        /// The model refused.
        model: String,
        /// Its estimated memory, MiB.
        requested: u64,
        /// The estimated memory of the models already loaded, MiB.
        used: u64,
        /// The budget, MiB.
        budget: u64,
    },
    /// Every slot of the model holds a stream with work queued in this very step, so none can
    /// be evicted to make room for a new one; retry once some finish.
    #[error(
        "all {limit} stream slots of model `{model}` are busy with queued work; retry shortly \
         (idle streams are moved to disk to make room)"
    )]
    SlotsBusy {
        /// The model.
        model: String,
        /// Its resident stream slots.
        limit: usize,
    },
    /// The model is frozen for a move: no change until it is thawed (or deleted once moved).
    #[error("model `{0}` is frozen while it moves to another server; retry shortly")]
    Frozen(String),
    /// An imported snapshot does not fit this server or is inconsistent (its file was valid).
    #[error("the snapshot cannot be imported: {0}")]
    InvalidSnapshot(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model's durable storage failed (the write-ahead log, a checkpoint or a stream file):
    /// the request's effect is not durable.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The engine runs without a data directory: nothing to checkpoint.
    #[error("the server runs without a data directory; checkpoints are disabled")]
    NotDurable,
    /// The model's worker stopped unexpectedly (a bug): the request was not completed.
    #[error("the worker of model `{0}` stopped")]
    WorkerStopped(String),
}

impl EngineError {
    pub(super) fn invalid_config(field: &str, reason: impl Into<String>) -> Self {
        EngineError::InvalidConfig { field: field.to_owned(), reason: reason.into() }
    }
}
