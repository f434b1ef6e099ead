//! The resource types the simulator serves: the built-in ones, and those that
//! CustomResourceDefinitions add while it runs. Discovery documents are derived from here.

use serde_json::{Value, json};

/// One served resource type (one version of it).
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The resource name in URLs: `deployments`.
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `status` is a subresource: writes to the object ignore it, writes to
    /// `/status` change only it.
    pub status_subresource: bool,
    /// Whether the kind has a desired state whose change bumps `metadata.generation`.
    pub has_spec: bool,
    /// The CRD that serves this type, if any: its schema validates and defaults objects.
    pub crd: Option<CrdVersion>,
}

/// What a CRD version brings beyond the names.
#[derive(Clone, Debug, PartialEq)]
pub struct CrdVersion {
    /// The CRD's name (`plural.group`).
    pub name: String,
    /// `openAPIV3Schema` of this version.
    pub schema: Option<Value>,
    /// `additionalPrinterColumns` of this version.
    pub printer_columns: Vec<Value>,
    /// Whether this version is the storage version.
    pub storage: bool,
}

impl ResourceType {
    /// `apps/v1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// The URL prefix of its group version: `/api/v1` or `/apis/apps/v1`.
    pub fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, as messages name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The storage key shared by every version of the type.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// Its entries in an `APIResourceList`.
    pub fn discovery(&self) -> Vec<Value> {
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.kind == "Pod" {
            entries.push(
                json!({"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]}),
            );
        }
        entries
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    spec: bool,
}

#[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
const fn b(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    spec: bool,
) -> Builtin {
    Builtin { group, version, kind, plural, namespaced, short, status, spec }
}

const BUILTINS: &[Builtin] = &[
    b("", "v1", "Namespace", "namespaces", false, &["ns"], true, true),
    b("", "v1", "ConfigMap", "configmaps", true, &["cm"], false, false),
    b("", "v1", "Secret", "secrets", true, &[], false, false),
    b("", "v1", "Service", "services", true, &["svc"], true, true),
    b("", "v1", "Endpoints", "endpoints", true, &["ep"], false, false),
    b("", "v1", "Pod", "pods", true, &["po"], true, true),
    b("", "v1", "Node", "nodes", false, &["no"], true, true),
    b("", "v1", "Event", "events", true, &["ev"], false, false),
    b("events.k8s.io", "v1", "Event", "events", true, &[], false, false),
    b("", "v1", "ServiceAccount", "serviceaccounts", true, &["sa"], false, false),
    b("apps", "v1", "Deployment", "deployments", true, &["deploy"], true, true),
    b("batch", "v1", "Job", "jobs", true, &[], true, true),
    b("batch", "v1", "CronJob", "cronjobs", true, &["cj"], true, true),
    b("coordination.k8s.io", "v1", "Lease", "leases", true, &[], false, true),
    b("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", true, &["hpa"], true, true),
    b("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true, &["pdb"], true, true),
    b("rbac.authorization.k8s.io", "v1", "Role", "roles", true, &[], false, false),
    b("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true, &[], false, false),
    b("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false, &[], false, false),
    b("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", false, &[], false, false),
    b(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        true,
        true,
    ),
];

/// The built-in types, in discovery order.
pub fn builtins() -> Vec<ResourceType> {
    BUILTINS
        .iter()
        .map(|b| ResourceType {
            group: b.group.into(),
            version: b.version.into(),
            kind: b.kind.into(),
            plural: b.plural.into(),
            singular: b.kind.to_lowercase(),
            namespaced: b.namespaced,
            short_names: b.short.iter().map(|s| (*s).to_owned()).collect(),
            categories: if b.namespaced && matches!(b.kind, "Pod" | "Service" | "Deployment" | "Job" | "CronJob") {
                vec!["all".into()]
            } else {
                vec![]
            },
            status_subresource: b.status,
            has_spec: b.spec,
            crd: None,
        })
        .collect()
}

/// The served types of a CRD object, or why it cannot be served.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let group = spec.get("group").and_then(Value::as_str).ok_or("spec.group is required")?;
    let names = spec.get("names").ok_or("spec.names is required")?;
    let plural = names.get("plural").and_then(Value::as_str).ok_or("spec.names.plural is required")?;
    let kind = names.get("kind").and_then(Value::as_str).ok_or("spec.names.kind is required")?;
    let singular = names.get("singular").and_then(Value::as_str).map_or_else(|| kind.to_lowercase(), str::to_owned);
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let namespaced = match spec.get("scope").and_then(Value::as_str) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope must be Namespaced or Cluster".into()),
    };
    let name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return Err(format!("metadata.name must be spec.names.plural+\".\"+spec.group: {plural}.{group}"));
    }
    let versions = spec.get("versions").and_then(Value::as_array).ok_or("spec.versions is required")?;
    let mut served = Vec::new();
    for v in versions {
        let version = v.get("name").and_then(Value::as_str).ok_or("spec.versions[].name is required")?;
        if !v.get("served").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        served.push(ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: singular.clone(),
            namespaced,
            short_names: strings(names.get("shortNames")),
            categories: strings(names.get("categories")),
            status_subresource: v.pointer("/subresources/status").is_some(),
            has_spec: true,
            crd: Some(CrdVersion {
                name: name.into(),
                schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                printer_columns: v
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                storage: v.get("storage").and_then(Value::as_bool).unwrap_or(false),
            }),
        });
    }
    if served.is_empty() {
        return Err("spec.versions must serve at least one version".into());
    }
    Ok(served)
}

/// Every served type, built-in and custom.
#[derive(Clone, Debug)]
pub struct Registry {
    types: Vec<ResourceType>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { types: builtins() }
    }
}

impl Registry {
    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }

