//! What every object a platform runs on shares, whichever controller builds it: names,
//! labels, the keys of the platform Secret, and the pieces of a pod that reads the compiled
//! config (environment, volumes, mounts, probes).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe,
    SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use vellum_crds::blue_green_release::Color;
use vellum_crds::{BlueGreenRelease, labels};

/// Port the gateway serves on inside its pod.
pub const GATEWAY_PORT: i32 = 8080;
/// Where a worker serves `/healthz`, `/readyz` and `/metrics`.
pub const WORKERS_METRICS_PORT: i32 = 9090;
/// Where pods find the compiled config (the platform ConfigMap).
pub const CONFIG_MOUNT: &str = "/etc/vellum/config";
/// Where pods find the secret values (the platform Secret).
pub const SECRETS_MOUNT: &str = "/etc/vellum/secrets";
/// Where pods keep local files (a `file://` tier's data, spooled uploads).
pub const DATA_MOUNT: &str = "/var/lib/vellum";

/// Keys of the platform Secret besides the config's `secrets.json`.
pub mod secret_keys {
    pub const JWT_KEY: &str = "jwt-key";
    pub const LINK_KEY: &str = "link-key";
    pub const DATABASE_URL: &str = "database-url";
    pub const NATS_CREDENTIALS: &str = "nats.creds";
    /// What the keys of shards' URLs begin with.
    pub const SHARD_PREFIX: &str = "shard-";
    /// The connection URL of one shard: `shard-<name>`.
    pub fn shard(name: &str) -> String {
        format!("{SHARD_PREFIX}{name}")
    }
}

/// Names of everything a platform produces.
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
    /// The migration Job of one shard for one set of pod templates: a new version (or
    /// image) migrates again.
    pub fn migration(release: &str, shard: &str, template: &str) -> String {
        let hash = super::short_hash(&[release, shard, template]);
        let base = format!("{release}-migrate-{shard}");
        // Job names become pod labels: 63 characters at most, with room for the hash.
        let base: String = base.chars().take(63 - 9).collect();
        format!("{}-{hash}", base.trim_end_matches('-'))
    }
    /// The resharding Job of the move `key` names (see `release::reshard::move_key`).
    pub fn reshard(release: &str, key: &str) -> String {
        let base: String = format!("{release}-reshard").chars().take(63 - 9).collect();
        format!("{}-{key}", base.trim_end_matches('-'))
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

/// The labels of a release's pods: their component's, and the version they run.
pub fn pod_labels(release: &BlueGreenRelease, component: &str, color: Color) -> BTreeMap<String, String> {
    let mut labels = release_labels(&release.name_any(), component, Some(color));
    labels.insert(labels::VERSION.to_owned(), release.spec.version.clone());
    labels
}

/// The metadata of an object `owner` controls (deleted with it), in its namespace.
pub fn owned_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: impl Into<String>,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: owner.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: owner.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The metadata of an object a release produces for `component` (and `color`).
pub fn release_meta(release: &BlueGreenRelease, name: &str, component: &str, color: Option<Color>) -> ObjectMeta {
    owned_meta(release, name, release_labels(&release.name_any(), component, color))
}

/// What the builders need to know beyond the resource itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseFacts {
    /// The JWT key is a JWKS document rather than a PEM key (RS256 and ES256).
    pub jwt_is_jwks: bool,
    /// The NATS server needs credentials.
    pub nats_credentials: bool,
}

impl ReleaseFacts {
    /// What the release itself says (NATS credentials); the JWT key's form is learned from
    /// its value, which only the release's reconcile reads.
    pub fn of(release: &BlueGreenRelease) -> Self {
        Self { jwt_is_jwks: false, nats_credentials: release.spec.nats.credentials_secret_ref.is_some() }
    }
}

/// An environment variable with a value.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), value_from: None }
}

/// An environment variable read from one key of a Secret.
pub fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    let selector = SecretKeySelector { name: secret.to_owned(), key: key.to_owned(), optional: None };
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource { secret_key_ref: Some(selector), ..EnvVarSource::default() }),
    }
}

/// An environment variable read from a field of the pod (`status.podIP`).
pub fn env_from_field(name: &str, path: &str) -> EnvVar {
    let selector = ObjectFieldSelector { field_path: path.to_owned(), api_version: None };
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource { field_ref: Some(selector), ..EnvVarSource::default() }),
    }
}

