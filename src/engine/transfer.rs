//! Moving a model between servers: the freeze that stops its changes while it moves, the export
//! (a checkpoint file that carries its evicted streams inside it, so that it stands alone), and
//! the import that starts a model from an export exactly where the exporting server left it.
//!
//! An export is a [`crate::engine::model_file`] file: the checkpoint of [`checkpoint::into_model_file`]
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
    /// The bytes of the export file (its values are taken as they are written out).
    pub fn into_bytes(self) -> Result<Vec<u8>, String> {
        let Self { snapshot, mut evicted_states } = self;
        if evicted_states.len() != snapshot.evicted.len() {
            return Err("the export's evicted states do not match its evicted streams".into());
        }
        let mut file = checkpoint::into_model_file(snapshot)?;
        if !evicted_states.is_empty() {
            let scalars = evicted_states.iter().map(SlotScalars::of).collect();
            let mut rows: Vec<&mut SlotState<f32>> = evicted_states.iter_mut().collect();
            let (layout, extra) = stack_slot_tensors(EVICTED_PREFIX, &mut rows)?;
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
    /// The freeze lives in memory: a restarted server serves the model again. A caller that gives
    /// up waiting (a request timeout) leaves the model frozen: freeze again, or thaw it.
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
    ///
    /// `file`: the bytes `export` was parsed from, when it is not renamed: written as the first
    /// checkpoint as they are (a valid checkpoint already), instead of serializing the model again.
    pub async fn import(&self, export: ModelExport, file: Option<Vec<u8>>) -> Result<ModelInfo, EngineError> {
        let ModelExport { snapshot, evicted_states } = export;
        let def = snapshot.definition.clone();
        let spec = self.check_definition(&def)?;
        let invalid = |reason: String| EngineError::InvalidSnapshot(reason);
        let layout = crate::core::SlotStateLayout::of(&spec);
        for ((name, _), state) in snapshot.evicted.iter().zip(&evicted_states) {
            // A UORO stream saved before its lazy scale loads as its slot would (σ = 1).
            let upgraded = crate::core::learner::uoro_legacy_state(&spec, state);
            let state = upgraded.as_ref().unwrap_or(state);
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
            return self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot)), false).await;
        };
        let name = def.name.clone();
        let dir = d.model_dir(&name);
        let keep = d.checkpoint_keep;
        if dir.exists() {
            return Err(EngineError::Storage(format!(
                "the data directory holds files of a model `{name}` that is not loaded ({})",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::Storage(format!("{}: {e}", dir.display())))?;
        let (snapshot, first) = match file {
            Some(bytes) => (snapshot, FirstCheckpoint::File(bytes)),
            // Renamed: the file's bookkeeping names another model, so it is serialized anew from
            // a copy (made off the async runtime: it is as large as the model).
            None => tokio::task::spawn_blocking(move || {
                let copy = Box::new(snapshot.clone());
                (snapshot, FirstCheckpoint::Snapshot(copy))
            })
            .await
            .map_err(|e| EngineError::Storage(e.to_string()))?,
        };
        let (next_seq, evicted) = (snapshot.next_seq, snapshot.evicted.values().cloned().collect());
        // The files are written and synced while the worker loads the model. The model starts
        // frozen, so that nothing is acknowledged before its first checkpoint is on disk.
        let writer = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                write_import(&dir, next_seq, evicted, evicted_states, first, keep)
            })
        };
        let spawned = self.spawn_model(def, spec, worker::Start::Restore(Box::new(snapshot)), true).await;
        let written = writer.await.unwrap_or_else(|e| Err(e.to_string()));
        match (spawned, written) {
            (Ok(_), Ok(())) => self.thaw(&name),
            (Ok(_), Err(reason)) => {
                self.discard(&name, dir);
                Err(EngineError::Storage(reason))
            }
            (Err(e), _) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Removes a model that was never acknowledged (its import failed after its worker started):
    /// stops the worker, then removes its directory once the worker has let go of it.
    fn discard(&self, name: &str, dir: std::path::PathBuf) {
        let removed = self.models.write().unwrap_or_else(PoisonError::into_inner).remove(name);
        self.metrics.remove_model(name);
        let Some(handle) = removed else { return };
        handle.stop(STOP_ABORT);
        super::lifecycle::remove_after_worker(&handle, dir);
    }
}

/// What an import's first checkpoint is written from.
enum FirstCheckpoint {
    /// The uploaded file itself (a valid checkpoint of the same name).
    File(Vec<u8>),
    /// The snapshot, serialized anew.
    Snapshot(Box<ModelSnapshot>),
}

/// Writes an imported model's files into its (new, empty) directory: its evicted streams, then
/// its first checkpoint, synced.
fn write_import(
    dir: &std::path::Path,
    next_seq: u64,
    evicted: Vec<EvictedStream>,
    evicted_states: Vec<SlotState<f32>>,
    first: FirstCheckpoint,
    keep: usize,
) -> Result<(), String> {
    for (stream, state) in evicted.iter().zip(&evicted_states) {
        checkpoint::write_stream(dir, stream.generation, &stream.meta, state)?;
    }
    match first {
        FirstCheckpoint::File(bytes) => {
            let path = dir.join(checkpoint::checkpoint_name(next_seq));
            model_file::write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
        }
        FirstCheckpoint::Snapshot(snapshot) => checkpoint::write(dir, *snapshot, keep).map(|_| ()),
    }
}
