//! The on-disk format of a trained model, shared by `kfrtrl train --save` and the server's
//! checkpoints: one [safetensors](https://huggingface.co/docs/safetensors) file.
//!
//! - Tensors (f32, little-endian, row-major, shapes as in [`Params`]): `w` (`r·n × m`), `v`
//!   (`vocab × (n+1)`) and, for Adam, its moments `adam.m.w`, `adam.m.v`, `adam.v.w`, `adam.v.v`.
//! - The header's `__metadata__` (string → string) holds JSON:
//!   - `format` = `kfrtrl-model`, `version` = `2` (this build also reads `1`);
//!   - `config`: the [`ModelConfig`] as JSON;
//!   - `state`: the [`Counters`] and the optimizer's update count, as JSON;
//!   - `metadata`: a free JSON object (e.g. the corpus vocabulary);
//!   - `checksum`: a 64-bit hash of the other entries and of every tensor's bytes, so that a
//!     damaged file is refused instead of silently loading wrong weights. Version 2 hashes each
//!     MiB of a tensor on its own (four lanes, chunks in parallel) and chains the chunk hashes
//!     (`checksum::checksum_v2`), about ten times faster than version 1's one serial chain
//!     (`checksum::checksum`), which bounded how fast a large model could be saved, moved and loaded.
//!
//! [`save`] writes atomically: a temporary file in the same directory, `fsync`, `rename` over the
//! target, then `fsync` of the directory; a reader sees the old file or the new one, never a mix.
//! [`load`] validates everything (format, version, checksum, config, shapes, finiteness, Adam's
//! second moments non-negative) and says what is wrong.
//!
//! A server checkpoint adds [`ExtraTensor`]s (every stream's state and learner factors, stacked
//! per name under `streams.`) and its bookkeeping as JSON in `metadata`; `kfrtrl train --save`
//! adds its streams the same way, with their scalars under the metadata entry `train_streams`
//! (`tools::train::streams_to_file`), which `kfrtrl train --init` continues.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::checksum::checksum_of;
use crate::core::model::ConfigError;
use crate::core::{
    Gradients, ModelConfig, ModelSpec, Optimizer, OptimizerKind, Params, SlotState, StreamSet,
};

/// The `format` entry of the header.
pub const FORMAT: &str = "kfrtrl-model";
/// The version this build writes (it reads it and every earlier one).
pub const VERSION: u32 = 2;

/// Progress counters saved with a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Online steps taken (each consumes one token per stream of the batch).
    pub steps: u64,
    /// Tokens consumed over all streams.
    pub symbols: u64,
    /// Optimizer updates refused because the gradient was not finite.
    pub nonfinite_updates: u64,
}

/// A model as saved: configuration, weights, optimizer state, counters and free metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFile {
    /// The configuration (checked on load).
    pub config: ModelConfig,
    /// The weights.
    pub params: Params<f32>,
    /// The optimizer state (kind, learning rate and clip come from `config`).
    pub optimizer: Optimizer<f32>,
    /// Progress counters.
    pub counters: Counters,
    /// Free JSON metadata (e.g. `{"corpus_format": "ptb-char", "symbols": [...]}`).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// More tensors (a checkpoint's stream states), covered by the checksum; their values may be
    /// non-finite (a stream's fault is saved as it is).
    pub extra: Vec<ExtraTensor>,
}

/// A tensor beyond the weights and optimizer moments.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraTensor {
    /// Its name, unique, not one of the model's own names.
    pub name: String,
    /// Its shape (row-major).
    pub shape: Vec<usize>,
    /// Its values.
    pub data: Vec<f32>,
}

impl ModelFile {
    /// A file for freshly initialised weights and optimizer.
    pub fn init(config: &ModelConfig) -> Result<Self, ConfigError> {
        let spec = config.check()?;
        Ok(Self {
            config: config.clone(),
            params: Params::init(&spec),
            optimizer: Optimizer::new(&spec),
            counters: Counters::default(),
            metadata: serde_json::Map::new(),
            extra: Vec::new(),
        })
    }

    /// The checked spec of the configuration.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        self.config.check()
    }
}

/// Why a model file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The bytes are not a valid kfrtrl model file (or were damaged).
    #[error("{}: invalid model file: {reason}", path.display())]
    Invalid {
        /// The file (empty for in-memory bytes).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model to save is inconsistent (shapes do not match its config).
    #[error("cannot save the model: {0}")]
    Inconsistent(String),
}

