//! The fast, client-side judge of custom resources: the generated CRD schemas applied the
//! way an API server applies them (schema defaults, the OpenAPI schema with unknown fields
//! rejected, then the CEL rules), the examples of `manifests/examples/`, and a table of bad
//! resources with the field each must be refused for. `crds/tests/schema.rs` checks the
//! judge against the table; the end-to-end suite checks the real API server's verdicts
//! against the judge's.
#![allow(dead_code)] // each includer uses its part

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

/// A rejection: the Kubernetes-style field path (`spec.transitions[0].afterDays`) and why.
#[derive(Debug, Clone)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

pub fn crd_for(kind: &str) -> CustomResourceDefinition {
    vellum_crds::all_crds()
        .into_iter()
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"))
}

pub fn openapi_schema(kind: &str) -> Value {
    let crd = crd_for(kind);
    let schema = crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
    let mut schema = serde_json::to_value(schema).unwrap();
    // The API server supplies the schema of the fields every object has.
    let props = schema["properties"].as_object_mut().unwrap();
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert("metadata".into(), json!({"type": "object"}));
    schema
}

/// Turns the OpenAPI v3 schema of a CRD into a JSON Schema: `nullable` becomes a `null`
/// type, and objects that declare their properties reject unknown ones.
pub fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                if k.starts_with("x-kubernetes-") || k == "nullable" {
                    continue;
                }
                let v = match k.as_str() {
                    "properties" => Value::Object(
                        v.as_object().unwrap().iter().map(|(p, s)| (p.clone(), to_json_schema(s))).collect(),
                    ),
                    "items" | "additionalProperties" if v.is_object() => to_json_schema(v),
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = map.get("type")
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserves {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// `/spec/transitions/0/afterDays` → `spec.transitions[0].afterDays`
pub fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push('[');
            out.push_str(seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() { child.to_owned() } else { format!("{parent}.{child}") }
}

/// Validates a resource as an API server would, returning every violation.
pub fn validate(object: &Value) -> Vec<Violation> {
    let kind = object["kind"].as_str().expect("resource has a kind");
    let schema = openapi_schema(kind);
    let defaulted = kube_cel::apply_defaults(&schema, object);

    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .should_validate_formats(false)
        .build(&to_json_schema(&schema))
        .expect("CRD schema compiles as JSON Schema");
    let mut out: Vec<Violation> = validator
        .iter_errors(&defaulted)
        .map(|e| {
            let parent = field_path(e.instance_path().as_str());
            let path = match e.kind() {
                jsonschema::error::ValidationErrorKind::Required { property } => {
                    join(&parent, property.as_str().unwrap_or_default())
                }
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                    join(&parent, &unexpected.join(","))
                }
                _ => parent,
            };
            Violation { path, message: e.to_string() }
        })
        .collect();
    if out.is_empty() {
        // The API server runs CEL rules only on objects that passed the schema.
        out.extend(
            kube_cel::validate(&schema, &defaulted, None)
                .into_iter()
                .map(|e| Violation { path: e.field_path.trim_start_matches('.').to_owned(), message: e.message }),
        );
    }
    out
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every document of every file in `manifests/examples/`.
pub fn examples() -> Vec<(String, Value)> {
    let dir = repo_root().join("manifests/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            out.push((file.file_name().unwrap().to_string_lossy().into_owned(), value));
        }
    }
    out
}

pub fn example(kind: &str) -> Value {
    examples()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no example of kind {kind}"))
}

/// One bad resource: an example with one change, and the field it must be rejected for.
pub struct Case {
    pub name: &'static str,
    pub kind: &'static str,
    pub change: fn(&mut Value),
    pub path: &'static str,
    pub message: &'static str,
}

pub fn set(v: &mut Value, pointer: &str, new: Value) {
    *v.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer}")) = new;
}

pub fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent).unwrap().as_object_mut().unwrap().remove(key).unwrap_or_else(|| panic!("no {pointer}"));
}

