//! Pod volumes on disk, as a kubelet keeps them: a ConfigMap or Secret volume is a
//! directory whose keys are links into `..data`, itself a link to a timestamped directory
//! that is replaced atomically when the source changes, so that a process reading a file
//! sees the old content or the new, never half of one. `emptyDir` is a directory of the
//! pod's, `hostPath` the host's path. A `projected` volume gathers ConfigMap and Secret keys,
//! downward API fields and a ServiceAccount token the API server issues for the pod (the
//! volume the ServiceAccount admission plugin adds to every pod, so that in-cluster clients
//! find `token`, `ca.crt` and `namespace` where they look).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::api::{NodeApi, TokenRequest};
use super::env::{Waiting, field_ref, object_data};
use crate::meta;

/// What a volume was built from, to know when to rebuild it.
pub type Fingerprint = Vec<String>;

/// A projected volume's files: relative path → (content, mode).
type Files = BTreeMap<PathBuf, (Vec<u8>, u32)>;

fn mode_of(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok())
}

/// The files of a ConfigMap or Secret source (`items` picked, or every key), added to
/// `files`, and its fingerprint; `Ok(None)` for an optional source that is missing.
fn object_files(
    api: &dyn NodeApi,
    namespace: &str,
    kind: &str,
    source: &Value,
    mode: u32,
    volume_name: &str,
    files: &mut Files,
) -> Result<String, Waiting> {
    let name = meta::str_at(
        source,
        if kind == "Secret" && source.get("secretName").is_some() { "/secretName" } else { "/name" },
    )
    .unwrap_or_default();
    let optional = source.get("optional").and_then(Value::as_bool).unwrap_or(false);
    let object = match api.object(kind, namespace, name) {
        Some(object) => object,
        None if optional => return Ok(format!("{kind}/{name}@")),
        None => {
            return Err(Waiting::new(
                "ContainerCreating",
                format!(
                    "MountVolume.SetUp failed for volume \"{volume_name}\" : {} \"{name}\" not found",
                    kind.to_ascii_lowercase()
                ),
            ));
        }
    };
    let data = object_data(&object, kind);
    match source.get("items").and_then(Value::as_array) {
        Some(items) => {
            for item in items {
                let key = meta::str_at(item, "/key").unwrap_or_default();
                let path = meta::str_at(item, "/path").unwrap_or(key);
                let item_mode = mode_of(item.get("mode")).unwrap_or(mode);
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
    Ok(format!("{kind}/{name}@{}", meta::resource_version(&object)))
}

/// The files a ConfigMap, Secret or projected volume should hold (`path → (bytes, mode)`),
/// and its fingerprint; `None` for volumes that are not made from API objects.
fn projected(api: &dyn NodeApi, pod: &Value, volume: &Value) -> Result<Option<(Files, Fingerprint)>, Waiting> {
    let namespace = meta::namespace(pod);
    let volume_name = meta::str_at(volume, "/name").unwrap_or_default();
    let mut files = BTreeMap::new();
    let mut fingerprint = Vec::new();
    if let Some((kind, source)) =
        volume.get("configMap").map(|s| ("ConfigMap", s)).or_else(|| volume.get("secret").map(|s| ("Secret", s)))
    {
        let mode = mode_of(source.get("defaultMode")).unwrap_or(0o644);
        fingerprint.push(object_files(api, namespace, kind, source, mode, volume_name, &mut files)?);
        return Ok(Some((files, fingerprint)));
    }
    let Some(projected) = volume.get("projected") else { return Ok(None) };
    let mode = mode_of(projected.get("defaultMode")).unwrap_or(0o644);
    for source in projected.get("sources").and_then(Value::as_array).into_iter().flatten() {
        if let Some(s) = source.get("configMap") {
            fingerprint.push(object_files(api, namespace, "ConfigMap", s, mode, volume_name, &mut files)?);
        } else if let Some(s) = source.get("secret") {
            fingerprint.push(object_files(api, namespace, "Secret", s, mode, volume_name, &mut files)?);
        } else if let Some(s) = source.get("downwardAPI") {
            for item in s.get("items").and_then(Value::as_array).into_iter().flatten() {
                let Some(path) = meta::str_at(item, "/fieldRef/fieldPath") else { continue };
                let value = field_ref(pod, path)?;
                fingerprint.push(format!("field/{path}={value}"));
                let item_mode = mode_of(item.get("mode")).unwrap_or(mode);
                files.insert(
                    PathBuf::from(meta::str_at(item, "/path").unwrap_or(path)),
                    (value.into_bytes(), item_mode),
                );
            }
        } else if let Some(s) = source.get("serviceAccountToken") {
            let request = TokenRequest {
                namespace: namespace.to_owned(),
                service_account: meta::str_at(pod, "/spec/serviceAccountName").unwrap_or("default").to_owned(),
                pod_name: meta::name(pod).to_owned(),
                pod_uid: meta::uid(pod).to_owned(),
                audience: meta::str_at(s, "/audience").map(str::to_owned),
                expiration_seconds: s.get("expirationSeconds").and_then(Value::as_i64).unwrap_or(3607),
            };
            let token = api.token(&request).ok_or_else(|| {
                Waiting::new(
                    "ContainerCreating",
                    format!(
                        "MountVolume.SetUp failed for volume \"{volume_name}\" : failed to fetch token: serviceaccounts \"{}\" token not issued",
                        request.service_account
                    ),
                )
            })?;
            // A new token rewrites the volume; its signature tells it apart.
            fingerprint.push(format!("token/{}", &token[token.len().saturating_sub(16)..]));
            files.insert(PathBuf::from(meta::str_at(s, "/path").unwrap_or("token")), (token.into_bytes(), mode));
        }
    }
    Ok(Some((files, fingerprint)))
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
    pub fn sync(&mut self, api: &dyn NodeApi, pod: &Value) -> Result<bool, Waiting> {
        let mut changed = false;
        for volume in pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
            let name = meta::str_at(volume, "/name").unwrap_or_default().to_owned();
            let dir = self.root.join(&name);
            if let Some((files, fingerprint)) = projected(api, pod, volume)? {
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
                // emptyDir, and what this node does not model, as an empty directory.
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
    use crate::kubelet::api::Memory;
    use serde_json::json;

    #[test]
    fn config_map_volumes_switch_atomically_and_drop_removed_keys() {
        let api = Memory::default();
        api.put(
            "ConfigMap",
            "default",
            json!({"metadata": {"name": "cfg", "resourceVersion": "1"}, "data": {"a": "1", "b": "2"}}),
        );
        let pod = json!({"metadata": {"name": "p", "namespace": "default"},
                         "spec": {"volumes": [{"name": "config", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]}});
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = Volumes::new(dir.path().to_owned());
        assert!(!volumes.sync(&api, &pod).unwrap());
        let config = volumes.paths["config"].clone();
        assert_eq!(std::fs::read_to_string(config.join("a")).unwrap(), "1");
        assert!(volumes.paths["scratch"].is_dir());
        assert!(!volumes.sync(&api, &pod).unwrap(), "unchanged sources are not rewritten");
        api.put(
            "ConfigMap",
            "default",
            json!({"metadata": {"name": "cfg", "resourceVersion": "2"}, "data": {"a": "one"}}),
        );
        assert!(volumes.sync(&api, &pod).unwrap());
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
        let err = Volumes::new(dir.path().join("x")).sync(&api, &missing).unwrap_err();
        assert_eq!(err.message, "MountVolume.SetUp failed for volume \"s\" : secret \"nope\" not found");
    }

    #[test]
    fn projected_volumes_hold_the_token_the_root_ca_and_the_namespace() {
        let api = Memory::default();
        api.put(
            "ConfigMap",
            "docs",
            json!({"metadata": {"name": "kube-root-ca.crt", "resourceVersion": "7"}, "data": {"ca.crt": "PEM"}}),
        );
        // The volume the ServiceAccount admission plugin adds.
        let pod = json!({"metadata": {"name": "p", "namespace": "docs", "uid": "u-1"},
        "spec": {"serviceAccountName": "gateway", "volumes": [{"name": "kube-api-access", "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]}}]}});
        let dir = tempfile::tempdir().unwrap();
        let mut volumes = Volumes::new(dir.path().to_owned());
        volumes.sync(&api, &pod).unwrap();
        let at = volumes.paths["kube-api-access"].clone();
        assert_eq!(std::fs::read_to_string(at.join("token")).unwrap(), "token-for-gateway-u-1");
        assert_eq!(std::fs::read_to_string(at.join("ca.crt")).unwrap(), "PEM");
        assert_eq!(std::fs::read_to_string(at.join("namespace")).unwrap(), "docs");
        let mode = std::fs::metadata(at.join("..data/token")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
