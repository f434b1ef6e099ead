//! The OpenAPI endpoints, as far as clients need them: kubectl reads the v3 document of a
//! group version to learn that the server validates fields itself (`fieldValidation` on
//! PATCH), and CRD schemas appear as their components.

use serde_json::{Map, Value, json};

use crate::registry::{Registry, ResourceType};

/// `/openapi/v2`: the Swagger 2.0 document (definitions of CRD types only).
pub fn v2(registry: &Registry) -> Value {
    let mut definitions = Map::new();
    for t in registry.all() {
        if let Some(schema) = t.crd.as_ref().and_then(|c| c.schema.clone()) {
            definitions.insert(definition_name(t), with_gvk(schema, t));
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": {},
        "definitions": definitions,
    })
}

fn path_key(t: &ResourceType) -> String {
    t.prefix().trim_start_matches('/').to_owned()
}

/// `/openapi/v3`: where each group version's document is.
pub fn v3_index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for t in registry.all() {
        let key = path_key(t);
        paths.entry(key.clone()).or_insert_with(|| json!({"serverRelativeURL": format!("/openapi/v3/{key}")}));
    }
    json!({"paths": paths})
}

fn definition_name(t: &ResourceType) -> String {
    let group: Vec<&str> = t.group.split('.').rev().collect();
    let group = if t.group.is_empty() { "io.k8s.api.core".to_owned() } else { group.join(".") };
    format!("{group}.{}.{}", t.version, t.kind)
}

fn gvk(t: &ResourceType) -> Value {
    json!([{"group": t.group, "version": t.version, "kind": t.kind}])
}

fn with_gvk(mut schema: Value, t: &ResourceType) -> Value {
    if let Some(map) = schema.as_object_mut() {
        map.insert("x-kubernetes-group-version-kind".into(), gvk(t));
    }
    schema
}

fn operation(t: &ResourceType, verb: &str, params: &[&str]) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
        .collect();
    json!({
        "operationId": format!("{verb}{}", t.kind),
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": verb,
        // A single object on operations (a list on schemas), as kubectl reads them.
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
    })
}

/// `/openapi/v3/{api/v1 | apis/group/version}`: the group version's paths and schemas.
pub fn v3_group_version(registry: &Registry, key: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry.all().iter().filter(|t| path_key(t) == key).collect();
    if types.is_empty() {
        return None;
    }
    let write_params = ["dryRun", "fieldManager", "fieldValidation"];
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in types {
        let base = if t.namespaced {
            format!("{}/namespaces/{{namespace}}/{}", t.prefix(), t.plural)
        } else {
            format!("{}/{}", t.prefix(), t.plural)
        };
        paths.insert(
            base.clone(),
            json!({"post": operation(t, "post", &write_params), "get": operation(t, "list", &[])}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": operation(t, "get", &[]),
                "put": operation(t, "put", &write_params),
                "patch": operation(t, "patch", &["dryRun", "fieldManager", "fieldValidation", "force"]),
                "delete": operation(t, "delete", &["dryRun"]),
            }),
        );
        if let Some(schema) = t.crd.as_ref().and_then(|c| c.schema.clone()) {
            schemas.insert(definition_name(t), with_gvk(schema, t));
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
