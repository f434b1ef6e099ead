//! Reading the same YAML a platform team applies to a cluster from files, for standalone
//! mode: StorageTier, Webhook, RetentionPolicy and ShardSet resources, and the v1 Secrets
//! they name.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::Sources;

/// Why a directory of resources could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: document {index}: {message}")]
    Document { origin: String, index: usize, message: String },
}

/// Reads every `*.yaml` and `*.yml` file of `dir` (not recursively), in name order.
pub fn load_dir(dir: &Path) -> Result<Sources, LoadError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut sources = Sources::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        parse_documents(&text, &file.display().to_string(), &mut sources)?;
    }
    Ok(sources)
}

/// Adds the resources of one YAML stream to `sources`. `origin` names the stream in errors.
pub fn parse_documents(text: &str, origin: &str, sources: &mut Sources) -> Result<(), LoadError> {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |message: String| LoadError::Document { origin: origin.to_owned(), index, message };
        let value = Value::deserialize(doc).map_err(|e| fail(format!("not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let parse_err = |e: serde_json::Error| fail(format!("{kind}: {e}"));
        match (api_version.as_str(), kind.as_str()) {
            ("vellum.dev/v1alpha1", "StorageTier") => {
                sources.tiers.push(serde_json::from_value(value).map_err(parse_err)?);
            }
            ("vellum.dev/v1alpha1", "Webhook") => {
                sources.webhooks.push(serde_json::from_value(value).map_err(parse_err)?);
            }
            ("vellum.dev/v1alpha1", "RetentionPolicy") => {
                sources.retention_policies.push(serde_json::from_value(value).map_err(parse_err)?);
            }
            ("vellum.dev/v1alpha1", "ShardSet") => {
                sources.shard_sets.push(serde_json::from_value(value).map_err(parse_err)?);
            }
            ("v1", "Secret") => {
                let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(value).map_err(parse_err)?;
                let name = secret.metadata.name.clone().ok_or_else(|| fail("Secret without metadata.name".into()))?;
                sources.secrets.insert(name, super::secret_data(&secret));
            }
            ("vellum.dev/v1alpha1", "BlueGreenRelease") => {
                // Deploying is the operator's business; standalone mode runs one version
                // and takes only the platform-wide settings from it.
                sources.releases.push(serde_json::from_value(value).map_err(parse_err)?);
            }
            _ => {
                return Err(fail(format!(
                    "unsupported resource {api_version:?} {kind:?}: expected StorageTier, Webhook, RetentionPolicy, ShardSet, BlueGreenRelease (vellum.dev/v1alpha1) or Secret (v1)"
                )));
            }
        }
    }
    Ok(())
}
