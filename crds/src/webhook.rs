//! Webhook: an HTTP endpoint notified of document events, signed with HMAC.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, SecretKeyRef};

/// An HTTP endpoint that receives document events as signed JSON POST requests.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vellum.dev",
    version = "v1alpha1",
    kind = "Webhook",
    namespaced,
    status = "WebhookStatus",
    shortname = "wh",
    category = "vellum",
    doc = "An HTTP endpoint that receives document events as signed JSON POST requests.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Active", type_ = "boolean", json_path = ".status.active"),
    printcolumn(name = "Success %", type_ = "number", json_path = ".status.successRate"),
    printcolumn(name = "Calls", type_ = "integer", json_path = ".status.totalCalls", priority = 1),
    printcolumn(name = "Last Triggered", type_ = "date", json_path = ".status.lastTriggered"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Endpoint the events are POSTed to.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s/?#]+[^\s]*$"))]
    pub url: String,
    /// The HMAC-SHA256 signing key. Every delivery is signed; a `whsec_` prefixed,
    /// base64-encoded key is used as Standard Webhooks defines, any other value as raw bytes.
    pub secret_ref: SecretKeyRef,
    /// Event types delivered to this endpoint; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub event_types: Vec<EventType>,
    /// Further conditions an event's document must meet to be delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<EventFilter>,
    /// Retries of failed deliveries.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Seconds to wait for the endpoint to answer one delivery.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: u32,
    /// Upper bound on the deliveries sent to this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Deliveries in flight to this endpoint at once.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrency: u32,
    /// Extra HTTP headers sent with every delivery. Signature, content and host headers are
    /// set by Vellum and cannot be overridden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(h, !(h.name.lowerAscii().startsWith('webhook-') || h.name.lowerAscii() in ['x-webhook-signature', 'x-event-type', 'x-timestamp', 'content-type', 'content-length', 'host']))", "message": "signature, content and host headers are set by Vellum and cannot be overridden"}
    ]))]
    pub headers: Vec<HttpHeader>,
    /// Stop delivering without deactivating; events are kept and delivered on resume.
    #[serde(default)]
    pub paused: bool,
    /// When the endpoint is deactivated for failing too often.
    #[serde(default)]
    pub deactivation: DeactivationRule,
}

/// Headers Vellum sets on every delivery, besides those starting with `webhook-`; a
/// Webhook's extra `headers` may not name them (the schema's CEL rule says the same).
pub const RESERVED_HEADERS: [&str; 6] =
    ["x-webhook-signature", "x-event-type", "x-timestamp", "content-type", "content-length", "host"];

fn default_timeout_seconds() -> u32 {
    30
}

fn default_max_concurrency() -> u32 {
    4
}

/// An extra HTTP header of a delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    /// Header name.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9-]*$"))]
    pub name: String,
    /// Header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// The document event types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    DocumentUploaded,
    DocumentUpdated,
    DocumentDeleted,
    DocumentArchived,
    DocumentRestored,
    DocumentVersionCreated,
    BulkOperationProgress,
    BulkOperationCompleted,
    WebhookDeactivated,
}

/// Conditions on the document an event is about. All given criteria must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventFilter {
    /// The document carries at least one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tags: Vec<String>,
    /// The document is of one of these file types (extensions without the dot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub file_types: Vec<String>,
    /// The document was uploaded by one of these users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub owners: Vec<String>,
}

/// Retries of a failed delivery with exponential backoff: the first attempt at once, then
/// after `initialBackoffSeconds`, doubling up to `maxBackoffSeconds`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxBackoffSeconds >= self.initialBackoffSeconds").message("maxBackoffSeconds must be at least initialBackoffSeconds").field_path(".maxBackoffSeconds"))]
pub struct RetryPolicy {
    /// Retries after the first attempt before the delivery is FAILED.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 20))]
    pub max_retries: u32,
    /// Delay before the first retry.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 1, max = 3600))]
    pub initial_backoff_seconds: u32,
    /// Upper bound of the delay between two attempts.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_backoff_seconds: u32,
    /// Spread retries by up to 20 % so that failing deliveries do not retry in lockstep.
    #[serde(default = "default_true")]
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            initial_backoff_seconds: default_initial_backoff(),
            max_backoff_seconds: default_max_backoff(),
            jitter: true,
        }
    }
}

fn default_max_retries() -> u32 {
    3
}
fn default_initial_backoff() -> u32 {
    2
}
fn default_max_backoff() -> u32 {
    300
}
fn default_true() -> bool {
    true
}

/// A token bucket bounding the deliveries to one endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained deliveries per second.
    #[schemars(range(min = 1, max = 100_000))]
    pub requests_per_second: u32,
    /// Deliveries allowed in a burst above the sustained rate.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100_000))]
    pub burst: u32,
}

/// When an endpoint is deactivated automatically.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeactivationRule {
    /// Whether the endpoint is deactivated automatically at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Failure rate, in percent of calls, above which the endpoint is deactivated.
    #[serde(default = "default_failure_rate")]
    #[schemars(range(min = 0, max = 100))]
    pub failure_rate_percent: u32,
    /// Calls observed before the failure rate is judged.
    #[serde(default = "default_minimum_calls")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub minimum_calls: u32,
}

impl Default for DeactivationRule {
    fn default() -> Self {
        Self { enabled: true, failure_rate_percent: default_failure_rate(), minimum_calls: default_minimum_calls() }
    }
}

fn default_failure_rate() -> u32 {
    80
}
fn default_minimum_calls() -> u32 {
    10
}

/// Observed state of a Webhook.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    /// `Ready` (URL allowed, signing key present), `Deactivated`, `Degraded`.
    #[serde(default)]
    pub conditions: Conditions,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether deliveries are being sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Why the endpoint was deactivated, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivation_reason: Option<String>,
    /// Delivery attempts made.
    #[serde(default)]
    pub total_calls: i64,
    /// Attempts answered with a 2xx status.
    #[serde(default)]
    pub success_count: i64,
    /// Attempts that failed.
    #[serde(default)]
    pub failure_count: i64,
    /// Successful attempts in percent of all attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub success_rate: Option<f64>,
    /// When the last delivery was attempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_triggered: Option<Time>,
    /// The last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<DeliveryFailure>,
}

/// A failed delivery attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryFailure {
    /// When the attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// HTTP status of the answer, if one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// What went wrong.
    #[serde(default)]
    pub message: String,
}
