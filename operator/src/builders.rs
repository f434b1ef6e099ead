//! Pure functions from a custom resource (and what the operator read beside it) to the
//! objects it should produce. No API calls here: every builder is unit-tested without a
//! server, and the controllers apply what they return with server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use vellum_core::config::{CONFIG_FILE, PlatformConfig};
use vellum_crds::blue_green_release::{Color, JwtAlgorithm};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, annotations, labels};

/// Port the gateway serves on inside its pod.
pub const GATEWAY_PORT: i32 = 8080;
/// Where a worker serves `/healthz`, `/readyz` and `/metrics`.
pub const WORKERS_METRICS_PORT: i32 = 9090;
/// Where pods find the compiled config (the platform ConfigMap).
pub const CONFIG_MOUNT: &str = "/etc/vellum/config";
/// Where pods find the secret values (the platform Secret).
pub const SECRETS_MOUNT: &str = "/etc/vellum/secrets";

/// Keys of the platform Secret besides the config's `secrets.json`.
pub mod secret_keys {
    pub const JWT_KEY: &str = "jwt-key";
    pub const LINK_KEY: &str = "link-key";
    pub const DATABASE_URL: &str = "database-url";
    pub const NATS_CREDENTIALS: &str = "nats.creds";
    /// The connection URL of one shard: `shard-<name>`.
    pub fn shard(name: &str) -> String {
        format!("shard-{name}")
    }
}

/// Converts a JSON object literal into its typed form. The literals are ours and covered by
/// the tests below, so a failure is a bug in this file.
fn typed<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("the builders produce well-formed objects")
}

/// Names of everything a release produces.
pub mod names {
    use super::Color;

    pub fn platform(release: &str) -> String {
        format!("{release}-platform")
    }
    pub fn gateway(release: &str, color: Color) -> String {
        format!("{release}-gateway-{}", color.as_str())
    }
    pub fn workers(release: &str, color: Color) -> String {
        format!("{release}-workers-{}", color.as_str())
    }
    pub fn active_service(release: &str) -> String {
        release.to_owned()
    }
    pub fn preview_service(release: &str) -> String {
        format!("{release}-preview")
    }
    pub fn gateway_policy(release: &str) -> String {
        format!("{release}-gateway")
    }
    /// The gateway pods' ServiceAccount, and its RoleBinding to the gateway role.
    pub fn gateway_account(release: &str) -> String {
        format!("{release}-gateway")
    }
    /// The migration Job of one shard for one version: a new version migrates again.
    pub fn migration(release: &str, shard: &str, version: &str) -> String {
        let hash = super::short_hash(&[release, shard, version]);
        let base = format!("{release}-migrate-{shard}");
        // Job names become pod labels: 63 characters at most, with room for the hash.
        let base: String = base.chars().take(63 - 9).collect();
        format!("{}-{hash}", base.trim_end_matches('-'))
    }
    pub fn retention(policy: &str) -> String {
        let base: String = format!("{policy}-retention").chars().take(52).collect();
        base.trim_end_matches('-').to_owned()
    }
}

/// Eight hex digits of SHA-256 over the parts.
pub fn short_hash(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..4])
}

/// The labels of everything a release produces; `component` and `color` narrow them.
pub fn release_labels(release: &str, component: &str, color: Option<Color>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([
        (labels::NAME.to_owned(), labels::PART_OF_VALUE.to_owned()),
        (labels::INSTANCE.to_owned(), release.to_owned()),
        (labels::COMPONENT.to_owned(), component.to_owned()),
        (labels::PART_OF.to_owned(), labels::PART_OF_VALUE.to_owned()),
        (labels::MANAGED_BY.to_owned(), labels::MANAGED_BY_VALUE.to_owned()),
    ]);
    if let Some(color) = color {
        out.insert(labels::COLOR.to_owned(), color.as_str().to_owned());
    }
    out
}

