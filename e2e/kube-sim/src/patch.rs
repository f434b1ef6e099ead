//! The four patch types: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge
//! patch (lists of named things merge by their key, as kubectl sends for built-in kinds)
//! and server-side apply.

use serde_json::{Map, Value};

use crate::status::ApiError;

/// The patch types, by their content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let base = content_type.split(';').next().unwrap_or_default().trim();
        match base {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Applies a JSON patch.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
    let mut doc = target.clone();
    json_patch::patch(&mut doc, &ops)
        .map_err(|e| ApiError::new(422, "Invalid", format!("the JSON patch could not be applied: {e}")))?;
    Ok(doc)
}

/// Applies a JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
    }
    let mut doc = target.clone();
    json_patch::merge(&mut doc, patch);
    Ok(doc)
}

/// The key lists of named things merge by, by field name, as the built-in types declare
/// (`patchMergeKey`). `ports` merge by `containerPort` in containers and by `port` in
/// Services; lists not named here are replaced whole.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets" => "name",
        "volumeMounts" | "volumeDevices" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Lists of scalars that merge as sets rather than being replaced.
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Applies a strategic merge patch.
pub fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let (Value::Object(t), Value::Object(p)) = (target, patch) else {
        return Err(ApiError::bad_request("a strategic merge patch must be a JSON object"));
    };
    Ok(Value::Object(merge_map(t, p)?))
}

fn merge_map(target: &Map<String, Value>, patch: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        return Ok(strip_directives(replaced));
    }
    let mut out = target.clone();
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(current)), Value::Array(remove)) = (out.get_mut(field), value) {
                current.retain(|v| !remove.contains(v));
            }
            continue;
        }
        match value {
            Value::Null => {
                out.remove(key);
            }
            Value::Object(p) if p.get("$patch").and_then(Value::as_str) == Some("delete") => {
                out.remove(key);
            }
            Value::Object(p) => {
                let merged = match out.get(key) {
                    Some(Value::Object(t)) => merge_map(t, p)?,
                    _ => strip_directives(p.clone()),
                };
                out.insert(key.clone(), Value::Object(merged));
            }
            Value::Array(items) => {
                let merged = match out.get(key) {
                    Some(Value::Array(current)) => merge_list(key, current, items)?,
                    _ => items.iter().filter(|i| !is_delete_directive(i)).cloned().map(strip_value).collect(),
                };
                out.insert(key.clone(), Value::Array(merged));
            }
            other => {
                out.insert(key.clone(), other.clone());
            }
        }
    }
    Ok(out)
}

fn is_delete_directive(item: &Value) -> bool {
    item.get("$patch").and_then(Value::as_str) == Some("delete")
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

fn strip_directives(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k, strip_value(v))).collect()
}

fn merge_list(field: &str, current: &[Value], patch: &[Value]) -> Result<Vec<Value>, ApiError> {
    if patch.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return Ok(patch.iter().filter(|i| i.get("$patch").is_none()).cloned().map(strip_value).collect());
    }
    if merges_primitives(field) {
        let mut out = current.to_vec();
        for item in patch {
            if !out.contains(item) {
                out.push(item.clone());
            }
        }
        return Ok(out);
    }
    let all: Vec<Value> = current.iter().chain(patch).cloned().collect();
    let Some(key) = merge_key(field, &all) else {
        return Ok(patch.iter().cloned().map(strip_value).collect());
    };
    let mut out = current.to_vec();
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(ApiError::bad_request(format!("map: {item} does not contain declared merge key: {key}")));
        };
        let at = out.iter().position(|c| c.get(key) == Some(id));
        if is_delete_directive(item) {
            if let Some(i) = at {
                out.remove(i);
            }
            continue;
        }
        match (at, item) {
            (Some(i), Value::Object(p)) => {
                let merged = match &out[i] {
                    Value::Object(t) => merge_map(t, p)?,
                    _ => strip_directives(p.clone()),
                };
                out[i] = Value::Object(merged);
            }
            (Some(i), other) => out[i] = other.clone(),
            (None, other) => out.push(strip_value(other.clone())),
        }
    }
    Ok(out)
}

