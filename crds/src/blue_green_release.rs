//! BlueGreenRelease: the deployable unit of a Vellum platform.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, SecretKeyRef};

/// One version of the gateway and workers, deployed as a color beside the running one,
/// smoke-checked, switched to, watched, and kept or rolled back.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vellum.dev",
    version = "v1alpha1",
    kind = "BlueGreenRelease",
    namespaced,
    status = "BlueGreenReleaseStatus",
    shortname = "bgr",
    category = "vellum",
    doc = "The deployable unit of a Vellum platform: gateway and workers, rolled out blue-green with smoke checks.",
    printcolumn(name = "Version", type_ = "string", json_path = ".status.activeVersion"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeColor"),
    printcolumn(name = "Requested", type_ = "string", json_path = ".spec.version", priority = 1),
    printcolumn(name = "Preview", type_ = "string", json_path = ".status.previewColor"),
    printcolumn(name = "Preview Version", type_ = "string", json_path = ".status.previewVersion"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenReleaseSpec {
    /// Version of the platform being released; a change deploys it as the other color.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"))]
    pub version: String,
    /// The HTTP gateway application clients use.
    pub gateway: GatewaySpec,
    /// The asynchronous workers (webhook delivery, tier migration, retention).
    pub workers: WorkersSpec,
    /// Name of the ShardSet holding the metadata databases.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub shard_set_ref: String,
    /// The NATS server carrying events.
    pub nats: NatsSpec,
    /// How the gateway checks the JWTs of its clients.
    pub jwt: JwtSpec,
    /// Requests sent to the preview color; all must pass before traffic switches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub smoke_checks: Vec<SmokeCheck>,
    /// How the new color is watched after the switch.
    #[serde(default)]
    pub analysis: Analysis,
    /// When and how the new color is promoted.
    #[serde(default)]
    pub promotion: Promotion,
    /// Non-public networks (CIDRs such as 10.20.0.0/16, or single addresses) that webhook
    /// deliveries may reach. Loopback, private, link-local, shared and cloud-metadata
    /// addresses are refused unless listed here; the check applies to the address a
    /// delivery actually connects to, after DNS resolution.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub webhook_allowed_cidrs: Vec<String>,
}

/// The gateway Deployment of each color.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Container image of `vellum-gateway`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Replicas when autoscaling is off.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Compute resources of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A HorizontalPodAutoscaler for the active color's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// What one careless or hostile client may take of a gateway replica; each unset
    /// field keeps the gateway's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<GatewayLimits>,
    /// Origins whose browser pages may call the API and SockJS, with credentials: scheme,
    /// host and optional port (`https://app.example.com`, `http://localhost:3000`). None by
    /// default: no CORS headers are sent, and pages from other origins cannot read answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = r"^https?://[^/?#@\s]+/?$")))]
    pub cors_allowed_origins: Vec<String>,
}

/// Timeouts and caps of each gateway replica.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayLimits {
    /// Seconds a client has to send a whole request head; an idle keep-alive connection is
    /// closed after as long (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub header_timeout_seconds: Option<u32>,
    /// Seconds a request body may send nothing before the request fails (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub body_timeout_seconds: Option<u32>,
    /// Open connections per replica, WebSockets included (default 10000); at the cap the
    /// longest-open idle connection makes room, or a new one is refused when all are busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    /// Uploads in progress per replica (default 64); more are answered 503 with Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_uploads: Option<u32>,
    /// Largest document accepted, in bytes (default 5 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_upload_bytes: Option<u64>,
    /// Failed token checks allowed per client address and second, twice as many in a burst
    /// (default 20; 0: unlimited). Past it the address gets 429 without its tokens being
    /// checked: behind a proxy that hides client addresses, raise it or set 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub auth_failures_per_second: Option<u32>,
}

fn default_gateway_replicas() -> i32 {
    2
}

/// The workers Deployment of each color.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// Container image of `vellum-workers`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Worker replicas.
    #[serde(default = "default_worker_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Compute resources of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_worker_replicas() -> i32 {
    1
}

/// Autoscaling of the gateway by CPU utilisation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be at least minReplicas").field_path(".maxReplicas"))]
pub struct Autoscaling {
    /// Fewest gateway replicas.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most gateway replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation, in percent of the request, the autoscaler aims for.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percent: i32,
}

fn default_min_replicas() -> i32 {
    2
}
fn default_target_cpu() -> i32 {
    70
}

/// The NATS server carrying events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// URL of the NATS server, with JetStream enabled.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(nats|tls|ws|wss)://[^\s]+$"))]
    pub url: String,
    /// Secret key holding NATS credentials (a `.creds` file), if the server needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
}

/// How the gateway checks JWT bearer tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtSpec {
    /// Signature algorithm of accepted tokens.
    #[serde(default)]
    pub algorithm: JwtAlgorithm,
    /// Secret key holding the HS256 shared secret, or the PEM public key or JWKS document
    /// for RS256 and ES256.
    pub secret_ref: SecretKeyRef,
    /// Required `iss` claim, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: Option<String>,
    /// Required `aud` claim, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub audience: Option<String>,
}

/// Signature algorithm of JWTs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    #[default]
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
}

/// One HTTP request sent to the preview color before the switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmokeCheck {
    /// Name of the check, shown in status.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Path requested on the preview Service, such as `/readyz`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^/[^\s]*$"))]
    pub path: String,
    /// HTTP status the check expects.
    #[serde(default = "default_expect_status")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: u16,
    /// Seconds to wait for the answer.
    #[serde(default = "default_smoke_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: u32,
}