pub const CASES: &[Case] = &[
    // StorageTier
    Case {
        name: "unknown tier class",
        kind: "StorageTier",
        change: |v| set(v, "/spec/class", json!("LUKEWARM")),
        path: "spec.class",
        message: "LUKEWARM",
    },
    Case {
        name: "missing class",
        kind: "StorageTier",
        change: |v| remove(v, "/spec/class"),
        path: "spec.class",
        message: "required",
    },
    Case {
        name: "backend url of an unknown scheme",
        kind: "StorageTier",
        change: |v| set(v, "/spec/backend/url", json!("ftp://bucket")),
        path: "spec.backend.url",
        message: "does not match",
    },
    Case {
        name: "negative cost",
        kind: "StorageTier",
        change: |v| set(v, "/spec/costPerGbMonth", json!(-0.5)),
        path: "spec.costPerGbMonth",
        message: "minimum",
    },
    Case {
        name: "zstd level above 22",
        kind: "StorageTier",
        change: |v| set(v, "/spec/compression/level", json!(23)),
        path: "spec.compression.level",
        message: "maximum",
    },
    Case {
        name: "misspelt field",
        kind: "StorageTier",
        change: |v| v["spec"]["defualt"] = json!(true),
        path: "spec.defualt",
        message: "not allowed",
    },
    Case {
        name: "credentials on a memory backend",
        kind: "StorageTier",
        change: |v| set(v, "/spec/backend/url", json!("memory://")),
        path: "spec.backend",
        message: "a memory:// backend takes no credentials",
    },
    // RetentionPolicy
    Case {
        name: "negative afterDays",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/transitions/0/afterDays", json!(-1)),
        path: "spec.transitions[0].afterDays",
        message: "minimum",
    },
    Case {
        name: "transitions out of order",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/transitions/1/afterDays", json!(10)),
        path: "spec.transitions",
        message: "strictly increasing afterDays",
    },
    Case {
        name: "two transitions on one day",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/transitions/1/afterDays", json!(30)),
        path: "spec.transitions",
        message: "strictly increasing afterDays",
    },
    Case {
        name: "expiration before a transition",
        kind: "RetentionPolicy",
        change: |v| v["spec"]["expiration"] = json!({"afterDays": 100}),
        path: "spec.expiration.afterDays",
        message: "later than every transition",
    },
    Case {
        name: "unknown expiration action",
        kind: "RetentionPolicy",
        change: |v| v["spec"]["expiration"] = json!({"afterDays": 400, "action": "SHRED"}),
        path: "spec.expiration.action",
        message: "SHRED",
    },
    Case {
        name: "archive tier on a DELETE",
        kind: "RetentionPolicy",
        change: |v| v["spec"]["expiration"] = json!({"afterDays": 400, "archiveTier": "frozen"}),
        path: "spec.expiration.archiveTier",
        message: "only to the ARCHIVE action",
    },
    Case {
        name: "cron with three fields",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/schedule", json!("0 3 *")),
        path: "spec.schedule",
        message: "does not match",
    },
    Case {
        name: "cron in words",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/schedule", json!("every night")),
        path: "spec.schedule",
        message: "does not match",
    },
    Case {
        name: "tier name with capitals",
        kind: "RetentionPolicy",
        change: |v| set(v, "/spec/transitions/0/toTier", json!("Warm")),
        path: "spec.transitions[0].toTier",
        message: "does not match",
    },
    // Webhook
    Case {
        name: "missing url",
        kind: "Webhook",
        change: |v| remove(v, "/spec/url"),
        path: "spec.url",
        message: "required",
    },
    Case {
        name: "url not http",
        kind: "Webhook",
        change: |v| set(v, "/spec/url", json!("ftp://example.com/hook")),
        path: "spec.url",
        message: "does not match",
    },
    Case {
        name: "missing signing key",
        kind: "Webhook",
        change: |v| remove(v, "/spec/secretRef"),
        path: "spec.secretRef",
        message: "required",
    },
    Case {
        name: "21 retries",
        kind: "Webhook",
        change: |v| set(v, "/spec/retry/maxRetries", json!(21)),
        path: "spec.retry.maxRetries",
        message: "maximum",
    },
    Case {
        name: "timeout of zero",
        kind: "Webhook",
        change: |v| set(v, "/spec/timeoutSeconds", json!(0)),
        path: "spec.timeoutSeconds",
        message: "minimum",
    },
    Case {
        name: "timeout over 300 s",
        kind: "Webhook",
        change: |v| set(v, "/spec/timeoutSeconds", json!(301)),
        path: "spec.timeoutSeconds",
        message: "maximum",
    },
    Case {
        name: "failure rate over 100 %",
        kind: "Webhook",
        change: |v| set(v, "/spec/deactivation/failureRatePercent", json!(150)),
        path: "spec.deactivation.failureRatePercent",
        message: "maximum",
    },
    Case {
        name: "unknown event type",
        kind: "Webhook",
        change: |v| set(v, "/spec/eventTypes/0", json!("DOCUMENT_EATEN")),
        path: "spec.eventTypes[0]",
        message: "DOCUMENT_EATEN",
    },
    Case {
        name: "backoff cap below the first backoff",
        kind: "Webhook",
        change: |v| set(v, "/spec/retry/maxBackoffSeconds", json!(1)),
        path: "spec.retry.maxBackoffSeconds",
        message: "at least initialBackoffSeconds",
    },
    Case {
        name: "overriding the signature header",
        kind: "Webhook",
        change: |v| {
            v["spec"]["headers"].as_array_mut().unwrap().push(json!({"name": "Webhook-Signature", "value": "forged"}));
        },
        path: "spec.headers",
        message: "cannot be overridden",
    },
    Case {
        name: "header name with a space",
        kind: "Webhook",
        change: |v| set(v, "/spec/headers/0/name", json!("X Bad")),
        path: "spec.headers[0].name",
        message: "does not match",
    },
    // ShardSet
    Case {
        name: "zero shards",
        kind: "ShardSet",
        change: |v| set(v, "/spec/shards", json!([])),
        path: "spec.shards",
        message: "less than 1 item",
    },
    Case {
        name: "missing shards",
        kind: "ShardSet",
        change: |v| remove(v, "/spec/shards"),
        path: "spec.shards",
        message: "required",
    },
    Case {
        name: "duplicate shard names",
        kind: "ShardSet",
        change: |v| set(v, "/spec/shards/1/name", json!("shard-a")),
        path: "spec.shards",
        message: "shard names must be unique",
    },
    Case {
        name: "unknown routing strategy",
        kind: "ShardSet",
        change: |v| set(v, "/spec/routing/strategy", json!("RoundRobin")),
        path: "spec.routing.strategy",
        message: "RoundRobin",
    },
    Case {
        name: "zero virtual nodes",
        kind: "ShardSet",
        change: |v| set(v, "/spec/routing/virtualNodes", json!(0)),
        path: "spec.routing.virtualNodes",
        message: "minimum",
    },
    Case {
        name: "range routing without ranges",
        kind: "ShardSet",
        change: |v| set(v, "/spec/routing/strategy", json!("Range")),
        path: "spec.shards",
        message: "rangeStart on every shard",
    },
    Case {
        name: "ranges under consistent hashing",
        kind: "ShardSet",
        change: |v| v["spec"]["shards"][0]["rangeStart"] = json!(""),
        path: "spec.shards",
        message: "only to Range routing",
    },
    // BlueGreenRelease
    Case {
        name: "negative replicas",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/gateway/replicas", json!(-1)),
        path: "spec.gateway.replicas",
        message: "minimum",
    },
    Case {
        name: "error rate over 100 %",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/analysis/maxErrorRatePercent", json!(101)),
        path: "spec.analysis.maxErrorRatePercent",
        message: "maximum",
    },
    Case {
        name: "autoscaling max below min",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/gateway/autoscaling/maxReplicas", json!(1)),
        path: "spec.gateway.autoscaling.maxReplicas",
        message: "at least minReplicas",
    },
    Case {
        name: "version with a space",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/version", json!("1.0 beta")),
        path: "spec.version",
        message: "does not match",
    },
    Case {
        name: "nats url over http",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/nats/url", json!("http://nats:4222")),
        path: "spec.nats.url",
        message: "does not match",
    },
    Case {
        name: "unknown jwt algorithm",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/jwt/algorithm", json!("none")),
        path: "spec.jwt.algorithm",
        message: "none",
    },
    Case {
        name: "smoke check path without a slash",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/smokeChecks/0/path", json!("readyz")),
        path: "spec.smokeChecks[0].path",
        message: "does not match",
    },
    Case {
        name: "smoke check expecting status 600",
        kind: "BlueGreenRelease",
        change: |v| set(v, "/spec/smokeChecks/1/expectStatus", json!(600)),
        path: "spec.smokeChecks[1].expectStatus",
        message: "maximum",
    },
    Case {
        name: "missing shard set",
        kind: "BlueGreenRelease",
        change: |v| remove(v, "/spec/shardSetRef"),
        path: "spec.shardSetRef",
        message: "required",
    },
];