/// Server-side apply of `applied` (the manager's whole intent) onto `live`: the applied
/// fields merge in as a strategic merge would, and fields this manager applied before but
/// no longer does are removed. Returns the new object and the manager's field set.
pub fn apply(
    live: &Value,
    applied: &Value,
    previous: Option<&Value>,
    others: &Value,
) -> Result<(Value, Value), ApiError> {
    let Value::Object(a) = applied else {
        return Err(ApiError::bad_request("an apply patch must be an object"));
    };
    let mut merged = strategic_merge(live, &Value::Object(a.clone()))?;
    let fields = field_set(applied, "");
    if let Some(previous) = previous {
        remove_unapplied(&mut merged, previous, &fields, others);
    }
    Ok((merged, fields))
}

/// The fields of an object as a `FieldsV1` set: `{"f:spec": {"f:replicas": {}}}`; list
/// items with a merge key are `k:{"name":"web"}` entries.
pub fn field_set(object: &Value, field: &str) -> Value {
    match object {
        Value::Object(map) => {
            let mut set = Map::new();
            for (k, v) in map {
                if field.is_empty() && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if k == "metadata" && field.is_empty() {
                    let mut m = Map::new();
                    if let Value::Object(meta) = v {
                        for key in ["labels", "annotations"] {
                            if let Some(inner) = meta.get(key) {
                                m.insert(format!("f:{key}"), field_set(inner, key));
                            }
                        }
                        if let Some(f) = meta.get("finalizers").and_then(Value::as_array) {
                            let mut fin = Map::new();
                            for item in f {
                                fin.insert(format!("v:{item}"), Value::Object(Map::new()));
                            }
                            m.insert("f:finalizers".into(), Value::Object(fin));
                        }
                    }
                    if !m.is_empty() {
                        set.insert("f:metadata".into(), Value::Object(m));
                    }
                    continue;
                }
                set.insert(format!("f:{k}"), field_set(v, k));
            }
            Value::Object(set)
        }
        Value::Array(items) => match merge_key(field, items) {
            Some(key) => {
                let mut set = Map::new();
                for item in items {
                    if let Some(id) = item.get(key) {
                        let mut entry = match field_set(item, "") {
                            Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        entry.insert(".".into(), Value::Object(Map::new()));
                        set.insert(format!("k:{{\"{key}\":{id}}}"), Value::Object(entry));
                    }
                }
                Value::Object(set)
            }
            None => Value::Object(Map::new()),
        },
        _ => Value::Object(Map::new()),
    }
}

/// Removes from `object` the fields in `previous` that are not in `current`.
fn remove_unapplied(object: &mut Value, previous: &Value, current: &Value, others: &Value) {
    static NONE: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Map::new()));
    let (Value::Object(prev), Some(obj)) = (previous, object.as_object_mut()) else { return };
    for (entry, sub) in prev {
        let Some(name) = entry.strip_prefix("f:") else { continue };
        let still = current.get(entry.as_str());
        let shared = others.get(entry.as_str());
        match still {
            // A map the manager owned parts of: those parts go, and the map with them if
            // nothing else is left in it.
            None if sub.as_object().is_some_and(|m| m.keys().any(|k| k.starts_with("f:")))
                && obj.get(name).is_some_and(Value::is_object) =>
            {
                if let Some(child) = obj.get_mut(name) {
                    remove_unapplied(child, sub, &NONE, shared.unwrap_or(&NONE));
                    if child.as_object().is_some_and(Map::is_empty) && name != "metadata" && shared.is_none() {
                        obj.remove(name);
                    }
                }
            }
            // Another manager owns it too: it stays.
            None if shared.is_some() => {}
            None => {
                obj.remove(name);
            }
            Some(cur) => {
                if let Some(child) = obj.get_mut(name) {
                    match child {
                        Value::Object(_) => remove_unapplied(child, sub, cur, shared.unwrap_or(&NONE)),
                        Value::Array(items) => {
                            // Keyed items this manager no longer applies go.
                            for key in
                                sub.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
                            {
                                let kept = shared.is_some_and(|s| s.get(key.as_str()).is_some());
                                if key.starts_with("k:") && cur.get(key.as_str()).is_none() && !kept {
                                    items.retain(|item| !matches_key(item, &key));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

fn matches_key(item: &Value, key: &str) -> bool {
    let Some(json) = key.strip_prefix("k:") else { return false };
    let Ok(Value::Object(id)) = serde_json::from_str::<Value>(json) else { return false };
    id.iter().all(|(k, v)| item.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_named_lists_and_honours_directives() {
        let live = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "web:1", "args": ["a"]},
            {"name": "sidecar", "image": "side:1"}
        ]}}}, "metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}}});
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "web:2", "args": ["b"]},
            {"name": "sidecar", "$patch": "delete"},
            {"name": "new", "image": "new:1"}
        ]}}}, "metadata": {"finalizers": ["b"], "labels": {"x": null}}});
        let out = strategic_merge(&live, &patch).unwrap();
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 2);
        assert_eq!(containers[0], json!({"name": "web", "image": "web:2", "args": ["b"]}));
        assert_eq!(containers[1]["name"], "new");
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["metadata"]["labels"], json!({"y": "2"}));
        let removed =
            strategic_merge(&out, &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}})).unwrap();
        assert_eq!(removed["metadata"]["finalizers"], json!(["b"]));
        let replaced =
            strategic_merge(&out, &json!({"metadata": {"labels": {"$patch": "replace", "z": "3"}}})).unwrap();
        assert_eq!(replaced["metadata"]["labels"], json!({"z": "3"}));
    }

    #[test]
    fn json_and_merge_patches() {
        let doc = json!({"a": {"b": 1}, "l": [1, 2]});
        assert_eq!(merge_patch(&doc, &json!({"a": {"b": null, "c": 2}})).unwrap(), json!({"a": {"c": 2}, "l": [1, 2]}));
        let patched = json_patch(
            &doc,
            &json!([{"op": "add", "path": "/l/-", "value": 3}, {"op": "test", "path": "/a/b", "value": 1}]),
        );
        assert_eq!(patched.unwrap()["l"], json!([1, 2, 3]));
        assert_eq!(json_patch(&doc, &json!([{"op": "test", "path": "/a/b", "value": 2}])).unwrap_err().code, 422);
        assert_eq!(json_patch(&doc, &json!({"op": "nonsense"})).unwrap_err().code, 400);
    }

    #[test]
    fn apply_removes_what_the_manager_no_longer_applies() {
        let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1"}},
                           "data": {"x": "1", "y": "2"}});
        let none = json!({});
        let (live, fields) =
            apply(&json!({"metadata": {"name": "c"}, "data": {"other": "kept"}}), &first, None, &none).unwrap();
        assert_eq!(fields["f:data"], json!({"f:x": {}, "f:y": {}}));
        let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "3"}});
        let (after, _) = apply(&live, &second, Some(&fields), &none).unwrap();
        assert_eq!(after["data"], json!({"x": "3", "other": "kept"}));
        assert!(after["metadata"].get("labels").is_none(), "the label it stopped applying: {after}");
        // A field another manager also owns stays when the applier stops applying it.
        let others = json!({"f:data": {"f:y": {}}, "f:metadata": {"f:labels": {"f:a": {}}}});
        let (shared, _) = apply(&live, &second, Some(&fields), &others).unwrap();
        assert_eq!(shared["data"], json!({"x": "3", "y": "2", "other": "kept"}));
        assert_eq!(shared["metadata"]["labels"], json!({"a": "1"}));
    }
}
