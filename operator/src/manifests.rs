//! Everything in `manifests/` and `charts/vellum/` that is generated rather than written:
//! the CRDs (from the Rust types in `vellum-crds`), the operator's RBAC rules, and the
//! plain install manifest. Pure functions; `vellum-operator generate` writes their output
//! and a test fails when the committed files drift from it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Namespace, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecurityContext, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use vellum_crds::{GROUP, labels};

/// Name of the operator's ServiceAccount, ClusterRole and Deployment.
pub const OPERATOR_NAME: &str = "vellum-operator";
/// Name of the ClusterRole every release's gateway ServiceAccount is bound to, in the
/// release's namespace only.
pub const GATEWAY_ROLE: &str = "vellum-gateway";
/// Namespace the plain install manifest puts the operator in.
pub const DEFAULT_NAMESPACE: &str = "vellum-system";
/// Image the plain install manifest runs.
pub const DEFAULT_IMAGE: &str = "vellum/operator:0.1.0";
/// Port of the operator's metrics and health endpoints.
pub const METRICS_PORT: i32 = 8080;

const HEADER: &str = "# Generated from the Rust types by `vellum-operator generate`. Do not edit.\n";

/// One generated file: its path relative to the repository root and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: String,
    pub content: String,
}

/// Every generated file of the repository.
pub fn generated_files() -> Vec<GeneratedFile> {
    let mut files = Vec::new();
    for crd in vellum_crds::all_crds() {
        let plural = crd.spec.names.plural.clone();
        let content = format!("{HEADER}{}", to_yaml(&crd));
        files.push(GeneratedFile { path: format!("manifests/crds/{plural}.yaml"), content: content.clone() });
        files.push(GeneratedFile { path: format!("charts/vellum/crds/{plural}.yaml"), content });
    }
    files.push(GeneratedFile {
        path: "charts/vellum/files/operator-rules.yaml".into(),
        content: format!("{HEADER}{}", to_yaml(&operator_cluster_rules())),
    });
    files.push(GeneratedFile {
        path: "charts/vellum/files/leader-election-rules.yaml".into(),
        content: format!("{HEADER}{}", to_yaml(&leader_election_rules())),
    });
    files.push(GeneratedFile {
        path: "charts/vellum/files/gateway-rules.yaml".into(),
        content: format!("{HEADER}{}", to_yaml(&gateway_rules())),
    });
    files.push(GeneratedFile {
        path: "manifests/install.yaml".into(),
        content: install_manifest(&InstallOptions::default()),
    });
    files
}

/// Every CRD as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    let mut out = String::from(HEADER);
    for crd in vellum_crds::all_crds() {
        out.push_str("---\n");
        out.push_str(&to_yaml(&crd));
    }
    out
}

fn to_yaml<T: Serialize>(value: &T) -> String {
    // Serialising our own k8s-openapi and CRD types cannot fail: they hold no maps with
    // non-string keys and no non-finite floats.
    serde_yaml::to_string(value).expect("kubernetes objects serialise to YAML")
}

fn rule(api_group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![api_group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The cluster-wide permissions of the operator: read its own resources and write their
/// status, and manage the objects it provisions for them. No wildcards.
pub fn operator_cluster_rules() -> Vec<PolicyRule> {
    // Exactly what the controllers call: watches (list, watch), reads of what they published
    // (get), server-side apply (patch, and create when the object is new), and deletes of
    // what a resource stopped asking for.
    const APPLY: &[&str] = &["list", "watch", "create", "patch"];
    let plurals: Vec<String> = vellum_crds::all_crds().into_iter().map(|crd| crd.spec.names.plural).collect();
    let own: Vec<&str> = plurals.iter().map(String::as_str).collect();
    let status: Vec<String> = plurals.iter().map(|p| format!("{p}/status")).collect();
    vec![
        rule(GROUP, &own, &["get", "list", "watch", "patch"]),
        rule(GROUP, &status.iter().map(String::as_str).collect::<Vec<_>>(), &["patch"]),
        rule("", &["configmaps", "secrets"], &["get", "list", "watch", "create", "patch"]),
        rule("", &["services"], APPLY),
        // A release whose gateways are not ready reads their pods to say why; a rollout's
        // switch is done when the active Service's endpoints are the new color's pods.
        rule("", &["pods"], &["list"]),
        rule("discovery.k8s.io", &["endpointslices"], &["list"]),
        rule("events.k8s.io", &["events"], &["create", "patch"]),
        // A release whose new version failed reads the Deployment still serving (it does not
        // apply the spec to it); a promoted release scales the old color to zero.
        rule("apps", &["deployments"], &["get", "list", "watch", "create", "patch"]),
        // A tier's drain Job is deleted to run again when blobs arrived after it finished; a
        // resharding Job is read to learn whether its move is done, and deleted after.
        rule("batch", &["jobs", "cronjobs"], &["get", "list", "watch", "create", "patch", "delete"]),
        rule("autoscaling", &["horizontalpodautoscalers"], &["list", "watch", "create", "patch", "delete"]),
        rule("policy", &["poddisruptionbudgets"], APPLY),
        // Each release's gateway runs under its own ServiceAccount, bound to the gateway's
        // ClusterRole in the release's namespace; binding that one role is all it may grant.
        rule("", &["serviceaccounts"], APPLY),
        rule("rbac.authorization.k8s.io", &["rolebindings"], APPLY),
        PolicyRule {
            resource_names: Some(vec![GATEWAY_ROLE.to_owned()]),
            ..rule("rbac.authorization.k8s.io", &["clusterroles"], &["bind"])
        },
    ]
}

/// What a gateway may do, in its release's namespace only (a RoleBinding per release): the
/// webhook API creates a Webhook and its signing Secret, lists and reads Webhooks, and
/// deletes the ones it created. Nothing else: it never reads a Secret.
pub fn gateway_rules() -> Vec<PolicyRule> {
    vec![
        rule(GROUP, &["webhooks"], &["get", "list", "create", "delete"]),
        rule("", &["secrets"], &["create", "delete"]),
    ]
}

/// Permissions the operator needs in its own namespace only: the leader-election Lease.
pub fn leader_election_rules() -> Vec<PolicyRule> {
    vec![rule("coordination.k8s.io", &["leases"], &["get", "create", "patch"])]
}

/// What varies between installs of the plain manifest.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    pub image: String,
    pub replicas: i32,
    pub log_level: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self { namespace: DEFAULT_NAMESPACE.into(), image: DEFAULT_IMAGE.into(), replicas: 2, log_level: "info".into() }
    }
}