    /// The type served at this group, version and resource name.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// The type of this apiVersion and kind.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.api_version() == api_version && t.kind == kind)
    }

    /// Replaces the types a CRD serves.
    pub fn set_crd(&mut self, crd_name: &str, types: Vec<ResourceType>) {
        self.remove_crd(crd_name);
        self.types.extend(types);
    }

    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types.retain(|t| t.crd.as_ref().is_none_or(|c| c.name != crd_name));
    }

    /// Group versions, each with its types, in a stable order (core first).
    fn group_versions(&self) -> Vec<(String, String)> {
        let mut gvs: Vec<(String, String)> = Vec::new();
        for t in &self.types {
            let gv = (t.group.clone(), t.version.clone());
            if !gvs.contains(&gv) {
                gvs.push(gv);
            }
        }
        gvs
    }

    /// `APIResourceList` of a group version, if served.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let types: Vec<&ResourceType> =
            self.types.iter().filter(|t| t.group == group && t.version == version).collect();
        let first = types.first()?;
        let resources: Vec<Value> = types.iter().flat_map(|t| t.discovery()).collect();
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": first.api_version(),
            "resources": resources,
        }))
    }

    /// `APIGroup` of a named group, if served.
    pub fn group(&self, group: &str) -> Option<Value> {
        let versions: Vec<Value> = self
            .group_versions()
            .into_iter()
            .filter(|(g, _)| g == group)
            .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
            .collect();
        let preferred = versions.first()?.clone();
        Some(json!({
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": versions,
            "preferredVersion": preferred,
        }))
    }

    /// `APIGroupList` of every named group.
    pub fn groups(&self) -> Value {
        let mut names: Vec<String> = Vec::new();
        for (g, _) in self.group_versions() {
            if !g.is_empty() && !names.contains(&g) {
                names.push(g);
            }
        }
        let groups: Vec<Value> = names.iter().filter_map(|g| self.group(g)).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crd_serves_its_versions_and_discovery_lists_them() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}},
                    {"name": "v0", "served": false, "storage": false}
                ]
            }
        });
        let types = from_crd(&crd).unwrap();
        assert_eq!(types.len(), 1);
        assert!(types[0].status_subresource);
        let mut registry = Registry::default();
        registry.set_crd("widgets.example.com", types);
        assert_eq!(registry.find("example.com", "v1", "widgets").unwrap().kind, "Widget");
        let list = registry.resource_list("example.com", "v1").unwrap();
        assert_eq!(list["resources"][1]["name"], "widgets/status");
        assert!(registry.groups()["groups"].as_array().unwrap().iter().any(|g| g["name"] == "example.com"));
        registry.remove_crd("widgets.example.com");
        assert!(registry.find("example.com", "v1", "widgets").is_none());
    }

    #[test]
    fn a_crd_whose_name_does_not_match_is_refused() {
        let crd = json!({
            "metadata": {"name": "wrong"},
            "spec": {"group": "example.com", "scope": "Cluster", "names": {"plural": "widgets", "kind": "Widget"},
                     "versions": [{"name": "v1", "served": true, "storage": true}]}
        });
        assert!(from_crd(&crd).unwrap_err().contains("widgets.example.com"));
    }
}
