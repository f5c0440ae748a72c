//! Moving a model between servers: the freeze that stops its changes while it moves, the export
//! (a checkpoint file that carries its evicted streams inside it, so that it stands alone), and
//! the import that starts a model from an export exactly where the exporting server left it.
//!
//! An export is a [`crate::engine::model_file`] file: the checkpoint of [`checkpoint::to_model_file`]
//! plus, when the model has evicted streams, their states stacked as tensors `evicted.<name>`
//! (in the order of the evicted streams' names) with their scalars as JSON in the metadata entry
//! `evicted_states`. A server checkpoint is an export without evicted states, so a checkpoint
//! file copied from a data directory imports too when its model had no evicted streams.

use super::*;
use crate::core::SlotState;
use crate::engine::model_file::{SlotLayout, SlotScalars, stack_slot_tensors, unstack_slot_tensors};

const EVICTED_PREFIX: &str = "evicted.";
const EVICTED_KEY: &str = "evicted_states";

/// A model as exported: a consistent snapshot and the states of its evicted streams.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelExport {
    /// The snapshot (its `evicted` map names the evicted streams).
    pub snapshot: ModelSnapshot,
    /// The evicted streams' states, in the order of `snapshot.evicted` (by name).
    pub evicted_states: Vec<SlotState<f32>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictedStatesJson {
    layout: SlotLayout,
    scalars: Vec<SlotScalars>,
}

impl ModelExport {
    /// The bytes of the export file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        if self.evicted_states.len() != self.snapshot.evicted.len() {
            return Err("the export's evicted states do not match its evicted streams".into());
        }
        let mut file = checkpoint::to_model_file(&self.snapshot)?;
        if !self.evicted_states.is_empty() {
            let rows: Vec<&SlotState<f32>> = self.evicted_states.iter().collect();
            let (layout, extra) = stack_slot_tensors(EVICTED_PREFIX, &rows)?;
            let scalars = self.evicted_states.iter().map(SlotScalars::of).collect();
            let json =
                serde_json::to_value(EvictedStatesJson { layout, scalars }).map_err(|e| e.to_string())?;
            file.metadata.insert(EVICTED_KEY.into(), json);
            file.extra.extend(extra);
        }
        model_file::to_bytes(&file).map_err(|e| e.to_string())
    }

    /// Parses and validates an export file (or a server checkpoint): the file's checksum and
    /// structure, every stream name, and that every evicted stream has its state.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let mut file = model_file::from_bytes(bytes).map_err(|e| match e {
            model_file::ModelFileError::Invalid { reason, .. } => reason,
            other => other.to_string(),
        })?;
        let evicted_json = file.metadata.remove(EVICTED_KEY);
        let extra = std::mem::take(&mut file.extra);
        let (streams, evicted): (Vec<_>, Vec<_>) =
            extra.into_iter().partition(|t| !t.name.starts_with(EVICTED_PREFIX));
        file.extra = streams;
        let snapshot = checkpoint::from_model_file(file)?;
        let evicted_states = match evicted_json {
            None if snapshot.evicted.is_empty() => Vec::new(),
            None => {
                return Err(format!(
                    "the file names {} evicted streams but holds none of their states: it is a \
                     checkpoint of a model with streams on disk, not an export",
                    snapshot.evicted.len()
                ));
            }
            Some(json) => {
                let e: EvictedStatesJson =
                    serde_json::from_value(json).map_err(|e| format!("evicted states: {e}"))?;
                if e.scalars.len() != snapshot.evicted.len() {
                    return Err("the evicted states do not match the evicted streams".into());
                }
                let tensors = unstack_slot_tensors(EVICTED_PREFIX, &e.layout, &evicted, e.scalars.len())?;
                e.scalars.into_iter().zip(tensors).map(|(s, t)| s.with_tensors(t)).collect()
            }
        };
        let names = snapshot
            .stream_slots
            .iter()
            .map(|s| &s.meta.name)
            .chain(snapshot.evicted.values().map(|e| &e.meta.name));
        for name in names {
            if !valid_name(name) {
                return Err(format!("the file holds a stream with an invalid name {name:?}"));
            }
        }
        if snapshot.evicted.iter().any(|(name, e)| *name != e.meta.name) {
            return Err("an evicted stream is filed under another name".into());
        }
        Ok(Self { snapshot, evicted_states })
    }

    /// The export renamed to `name` (streams, weights and signs do not depend on the name).
    pub fn renamed(mut self, name: &str) -> Self {
        name.clone_into(&mut self.snapshot.definition.name);
        self
    }
}

/// The digest of an export's content (its file's checksum over the configuration, counters,
/// bookkeeping and every tensor), as the quoted `ETag` of its HTTP replies: two servers holding
/// the same model state have the same tag, so equal tags prove a move exact. (The file's bytes
/// are not compared: the order of its header's entries is not fixed.)
pub fn export_tag(bytes: &[u8]) -> Result<String, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a complete safetensors file ({e:?})"))?;
    let sum = meta.metadata().as_ref().and_then(|m| m.get("checksum")).ok_or("the file has no checksum")?;
    Ok(format!("\"{sum}\""))
}

