//! Server-side printing: the `Table` that `kubectl get` asks for, with a CRD's
//! `additionalPrinterColumns` (simple JSONPath: `.status.phase`, `.spec.replicas`,
//! `.status.conditions[?(@.type=="Ready")].status`).

use serde_json::{Value, json};

use crate::meta;
use crate::registry::ResourceType;

/// Evaluates the JSONPath subset printer columns use.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('$');
    let mut at = object;
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, after) = rest.split_at(end);
        if !field.is_empty() {
            at = at.get(field)?;
        }
        rest = after;
        if let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']')?;
            let selector = &inner[..close];
            rest = &inner[close + 1..];
            at = if let Some(filter) = selector.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (key, value) = filter.split_once("==")?;
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                at.as_array()?.iter().find(|item| item.get(key.trim()).and_then(Value::as_str) == Some(value))?
            } else {
                at.get(selector.parse::<usize>().ok()?)?
            };
        }
        rest = rest.trim_start_matches('.');
    }
    Some(at)
}

/// How long ago a timestamp was, as kubectl shows ages (`45s`, `3m`, `2h`, `5d`).
pub fn age(timestamp: &str) -> String {
    let Ok(then) = time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339) else {
        return "<unknown>".into();
    };
    short((time::OffsetDateTime::now_utc() - then).whole_seconds())
}

/// A duration as kubectl shows ages: `45s`, `12m`, `5h`, `3d`.
fn short(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86_400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn cell(object: &Value, column: &Value) -> Value {
    let path = column.get("jsonPath").and_then(Value::as_str).unwrap_or_default();
    let value = json_path(object, path);
    match (column.get("type").and_then(Value::as_str), value) {
        (_, None | Some(Value::Null)) => Value::Null,
        (Some("date"), Some(Value::String(s))) => json!(age(s)),
        (_, Some(v)) => v.clone(),
    }
}

/// The columns and cells of one type.
fn columns(t: &ResourceType) -> Vec<Value> {
    let column = |name: &str, kind: &str, description: &str| {
        json!({"name": name, "type": kind, "format": if name == "Name" { "name" } else { "" },
               "description": description, "priority": 0})
    };
    let mut cols = vec![column("Name", "string", "Name must be unique within a namespace.")];
    if let Some(crd) = &t.crd {
        if crd.printer_columns.is_empty() {
            cols.push(column("Age", "date", "CreationTimestamp"));
        }
        for c in &crd.printer_columns {
            let mut def = column(
                c.get("name").and_then(Value::as_str).unwrap_or_default(),
                c.get("type").and_then(Value::as_str).unwrap_or("string"),
                c.get("description").and_then(Value::as_str).unwrap_or_default(),
            );
            def["priority"] = c.get("priority").cloned().unwrap_or(json!(0));
            cols.push(def);
        }
        return cols;
    }
    match t.kind.as_str() {
        "Pod" => {
            for (n, k) in [("Ready", "string"), ("Status", "string"), ("Restarts", "string")] {
                cols.push(column(n, k, ""));
            }
        }
        "Deployment" => {
            for (n, k) in [("Ready", "string"), ("Up-to-date", "string"), ("Available", "string")] {
                cols.push(column(n, k, ""));
            }
        }
        "Namespace" => cols.push(column("Status", "string", "The status of the namespace")),
        "Job" => {
            for (n, k) in [("Status", "string"), ("Completions", "string"), ("Duration", "string")] {
                cols.push(column(n, k, ""));
            }
        }
        "CronJob" => {
            for (n, k) in [
                ("Schedule", "string"),
                ("Timezone", "string"),
                ("Suspend", "boolean"),
                ("Active", "integer"),
                ("Last Schedule", "string"),
            ] {
                cols.push(column(n, k, ""));
            }
        }
        "Node" => {
            for (n, k) in [("Status", "string"), ("Roles", "string")] {
                cols.push(column(n, k, ""));
            }
        }
        _ => {}
    }
    cols.push(column("Age", "string", "CreationTimestamp"));
    if t.kind == "Node" {
        cols.push(column("Version", "string", ""));
    }
    cols
}

fn cells(t: &ResourceType, object: &Value) -> Vec<Value> {
    let mut cells = vec![json!(meta::name(object))];
    if let Some(crd) = &t.crd {
        if crd.printer_columns.is_empty() {
            cells.push(json!(age(meta::str_at(object, "/metadata/creationTimestamp").unwrap_or_default())));
        }
        for c in &crd.printer_columns {
            cells.push(cell(object, c));
        }
        return cells;
    }
    let int = |p: &str| object.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    match t.kind.as_str() {
        "Pod" => {
            let statuses =
                object.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
            let total = object.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
            let ready = statuses.iter().filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true)).count();
            let restarts: i64 = statuses.iter().filter_map(|s| s.get("restartCount").and_then(Value::as_i64)).sum();
            cells.push(json!(format!("{ready}/{total}")));
            cells.push(json!(pod_status(object)));
            let last = statuses
                .iter()
                .filter_map(|s| meta::str_at(s, "/lastState/terminated/finishedAt"))
                .max()
                .map(|at| format!(" ({} ago)", age(at)));
            cells.push(json!(format!("{restarts}{}", last.filter(|_| restarts > 0).unwrap_or_default())));
        }
        "Deployment" => {
            cells.push(json!(format!("{}/{}", int("/status/readyReplicas"), int("/spec/replicas"))));
            cells.push(json!(int("/status/updatedReplicas").to_string()));
            cells.push(json!(int("/status/availableReplicas").to_string()));
        }
        "Namespace" => cells.push(json!(meta::str_at(object, "/status/phase").unwrap_or("Active"))),
        "Job" => {
            let conditions =
                object.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            let has = |kind: &str| conditions.iter().any(|c| c["type"] == kind && c["status"] == "True");
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if has("Suspended") {
                "Suspended"
            } else {
                "Running"
            };
            cells.push(json!(status));
            let completions = object.pointer("/spec/completions").and_then(Value::as_i64);
            let succeeded = int("/status/succeeded");
            cells.push(json!(completions.map_or_else(
                || format!("{succeeded}/1 of {}", int("/spec/parallelism")),
                |c| format!("{succeeded}/{c}")
            )));
            let start = meta::str_at(object, "/status/startTime").and_then(meta::parse_time);
            let end = meta::str_at(object, "/status/completionTime")
                .and_then(meta::parse_time)
                .unwrap_or_else(time::OffsetDateTime::now_utc);
            cells.push(json!(start.map(|s| short((end - s).whole_seconds())).unwrap_or_default()));
        }
        "CronJob" => {
            cells.push(json!(meta::str_at(object, "/spec/schedule").unwrap_or_default()));
            cells.push(json!(meta::str_at(object, "/spec/timeZone").unwrap_or("<none>")));
            cells.push(json!(object.pointer("/spec/suspend").and_then(Value::as_bool).unwrap_or(false)));
            cells.push(json!(object.pointer("/status/active").and_then(Value::as_array).map_or(0, Vec::len)));
            cells
                .push(json!(meta::str_at(object, "/status/lastScheduleTime").map_or_else(|| "<none>".to_owned(), age)));
        }
        "Node" => {
            let ready = object
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            cells.push(json!(if ready { "Ready" } else { "NotReady" }));
            let roles: Vec<&str> = object
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|l| l.keys().filter_map(|k| k.strip_prefix("node-role.kubernetes.io/")).collect())
                .unwrap_or_default();
            cells.push(json!(if roles.is_empty() { "<none>".to_owned() } else { roles.join(",") }));
        }
        _ => {}
    }
    cells.push(json!(age(meta::str_at(object, "/metadata/creationTimestamp").unwrap_or_default())));
    if t.kind == "Node" {
        cells.push(json!(meta::str_at(object, "/status/nodeInfo/kubeletVersion").unwrap_or_default()));
    }
    cells
}