/// `POD_IP`, which later variables use as `$(POD_IP)`: defined first.
pub fn pod_ip_env() -> EnvVar {
    env_from_field("POD_IP", "status.podIP")
}

/// Environment shared by gateway, workers and retention runs.
pub fn common_env(release: &BlueGreenRelease, facts: &ReleaseFacts) -> Vec<EnvVar> {
    let secret = names::platform(&release.name_any());
    let mut env = vec![
        self::env("VELLUM_CONFIG_DIR", CONFIG_MOUNT),
        self::env("VELLUM_SECRETS_DIR", SECRETS_MOUNT),
        self::env("VELLUM_DATA_DIR", DATA_MOUNT),
        self::env("VELLUM_NATS_URL", release.spec.nats.url.clone()),
        env_from_secret("VELLUM_DATABASE_URL", &secret, secret_keys::DATABASE_URL),
        // Each database connection names its pod (`application_name`), so the database's
        // `pg_stat_activity` says which pod holds it.
        env_from_field("PGAPPNAME", "metadata.name"),
    ];
    if facts.nats_credentials {
        env.push(self::env("VELLUM_NATS_CREDENTIALS", format!("{SECRETS_MOUNT}/{}", secret_keys::NATS_CREDENTIALS)));
    }
    env
}

/// The platform ConfigMap and Secret, and a scratch directory, as volumes.
pub fn config_volumes(release: &str) -> Vec<Volume> {
    let platform = names::platform(release);
    vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource { name: platform.clone(), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        },
        Volume {
            name: "secrets".to_owned(),
            secret: Some(SecretVolumeSource { secret_name: Some(platform), ..SecretVolumeSource::default() }),
            ..Volume::default()
        },
        Volume { name: "data".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ]
}

/// Where [`config_volumes`] are mounted.
pub fn config_mounts() -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str, read_only: Option<bool>| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only,
        ..VolumeMount::default()
    };
    vec![
        mount("config", CONFIG_MOUNT, Some(true)),
        mount("secrets", SECRETS_MOUNT, Some(true)),
        mount("data", DATA_MOUNT, None),
    ]
}

/// A probe that GETs `path` on the named container port every `period` seconds.
pub fn http_probe(path: &str, port: &str, period: i32, failure_threshold: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold,
        ..Probe::default()
    }
}

/// A Job's spec that runs the release's workers image with `args` and the platform config
/// (the workers never call the Kubernetes API), its pods labelled `labels`, retried
/// `backoff_limit` times.
pub fn workers_job(
    release: &BlueGreenRelease,
    facts: &ReleaseFacts,
    (name, args): (&str, &[&str]),
    labels: &BTreeMap<String, String>,
    backoff_limit: i32,
) -> k8s_openapi::api::batch::v1::JobSpec {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    let container = Container {
        name: name.to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(args.iter().map(|a| (*a).to_owned()).collect()),
        env: Some(common_env(release, facts)),
        volume_mounts: Some(config_mounts()),
        ..Container::default()
    };
    k8s_openapi::api::batch::v1::JobSpec {
        backoff_limit: Some(backoff_limit),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..ObjectMeta::default() }),
            spec: Some(PodSpec {
                restart_policy: Some("Never".to_owned()),
                automount_service_account_token: Some(false),
                containers: vec![container],
                volumes: Some(config_volumes(&release.name_any())),
                ..PodSpec::default()
            }),
        },
        ..k8s_openapi::api::batch::v1::JobSpec::default()
    }
}

/// A CronJob running `job` on `schedule` (never two at once), keeping the last three
/// successes and failures.
pub fn cron_job(
    metadata: ObjectMeta,
    schedule: &str,
    suspend: bool,
    job: k8s_openapi::api::batch::v1::JobSpec,
) -> k8s_openapi::api::batch::v1::CronJob {
    use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobTemplateSpec};
    CronJob {
        metadata,
        spec: Some(CronJobSpec {
            schedule: schedule.to_owned(),
            suspend: Some(suspend),
            concurrency_policy: Some("Forbid".to_owned()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec { metadata: None, spec: Some(job) },
            ..CronJobSpec::default()
        }),
        status: None,
    }
}
