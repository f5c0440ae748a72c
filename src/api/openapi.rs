//! The wire contract served at `/openapi.json`: `proto-schemas/openapi.yaml` with every
//! `./NAME.schema.json` reference replaced by the schema itself under `components/schemas`, so
//! that the served document is self-contained. The files under `proto-schemas/` are the one
//! source; they are compiled in.

use serde_json::{Map, Value};

/// The source of `/openapi.json`.
pub const OPENAPI_YAML: &str = include_str!("../../proto-schemas/openapi.yaml");

/// Every message schema: component name, file name, contents.
pub const SCHEMAS: &[(&str, &str, &str)] = &[
    ("ModelConfig", "model_config.schema.json", include_str!("../../proto-schemas/model_config.schema.json")),
    ("ModelInfo", "model_info.schema.json", include_str!("../../proto-schemas/model_info.schema.json")),
    ("ModelList", "model_list.schema.json", include_str!("../../proto-schemas/model_list.schema.json")),
    (
        "TokensRequest",
        "tokens_request.schema.json",
        include_str!("../../proto-schemas/tokens_request.schema.json"),
    ),
    ("TokensReply", "tokens_reply.schema.json", include_str!("../../proto-schemas/tokens_reply.schema.json")),
    ("StreamInfo", "stream_info.schema.json", include_str!("../../proto-schemas/stream_info.schema.json")),
    ("StreamList", "stream_list.schema.json", include_str!("../../proto-schemas/stream_list.schema.json")),
    (
        "CheckpointReply",
        "checkpoint_reply.schema.json",
        include_str!("../../proto-schemas/checkpoint_reply.schema.json"),
    ),
    ("Problem", "problem.schema.json", include_str!("../../proto-schemas/problem.schema.json")),
    ("Health", "health.schema.json", include_str!("../../proto-schemas/health.schema.json")),
];

/// Why the contract could not be built (a broken file under `proto-schemas/`).
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// `openapi.yaml` is not valid YAML.
    #[error("proto-schemas/openapi.yaml: {0}")]
    Yaml(#[from] serde_norway::Error),
    /// A schema file is not valid JSON.
    #[error("proto-schemas/{file}: {error}")]
    Json {
        /// The file.
        file: &'static str,
        /// The parse error.
        error: serde_json::Error,
    },
    /// A reference names no known schema file.
    #[error("unresolved reference `{0}`")]
    Unresolved(String),
}

/// Rewrites `./NAME.schema.json[#/pointer]` references into `#/components/schemas/Name[/pointer]`.
fn rewrite_refs(value: &mut Value) -> Result<(), ContractError> {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "$ref"
                    && let Value::String(r) = v
                    && !r.starts_with('#')
                {
                    let (file, pointer) = r.split_once('#').unwrap_or((r.as_str(), ""));
                    let file = file.trim_start_matches("./");
                    let (component, _, _) = SCHEMAS
                        .iter()
                        .find(|(_, f, _)| *f == file)
                        .ok_or_else(|| ContractError::Unresolved(r.clone()))?;
                    *r = format!("#/components/schemas/{component}{pointer}");
                } else {
                    rewrite_refs(v)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(rewrite_refs),
        _ => Ok(()),
    }
}

/// The message schemas as a `components/schemas` object, references rewritten.
pub fn bundled_schemas() -> Result<Map<String, Value>, ContractError> {
    let mut components = Map::new();
    for (name, file, text) in SCHEMAS {
        let mut schema: Value =
            serde_json::from_str(text).map_err(|error| ContractError::Json { file, error })?;
        rewrite_refs(&mut schema)?;
        components.insert((*name).to_owned(), schema);
    }
    Ok(components)
}

/// The self-contained OpenAPI document.
pub fn openapi_document() -> Result<Value, ContractError> {
    let mut doc: Value = serde_norway::from_str(OPENAPI_YAML)?;
    rewrite_refs(&mut doc)?;
    let schemas = bundled_schemas()?;
    if let Value::Object(root) = &mut doc {
        let components = root.entry("components").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(components) = components {
            let target = components.entry("schemas").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(target) = target {
                target.extend(schemas);
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_self_contained() {
        let doc = openapi_document().unwrap();
        assert_eq!(doc["openapi"].as_str().unwrap(), "3.1.0");
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external reference {r}"));
            assert!(doc.pointer(pointer).is_some(), "dangling reference {r}");
        }
        for (name, _, _) in SCHEMAS {
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}
