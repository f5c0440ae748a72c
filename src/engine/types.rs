//! The values the engine takes and returns: token requests, replies with their predictions, and
//! the live statistics of streams and models.

use super::*;

/// Whether a token request changes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The stream consumes the tokens (and the model learns from them if asked).
    Consume,
    /// The tokens are evaluated on a copy of the stream's state; nothing changes.
    Predict,
}

/// A validated token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInput {
    /// Tokens, each inside the vocabulary; at least one.
    pub tokens: Vec<u32>,
    /// Whether the tokens train the weights.
    pub learn: bool,
    /// Whether the stream starts a new sequence before the first token.
    pub reset: bool,
    /// Number of next-token predictions in the reply (capped at the vocabulary size).
    pub top_k: usize,
    /// Whether the reply lists every token's loss.
    pub return_losses: bool,
}

/// One next-token prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The token.
    pub token: u32,
    /// Its probability.
    pub prob: f64,
    /// For byte-level models, the byte as text: printable ASCII as itself, any other byte
    /// escaped (`\n`, `\t`, `\r`, `\x00` … `\xff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The reply to a token request (the wire's tokens reply).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokensReply {
    /// The model.
    pub model: String,
    /// The stream.
    pub stream: String,
    /// Tokens the stream has consumed since it was created (unchanged by `/predict`).
    pub position: u64,
    /// Tokens of this request.
    pub consumed: usize,
    /// Mean loss of this request's tokens, in bits, each scored before learning from it; tokens
    /// whose loss was not finite (see `learner_resets`) are left out, and when that is every
    /// token it is `None` (`null` on the wire).
    pub mean_loss_bits: Option<f64>,
    /// Every token's loss in bits, when asked; `None` (`null`) for a loss that was not finite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub losses_bits: Option<Vec<Option<f64>>>,
    /// Times during this request that a non-finite loss, gradient or learner factor was met: the
    /// weight update of that step was skipped and the stream's learner state reset (its
    /// hidden state and position are kept). Omitted when zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub learner_resets: u32,
    /// The most likely next tokens, most likely first.
    pub predictions: Vec<Prediction>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// Live statistics of one stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamInfo {
    /// The model.
    pub model: String,
    /// The stream.
    pub stream: String,
    /// Tokens consumed since the stream was created.
    pub position: u64,
    /// Tokens consumed since the stream's last reset.
    pub sequence_position: u64,
    /// Tokens that trained the weights.
    pub symbols_learned: u64,
    /// Mean loss in bits over every token the stream consumed (null before the first).
    pub mean_loss_bits: Option<f64>,
    /// Moving average of the loss in bits over about the last 100 tokens (null before the first).
    pub loss_bits_avg: Option<f64>,
    /// Times its learner state was reset after a non-finite value.
    pub learner_resets: u64,
    /// Tokens queued for the stream.
    pub queued_tokens: usize,
    /// Seconds since the stream last consumed a token or was created (0 when evicted).
    pub idle_seconds: f64,
    /// Whether its state is in memory (false: evicted to disk, loaded back on its next request).
    pub resident: bool,
}

/// Whether a model can serve yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Its worker is allocating the weights and stream slots; requests queue meanwhile.
    Loading,
    /// Serving.
    Ready,
    /// Frozen for a move (`POST /v1/models/{model}/freeze`): reads work, every change gets 503
    /// `model-frozen` until it is thawed or deleted.
    Frozen,
    /// Its write-ahead log failed: it refuses every change and is not checkpointed until the
    /// server restarts (reads still work).
    Failed,
}

/// Live statistics of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStats {
    /// Tokens consumed by its streams.
    pub symbols_seen: u64,
    /// Tokens that trained the weights.
    pub symbols_learned: u64,
    /// Tokens evaluated by `/predict`.
    pub symbols_predicted: u64,
    /// Optimizer updates applied.
    pub optimizer_updates: u64,
    /// Updates refused because the gradient was not finite.
    pub nonfinite_updates: u64,
    /// Streams whose learner state was reset after a non-finite value.
    pub stream_faults: u64,
    /// Moving average of the loss in bits (about 100 tokens; null before the first).
    pub loss_bits_avg: Option<f64>,
    /// Moving average of the top-1 accuracy (null before the first token).
    pub top1_accuracy_avg: Option<f64>,
    /// Streams held (resident and evicted).
    pub streams: usize,
    /// Streams whose state is in memory.
    pub resident_streams: usize,
    /// Tokens queued, waiting to be stepped.
    pub queued_tokens: usize,
}

/// A model's description: its definition, state and live statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The model's name.
    pub name: String,
    /// Loading or ready.
    pub state: ModelState,
    /// The resolved definition.
    pub config: ModelDefinition,
    /// Live statistics.
    pub stats: ModelStats,
}
