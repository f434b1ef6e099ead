//! The objects a release produces, as pure functions of the release and what was read
//! beside it. No API calls here: each builder is tested on the whole object it returns.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use vellum_core::config::{CONFIG_FILE, PlatformConfig};
use vellum_crds::blue_green_release::{Color, JwtAlgorithm};
use vellum_crds::{BlueGreenRelease, annotations};

use crate::controllers::platform::{
    GATEWAY_PORT, ReleaseFacts, SECRETS_MOUNT, WORKERS_METRICS_PORT, common_env, config_mounts, config_volumes, env,
    env_from_field, env_from_secret, http_probe, names, pod_ip_env, pod_labels, release_labels, release_meta,
    secret_keys, selector_labels,
};

/// The compiled platform config, as the pods mount it. Its content hash is in an
/// annotation: pods read the file again when it changes, so the name stays.
pub fn build_config_map(release: &BlueGreenRelease, config: &PlatformConfig) -> ConfigMap {
    let mut metadata = release_meta(release, &names::platform(&release.name_any()), "config", None);
    metadata.annotations = Some(BTreeMap::from([(annotations::CONFIG_HASH.to_owned(), config.content_hash())]));
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    ConfigMap { metadata, data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), text)])), ..ConfigMap::default() }
}

/// The one Secret aggregating every credential the release's pods use.
pub fn build_secret(release: &BlueGreenRelease, data: &BTreeMap<String, Vec<u8>>) -> Secret {
    Secret {
        metadata: release_meta(release, &names::platform(&release.name_any()), "config", None),
        type_: Some("Opaque".to_owned()),
        data: Some(data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone()))).collect()),
        ..Secret::default()
    }
}

/// The ServiceAccount the release's gateway pods run under.
pub fn build_gateway_service_account(release: &BlueGreenRelease) -> ServiceAccount {
    ServiceAccount {
        metadata: release_meta(release, &names::gateway_account(&release.name_any()), "gateway", None),
        ..ServiceAccount::default()
    }
}

/// Binds the gateway role (what the webhook API does through the Kubernetes API) to the
/// gateway's ServiceAccount, in the release's namespace only.
pub fn build_gateway_role_binding(release: &BlueGreenRelease) -> RoleBinding {
    let account = names::gateway_account(&release.name_any());
    RoleBinding {
        metadata: release_meta(release, &account, "gateway", None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: crate::manifests::GATEWAY_ROLE.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: account,
            namespace: release.namespace(),
            api_group: None,
        }]),
    }
}

/// How the gateway reads the JWT verification key: a file of the mounted platform Secret,
/// read again when it changes, so a rotated key reaches running gateways without a restart.
fn jwt_env(release: &BlueGreenRelease, facts: &ReleaseFacts) -> k8s_openapi::api::core::v1::EnvVar {
    let key_file = format!("{SECRETS_MOUNT}/{}", secret_keys::JWT_KEY);
    match release.spec.jwt.algorithm {
        JwtAlgorithm::HS256 => env("VELLUM_JWT_SECRET_FILE", key_file),
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 if facts.jwt_is_jwks => env("VELLUM_JWT_JWKS", key_file),
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => env("VELLUM_JWT_PUBLIC_KEY", key_file),
    }
}

/// The gateway's environment: where it listens, its keys, and the limits the release sets
/// (unset ones keep the gateway's defaults).
fn gateway_env(release: &BlueGreenRelease, facts: &ReleaseFacts) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    let spec = &release.spec;
    let mut out = vec![pod_ip_env()];
    out.extend(common_env(release, facts));
    out.push(env("VELLUM_LISTEN", format!("$(POD_IP):{GATEWAY_PORT}")));
    // Webhooks created through the API become Webhook resources and Secrets here.
    out.push(env_from_field("VELLUM_KUBE_NAMESPACE", "metadata.namespace"));
    out.push(env_from_secret("VELLUM_LINK_KEY", &names::platform(&release.name_any()), secret_keys::LINK_KEY));
    out.push(jwt_env(release, facts));
    if let Some(issuer) = &spec.jwt.issuer {
        out.push(env("VELLUM_JWT_ISSUER", issuer.clone()));
    }
    if let Some(audience) = &spec.jwt.audience {
        out.push(env("VELLUM_JWT_AUDIENCE", audience.clone()));
    }
    if !spec.gateway.cors_allowed_origins.is_empty() {
        out.push(env("VELLUM_CORS_ORIGINS", spec.gateway.cors_allowed_origins.join(",")));
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
        out.extend(set.into_iter().filter_map(|(name, value)| value.map(|v| env(name, v.to_string()))));
    }
    out
}

/// A Deployment of one of the release's components in `color`.
fn deployment(
    release: &BlueGreenRelease,
    color: Color,
    component: &str,
    name: &str,
    replicas: Option<i32>,
    pod: PodSpec,
) -> Deployment {
    let release_name = release.name_any();
    Deployment {
        metadata: release_meta(release, name, component, Some(color)),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector_labels(&release_name, component, Some(color))),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(release, component, color)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort { name: Some(name.to_owned()), container_port: number, ..ContainerPort::default() }
}

