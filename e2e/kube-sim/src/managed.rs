//! Field ownership (`metadata.managedFields`), as server-side apply keeps it: each manager
//! owns a set of fields (`FieldsV1`); applying a field another manager owns with a different
//! value is a conflict unless forced, which takes the field over; any other write takes
//! ownership of the fields it changed.

use serde_json::{Map, Value, json};

use crate::meta;
use crate::patch::field_set;

/// A path of `FieldsV1` keys (`f:spec`, `k:{"name":"web"}`, `v:"x"`).
pub type Path = Vec<String>;

/// The leaf fields of a set.
pub fn leaves(set: &Value) -> Vec<Path> {
    let mut out = Vec::new();
    walk(set, &mut Vec::new(), &mut out);
    out
}

fn walk(set: &Value, prefix: &mut Path, out: &mut Vec<Path>) {
    let Some(map) = set.as_object() else { return };
    for (key, child) in map {
        if key == "." {
            continue;
        }
        prefix.push(key.clone());
        let has_children = child.as_object().is_some_and(|m| m.keys().any(|k| k != "."));
        if has_children {
            walk(child, prefix, out);
        } else {
            out.push(prefix.clone());
        }
        prefix.pop();
    }
}

/// The value at a field path, if the object has it.
pub fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = object;
    for key in path {
        at = if let Some(field) = key.strip_prefix("f:") {
            at.get(field)?
        } else if let Some(id) = key.strip_prefix("k:") {
            let Ok(Value::Object(id)) = serde_json::from_str::<Value>(id) else { return None };
            at.as_array()?.iter().find(|item| id.iter().all(|(k, v)| item.get(k) == Some(v)))?
        } else if let Some(v) = key.strip_prefix("v:") {
            let wanted: Value = serde_json::from_str(v).ok()?;
            at.as_array()?.iter().find(|item| **item == wanted)?
        } else {
            return None;
        };
    }
    Some(at)
}

/// `.spec.containers[name="web"].image`, as conflicts are reported.
pub fn display(path: &[String]) -> String {
    let mut out = String::new();
    for key in path {
        if let Some(field) = key.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(id) = key.strip_prefix("k:") {
            let inner = serde_json::from_str::<Map<String, Value>>(id)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            out.push('[');
            out.push_str(&inner);
            out.push(']');
        } else if let Some(v) = key.strip_prefix("v:") {
            out.push('[');
            out.push_str(v);
            out.push(']');
        }
    }
    out
}

fn insert(set: &mut Value, path: &[String]) {
    let mut at = set;
    for key in path {
        if !at.is_object() {
            *at = json!({});
        }
        let Some(map) = at.as_object_mut() else { return };
        at = map.entry(key.clone()).or_insert_with(|| json!({}));
    }
}

/// Removes a leaf (and the maps it leaves empty).
fn remove(set: &mut Value, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else { return false };
    let Some(map) = set.as_object_mut() else { return false };
    if rest.is_empty() {
        map.remove(first);
    } else if let Some(child) = map.get_mut(first)
        && remove(child, rest)
    {
        map.remove(first);
    }
    map.keys().all(|k| k == ".")
}

fn entries(object: &Value) -> Vec<Value> {
    object.pointer("/metadata/managedFields").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn is(entry: &Value, manager: &str, operation: &str) -> bool {
    entry.get("manager").and_then(Value::as_str) == Some(manager)
        && entry.get("operation").and_then(Value::as_str) == Some(operation)
}

/// One field another manager owns with a different value than the one applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub path: Path,
}

/// The conflicts of applying `applied` (whose fields are `fields`) by `manager` to `live`.
pub fn conflicts(live: &Value, applied: &Value, fields: &Value, manager: &str) -> Vec<Conflict> {
    let mine = leaves(fields);
    let mut found = Vec::new();
    for entry in entries(live) {
        let other = entry.get("manager").and_then(Value::as_str).unwrap_or_default();
        if is(&entry, manager, "Apply") {
            continue;
        }
        let theirs = leaves(entry.get("fieldsV1").unwrap_or(&Value::Null));
        for path in mine.iter().filter(|p| theirs.contains(p)) {
            if value_at(live, path) != value_at(applied, path) {
                found.push(Conflict {
                    manager: other.to_owned(),
                    api_version: entry.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    path: path.clone(),
                });
            }
        }
    }
    found
}