/// The part of a [`SlotState`] that is not a float tensor, kept as JSON beside the stacked
/// tensors ([`stack_slot_tensors`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotScalars {
    position: u64,
    sign_key: u64,
    sign_counter: u64,
    counters: Vec<(String, u64)>,
    /// Integer tensors (small: a TBPTT window's tokens).
    indices: Vec<(String, Vec<usize>, Vec<u32>)>,
}

/// One slot's float tensors: name, shape and values.
pub type SlotTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

impl SlotScalars {
    /// The scalars of a slot state.
    pub fn of(s: &SlotState<f32>) -> Self {
        Self {
            position: s.position,
            sign_key: s.sign_key,
            sign_counter: s.sign_counter,
            counters: s.counters.clone(),
            indices: s.indices.clone(),
        }
    }

    /// The slot state with these scalars and `tensors`.
    pub fn with_tensors(self, tensors: SlotTensors) -> SlotState<f32> {
        SlotState {
            position: self.position,
            sign_key: self.sign_key,
            sign_counter: self.sign_counter,
            counters: self.counters,
            indices: self.indices,
            tensors,
        }
    }
}

/// Names and per-slot shapes of stacked slot tensors.
pub type SlotLayout = Vec<(String, Vec<usize>)>;

/// Stacks the float tensors of slot states of one layout: one tensor `<prefix><name>` per name,
/// of shape `[rows.len(), ..shape]`, with the layout (taken from the first row) to unstack them.
/// Each row's values are taken as they are stacked (the rows' tensors are left empty), so that a
/// large snapshot is never held twice while it is stacked.
pub fn stack_slot_tensors(
    prefix: &str,
    rows: &mut [&mut SlotState<f32>],
) -> Result<(SlotLayout, Vec<ExtraTensor>), String> {
    let Some(first) = rows.first() else { return Ok((Vec::new(), Vec::new())) };
    let layout: SlotLayout =
        first.tensors.iter().map(|(name, shape, _)| (name.clone(), shape.clone())).collect();
    let mut extra = Vec::with_capacity(layout.len());
    for (i, (name, shape)) in layout.iter().enumerate() {
        let per_slot: usize = shape.iter().product();
        let mut data = Vec::with_capacity(per_slot * rows.len());
        for row in rows.iter_mut() {
            let (n, sh, values) = row.tensors.get_mut(i).ok_or("a stream state misses a tensor")?;
            if n != name || sh != shape || values.len() != per_slot {
                return Err(format!("stream states disagree on tensor {name}"));
            }
            data.extend_from_slice(values);
            *values = Vec::new();
        }
        let mut stacked = vec![rows.len()];
        stacked.extend_from_slice(shape);
        extra.push(ExtraTensor { name: format!("{prefix}{name}"), shape: stacked, data });
    }
    Ok((layout, extra))
}

/// The inverse of [`stack_slot_tensors`]: the float tensors of each of `rows` slots.
pub fn unstack_slot_tensors(
    prefix: &str,
    layout: &SlotLayout,
    extra: &[ExtraTensor],
    rows: usize,
) -> Result<Vec<SlotTensors>, String> {
    let mut stacked = Vec::with_capacity(layout.len());
    for (name, shape) in layout {
        let full = format!("{prefix}{name}");
        let t = extra.iter().find(|t| t.name == full).ok_or_else(|| format!("tensor {full} is missing"))?;
        let mut want = vec![rows];
        want.extend_from_slice(shape);
        if t.shape != want {
            return Err(format!("tensor {full} has shape {:?}, expected {want:?}", t.shape));
        }
        stacked.push((name, shape, &t.data));
    }
    Ok((0..rows)
        .map(|row| {
            stacked
                .iter()
                .map(|(name, shape, data)| {
                    let per: usize = shape.iter().product();
                    ((*name).clone(), (*shape).clone(), data[row * per..(row + 1) * per].to_vec())
                })
                .collect()
        })
        .collect())
}

/// Every slot of `set`, exported and stacked under `prefix` ([`stack_slot_tensors`]): the
/// layout, each slot's scalars and the tensors, for a file that saves a whole set.
pub fn stack_slots(
    prefix: &str,
    set: &StreamSet<f32>,
) -> Result<(SlotLayout, Vec<SlotScalars>, Vec<ExtraTensor>), String> {
    let mut states: Vec<SlotState<f32>> = (0..set.capacity()).map(|s| set.export_slot(s)).collect();
    let scalars = states.iter().map(SlotScalars::of).collect();
    let mut rows: Vec<&mut SlotState<f32>> = states.iter_mut().collect();
    let (layout, extra) = stack_slot_tensors(prefix, &mut rows)?;
    Ok((layout, scalars, extra))
}

