//! A training run's state in a model file: the checkpoint a run hands out every so often and
//! the streams' states saved beside the weights, so that `kfrtrl train --init` continues a
//! stopped run bit for bit.

use serde::{Deserialize, Serialize};

use crate::core::{Optimizer, Params, SlotState, StreamSet};
use crate::engine::model_file::{
    ExtraTensor, ModelFile, SlotLayout, SlotScalars, stack_slots, unstack_slots,
};

/// A run's state at a checkpoint, after a whole step: with the place in the corpus it makes a
/// [`Start`] that continues the run exactly.
pub struct Checkpoint<'a> {
    /// Steps this run has taken (the earlier runs' not counted).
    pub steps: u64,
    /// The weights.
    pub params: &'a Params<f32>,
    /// The optimizer, with any gradients summed and not yet applied.
    pub optimizer: &'a Optimizer<f32>,
    /// The streams (every slot a stream, in order).
    pub streams: &'a StreamSet<f32>,
    /// Non-finite updates refused by this run so far.
    pub nonfinite_updates: u64,
}

/// Metadata entry of the streams' scalars in a model file saved by `kfrtrl train`.
pub const STREAMS_ENTRY: &str = "train_streams";
const STREAMS_PREFIX: &str = "streams.";

/// The JSON part of the streams saved in a model file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamsJson {
    layout: SlotLayout,
    slots: Vec<SlotScalars>,
}

/// Every slot of `set` as stacked extra tensors and the metadata entry [`STREAMS_ENTRY`] that
/// [`streams_from_file`] reads back.
pub fn streams_to_file(
    set: &StreamSet<f32>,
    metadata: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<ExtraTensor>, String> {
    let (layout, slots, extra) = stack_slots(STREAMS_PREFIX, set)?;
    let json = serde_json::to_value(StreamsJson { layout, slots }).map_err(|e| e.to_string())?;
    metadata.insert(STREAMS_ENTRY.into(), json);
    Ok(extra)
}

/// The streams a model file holds ([`streams_to_file`]), or `None` when it holds none.
pub fn streams_from_file(file: &ModelFile) -> Result<Option<Vec<SlotState<f32>>>, String> {
    let Some(entry) = file.metadata.get(STREAMS_ENTRY) else { return Ok(None) };
    let json: StreamsJson =
        serde_json::from_value(entry.clone()).map_err(|e| format!("{STREAMS_ENTRY} metadata: {e}"))?;
    unstack_slots(STREAMS_PREFIX, &json.layout, json.slots, &file.extra).map(Some)
}
