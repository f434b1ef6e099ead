//! The generated CRD schemas judge custom resources the way an API server does: every
//! example in `manifests/examples/` parses into its Rust type and passes, and every bad
//! resource in the table below is rejected for the field that is wrong.
//!
//! Validation follows the API server's order: schema defaults are applied, the OpenAPI
//! schema is checked (by the `jsonschema` crate, with unknown fields rejected as
//! `kubectl`'s strict field validation does), then the `x-kubernetes-validations` CEL rules
//! run (by `kube-cel`).

mod judge;

use judge::{CASES, example, examples, openapi_schema, validate};
use serde_json::{Value, json};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, ShardSet, StorageTier, Webhook};

#[test]
fn every_example_parses_into_its_rust_type_and_passes_the_schema() {
    let mut seen = std::collections::BTreeSet::new();
    for (file, value) in examples() {
        let kind = value["kind"].as_str().unwrap().to_owned();
        let name = value["metadata"]["name"].as_str().unwrap().to_owned();
        let parsed = match kind.as_str() {
            "StorageTier" => serde_json::from_value::<StorageTier>(value.clone()).map(|_| ()),
            "RetentionPolicy" => serde_json::from_value::<RetentionPolicy>(value.clone()).map(|_| ()),
            "Webhook" => serde_json::from_value::<Webhook>(value.clone()).map(|_| ()),
            "ShardSet" => serde_json::from_value::<ShardSet>(value.clone()).map(|_| ()),
            "BlueGreenRelease" => serde_json::from_value::<BlueGreenRelease>(value.clone()).map(|_| ()),
            "Secret" => continue,
            other => panic!("{file}: unexpected kind {other}"),
        };
        parsed.unwrap_or_else(|e| panic!("{file}: {kind}/{name} does not parse: {e}"));
        let violations = validate(&value);
        assert!(violations.is_empty(), "{file}: {kind}/{name} rejected: {violations:?}");
        seen.insert(kind);
    }
    let all: std::collections::BTreeSet<String> =
        vellum_crds::all_crds().into_iter().map(|c| c.spec.names.kind).collect();
    assert_eq!(seen, all, "every resource kind has an example");
}

#[test]
fn schema_defaults_match_serde_defaults() {
    // A minimal object defaulted by the schema and the same object defaulted by serde must
    // be the same resource.
    for kind in ["StorageTier", "RetentionPolicy", "Webhook", "ShardSet", "BlueGreenRelease"] {
        let minimal = minimal_of(kind);
        let schema = openapi_schema(kind);
        let by_schema = kube_cel::apply_defaults(&schema, &minimal);
        let (a, b) = match kind {
            "StorageTier" => roundtrip::<StorageTier>(&minimal, &by_schema),
            "RetentionPolicy" => roundtrip::<RetentionPolicy>(&minimal, &by_schema),
            "Webhook" => roundtrip::<Webhook>(&minimal, &by_schema),
            "ShardSet" => roundtrip::<ShardSet>(&minimal, &by_schema),
            "BlueGreenRelease" => roundtrip::<BlueGreenRelease>(&minimal, &by_schema),
            _ => unreachable!(),
        };
        assert_eq!(a, b, "{kind}: schema defaults differ from serde defaults");
    }
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(raw: &Value, defaulted: &Value) -> (Value, Value) {
    let by_serde: T = serde_json::from_value(raw.clone()).unwrap();
    let by_schema: T = serde_json::from_value(defaulted.clone()).unwrap();
    (serde_json::to_value(by_serde).unwrap(), serde_json::to_value(by_schema).unwrap())
}

/// The smallest valid object of each kind: only required fields.
fn minimal_of(kind: &str) -> Value {
    let spec = match kind {
        "StorageTier" => json!({"class": "HOT", "backend": {"url": "memory://"}}),
        "RetentionPolicy" => {
            json!({"transitions": [{"afterDays": 30, "toTier": "warm"}], "expiration": {"afterDays": 60}})
        }
        "Webhook" => {
            json!({"url": "https://example.com/hook", "secretRef": {"name": "s", "key": "k"}, "rateLimit": {"requestsPerSecond": 5}})
        }
        "ShardSet" => json!({"shards": [{"name": "a", "urlSecretRef": {"name": "s", "key": "a"}}]}),
        "BlueGreenRelease" => json!({
            "version": "1", "gateway": {"image": "g", "autoscaling": {"maxReplicas": 3}}, "workers": {"image": "w"},
            "shardSetRef": "s", "nats": {"url": "nats://n:4222"}, "jwt": {"secretRef": {"name": "j", "key": "k"}},
            "smokeChecks": [{"name": "ready", "path": "/readyz"}]
        }),
        other => panic!("no minimal object for {other}"),
    };
    json!({"apiVersion": "vellum.dev/v1alpha1", "kind": kind, "metadata": {"name": "m"}, "spec": spec})
}

#[test]
fn minimal_objects_are_valid() {
    for kind in ["StorageTier", "RetentionPolicy", "Webhook", "ShardSet", "BlueGreenRelease"] {
        let violations = validate(&minimal_of(kind));
        assert!(violations.is_empty(), "{kind}: {violations:?}");
    }
}

#[test]
fn bad_resources_are_rejected_for_the_right_field() {
    let mut failures = Vec::new();
    for case in CASES {
        let mut object = example(case.kind);
        (case.change)(&mut object);
        let violations = validate(&object);
        let hit = violations.iter().any(|v| v.path == case.path && v.message.contains(case.message));
        if !hit {
            failures.push(format!(
                "{} ({}): expected {} ~ {:?}, got {:?}",
                case.name, case.kind, case.path, case.message, violations
            ));
        }
    }
    assert!(failures.is_empty(), "{} case(s) not rejected as expected:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_cel_rule_compiles() {
    for crd in vellum_crds::all_crds() {
        let schema =
            serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
                .unwrap();
        let compiled = kube_cel::compile_schema(&schema);
        let errors = compiled.compilation_errors();
        assert!(errors.is_empty(), "{}: {errors:?}", crd.spec.names.kind);
    }
}

/// Every CEL rule in the tree below `node`, with the schema node it is attached to.
fn rules_of<'a>(node: &'a kube_cel::CompiledSchema, out: &mut Vec<(String, &'a kube_cel::CompiledSchema)>) {
    for compiled in node.validations.iter().flatten() {
        out.push((compiled.rule.rule.clone(), node));
    }
    for child in node.properties.values() {
        rules_of(child, out);
    }
    if let Some(items) = &node.items {
        rules_of(items, out);
    }
    if let Some(additional) = &node.additional_properties {
        rules_of(additional, out);
    }
}

#[test]
fn cel_rules_stay_within_the_api_servers_cost_budget() {
    let mut count = 0;
    for crd in vellum_crds::all_crds() {
        let kind = crd.spec.names.kind.clone();
        let schema =
            serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
                .unwrap();
        let compiled = kube_cel::compile_schema(&schema);
        let mut rules = Vec::new();
        rules_of(&compiled, &mut rules);
        for (rule, node) in rules {
            count += 1;
            // (kube-cel's scope check does not know comprehension variables such as the `t`
            // of `all(t, …)`, so only the cost estimate is asked here; the CEL compile test
            // above and the rejection table cover the rest.)
            let warnings = kube_cel::estimate_rule_cost(&rule, node);
            assert!(warnings.is_empty(), "{kind}: {rule}: {warnings:?}");
        }
    }
    assert!(count >= 8, "every CEL rule was found ({count})");
}
