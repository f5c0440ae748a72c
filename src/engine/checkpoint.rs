//! Checkpoints of a model and the files of evicted streams.
//!
//! A checkpoint is a [`crate::engine::model_file`] file (safetensors, so the weights load in NumPy or
//! PyTorch unchanged, with a checksum over everything) named
//! `checkpoint-<next seq, 20 digits>.safetensors` in the model's directory, where `next seq` is
//! the sequence number of the first write-ahead-log record it does not contain. Besides the
//! weights and optimizer moments it holds every resident stream's state as tensors
//! `streams.<name>` stacked over the streams (the scratch slot last), and the engine's
//! bookkeeping (definition, free slots, stream table, statistics, evicted streams) as JSON in
//! the metadata entry `engine`.
//!
//! Files are written atomically (temporary file, fsync, rename, fsync of the directory); the
//! newest `keep` are kept. On boot the newest that validates wins, else the one before it.
//! An evicted stream's state is a small safetensors file `streams/<hex of name>-<generation>.state`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::{ModelDefinition, ModelStats};
use crate::core::{Optimizer, Params, SlotState};
use crate::engine::model_file::{
    self, Counters, ModelFile, SlotScalars, stack_slot_tensors, unstack_slot_tensors,
};

/// A stream's bookkeeping beside its slot state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// The stream's name.
    pub name: String,
    /// Tokens consumed since it was created.
    pub position: u64,
    /// Tokens that trained the weights.
    pub learned: u64,
    /// Sum of the losses in bits of every consumed token.
    pub loss_bits_sum: f64,
    /// Moving average of the loss in bits.
    pub loss_bits_avg: Option<f64>,
    /// Times its learner was reset after a non-finite value.
    #[serde(default)]
    pub faults: u64,
}

impl StreamMeta {
    /// A new stream.
    pub fn new(name: String) -> Self {
        Self { name, position: 0, learned: 0, loss_bits_sum: 0.0, loss_bits_avg: None, faults: 0 }
    }
}

/// A resident stream in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSnapshot {
    /// Its slot.
    pub slot: usize,
    /// Its bookkeeping.
    pub meta: StreamMeta,
    /// Its state and learner factors.
    pub state: SlotState<f32>,
}

/// An evicted stream: its bookkeeping, and the generation of the file holding its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvictedStream {
    /// The file's generation.
    pub generation: u64,
    /// Its bookkeeping.
    pub meta: StreamMeta,
}