/// The inverse of [`stack_slots`]: one slot state per entry of `scalars`, in order.
pub fn unstack_slots(
    prefix: &str,
    layout: &SlotLayout,
    scalars: Vec<SlotScalars>,
    extra: &[ExtraTensor],
) -> Result<Vec<SlotState<f32>>, String> {
    let tensors = unstack_slot_tensors(prefix, layout, extra, scalars.len())?;
    Ok(scalars.into_iter().zip(tensors).map(|(s, t)| s.with_tensors(t)).collect())
}

fn invalid(reason: impl Into<String>) -> ModelFileError {
    ModelFileError::Invalid { path: PathBuf::new(), reason: reason.into() }
}

fn with_path(e: ModelFileError, path: &Path) -> ModelFileError {
    match e {
        ModelFileError::Invalid { reason, .. } => {
            ModelFileError::Invalid { path: path.to_path_buf(), reason }
        }
        other => other,
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    counters: Counters,
    optimizer: String,
    optimizer_updates: u64,
    /// The count (tokens or steps, per the config's `update_unit`) of the gradients summed in
    /// `pending.*` and not applied yet (`tokens_per_update` above 1); the key keeps the name it
    /// had when only tokens were counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_tokens: Option<f64>,
}

/// The tensors of a model, in a fixed order, with their expected shapes.
fn tensors(m: &ModelFile) -> Vec<(&'static str, &Array2<f32>)> {
    let mut t = vec![("w", &m.params.w), ("v", &m.params.v)];
    if let (Some(mm), Some(vv)) = (&m.optimizer.m, &m.optimizer.v) {
        t.extend([("adam.m.w", &mm.w), ("adam.m.v", &mm.v), ("adam.v.w", &vv.w), ("adam.v.v", &vv.v)]);
    }
    if let Some((sum, _)) = m.optimizer.pending() {
        t.extend([("pending.w", &sum.w), ("pending.v", &sum.v)]);
    }
    t
}

/// Serializes a model to the bytes of a model file.
pub fn to_bytes(model: &ModelFile) -> Result<Vec<u8>, ModelFileError> {
    to_bytes_of_version(model, VERSION)
}

/// Serializes a model as a file of an earlier `version` (1 or 2), for compatibility tests.
pub fn to_bytes_of_version(model: &ModelFile, version: u32) -> Result<Vec<u8>, ModelFileError> {
    if !(1..=VERSION).contains(&version) {
        return Err(ModelFileError::Inconsistent(format!("version {version} cannot be written")));
    }
    let spec = model.config.check().map_err(|e| ModelFileError::Inconsistent(e.to_string()))?;
    let expect_w = (spec.gate_rows(), spec.m);
    let expect_v = (spec.vocab, spec.n + 1);
    let adam = model.config.optimizer == OptimizerKind::Adam;
    if adam != (model.optimizer.m.is_some() && model.optimizer.v.is_some()) {
        return Err(ModelFileError::Inconsistent(
            "optimizer state does not match the config's optimizer".into(),
        ));
    }
    let named = tensors(model);
    for (name, a) in &named {
        let want = if name.ends_with('w') { expect_w } else { expect_v };
        if a.dim() != want {
            return Err(ModelFileError::Inconsistent(format!(
                "tensor {name} has shape {:?}, the config needs {want:?}",
                a.dim()
            )));
        }
    }
    // The tensors' bytes are borrowed (f32 is stored little-endian), hashed and copied once into
    // the file: a model is held once more while it is written, not three times.
    let mut tensors: Vec<NamedBytes<'_>> =
        named.iter().map(|(name, a)| (*name, vec![a.nrows(), a.ncols()], array_bytes(a))).collect();
    let mut extra: Vec<&ExtraTensor> = model.extra.iter().collect();
    extra.sort_by(|a, b| a.name.cmp(&b.name));
    for t in extra {
        if tensors.iter().any(|(n, _, _)| *n == t.name) {
            return Err(ModelFileError::Inconsistent(format!("duplicate tensor name {:?}", t.name)));
        }
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(ModelFileError::Inconsistent(format!(
                "tensor {:?} does not match its shape",
                t.name
            )));
        }
        tensors.push((t.name.as_str(), t.shape.clone(), f32_bytes(&t.data)));
    }
    let config =
        serde_json::to_string(&model.config).map_err(|e| ModelFileError::Inconsistent(e.to_string()))?;
    let state = serde_json::to_string(&State {
        counters: model.counters,
        optimizer: model.config.optimizer.name().into(),
        optimizer_updates: model.optimizer.steps,
        pending_tokens: model.optimizer.pending().map(|(_, count)| count),
    })
    .map_err(|e| ModelFileError::Inconsistent(e.to_string()))?;
    let metadata = serde_json::Value::Object(model.metadata.clone()).to_string();
    let sum = checksum_of(
        version,
        [config.as_bytes(), state.as_bytes(), metadata.as_bytes()]
            .into_iter()
            .chain(tensors.iter().flat_map(|(name, _, b)| [name.as_bytes(), b.as_ref()])),
    );
    let entries = [
        ("format", FORMAT.to_string()),
        ("version", version.to_string()),
        ("config", config),
        ("state", state),
        ("metadata", metadata),
        ("checksum", format!("{sum:016x}")),
    ];
    Ok(write_safetensors(&entries, &tensors))
}