/// The gateway Deployment of one color.
pub fn build_gateway_deployment(release: &BlueGreenRelease, color: Color, facts: &ReleaseFacts) -> Deployment {
    let name = release.name_any();
    let spec = &release.spec;
    let container = Container {
        name: "gateway".to_owned(),
        image: Some(spec.gateway.image.clone()),
        args: Some(vec!["serve".to_owned()]),
        env: Some(gateway_env(release, facts)),
        ports: Some(vec![port("http", GATEWAY_PORT)]),
        readiness_probe: Some(http_probe("/readyz", "http", 5, None)),
        liveness_probe: Some(http_probe("/healthz", "http", 10, Some(6))),
        volume_mounts: Some(config_mounts()),
        resources: spec.gateway.resources.clone(),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(names::gateway_account(&name)),
        containers: vec![container],
        volumes: Some(config_volumes(&name)),
        ..PodSpec::default()
    };
    // With an autoscaler the replica count is its to set; applying one would fight it.
    let replicas = spec.gateway.autoscaling.is_none().then_some(spec.gateway.replicas);
    deployment(release, color, "gateway", &names::gateway(&name, color), replicas, pod)
}

/// The workers Deployment of one color.
pub fn build_workers_deployment(release: &BlueGreenRelease, color: Color, facts: &ReleaseFacts) -> Deployment {
    let name = release.name_any();
    let spec = &release.spec;
    let mut environment = vec![pod_ip_env()];
    environment.extend(common_env(release, facts));
    environment.push(env("VELLUM_METRICS_LISTEN", format!("$(POD_IP):{WORKERS_METRICS_PORT}")));
    let container = Container {
        name: "workers".to_owned(),
        image: Some(spec.workers.image.clone()),
        args: Some(vec!["run".to_owned()]),
        env: Some(environment),
        ports: Some(vec![port("metrics", WORKERS_METRICS_PORT)]),
        // Ready once its database answers and NATS is connected.
        readiness_probe: Some(http_probe("/readyz", "metrics", 5, None)),
        liveness_probe: Some(http_probe("/healthz", "metrics", 10, Some(6))),
        volume_mounts: Some(config_mounts()),
        resources: spec.workers.resources.clone(),
        ..Container::default()
    };
    let pod = PodSpec {
        // The workers never call the Kubernetes API.
        automount_service_account_token: Some(false),
        containers: vec![container],
        volumes: Some(config_volumes(&name)),
        ..PodSpec::default()
    };
    deployment(release, color, "workers", &names::workers(&name, color), Some(spec.workers.replicas), pod)
}

/// A Service selecting the gateway pods of `color`: the active one under the release's own
/// name, the preview one beside it.
pub fn build_gateway_service(release: &BlueGreenRelease, name: &str, color: Color) -> Service {
    Service {
        metadata: release_meta(release, name, "gateway", None),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&release.name_any(), "gateway", Some(color))),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The autoscaler of the active gateway, when the release asks for one.
pub fn build_gateway_autoscaler(release: &BlueGreenRelease, color: Color) -> Option<HorizontalPodAutoscaler> {
    let scaling = release.spec.gateway.autoscaling.as_ref()?;
    let name = release.name_any();
    Some(HorizontalPodAutoscaler {
        metadata: release_meta(release, &names::gateway_policy(&name), "gateway", None),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: names::gateway(&name, color),
            },
            min_replicas: Some(scaling.min_replicas),
            max_replicas: scaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(scaling.target_cpu_utilization_percent),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        status: None,
    })
}

/// Keeps all but one gateway pod of the active color up through voluntary disruptions.
pub fn build_gateway_disruption_budget(release: &BlueGreenRelease, color: Color) -> PodDisruptionBudget {
    let name = release.name_any();
    PodDisruptionBudget {
        metadata: release_meta(release, &names::gateway_policy(&name), "gateway", None),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name, "gateway", Some(color))),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The Job bringing one shard's schema up to the release's version before its pods start.
/// The migration Job of one shard for the pod templates `template` (their hash): each new
/// version or image migrates again under a Job of its own name, so that a Job's immutable
/// template never stands in a release's way.
pub fn build_migration_job(release: &BlueGreenRelease, shard: &str, template: &str) -> Job {
    let name = release.name_any();
    let container = Container {
        name: "migrate".to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(vec!["migrate".to_owned()]),
        env: Some(vec![env_from_secret("VELLUM_DATABASE_URL", &names::platform(&name), &secret_keys::shard(shard))]),
        ..Container::default()
    };
    Job {
        metadata: release_meta(release, &names::migration(&name, shard, template), "migration", None),
        spec: Some(JobSpec {
            backoff_limit: Some(6),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(release_labels(&name, "migration", None)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The Job that runs the move `key` names (see `reshard::move_key`): `vellum-workers
/// reshard` with the platform's config and Secret, as the workers run. A pod that dies is
/// replaced and goes on where the documents are.
pub fn build_reshard_job(release: &BlueGreenRelease, key: &str) -> Job {
    let name = release.name_any();
    let container = Container {
        name: "reshard".to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(vec!["reshard".to_owned()]),
        env: Some(common_env(release, &ReleaseFacts::of(release))),
        volume_mounts: Some(config_mounts()),
        resources: release.spec.workers.resources.clone(),
        ..Container::default()
    };
    Job {
        metadata: release_meta(release, &names::reshard(&name, key), "resharding", None),
        spec: Some(JobSpec {
            backoff_limit: Some(20),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(release_labels(&name, "resharding", None)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    automount_service_account_token: Some(false),
                    containers: vec![container],
                    volumes: Some(config_volumes(&name)),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