/// A consistent copy of a model between two steps: everything needed to resume it exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    /// The definition.
    pub definition: ModelDefinition,
    /// The weights.
    pub params: Params<f32>,
    /// The optimizer with its moments and update count.
    pub optimizer: Optimizer<f32>,
    /// The resident streams, by slot.
    pub stream_slots: Vec<StreamSnapshot>,
    /// The scratch slot (a predict in progress runs on it).
    pub scratch: SlotState<f32>,
    /// Free slots, in the order they are handed out (last first).
    pub free: Vec<usize>,
    /// Sequence number of the next write-ahead-log record.
    pub next_seq: u64,
    /// Generation of the next evicted-stream file.
    pub next_generation: u64,
    /// Streams opened so far (each open's sign key mixes in its index, so that a stream
    /// reopened under the same name draws new signs).
    pub opened_streams: u64,
    /// Evicted streams by name.
    pub evicted: BTreeMap<String, EvictedStream>,
    /// The model's statistics.
    pub stats: ModelStats,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResidentJson {
    slot: usize,
    meta: StreamMeta,
    scalars: SlotScalars,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineJson {
    definition: ModelDefinition,
    next_seq: u64,
    next_generation: u64,
    /// Absent from checkpoints written before it existed (their streams' keys do not use it).
    #[serde(default)]
    opened_streams: u64,
    free: Vec<usize>,
    stats: ModelStats,
    /// Tensor names and per-slot shapes of the stacked `streams.*` tensors.
    layout: Vec<(String, Vec<usize>)>,
    streams: Vec<ResidentJson>,
    scratch: SlotScalars,
    evicted: Vec<(String, EvictedStream)>,
}

const STREAMS_PREFIX: &str = "streams.";

/// Turns a snapshot into a model file, taking its values (the stream states are stacked as they
/// are taken, so the snapshot is never held twice).
pub fn into_model_file(s: ModelSnapshot) -> Result<ModelFile, String> {
    let ModelSnapshot {
        definition,
        params,
        optimizer,
        mut stream_slots,
        mut scratch,
        free,
        next_seq,
        next_generation,
        opened_streams,
        evicted,
        stats,
    } = s;
    let streams: Vec<ResidentJson> = stream_slots
        .iter()
        .map(|r| ResidentJson { slot: r.slot, meta: r.meta.clone(), scalars: SlotScalars::of(&r.state) })
        .collect();
    let scratch_scalars = SlotScalars::of(&scratch);
    // The scratch slot last; it always exists, so the layout is known without streams too.
    let mut rows: Vec<&mut SlotState<f32>> =
        stream_slots.iter_mut().map(|r| &mut r.state).chain(std::iter::once(&mut scratch)).collect();
    let (layout, extra) = stack_slot_tensors(STREAMS_PREFIX, &mut rows)?;
    let counters =
        Counters { steps: next_seq, symbols: stats.symbols_seen, nonfinite_updates: stats.nonfinite_updates };
    let engine = EngineJson {
        definition,
        next_seq,
        next_generation,
        opened_streams,
        free,
        stats,
        layout,
        streams,
        scratch: scratch_scalars,
        evicted: evicted.into_iter().collect(),
    };
    let mut metadata = serde_json::Map::new();
    metadata.insert("engine".into(), serde_json::to_value(&engine).map_err(|e| e.to_string())?);
    Ok(ModelFile { config: engine.definition.model_config(), params, optimizer, counters, metadata, extra })
}

/// Rebuilds a snapshot from a checkpoint's model file.
pub fn from_model_file(file: ModelFile) -> Result<ModelSnapshot, String> {
    let engine = file.metadata.get("engine").ok_or("not a server checkpoint (no `engine` metadata)")?;
    let e: EngineJson =
        serde_json::from_value(engine.clone()).map_err(|e| format!("engine metadata: {e}"))?;
    if e.definition.model_config() != file.config {
        return Err("the engine's definition does not match the file's config".into());
    }
    let mut tensors = unstack_slot_tensors(STREAMS_PREFIX, &e.layout, &file.extra, e.streams.len() + 1)?;
    let scratch = e.scratch.with_tensors(tensors.pop().expect("one row at least"));
    let stream_slots = e
        .streams
        .into_iter()
        .zip(tensors)
        .map(|(r, tensors)| StreamSnapshot {
            slot: r.slot,
            meta: r.meta,
            state: r.scalars.with_tensors(tensors),
        })
        .collect();
    Ok(ModelSnapshot {
        definition: e.definition,
        params: file.params,
        optimizer: file.optimizer,
        stream_slots,
        scratch,
        free: e.free,
        next_seq: e.next_seq,
        next_generation: e.next_generation,
        opened_streams: e.opened_streams,
        evicted: e.evicted.into_iter().collect(),
        stats: e.stats,
    })
}

/// The file name of the checkpoint whose next log record is `next_seq`.
pub fn checkpoint_name(next_seq: u64) -> String {
    format!("checkpoint-{next_seq:020}.safetensors")
}

/// The checkpoints in `dir`, oldest first (temporary files are ignored).
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    super::wal::numbered_files(dir, "checkpoint-", ".safetensors")
}

/// Writes a checkpoint atomically, keeps the newest `keep`, deletes the log segments and
/// evicted-stream files no kept checkpoint needs. Returns the file and its size.
pub fn write(dir: &Path, snapshot: ModelSnapshot, keep: usize) -> Result<(PathBuf, u64), String> {
    let path = dir.join(checkpoint_name(snapshot.next_seq));
    let file = into_model_file(snapshot)?;
    model_file::save(&path, &file).map_err(|e| e.to_string())?;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    prune(dir, keep.max(1)).map_err(|e| format!("{}: pruning: {e}", dir.display()))?;
    Ok((path, size))
}

fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    let all = list(dir)?;
    let cut = all.len().saturating_sub(keep);
    for (_, path) in &all[..cut] {
        std::fs::remove_file(path)?;
    }
    let kept = &all[cut..];
    if let Some((oldest, _)) = kept.first() {
        super::wal::prune(dir, *oldest)?;
    }
    // Evicted-stream files: keep those a kept checkpoint refers to, and every newer generation
    // (written since the newest checkpoint; replay may read them).
    let streams = dir.join("streams");
    if let (Ok(entries), Some((_, newest))) = (std::fs::read_dir(&streams), kept.last()) {
        let mut needed = std::collections::HashSet::new();
        let mut floor = 0;
        for (i, (_, path)) in kept.iter().enumerate() {
            let Ok(e) = read_engine_header(path) else { continue };
            needed.extend(e.evicted.iter().map(|(name, ev)| stream_file_name(name, ev.generation)));
            if i + 1 == kept.len() || path == newest {
                floor = e.next_generation;
            }
        }
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let generation = name
                .rsplit_once('-')
                .and_then(|(_, g)| g.strip_suffix(".state"))
                .and_then(|g| g.parse::<u64>().ok());
            if let Some(g) = generation
                && g < floor
                && !needed.contains(&name)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Reads only the engine metadata of a checkpoint (its JSON header, not the tensors).
fn read_engine_header(path: &Path) -> Result<EngineJson, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 30 {
        return Err("header too large".into());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    let engine = v["__metadata__"]["metadata"].as_str().ok_or("no metadata")?;
    let m: serde_json::Value = serde_json::from_str(engine).map_err(|e| e.to_string())?;
    serde_json::from_value(m["engine"].clone()).map_err(|e| e.to_string())
}

/// What [`load_latest`] found.
#[derive(Debug)]
pub struct Latest {
    /// The newest checkpoint that validates, and its file.
    pub best: Option<(ModelSnapshot, PathBuf)>,
    /// Newer files that did not validate, with the reason (left in place).
    pub rejected: Vec<String>,
}

/// The newest checkpoint in `dir` that validates, falling back to older ones.
pub fn load_latest(dir: &Path) -> std::io::Result<Latest> {
    let mut rejected = Vec::new();
    for (_, path) in list(dir)?.into_iter().rev() {
        match model_file::load(&path).map_err(|e| e.to_string()).and_then(from_model_file) {
            Ok(snapshot) => return Ok(Latest { best: Some((snapshot, path)), rejected }),
            Err(e) => rejected.push(format!("{}: {e}", path.display())),
        }
    }
    Ok(Latest { best: None, rejected })
}

/// The file name of an evicted stream's state: the name in hex, so that no name can become a
/// path trick, and the generation.
pub fn stream_file_name(name: &str, generation: u64) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{generation:020}.state")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFileJson {
    meta: StreamMeta,
    scalars: SlotScalars,
    /// Tensor names in the slot state's order.
    order: Vec<String>,
    checksum: String,
}

fn state_checksum(
    meta: &StreamMeta,
    scalars: &SlotScalars,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> String {
    let head = serde_json::to_string(&(meta, scalars)).unwrap_or_default();
    let mut parts: Vec<Vec<u8>> = vec![head.into_bytes()];
    for (name, _, data) in tensors {
        parts.push(name.as_bytes().to_vec());
        parts.push(data.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    format!("{:016x}", super::checksum::checksum(parts.iter().map(Vec::as_slice)))
}

/// Writes an evicted stream's state (atomically, synced).
pub fn write_stream(
    dir: &Path,
    generation: u64,
    meta: &StreamMeta,
    state: &SlotState<f32>,
) -> Result<(), String> {
    let streams = dir.join("streams");
    std::fs::create_dir_all(&streams).map_err(|e| format!("{}: {e}", streams.display()))?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = state
        .tensors
        .iter()
        .map(|(name, shape, data)| {
            (name.clone(), shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let scalars = SlotScalars::of(state);
    let checksum = state_checksum(meta, &scalars, &state.tensors);
    let order = state.tensors.iter().map(|(n, _, _)| n.clone()).collect();
    let json = serde_json::to_string(&StreamFileJson { meta: meta.clone(), scalars, order, checksum })
        .map_err(|e| e.to_string())?;
    let views: Vec<(&str, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (n.as_str(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{e:?}"))?;
    let header = std::collections::HashMap::from([("stream".to_string(), json)]);
    let out = safetensors::tensor::serialize(views, &Some(header)).map_err(|e| format!("{e:?}"))?;
    let path = streams.join(stream_file_name(&meta.name, generation));
    model_file::write_atomic(&path, &out).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads an evicted stream's state.
pub fn read_stream(dir: &Path, name: &str, generation: u64) -> Result<(StreamMeta, SlotState<f32>), String> {
    let path = dir.join("streams").join(stream_file_name(name, generation));
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |why: String| format!("{}: {why}", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("{e:?}")))?;
    let json =
        meta.metadata().as_ref().and_then(|m| m.get("stream")).ok_or_else(|| bad("no header".into()))?;
    let f: StreamFileJson = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("{e:?}")))?;
    let mut tensors = Vec::with_capacity(f.order.len());
    for tensor_name in &f.order {
        let t = st.tensor(tensor_name).map_err(|e| bad(format!("{e:?}")))?;
        let data: Vec<f32> =
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
        tensors.push((tensor_name.clone(), t.shape().to_vec(), data));
    }
    if f.checksum != state_checksum(&f.meta, &f.scalars, &tensors) || f.meta.name != name {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    Ok((f.meta, f.scalars.with_tensors(tensors)))
}