/// The labels a selector matches: stable for the life of a Deployment.
pub fn selector_labels(release: &str, component: &str, color: Option<Color>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([
        (labels::INSTANCE.to_owned(), release.to_owned()),
        (labels::COMPONENT.to_owned(), component.to_owned()),
    ]);
    if let Some(color) = color {
        out.insert(labels::COLOR.to_owned(), color.as_str().to_owned());
    }
    out
}

fn metadata(release: &BlueGreenRelease, name: &str, component: &str, color: Option<Color>) -> Value {
    json!({
        "name": name,
        "namespace": release.namespace(),
        "labels": release_labels(&release.name_any(), component, color),
        "ownerReferences": [release.controller_owner_ref(&())],
    })
}

/// The compiled platform config, as the pods mount it. Its content hash is in an
/// annotation: pods read the file again when it changes, so the name stays.
pub fn platform_config_map(release: &BlueGreenRelease, config: &PlatformConfig) -> ConfigMap {
    let mut meta = metadata(release, &names::platform(&release.name_any()), "config", None);
    meta["annotations"] = json!({ annotations::CONFIG_HASH: config.content_hash() });
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    typed(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta,
        "data": { CONFIG_FILE: text },
    }))
}

/// The one Secret aggregating every credential the release's pods use.
pub fn platform_secret(release: &BlueGreenRelease, data: &BTreeMap<String, Vec<u8>>) -> Secret {
    let mut secret: Secret = typed(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": metadata(release, &names::platform(&release.name_any()), "config", None),
        "type": "Opaque",
    }));
    secret.data = Some(data.iter().map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.clone()))).collect());
    secret
}

fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
}

fn config_volumes(release: &str) -> Value {
    json!([
        {"name": "config", "configMap": {"name": names::platform(release)}},
        {"name": "secrets", "secret": {"secretName": names::platform(release)}},
        {"name": "data", "emptyDir": {}},
    ])
}

fn config_mounts() -> Value {
    json!([
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": true},
        {"name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": true},
        {"name": "data", "mountPath": "/var/lib/vellum"},
    ])
}

/// Environment shared by gateway, workers and retention runs.
fn common_env(release: &BlueGreenRelease, has_nats_credentials: bool) -> Vec<Value> {
    let secret = names::platform(&release.name_any());
    let mut env = vec![
        json!({"name": "VELLUM_CONFIG_DIR", "value": CONFIG_MOUNT}),
        json!({"name": "VELLUM_SECRETS_DIR", "value": SECRETS_MOUNT}),
        json!({"name": "VELLUM_DATA_DIR", "value": "/var/lib/vellum"}),
        json!({"name": "VELLUM_NATS_URL", "value": release.spec.nats.url}),
        secret_env("VELLUM_DATABASE_URL", &secret, secret_keys::DATABASE_URL),
    ];
    if has_nats_credentials {
        let path = format!("{SECRETS_MOUNT}/{}", secret_keys::NATS_CREDENTIALS);
        env.push(json!({"name": "VELLUM_NATS_CREDENTIALS", "value": path}));
    }
    env
}

/// What the builders need to know beyond the resource itself.
#[derive(Clone, Debug, Default)]
pub struct ReleaseFacts {
    /// The JWT key is a JWKS document rather than a PEM key (RS256 and ES256).
    pub jwt_is_jwks: bool,
    /// The NATS server needs credentials.
    pub nats_credentials: bool,
}

/// The ServiceAccount the release's gateway pods run under.
pub fn gateway_service_account(release: &BlueGreenRelease) -> ServiceAccount {
    typed(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": metadata(release, &names::gateway_account(&release.name_any()), "gateway", None),
    }))
}

/// Binds the gateway role (what the webhook API does through the Kubernetes API) to the
/// gateway's ServiceAccount, in the release's namespace only.
pub fn gateway_role_binding(release: &BlueGreenRelease) -> RoleBinding {
    let account = names::gateway_account(&release.name_any());
    typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": metadata(release, &account, "gateway", None),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": crate::manifests::GATEWAY_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": release.namespace()}],
    }))
}

