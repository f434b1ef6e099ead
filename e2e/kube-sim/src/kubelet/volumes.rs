//! Pod volumes on disk, as a kubelet keeps them: a ConfigMap or Secret volume is a
//! directory whose keys are links into `..data`, itself a link to a timestamped directory
//! that is replaced atomically when the source changes, so that a process reading a file
//! sees the old content or the new, never half of one. `emptyDir` is a directory of the
//! pod's, `hostPath` the host's path.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::env::{Waiting, source_data};
use crate::meta;
use crate::store::Store;

/// What a volume was built from, to know when to rebuild it.
pub type Fingerprint = Vec<String>;

/// A projected volume's files: relative path → (content, mode).
type Files = BTreeMap<PathBuf, (Vec<u8>, u32)>;

/// The files a ConfigMap or Secret volume should hold (`path → (bytes, mode)`), and its
/// fingerprint; `None` for volumes that are not projected from objects.
fn projected(store: &Store, namespace: &str, volume: &Value) -> Result<Option<(Files, Fingerprint)>, Waiting> {
    let (kind, source) = match (volume.get("configMap"), volume.get("secret")) {
        (Some(s), _) => ("ConfigMap", s),
        (_, Some(s)) => ("Secret", s),
        _ => return Ok(None),
    };
    let name = meta::str_at(source, if kind == "Secret" { "/secretName" } else { "/name" }).unwrap_or_default();
    let optional = source.get("optional").and_then(Value::as_bool).unwrap_or(false);
    let mode = source.get("defaultMode").and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644);
    let volume_name = meta::str_at(volume, "/name").unwrap_or_default();
    let data = match source_data(store, namespace, kind, name) {
        Ok(data) => data,
        Err(_) if optional => BTreeMap::new(),
        Err(_) => {
            return Err(Waiting::new(
                "ContainerCreating",
                format!(
                    "MountVolume.SetUp failed for volume \"{volume_name}\" : {} \"{name}\" not found",
                    kind.to_ascii_lowercase()
                ),
            ));
        }
    };
    let version = {
        let registry = store.registry();
        registry
            .by_kind("v1", kind)
            .and_then(|t| store.get(t, namespace, name).ok())
            .map(|o| meta::resource_version(&o).to_owned())
    };
    let mut files = BTreeMap::new();
    match source.get("items").and_then(Value::as_array) {
        Some(items) => {
            for item in items {
                let key = meta::str_at(item, "/key").unwrap_or_default();
                let path = meta::str_at(item, "/path").unwrap_or(key);
                let item_mode =
                    item.get("mode").and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok()).unwrap_or(mode);
                match data.get(key) {
                    Some(bytes) => {
                        files.insert(PathBuf::from(path), (bytes.clone(), item_mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(Waiting::new(
                            "ContainerCreating",
                            format!(
                                "MountVolume.SetUp failed for volume \"{volume_name}\" : configmap references non-existent config key: {key}"
                            ),
                        ));
                    }
                }
            }
        }
        None => {
            for (k, v) in data {
                files.insert(PathBuf::from(k), (v, mode));
            }
        }
    }
    Ok(Some((files, vec![format!("{kind}/{name}@{}", version.unwrap_or_default())])))
}

fn safe_relative(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `files` into `dir` atomically: a new timestamped directory, `..data` switched to
/// it by a rename, top-level links made for new names and removed for gone ones.
fn write_atomically(dir: &Path, files: &Files) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = format!("..{}", time::OffsetDateTime::now_utc().unix_timestamp_nanos());
    let fresh = dir.join(&stamp);
    std::fs::create_dir_all(&fresh)?;
    for (path, (bytes, mode)) in files {
        if !safe_relative(path) {
            continue;
        }
        let target = fresh.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, bytes)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode & 0o777))?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let top: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|p| p.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !top.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// A pod's volumes, materialised under `root`.
#[derive(Debug)]
pub struct Volumes {
    root: PathBuf,
    /// Each volume's directory (or host path) by name.
    pub paths: BTreeMap<String, PathBuf>,
    fingerprints: BTreeMap<String, Fingerprint>,
}

impl Volumes {
    pub fn new(root: PathBuf) -> Self {
        Self { root, paths: BTreeMap::new(), fingerprints: BTreeMap::new() }
    }

    /// Builds (or refreshes) every volume of `pod`; `Ok(true)` when a projected volume changed.
    pub fn sync(&mut self, store: &Store, pod: &Value) -> Result<bool, Waiting> {
        let namespace = meta::namespace(pod);
        let mut changed = false;
        for volume in pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
            let name = meta::str_at(volume, "/name").unwrap_or_default().to_owned();
            let dir = self.root.join(&name);
            if let Some((files, fingerprint)) = projected(store, namespace, volume)? {
                if self.fingerprints.get(&name) != Some(&fingerprint) {
                    write_atomically(&dir, &files).map_err(|e| {
                        Waiting::new(
                            "ContainerCreating",
                            format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"),
                        )
                    })?;
                    changed |= self.fingerprints.insert(name.clone(), fingerprint).is_some();
                }
                self.paths.insert(name, dir);
            } else if let Some(path) = meta::str_at(volume, "/hostPath/path") {
                self.paths.insert(name, PathBuf::from(path));
            } else {
                // emptyDir, and what the simulator does not model, as an empty directory.
                std::fs::create_dir_all(&dir).map_err(|e| {
                    Waiting::new("ContainerCreating", format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"))
                })?;
                self.paths.insert(name, dir);
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_map_volumes_switch_atomically_and_drop_removed_keys() {
        let store = Store::new();
        let cm = store.registry().by_kind("v1", "ConfigMap").cloned().unwrap();
        store
            .create(&cm, "default", json!({"metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}}), false)
            .unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "default"},
                         "spec": {"volumes": [{"name": "config", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]}});
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = Volumes::new(dir.path().to_owned());
        assert!(!volumes.sync(&store, &pod).unwrap());
        let config = volumes.paths["config"].clone();
        assert_eq!(std::fs::read_to_string(config.join("a")).unwrap(), "1");
        assert!(volumes.paths["scratch"].is_dir());
        assert!(!volumes.sync(&store, &pod).unwrap(), "unchanged sources are not rewritten");
        let mut object = store.get(&cm, "default", "cfg").unwrap();
        object["data"] = json!({"a": "one"});
        store.update(&cm, "default", "cfg", object, false, false).unwrap();
        assert!(volumes.sync(&store, &pod).unwrap());
        assert_eq!(std::fs::read_to_string(config.join("a")).unwrap(), "one");
        assert!(!config.join("b").exists(), "a removed key goes");
        let stamps = std::fs::read_dir(&config)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..1"))
            .count();
        assert_eq!(stamps, 1, "the old data directory is removed");
        let missing = json!({"metadata": {"name": "p", "namespace": "default"},
                             "spec": {"volumes": [{"name": "s", "secret": {"secretName": "nope"}}]}});
        let err = Volumes::new(dir.path().join("x")).sync(&store, &missing).unwrap_err();
        assert_eq!(err.message, "MountVolume.SetUp failed for volume \"s\" : secret \"nope\" not found");
    }
}