fn default_expect_status() -> u16 {
    200
}
fn default_smoke_timeout() -> u32 {
    10
}

/// How the new color is watched after the switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Seconds the new color is watched before it is declared stable.
    #[serde(default = "default_window")]
    #[schemars(range(min = 0, max = 86400))]
    pub window_seconds: u32,
    /// Error rate (5xx answers, in percent of requests) above which the release rolls back.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_error_rate_percent: f64,
}

impl Default for Analysis {
    fn default() -> Self {
        Self { window_seconds: default_window(), max_error_rate_percent: default_max_error_rate() }
    }
}

fn default_window() -> u32 {
    300
}
fn default_max_error_rate() -> f64 {
    1.0
}

/// When and how the new color is promoted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// `Auto` switches as soon as the smoke checks pass; `Manual` waits for the
    /// `vellum.dev/promote` annotation.
    #[serde(default)]
    pub mode: PromotionMode,
    /// Roll back by itself when the analysis fails.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Seconds the old color keeps running after the new one is stable, for a fast rollback.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 604_800))]
    pub scale_down_delay_seconds: u32,
    /// Seconds a rollout phase before the analysis may take (the new color becoming ready,
    /// its migrations, its smoke checks, the switch) before the rollout fails.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: u32,
}

fn default_progress_deadline() -> u32 {
    600
}

impl Default for Promotion {
    fn default() -> Self {
        Self {
            mode: PromotionMode::default(),
            auto_rollback: true,
            scale_down_delay_seconds: default_scale_down_delay(),
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_scale_down_delay() -> u32 {
    600
}

/// How a release is promoted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PromotionMode {
    /// Switch when the smoke checks pass.
    #[default]
    Auto,
    /// Wait for the `vellum.dev/promote` annotation.
    Manual,
}

/// A deployment color.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    /// The other color.
    #[must_use]
    pub fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    /// The color as it appears in names and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }
}

/// Where a release is in its rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Not yet acted on.
    #[default]
    Pending,
    /// Deployments of the new color are being created and becoming ready.
    Deploying,
    /// Schema migrations of the new version are running.
    Migrating,
    /// Smoke checks run against the preview color.
    SmokeTesting,
    /// Smoke checks passed; waiting for the promote annotation.
    AwaitingPromotion,
    /// The active Service is being switched to the new color.
    Switching,
    /// The new color serves and is watched for errors.
    Analyzing,
    /// The active color is serving and healthy.
    Stable,
    /// Traffic is being moved back to the previous color.
    RollingBack,
    /// The rollout was aborted; the previous color serves.
    Aborted,
    /// The release cannot progress; see the conditions.
    Failed,
}

/// Observed state of a BlueGreenRelease.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenReleaseStatus {
    /// `Ready` (the active color serves), `Progressing` (a rollout is under way), `Degraded`.
    #[serde(default)]
    pub conditions: Conditions,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the release is in its rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The color of the version last promoted. While a rollout is `Switching` or
    /// `Analyzing`, the active Service already selects the preview color.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_color: Option<Color>,
    /// The version of the active color.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// The color being rolled out, while a rollout is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_color: Option<Color>,
    /// The version being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_version: Option<String>,
    /// Ready gateway replicas of the active color.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Hash of the pod templates the active color runs: a change of the gateway or
    /// workers template (image, resources, environment) is a new rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_template: Option<String>,
    /// Hash of the pod templates being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_template: Option<String>,
    /// When the current phase began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,
    /// When the rollout under way began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_since: Option<Time>,
    /// When the analysis of the new color began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_since: Option<Time>,
    /// Requests and 5xx answers the new color had served when its analysis began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_baseline: Option<RequestCounts>,
    /// When the previous color is scaled to zero (`promotion.scaleDownDelaySeconds` after
    /// the promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_at: Option<Time>,
    /// The color scaled to zero at `scaleDownAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_color: Option<Color>,
    /// Results of the latest smoke checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smoke_results: Vec<SmokeResult>,
    /// Error rate of the new color during analysis, in percent of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_error_rate_percent: Option<f64>,
    /// Past rollouts, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ReleaseRecord>,
}

/// Requests a color's gateways served, and how many of them were answered 5xx.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestCounts {
    /// Requests answered (probes and metric scrapes left out).
    pub requests: u64,
    /// Of those, the ones answered with a 5xx status.
    pub errors: u64,
}

/// The outcome of one smoke check.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmokeResult {
    /// Name of the check.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// HTTP status received, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// What went wrong, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long the check took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When the check ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// One past rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    /// Version rolled out.
    pub version: String,
    /// Color it was deployed as.
    pub color: Color,
    /// How it ended.
    pub outcome: ReleaseOutcome,
    /// The reason of the condition it ended with (`SmokeCheckFailed`, `AnalysisFailed`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Hash of the pod templates rolled out: a failed or aborted one is not tried again
    /// until the spec changes or `vellum.dev/retry` asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Seconds from the start of the rollout to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<u64>,
    /// Seconds from the start of the analysis to the end of the rollout (the promotion,
    /// or traffic back on the old color), when it got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_seconds: Option<u64>,
}

/// How a rollout ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReleaseOutcome {
    Promoted,
    RolledBack,
    Aborted,
    Failed,
}