/// The gateway Deployment of one color.
pub fn gateway_deployment(release: &BlueGreenRelease, color: Color, facts: &ReleaseFacts) -> Deployment {
    let name = release.name_any();
    let spec = &release.spec;
    let secret = names::platform(&name);
    let mut env = vec![json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})];
    env.extend(common_env(release, facts.nats_credentials));
    env.push(json!({"name": "VELLUM_LISTEN", "value": format!("$(POD_IP):{GATEWAY_PORT}")}));
    // Webhooks created through the API become Webhook resources and Secrets here.
    env.push(json!({"name": "VELLUM_KUBE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}));
    env.push(secret_env("VELLUM_LINK_KEY", &secret, secret_keys::LINK_KEY));
    let key_file = format!("{SECRETS_MOUNT}/{}", secret_keys::JWT_KEY);
    env.push(match spec.jwt.algorithm {
        // A file of the mounted platform Secret, read again when it changes: a rotated key
        // reaches the running gateways without a restart.
        JwtAlgorithm::HS256 => json!({"name": "VELLUM_JWT_SECRET_FILE", "value": key_file}),
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 if facts.jwt_is_jwks => {
            json!({"name": "VELLUM_JWT_JWKS", "value": key_file})
        }
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => json!({"name": "VELLUM_JWT_PUBLIC_KEY", "value": key_file}),
    });
    if let Some(issuer) = &spec.jwt.issuer {
        env.push(json!({"name": "VELLUM_JWT_ISSUER", "value": issuer}));
    }
    if let Some(audience) = &spec.jwt.audience {
        env.push(json!({"name": "VELLUM_JWT_AUDIENCE", "value": audience}));
    }
    if let Some(limits) = &spec.gateway.limits {
        let set = [
            ("VELLUM_HEADER_TIMEOUT_SECONDS", limits.header_timeout_seconds.map(u64::from)),
            ("VELLUM_BODY_TIMEOUT_SECONDS", limits.body_timeout_seconds.map(u64::from)),
            ("VELLUM_MAX_CONNECTIONS", limits.max_connections.map(u64::from)),
            ("VELLUM_MAX_UPLOADS", limits.max_uploads.map(u64::from)),
            ("VELLUM_MAX_UPLOAD_BYTES", limits.max_upload_bytes),
            ("VELLUM_AUTH_FAILURES_PER_SECOND", limits.auth_failures_per_second.map(u64::from)),
        ];
        for (name, value) in set {
            if let Some(value) = value {
                env.push(json!({"name": name, "value": value.to_string()}));
            }
        }
    }
    let mut deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(release, &names::gateway(&name, color), "gateway", Some(color)),
        "spec": {
            "selector": {"matchLabels": selector_labels(&name, "gateway", Some(color))},
            "template": {
                "metadata": {"labels": pod_labels(release, "gateway", color)},
                "spec": {
                    "serviceAccountName": names::gateway_account(&name),
                    "containers": [{
                        "name": "gateway",
                        "image": spec.gateway.image,
                        "args": ["serve"],
                        "env": env,
                        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
                        "volumeMounts": config_mounts(),
                        "resources": spec.gateway.resources,
                    }],
                    "volumes": config_volumes(&name),
                },
            },
        },
    });
    // With an autoscaler the replica count is its to set; applying one would fight it.
    if spec.gateway.autoscaling.is_none() {
        deployment["spec"]["replicas"] = json!(spec.gateway.replicas);
    }
    typed(strip_nulls(deployment))
}

fn pod_labels(release: &BlueGreenRelease, component: &str, color: Color) -> BTreeMap<String, String> {
    let mut labels = release_labels(&release.name_any(), component, Some(color));
    labels.insert(labels::VERSION.to_owned(), release.spec.version.clone());
    labels
}

