//! The compiled platform config as files: what the operator writes into the platform's
//! ConfigMap (`platform.json`) and Secret (`secrets.json`), and what gateway and worker pods
//! read from where those are mounted. A directory without `platform.json` holds resource
//! YAML instead (standalone mode) and is compiled here: one reader for both.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{PlatformConfig, SecretBundle, SecretHandle, SecretValue, Sources, compile, load_dir};

/// File name of the compiled config in the platform ConfigMap.
pub const CONFIG_FILE: &str = "platform.json";
/// File name of the secret values in the platform Secret.
pub const SECRETS_FILE: &str = "secrets.json";

impl SecretBundle {
    /// The values as a JSON object of handle → base64, for the platform Secret.
    pub fn to_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> =
            self.0.iter().map(|(h, v)| (h.0.clone(), STANDARD.encode(v.expose()).into())).collect();
        serde_json::Value::Object(map).to_string()
    }

    /// Reads what [`SecretBundle::to_json`] wrote. Errors never quote a value.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        let map: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(text).map_err(|e| format!("not a JSON object of strings (line {})", e.line()))?;
        let mut bundle = Self::default();
        for (handle, encoded) in map {
            let bytes = STANDARD.decode(encoded).map_err(|_| format!("the value of {handle} is not base64"))?;
            bundle.0.insert(SecretHandle(handle), SecretValue::new(bytes));
        }
        Ok(bundle)
    }
}

/// Reads a platform: the compiled `platform.json` in `config_dir` with the values of
/// `secrets_dir/secrets.json` (the operator's output), or else the resource YAML in
/// `config_dir`, compiled. Errors are whole sentences naming the file at fault.
pub fn read_platform(config_dir: &Path, secrets_dir: Option<&Path>) -> Result<(PlatformConfig, SecretBundle), String> {
    let compiled = config_dir.join(CONFIG_FILE);
    if compiled.exists() {
        let text = std::fs::read(&compiled).map_err(|e| format!("reading {}: {e}", compiled.display()))?;
        let config: PlatformConfig = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a platform config: {e}", compiled.display()))?;
        let Some(secrets_dir) = secrets_dir else {
            return Err(format!(
                "{} is a compiled config: its secret values are needed too (--secrets-dir)",
                compiled.display()
            ));
        };
        let path = secrets_dir.join(SECRETS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let secrets = SecretBundle::from_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(missing) = config.handles().find(|h| secrets.get(h).is_none()) {
            return Err(format!("{} has no value for {missing}", path.display()));
        }
        return Ok((config, secrets));
    }
    compile_dir(config_dir).map(|(_, config, secrets)| (config, secrets))
}

/// Reads the resource YAML of `config_dir` and compiles it, keeping the resources too.
pub fn compile_dir(config_dir: &Path) -> Result<(Sources, PlatformConfig, SecretBundle), String> {
    let sources = load_dir(config_dir).map_err(|e| format!("reading the platform config: {e}"))?;
    compiled(sources, &config_dir.display().to_string())
}

/// [`compile_dir`] of files given as (name, YAML text): a config built into a binary.
///
/// # Errors
/// As [`compile_dir`], naming the files by `name`.
pub fn compile_files(files: &[(&str, &str)]) -> Result<(Sources, PlatformConfig, SecretBundle), String> {
    let mut sources = Sources::default();
    for (name, text) in files {
        super::parse_documents(text, name, &mut sources).map_err(|e| format!("reading the platform config: {e}"))?;
    }
    let names: Vec<&str> = files.iter().map(|(name, _)| *name).collect();
    compiled(sources, &names.join(", "))
}

fn compiled(sources: Sources, origin: &str) -> Result<(Sources, PlatformConfig, SecretBundle), String> {
    let (config, secrets) = compile(&sources).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        format!("the platform config in {origin} is not valid:\n  {}", lines.join("\n  "))
    })?;
    Ok((sources, config, secrets))
}

impl PlatformConfig {
    /// Every secret handle the config refers to.
    pub fn handles(&self) -> impl Iterator<Item = &SecretHandle> {
        let tiers = self.tiers.values().flat_map(|t| t.secret_options.values());
        let webhooks = self.webhooks.values().map(|w| &w.signing_key);
        let shards = self.all_shards().into_iter().map(|s| &s.url);
        tiers.chain(webhooks).chain(shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_files_read_back_as_written() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        let (config, secrets) = read_platform(&dir, None).unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
        let err = read_platform(out.path(), None).unwrap_err();
        assert!(err.contains("--secrets-dir"), "{err}");
        std::fs::write(out.path().join(SECRETS_FILE), "{}").unwrap();
        let err = read_platform(out.path(), Some(out.path())).unwrap_err();
        assert!(err.contains("has no value for"), "{err}");
        std::fs::write(out.path().join(SECRETS_FILE), secrets.to_json()).unwrap();
        let (config2, secrets2) = read_platform(out.path(), Some(out.path())).unwrap();
        assert_eq!(config2, config);
        assert_eq!(secrets2, secrets);
    }

    #[test]
    fn bad_secret_files_are_refused_without_quoting_values() {
        let err = SecretBundle::from_json(br#"{"a/b": "not base64 hunter2!"}"#).unwrap_err();
        assert!(err.contains("a/b") && !err.contains("hunter2"), "{err}");
        assert!(SecretBundle::from_json(b"[1]").is_err());
    }
}