/// The STATUS column of a pod, as the API server's printer words it: the reason a container
/// waits or ended, `Init:…` while initialising, `Terminating` once deleted.
fn pod_status(pod: &Value) -> String {
    let list = |p: &str| pod.pointer(p).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut reason = meta::str_at(pod, "/status/reason")
        .or_else(|| meta::str_at(pod, "/status/phase"))
        .unwrap_or("Pending")
        .to_owned();
    let ended = |t: &Value| match meta::str_at(t, "/reason") {
        Some(r) if !r.is_empty() => r.to_owned(),
        _ => match t.get("signal").and_then(Value::as_i64) {
            Some(sig) if sig != 0 => format!("Signal:{sig}"),
            _ => format!("ExitCode:{}", t.get("exitCode").and_then(Value::as_i64).unwrap_or(0)),
        },
    };
    let init = list("/status/initContainerStatuses");
    let total_init = list("/spec/initContainers").len();
    let mut initializing = false;
    for (i, s) in init.iter().enumerate() {
        if let Some(t) = s.pointer("/state/terminated") {
            if t.get("exitCode").and_then(Value::as_i64) == Some(0) {
                continue;
            }
            reason = format!("Init:{}", ended(t));
        } else if let Some(w) =
            meta::str_at(s, "/state/waiting/reason").filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            reason = format!("Init:{w}");
        } else {
            reason = format!("Init:{i}/{total_init}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut running = false;
        for s in list("/status/containerStatuses").iter().rev() {
            if let Some(w) = meta::str_at(s, "/state/waiting/reason").filter(|r| !r.is_empty()) {
                w.clone_into(&mut reason);
            } else if let Some(t) = s.pointer("/state/terminated") {
                reason = ended(t);
            } else if s.pointer("/state/running").is_some() && s.get("ready").and_then(Value::as_bool) == Some(true) {
                running = true;
            }
        }
        if reason == "Completed" && running {
            let ready = list("/status/conditions").iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready { "Running" } else { "NotReady" }.clone_into(&mut reason);
        }
    }
    if meta::deleting(pod) {
        "Terminating".clone_into(&mut reason);
    }
    reason
}

/// A `meta.k8s.io/v1` Table of these objects; `include` is `None`, `Metadata` or `Object`.
pub fn table(t: &ResourceType, objects: &[Value], rv: &str, include: &str) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let object = match include {
                "None" => Value::Null,
                "Object" => o.clone(),
                _ => {
                    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
                }
            };
            json!({"cells": cells(t, o), "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": columns(t),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let o = json!({"status": {"phase": "Ready", "conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
                       "spec": {"items": [1, 2]}});
        assert_eq!(json_path(&o, ".status.phase"), Some(&json!("Ready")));
        assert_eq!(json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"), Some(&json!("True")));
        assert_eq!(json_path(&o, ".spec.items[1]"), Some(&json!(2)));
        assert_eq!(json_path(&o, ".spec.missing"), None);
        assert_eq!(age("not a time"), "<unknown>");
    }
}