impl Engine {
    /// Stops every change to a model (its token and predict requests and stream deletes get
    /// [`EngineError::Frozen`]) and returns once the requests admitted before are answered and
    /// logged: from then on its state is what every acknowledged request left, and it stays so
    /// until [`Engine::thaw`]. Reads, snapshots, checkpoints and the model's deletion still work.
    /// The freeze lives in memory: a restarted server serves the model again.
    pub async fn freeze(&self, model: &str) -> Result<ModelInfo, EngineError> {
        let handle = self.handle(model)?;
        handle.shared.frozen.store(true, Ordering::Release);
        let (reply, rx) = oneshot::channel();
        if let Err(e) = handle.send(Command::Barrier { reply }) {
            // Not frozen after all: a failed freeze must not leave the model refusing requests.
            handle.shared.frozen.store(false, Ordering::Release);
            return Err(e);
        }
        let drained = PendingReply { model: model.to_owned(), rx }.wait().await;
        if let Err(e) = drained {
            handle.shared.frozen.store(false, Ordering::Release);
            return Err(e);
        }
        Ok(handle.info())
    }

    /// Lets a frozen model change again (a no-op for one that is not frozen).
    pub fn thaw(&self, model: &str) -> Result<ModelInfo, EngineError> {
        let handle = self.handle(model)?;
        handle.shared.frozen.store(false, Ordering::Release);
        Ok(handle.info())
    }

    /// A consistent copy of a model with the states of its evicted streams, read by its worker
    /// between two steps.
    pub async fn export(&self, model: &str) -> Result<ModelExport, EngineError> {
        let handle = self.handle(model)?;
        let (reply, rx) = oneshot::channel();
        handle.send(Command::Export { reply })?;
        PendingReply { model: model.to_owned(), rx }.wait().await.map(|e| *e)
    }

    /// Creates a model from an export (renamed to the export's definition name): its weights,
    /// optimizer, streams (resident and evicted) and counters continue exactly where the
    /// exporting server left them. With a data directory, the model's first checkpoint and its
    /// evicted streams' files are written before it starts, so a crash after the reply keeps it.
    pub async fn import(&self, export: ModelExport) -> Result<ModelInfo, EngineError> {
        let ModelExport { snapshot, evicted_states } = export;
        let def = snapshot.definition.clone();
        let spec = self.check_definition(&def)?;
        let invalid = |reason: String| EngineError::InvalidSnapshot(reason);
        let layout = crate::core::SlotStateLayout::of(&spec);
        for ((name, _), state) in snapshot.evicted.iter().zip(&evicted_states) {
            layout.check(state).map_err(|e| invalid(format!("evicted stream `{name}`: {e}")))?;
        }
        let stored = snapshot.stream_slots.len() + snapshot.evicted.len();
        if stored > self.limits.max_stored_streams {
            return Err(invalid(format!(
                "the model holds {stored} streams; this server keeps at most {} per model",
                self.limits.max_stored_streams
            )));
        }
        let _lifecycle = self.lifecycle.lock().await;
        if self.handle(&def.name).is_ok() {
            return Err(EngineError::DuplicateModel(def.name.clone()));
        }
        self.check_memory_budget(&def, &spec)?;
        let Some(d) = &self.durability else {
            if !snapshot.evicted.is_empty() {
                return Err(invalid(format!(
                    "the model has {} streams on disk and this server runs without a data directory \
                     to keep them",
                    snapshot.evicted.len()
                )));
            }
            return self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot))).await;
        };
        let dir = d.model_dir(&def.name);
        let keep = d.checkpoint_keep;
        let written = {
            let dir = dir.clone();
            let snapshot = snapshot.clone();
            tokio::task::spawn_blocking(move || write_import(&dir, &snapshot, &evicted_states, keep))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        };
        if let Err(reason) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(EngineError::Storage(reason));
        }
        let spawned = self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot))).await;
        if spawned.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        spawned
    }
}

/// Writes an imported model's directory: its evicted streams' files, then its first checkpoint.
/// Refuses a directory that holds a model already (one that is not loaded, or being deleted).
fn write_import(
    dir: &std::path::Path,
    snapshot: &ModelSnapshot,
    evicted_states: &[SlotState<f32>],
    keep: usize,
) -> Result<(), String> {
    if dir.exists() {
        return Err(format!(
            "the data directory holds files of a model `{}` that is not loaded ({})",
            snapshot.definition.name,
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for ((_, evicted), state) in snapshot.evicted.iter().zip(evicted_states) {
        checkpoint::write_stream(dir, evicted.generation, &evicted.meta, state)?;
    }
    checkpoint::write(dir, snapshot, keep).map(|_| ())
}