fn operator_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::PART_OF_VALUE.to_owned()),
        (labels::COMPONENT.to_owned(), "operator".to_owned()),
        (labels::PART_OF.to_owned(), labels::PART_OF_VALUE.to_owned()),
        (labels::MANAGED_BY.to_owned(), "kubectl".to_owned()),
    ])
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::PART_OF_VALUE.to_owned()),
        (labels::COMPONENT.to_owned(), "operator".to_owned()),
    ])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(operator_labels()),
        ..ObjectMeta::default()
    }
}

/// An environment variable filled from a field of the pod (the downward API).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The operator Deployment: two replicas by default, of which the Lease holder acts.
pub fn build_operator_deployment(opts: &InstallOptions) -> Deployment {
    let http_probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        ..Probe::default()
    };
    let container = Container {
        name: "operator".into(),
        image: Some(opts.image.clone()),
        args: Some(vec!["run".into(), format!("--metrics-listen=$(POD_IP):{METRICS_PORT}")]),
        env: Some(vec![
            EnvVar { name: "RUST_LOG".into(), value: Some(opts.log_level.clone()), ..EnvVar::default() },
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_IP", "status.podIP"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            // The operator's connections to the shards name its pod in `pg_stat_activity`.
            field_env("PGAPPNAME", "metadata.name"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: METRICS_PORT,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz")),
        liveness_probe: Some(http_probe("/healthz")),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("50m".into())),
                ("memory".to_owned(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("256Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: meta(OPERATOR_NAME, Some(&opts.namespace)),
        spec: Some(DeploymentSpec {
            replicas: Some(opts.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(operator_labels()), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(OPERATOR_NAME.into()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The plain install manifest: namespace, CRDs, ServiceAccount, RBAC and the operator
/// Deployment, as one YAML stream for `kubectl apply -f`.
pub fn install_manifest(opts: &InstallOptions) -> String {
    let ns = opts.namespace.as_str();
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: OPERATOR_NAME.into(),
        namespace: Some(ns.to_owned()),
        ..Subject::default()
    };
    let mut docs: Vec<String> = vec![to_yaml(&Namespace { metadata: meta(ns, None), ..Namespace::default() })];
    docs.extend(vellum_crds::all_crds().iter().map(to_yaml));
    docs.push(to_yaml(&ServiceAccount { metadata: meta(OPERATOR_NAME, Some(ns)), ..ServiceAccount::default() }));
    docs.push(to_yaml(&ClusterRole {
        metadata: meta(OPERATOR_NAME, None),
        rules: Some(operator_cluster_rules()),
        ..ClusterRole::default()
    }));
    docs.push(to_yaml(&ClusterRoleBinding {
        metadata: meta(OPERATOR_NAME, None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: OPERATOR_NAME.into(),
        },
        subjects: Some(vec![subject.clone()]),
    }));
    docs.push(to_yaml(&ClusterRole {
        metadata: meta(GATEWAY_ROLE, None),
        rules: Some(gateway_rules()),
        ..ClusterRole::default()
    }));
    let election = format!("{OPERATOR_NAME}-leader-election");
    docs.push(to_yaml(&Role { metadata: meta(&election, Some(ns)), rules: Some(leader_election_rules()) }));
    docs.push(to_yaml(&RoleBinding {
        metadata: meta(&election, Some(ns)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: election.clone(),
        },
        subjects: Some(vec![subject]),
    }));
    docs.push(to_yaml(&build_operator_deployment(opts)));
    let mut out = String::from(HEADER);
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&doc);
    }
    out
}