/// The workers Deployment of one color.
pub fn workers_deployment(release: &BlueGreenRelease, color: Color, facts: &ReleaseFacts) -> Deployment {
    let name = release.name_any();
    let spec = &release.spec;
    let mut env = vec![json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})];
    env.extend(common_env(release, facts.nats_credentials));
    env.push(json!({"name": "VELLUM_METRICS_LISTEN", "value": format!("$(POD_IP):{WORKERS_METRICS_PORT}")}));
    typed(strip_nulls(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(release, &names::workers(&name, color), "workers", Some(color)),
        "spec": {
            "replicas": spec.workers.replicas,
            "selector": {"matchLabels": selector_labels(&name, "workers", Some(color))},
            "template": {
                "metadata": {"labels": pod_labels(release, "workers", color)},
                "spec": {
                    // The workers never call the Kubernetes API.
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "workers",
                        "image": spec.workers.image,
                        "args": ["run"],
                        "env": env,
                        "ports": [{"name": "metrics", "containerPort": WORKERS_METRICS_PORT}],
                        // Ready once its database answers and NATS is connected.
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 6},
                        "volumeMounts": config_mounts(),
                        "resources": spec.workers.resources,
                    }],
                    "volumes": config_volumes(&name),
                },
            },
        },
    })))
}

/// A Service selecting the gateway pods of `color`: the active one under the release's own
/// name, the preview one beside it.
pub fn gateway_service(release: &BlueGreenRelease, name: &str, color: Color) -> Service {
    let release_name = release.name_any();
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(release, name, "gateway", None),
        "spec": {
            "selector": selector_labels(&release_name, "gateway", Some(color)),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
}

/// The autoscaler of the active gateway, when the release asks for one.
pub fn gateway_autoscaler(release: &BlueGreenRelease, color: Color) -> Option<HorizontalPodAutoscaler> {
    let scaling = release.spec.gateway.autoscaling.as_ref()?;
    let name = release.name_any();
    Some(typed(json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(release, &names::gateway_policy(&name), "gateway", None),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names::gateway(&name, color)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization_percent}}}],
        },
    })))
}

/// Keeps all but one gateway pod of the active color up through voluntary disruptions.
pub fn gateway_disruption_budget(release: &BlueGreenRelease, color: Color) -> PodDisruptionBudget {
    let name = release.name_any();
    typed(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": metadata(release, &names::gateway_policy(&name), "gateway", None),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(&name, "gateway", Some(color))},
        },
    }))
}

/// The Job bringing one shard's schema up to the release's version before its pods start.
pub fn migration_job(release: &BlueGreenRelease, shard: &str) -> Job {
    let name = release.name_any();
    let secret = names::platform(&name);
    typed(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(release, &names::migration(&name, shard, &release.spec.version), "migration", None),
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": release_labels(&name, "migration", None)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "migrate",
                        "image": release.spec.workers.image,
                        "args": ["migrate"],
                        "env": [secret_env("VELLUM_DATABASE_URL", &secret, &secret_keys::shard(shard))],
                    }],
                },
            },
        },
    }))
}

/// The CronJob running one retention policy with the workers of the release's active color.
pub fn retention_cron_job(policy: &RetentionPolicy, release: &BlueGreenRelease, facts: &ReleaseFacts) -> CronJob {
    let name = policy.name_any();
    let release_name = release.name_any();
    let mut labels = release_labels(&release_name, "retention", None);
    labels.insert("vellum.dev/retention-policy".to_owned(), name.clone());
    typed(json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {
            "name": names::retention(&name),
            "namespace": policy.namespace(),
            "labels": labels,
            "ownerReferences": [policy.controller_owner_ref(&())],
        },
        "spec": {
            "schedule": policy.spec.schedule,
            "suspend": policy.spec.suspend,
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {
                "backoffLimit": 2,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{
                            "name": "retention",
                            "image": release.spec.workers.image,
                            "args": ["retention", "--policy", name],
                            "env": common_env(release, facts.nats_credentials),
                            "volumeMounts": config_mounts(),
                        }],
                        "volumes": config_volumes(&release_name),
                    },
                },
            }},
        },
    }))
}

/// Removes `null` members, which stand for "not set" in the literals above.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