/// Records that `manager` now owns `fields` through `operation` (`Apply` replaces its set,
/// `Update` adds to it), and takes `taken` away from every other manager.
pub fn record(object: &mut Value, manager: &str, operation: &str, api_version: &str, fields: &Value, taken: &[Path]) {
    let mut list = entries(object);
    let pruned = prune_missing(object, &mut list);
    // A write that changed nothing leaves ownership (and its timestamps) alone.
    if !pruned && operation != "Apply" && leaves(fields).is_empty() {
        return;
    }
    if !pruned
        && operation == "Apply"
        && taken.is_empty()
        && list.iter().any(|e| is(e, manager, operation) && e.get("fieldsV1") == Some(fields))
    {
        return;
    }
    for entry in &mut list {
        if is(entry, manager, operation) {
            continue;
        }
        if let Some(set) = entry.get_mut("fieldsV1") {
            for path in taken {
                remove(set, path);
            }
        }
    }
    let mut set = if operation == "Apply" {
        fields.clone()
    } else {
        list.iter().find(|e| is(e, manager, operation)).and_then(|e| e.get("fieldsV1").cloned()).unwrap_or(json!({}))
    };
    if operation != "Apply" {
        for path in leaves(fields) {
            insert(&mut set, &path);
        }
    }
    list.retain(|e| !is(e, manager, operation));
    list.retain(|e| e.get("fieldsV1").and_then(Value::as_object).is_some_and(|m| !m.is_empty()));
    if set.as_object().is_some_and(|m| !m.is_empty()) {
        list.push(json!({
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": meta::now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": set,
        }));
    }
    if let Some(m) = meta::metadata_mut(object) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Drops, from every manager's set, the fields the object no longer has: a write that
/// removed a field (a patch setting it to null, say) removed its ownership too, as on a
/// real API server. Whether anything was dropped.
fn prune_missing(object: &Value, list: &mut [Value]) -> bool {
    let mut pruned = false;
    for entry in list.iter_mut() {
        let Some(set) = entry.get_mut("fieldsV1") else { continue };
        for path in leaves(set) {
            // `.` marks a list item or map owned as a whole: the item itself must exist.
            let probe = if path.last().is_some_and(|k| k == ".") { &path[..path.len() - 1] } else { &path[..] };
            if value_at(object, probe).is_none() {
                remove(set, &path);
                pruned = true;
            }
        }
    }
    pruned
}

/// The fields a write changed (added or given a new value), as a set.
pub fn changed(old: &Value, new: &Value) -> Value {
    let mut set = json!({});
    for path in leaves(&field_set(new, "")) {
        if value_at(old, &path) != value_at(new, &path) {
            insert(&mut set, &path);
        }
    }
    set
}

/// The fields a manager last applied.
pub fn applied_by(object: &Value, manager: &str) -> Option<Value> {
    entries(object).into_iter().find(|e| is(e, manager, "Apply")).and_then(|e| e.get("fieldsV1").cloned())
}

/// The union of the fields every other owner (any manager but this applier, or this
/// manager's updates) holds: fields the applier stops applying stay while they are in it.
pub fn owned_by_others(object: &Value, manager: &str) -> Value {
    fn union(into: &mut Value, set: &Value) {
        let (Some(into), Value::Object(set)) = (into.as_object_mut(), set) else { return };
        for (k, v) in set {
            union(into.entry(k.clone()).or_insert_with(|| json!({})), v);
        }
    }
    let mut all = json!({});
    for entry in entries(object).iter().filter(|e| !is(e, manager, "Apply")) {
        if let Some(fields) = entry.get("fieldsV1") {
            union(&mut all, fields);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_conflicts_with_another_owner_unless_forced_and_updates_take_ownership() {
        let mut live = json!({"metadata": {"name": "d"}, "spec": {"replicas": 1, "paused": false}});
        let first = json!({"spec": {"replicas": 1}});
        record(&mut live, "team", "Apply", "apps/v1", &field_set(&first, ""), &[]);
        // Another writer changes replicas and takes it over.
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        let taken = changed(&live, &scaled);
        record(&mut scaled, "hpa", "Update", "apps/v1", &taken, &leaves(&taken));
        assert!(applied_by(&scaled, "team").is_none(), "the field went to the updater: {scaled}");
        // The applier's own set is empty now, so re-applying 1 conflicts with the updater.
        let again = json!({"spec": {"replicas": 1}});
        let found = conflicts(&scaled, &again, &field_set(&again, ""), "team");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].manager, "hpa");
        assert_eq!(display(&found[0].path), ".spec.replicas");
        // The same value is shared ownership, not a conflict.
        let same = json!({"spec": {"replicas": 5}});
        assert!(conflicts(&scaled, &same, &field_set(&same, ""), "team").is_empty());
    }

    #[test]
    fn paths_reach_keyed_items() {
        let object = json!({"spec": {"containers": [{"name": "web", "image": "a"}]}});
        let path: Path = vec!["f:spec".into(), "f:containers".into(), r#"k:{"name":"web"}"#.into(), "f:image".into()];
        assert_eq!(value_at(&object, &path), Some(&json!("a")));
        assert_eq!(display(&path), r#".spec.containers[name="web"].image"#);
    }

    #[test]
    fn a_field_removed_by_an_update_is_no_ones_and_applies_without_conflict() {
        let mut live = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseTransitions": 1}});
        let first = json!({"spec": {"holderIdentity": "a"}});
        record(&mut live, "a", "Apply", "coordination.k8s.io/v1", &field_set(&first, ""), &[]);
        // Another writer deletes the field (a strategic merge patch with null).
        let mut released = live.clone();
        released["spec"].as_object_mut().unwrap().remove("holderIdentity");
        let taken = changed(&live, &released);
        record(&mut released, "b", "Update", "coordination.k8s.io/v1", &taken, &leaves(&taken));
        assert!(applied_by(&released, "a").is_none(), "ownership of a removed field is gone: {released}");
        let next = json!({"spec": {"holderIdentity": "b"}});
        assert!(conflicts(&released, &next, &field_set(&next, ""), "b").is_empty());
    }
}
