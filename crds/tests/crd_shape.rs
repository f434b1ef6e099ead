//! The generated CRDs are valid `apiextensions.k8s.io/v1` definitions with structural
//! schemas, and carry the names, columns and subresources `kubectl` users rely on.

use std::collections::BTreeMap;

use serde_json::Value;

/// Walks a schema node, collecting every way it breaks the structural-schema rules or our
/// own rule that every field is documented.
fn check_structural(path: &str, node: &Value, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for forbidden in ["$ref", "definitions", "$defs", "oneOf", "anyOf", "allOf", "not"] {
        if map.contains_key(forbidden) {
            problems.push(format!("{path}: uses {forbidden}"));
        }
    }
    let typed = map.contains_key("type")
        || map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !typed {
        problems.push(format!("{path}: has no type"));
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!("{path}: has both properties and additionalProperties"));
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = map
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for r in &required {
            if !props.contains_key(*r) {
                problems.push(format!("{path}: requires unknown property {r}"));
            }
        }
        for (name, child) in props {
            let child_path = format!("{path}.{name}");
            let described = child.get("description").and_then(Value::as_str).is_some_and(|d| !d.trim().is_empty());
            if !described {
                problems.push(format!("{child_path}: has no description"));
            }
            check_structural(&child_path, child, problems);
        }
    }
    if let Some(items) = map.get("items") {
        if let Some(keys) = map.get("x-kubernetes-list-map-keys").and_then(Value::as_array) {
            let required: Vec<&Value> =
                items.get("required").and_then(Value::as_array).map(|r| r.iter().collect()).unwrap_or_default();
            for key in keys {
                if !required.contains(&key) {
                    problems.push(format!("{path}: list-map key {key} is not required in its items"));
                }
            }
        }
        check_structural(&format!("{path}[]"), items, problems);
    }
    if let Some(additional) = map.get("additionalProperties").filter(|a| a.is_object()) {
        check_structural(&format!("{path}{{}}"), additional, problems);
    }
}

#[test]
fn every_crd_has_a_structural_documented_schema() {
    for crd in vellum_crds::all_crds() {
        let kind = crd.spec.names.kind.clone();
        assert_eq!(crd.spec.versions.len(), 1, "{kind}");
        let version = &crd.spec.versions[0];
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        let mut problems = Vec::new();
        check_structural(&kind, &schema, &mut problems);
        assert!(problems.is_empty(), "{kind}:\n{}", problems.join("\n"));
    }
}

/// Every string under a `format` key of a schema, with where it is.
fn formats(path: &str, value: &serde_json::Value, found: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(format) = map.get("format").and_then(serde_json::Value::as_str) {
                found.push((path.to_owned(), format.to_owned()));
            }
            for (key, child) in map {
                formats(&format!("{path}.{key}"), child, found);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| formats(path, item, found)),
        _ => {}
    }
}

/// The real API server warns on every apply about a format it does not know (schemars
/// writes `uint32` for a `u32`); the generated CRDs use only the ones it knows.
#[test]
fn every_schema_format_is_one_the_api_server_knows() {
    let known = ["int32", "int64", "float", "double", "byte", "date", "date-time", "password", "uri", "email"];
    for crd in vellum_crds::all_crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut found = Vec::new();
        formats(&crd.spec.names.kind, &schema, &mut found);
        let unknown: Vec<_> = found.iter().filter(|(_, f)| !known.contains(&f.as_str())).collect();
        assert!(unknown.is_empty(), "{unknown:?}");
    }
}

#[test]
fn every_crd_is_namespaced_served_stored_with_status_and_in_the_vellum_category() {
    let short_names: BTreeMap<&str, &str> = BTreeMap::from([
        ("StorageTier", "st"),
        ("RetentionPolicy", "rp"),
        ("Webhook", "wh"),
        ("ShardSet", "shs"),
        ("BlueGreenRelease", "bgr"),
    ]);
    let crds = vellum_crds::all_crds();
    assert_eq!(crds.len(), 5);
    for crd in crds {
        let kind = crd.spec.names.kind.as_str();
        let value = serde_json::to_value(&crd).unwrap();
        assert_eq!(value["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(value["kind"], "CustomResourceDefinition");
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.vellum.dev", crd.spec.names.plural).as_str()));
        assert_eq!(crd.spec.group, vellum_crds::GROUP);
        assert_eq!(crd.spec.scope, "Namespaced", "{kind}");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short_names[kind].to_owned()][..]), "{kind}");
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&[vellum_crds::CATEGORY.to_owned()][..]), "{kind}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, vellum_crds::VERSION);
        assert!(version.served && version.storage, "{kind}");
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{kind} has a status subresource"
        );
        let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns.last(), Some(&"Age"), "{kind}: Age is the last column");
        // Every column's path names a field that exists in the schema.
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        for column in version.additional_printer_columns.iter().flatten() {
            if column.json_path.starts_with(".metadata") {
                continue;
            }
            // Drop `[*]` and `[?(...)]` parts: they select items, the fields are what matter.
            let mut plain = String::new();
            let mut depth = 0;
            for c in column.json_path.chars() {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ if depth == 0 => plain.push(c),
                    _ => {}
                }
            }
            let mut node = &schema;
            for field in plain.trim_start_matches('.').split('.') {
                node = if node.get("type") == Some(&Value::String("array".into())) { &node["items"] } else { node };
                node = &node["properties"][field];
                assert!(!node.is_null(), "{kind}: column {} names a missing field {field}", column.name);
            }
        }
    }
}

#[test]
fn printer_columns_are_the_ones_platform_engineers_asked_for() {
    let columns = |kind: &str| -> Vec<String> {
        let crd = vellum_crds::all_crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(columns("Webhook"), ["URL", "Ready", "Active", "Success %", "Last Triggered", "Age"]);
    let bgr = columns("BlueGreenRelease");
    for wanted in ["Phase", "Active", "Preview", "Age"] {
        assert!(bgr.iter().any(|c| c == wanted), "BlueGreenRelease lacks {wanted}: {bgr:?}");
    }
    for kind in ["StorageTier", "RetentionPolicy", "ShardSet", "BlueGreenRelease"] {
        assert!(columns(kind).iter().any(|c| c == "Ready"), "{kind} shows Ready");
    }
}