/// A tensor to write: its name, shape and little-endian bytes.
type NamedBytes<'a> = (&'a str, Vec<usize>, Cow<'a, [u8]>);

/// The safetensors layout, written in one buffer: the header's length (u64, little-endian), the
/// JSON header (its `__metadata__` and each tensor's dtype, shape and byte range), padded with
/// spaces to a multiple of 8, then the tensors' bytes back to back in the order given.
fn write_safetensors(metadata: &[(&str, String)], tensors: &[NamedBytes<'_>]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let meta: serde_json::Map<String, serde_json::Value> =
        metadata.iter().map(|(k, v)| ((*k).to_string(), serde_json::Value::String(v.clone()))).collect();
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0usize;
    for (name, shape, bytes) in tensors {
        let end = offset + bytes.len();
        header.insert(
            (*name).to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

/// The little-endian bytes of f32 values: borrowed on a little-endian machine, converted otherwise.
fn f32_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: any f32 is 4 initialized bytes, u8 has alignment 1, and the slice covers
        // exactly the values' memory for the values' lifetime.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The bytes of an array in row-major order (borrowed when it is laid out so).
fn array_bytes(a: &Array2<f32>) -> Cow<'_, [u8]> {
    match a.as_slice() {
        Some(values) => f32_bytes(values),
        None => Cow::Owned(a.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}

fn read_tensor<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    shape: (usize, usize),
) -> Result<(Array2<f32>, &'a [u8]), ModelFileError> {
    let t = st.tensor(name).map_err(|_| invalid(format!("tensor {name:?} is missing")))?;
    if t.dtype() != Dtype::F32 {
        return Err(invalid(format!("tensor {name:?} is {:?}, expected F32", t.dtype())));
    }
    if t.shape() != [shape.0, shape.1] {
        return Err(invalid(format!(
            "tensor {name:?} has shape {:?}, the config needs [{}, {}]",
            t.shape(),
            shape.0,
            shape.1
        )));
    }
    let data = t.data();
    let values: Vec<f32> =
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    if values.iter().any(|x| !x.is_finite()) {
        return Err(invalid(format!("tensor {name:?} holds a NaN or infinite value")));
    }
    let a = Array2::from_shape_vec(shape, values).map_err(|e| invalid(e.to_string()))?;
    Ok((a, data))
}

/// Parses and validates the bytes of a model file.
pub fn from_bytes(bytes: &[u8]) -> Result<ModelFile, ModelFileError> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| invalid(format!("not a complete safetensors file ({e:?})")))?;
    let header = meta.metadata().clone().ok_or_else(|| invalid("no __metadata__ in the header"))?;
    let get = |k: &str| header.get(k).ok_or_else(|| invalid(format!("header entry {k:?} is missing")));
    if get("format")? != FORMAT {
        return Err(invalid(format!("format is {:?}, expected {FORMAT:?}", get("format")?)));
    }
    let version = match get("version")?.parse::<u32>() {
        Ok(v) if (1..=VERSION).contains(&v) => v,
        _ => {
            return Err(invalid(format!(
                "version {} is not supported (this build reads 1 to {VERSION})",
                get("version")?
            )));
        }
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| invalid(format!("damaged tensor table ({e:?})")))?;
    let (config_s, state_s, metadata_s) = (get("config")?, get("state")?, get("metadata")?);
    let config: ModelConfig =
        serde_json::from_str(config_s).map_err(|e| invalid(format!("config is not valid JSON: {e}")))?;
    let spec = config.check().map_err(|e| invalid(e.to_string()))?;
    let state: State =
        serde_json::from_str(state_s).map_err(|e| invalid(format!("state is not valid JSON: {e}")))?;
    if state.optimizer != config.optimizer.name() {
        return Err(invalid("the optimizer state does not match the config's optimizer"));
    }
    let metadata = match serde_json::from_str(metadata_s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(invalid("metadata is not a JSON object")),
    };
    let shape_w = (spec.gate_rows(), spec.m);
    let shape_v = (spec.vocab, spec.n + 1);
    let mut names = vec![("w", shape_w), ("v", shape_v)];
    let adam = config.optimizer == OptimizerKind::Adam;
    if adam {
        names.extend([
            ("adam.m.w", shape_w),
            ("adam.m.v", shape_v),
            ("adam.v.w", shape_w),
            ("adam.v.v", shape_v),
        ]);
    }
    let pending = state.pending_tokens.is_some();
    if pending {
        names.extend([("pending.w", shape_w), ("pending.v", shape_v)]);
    }
    let mut arrays = Vec::new();
    let mut raw = Vec::new();
    for (name, shape) in &names {
        let (a, b) = read_tensor(&st, name, *shape)?;
        arrays.push(a);
        raw.push(b);
    }
    let mut extra_names: Vec<String> =
        st.names().into_iter().filter(|n| !names.iter().any(|(m, _)| m == n)).cloned().collect();
    extra_names.sort();
    let mut extra = Vec::with_capacity(extra_names.len());
    let mut extra_raw = Vec::with_capacity(extra_names.len());
    for name in extra_names {
        let t = st.tensor(&name).map_err(|e| invalid(format!("tensor {name:?}: {e:?}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(invalid(format!("tensor {name:?} is {:?}, expected F32", t.dtype())));
        }
        let data = t.data();
        let values =
            data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        extra_raw.push(data);
        extra.push(ExtraTensor { shape: t.shape().to_vec(), data: values, name });
    }
    let sum = checksum_of(
        version,
        [config_s.as_bytes(), state_s.as_bytes(), metadata_s.as_bytes()]
            .into_iter()
            .chain(names.iter().zip(&raw).flat_map(|((name, _), b)| [name.as_bytes(), *b]))
            .chain(extra.iter().zip(&extra_raw).flat_map(|(t, b)| [t.name.as_bytes(), *b])),
    );
    if get("checksum")? != &format!("{sum:016x}") {
        return Err(invalid("checksum mismatch: the file is damaged"));
    }
    let mut it = arrays.into_iter();
    let params = Params { w: it.next().expect("w"), v: it.next().expect("v") };
    let moments = adam.then(|| {
        let m = Gradients { w: it.next().expect("m.w"), v: it.next().expect("m.v") };
        let v = Gradients { w: it.next().expect("v.w"), v: it.next().expect("v.v") };
        (m, v)
    });
    // Through `restore`, which refuses moments that would poison the weights (a negative v).
    let mut optimizer = Optimizer::restore(&spec, state.optimizer_updates, moments)
        .map_err(|e| invalid(format!("optimizer state: {e}")))?;
    if let Some(count) = state.pending_tokens {
        let sum = Gradients { w: it.next().expect("pending.w"), v: it.next().expect("pending.v") };
        optimizer.restore_pending(sum, count).map_err(|e| invalid(format!("optimizer state: {e}")))?;
    }
    Ok(ModelFile { config, params, optimizer, counters: state.counters, metadata, extra })
}

/// Writes a model file atomically (temporary file in the same directory, fsync, rename, fsync of
/// the directory). On failure the target is untouched and no temporary file is left.
pub fn save(path: &Path, model: &ModelFile) -> Result<(), ModelFileError> {
    let bytes = to_bytes(model)?;
    write_atomic(path, &bytes).map_err(|source| ModelFileError::Io { path: path.to_path_buf(), source })
}

/// Writes `bytes` to `path` atomically: a uniquely named temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory. A reader sees the old file or the new one,
/// never a mix; on failure `path` is untouched and no temporary file is left.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path has no file name"))?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{unique}", name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort where directories cannot be opened).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads and validates a model file.
pub fn load(path: &Path) -> Result<ModelFile, ModelFileError> {
    let bytes =
        std::fs::read(path).map_err(|source| ModelFileError::Io { path: path.to_path_buf(), source })?;
    from_bytes(&bytes).map_err(|e| with_path(e, path))
}
