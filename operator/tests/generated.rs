//! The generated files committed in the repository match what the Rust types generate
//! today. When this fails, run `cargo run -p vellum-operator -- generate` and commit.

use std::path::PathBuf;

use serde_json::Value;
use vellum_operator::manifests;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn parse_stream(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn committed_manifests_match_the_generators() {
    let mut drifted = Vec::new();
    for file in manifests::generated_files() {
        let path = repo_root().join(&file.path);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        // Compare documents, not bytes, so that key order chosen by a serializer's feature
        // set cannot fail the check; any change of content does.
        if parse_stream(&committed) != parse_stream(&file.content) {
            drifted.push(file.path);
        }
    }
    assert!(
        drifted.is_empty(),
        "generated files drifted from the Rust types: {drifted:?}\nrun `cargo run -p vellum-operator -- generate` and commit the result"
    );
}

#[test]
fn install_manifest_holds_every_crd_and_the_operator() {
    let docs = parse_stream(&manifests::install_manifest(&manifests::InstallOptions::default()));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"Namespace"), "the namespace comes first so the rest can land in it");
    assert_eq!(kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(), 5);
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment"] {
        assert!(kinds.contains(&kind), "install.yaml lacks a {kind}");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["metadata"]["namespace"], manifests::DEFAULT_NAMESPACE);
    assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], manifests::OPERATOR_NAME);
    let selector = deployment["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "the selector matches the pods");
    }
    assert!(!selector.contains_key("app.kubernetes.io/version"), "selectors never carry a version");
}

#[test]
fn rbac_has_no_wildcards_and_covers_every_vellum_resource() {
    let rules = [manifests::operator_cluster_rules(), manifests::leader_election_rules()].concat();
    for rule in rules.iter().chain(&manifests::gateway_rules()) {
        let all = rule.api_groups.iter().flatten().chain(rule.resources.iter().flatten()).chain(rule.verbs.iter());
        for item in all {
            assert!(!item.contains('*'), "wildcard in {rule:?}");
        }
        assert!(rule.non_resource_urls.is_none());
    }
    for crd in vellum_crds::all_crds() {
        let plural = crd.spec.names.plural;
        for (resource, verb) in [(plural.clone(), "watch"), (format!("{plural}/status"), "patch")] {
            let granted = rules.iter().any(|r| {
                r.api_groups.iter().flatten().any(|g| g == vellum_crds::GROUP)
                    && r.resources.iter().flatten().any(|x| *x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            });
            assert!(granted, "operator may not {verb} {resource}");
        }
    }
    // The operator never needs to create or delete the resources people own.
    for rule in rules.iter().filter(|r| r.api_groups.iter().flatten().any(|g| g == vellum_crds::GROUP)) {
        assert!(!rule.verbs.iter().any(|v| v == "create" || v == "delete"), "{rule:?}");
    }
}

#[test]
fn chart_values_and_metadata_parse() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join("charts/vellum/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "vellum");
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join("charts/vellum/values.yaml")).unwrap()).unwrap();
    for key in ["image", "resources", "logLevel", "replicaCount"] {
        assert!(!values[key].is_null(), "values.yaml has {key}");
    }
    // The chart's RBAC templates read the generated rule files, so they cannot drift apart.
    let templates = repo_root().join("charts/vellum/templates");
    let rbac = std::fs::read_to_string(templates.join("rbac.yaml")).unwrap();
    assert!(rbac.contains(r#".Files.Get "files/operator-rules.yaml""#));
    assert!(rbac.contains(r#".Files.Get "files/leader-election-rules.yaml""#));
    assert!(rbac.contains(r#".Files.Get "files/gateway-rules.yaml""#));
    assert!(rbac.contains(&format!("name: {}\n", manifests::GATEWAY_ROLE)), "the role releases bind, by name");
}

#[test]
fn the_operator_may_bind_the_gateway_role_and_nothing_else() {
    let rules = manifests::operator_cluster_rules();
    let bind: Vec<_> = rules.iter().filter(|r| r.verbs.iter().any(|v| v == "bind" || v == "escalate")).collect();
    assert_eq!(bind.len(), 1);
    assert_eq!(bind[0].resource_names.as_deref(), Some(&[manifests::GATEWAY_ROLE.to_owned()][..]));
    assert_eq!(bind[0].verbs, ["bind"]);
    // The gateway never reads Secrets: it creates a webhook's signing Secret and deletes it.
    let gateway = manifests::gateway_rules();
    let secrets = gateway.iter().find(|r| r.resources.iter().flatten().any(|x| x == "secrets")).unwrap();
    assert_eq!(secrets.verbs, ["create", "delete"]);
}
