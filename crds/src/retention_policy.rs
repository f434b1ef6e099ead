//! RetentionPolicy: which documents move between tiers or expire, and when.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Conditions;

/// Lifecycle rules for a set of documents, in the manner of S3 lifecycle rules: transitions
/// to colder tiers as documents age, then expiration.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vellum.dev",
    version = "v1alpha1",
    kind = "RetentionPolicy",
    plural = "retentionpolicies",
    namespaced,
    status = "RetentionPolicyStatus",
    shortname = "rp",
    category = "vellum",
    doc = "Lifecycle rules for a set of documents: transitions to colder tiers as they age, then expiration.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Dry Run", type_ = "boolean", json_path = ".spec.dryRun"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRun.completionTime"),
    // A string, not a date: kubectl shows a date column as an age, and a future time as <invalid>.
    printcolumn(name = "Next Run", type_ = "string", json_path = ".status.nextRun"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.expiration) || self.transitions.all(t, t.afterDays < self.expiration.afterDays)").message("expiration.afterDays must be later than every transition").field_path(".expiration.afterDays"))]
pub struct RetentionPolicySpec {
    /// Which documents the policy applies to. An empty selector matches every document.
    #[serde(default)]
    pub selector: DocumentSelector,
    /// From which moment a document's age is counted.
    #[serde(default)]
    pub age_basis: AgeBasis,
    /// Moves to colder tiers, in strictly increasing `afterDays` order.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.map(t, t.afterDays).isSorted() && self.all(t, self.exists_one(u, u.afterDays == t.afterDays))").message("transitions must be in strictly increasing afterDays order"))]
    #[schemars(length(max = 8))]
    pub transitions: Vec<Transition>,
    /// When matching documents are deleted or archived. Documents under legal hold are
    /// never expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<Expiration>,
    /// What happens to versions that are no longer the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noncurrent_versions: Option<NoncurrentVersions>,
    /// When the policy runs, as a five-field cron expression (UTC) or a macro such as `@daily`.
    #[serde(default = "default_schedule")]
    #[schemars(length(max = 128), regex(pattern = crate::common::CRON_SCHEDULE))]
    pub schedule: String,
    /// Report what would happen without moving or deleting anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Stop running the policy until this is set back to false.
    #[serde(default)]
    pub suspend: bool,
}

fn default_schedule() -> String {
    "0 3 * * *".to_owned()
}

/// Which documents a policy applies to. All given criteria must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DocumentSelector {
    /// Documents carrying at least one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tags: Vec<String>,
    /// Documents of one of these file types (extensions without the dot, such as `pdf` or `tmp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub file_types: Vec<String>,
    /// Documents uploaded by this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub owner: Option<String>,
    /// Documents of at least this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_size_bytes: Option<i64>,
    /// Documents of at most this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_size_bytes: Option<i64>,
}

/// The moment from which a document's age is counted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AgeBasis {
    /// Age counts from the upload of the version.
    #[default]
    Upload,
    /// Age counts from the last download of the document.
    LastAccess,
}

/// A move to another tier once a document is old enough.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// Age in days after which the document moves.
    #[schemars(range(max = 36500))]
    pub after_days: u32,
    /// Name of the StorageTier the document moves to.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub to_tier: String,
}

/// The end of a document's life under a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.action == 'ARCHIVE' || !has(self.archiveTier)").message("archiveTier applies only to the ARCHIVE action").field_path(".archiveTier"))]
pub struct Expiration {
    /// Age in days after which the document expires.
    #[schemars(range(max = 36500))]
    pub after_days: u32,
    /// What expiring does.
    #[serde(default)]
    pub action: ExpirationAction,
    /// For ARCHIVE: the StorageTier archived documents move to (by default the FROZEN tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub archive_tier: Option<String>,
}

/// What expiring a document does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ExpirationAction {
    /// Delete the document and every version of it.
    #[default]
    Delete,
    /// Move the document to the archive tier and mark it archived.
    Archive,
}

/// What happens to versions that are no longer the current one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NoncurrentVersions {
    /// How many of the newest noncurrent versions are always kept.
    #[serde(default)]
    #[schemars(range(max = 1000))]
    pub keep: u32,
    /// Days after it stopped being current that a noncurrent version beyond `keep` is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 36500))]
    pub expire_after_days: Option<u32>,
}

/// Observed state of a RetentionPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicyStatus {
    /// `Ready` (every named tier exists and the schedule is in place), `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Conditions,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary of the most recent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    /// When the policy runs next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// Estimated monthly savings of the policy's transitions and expirations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_monthly_savings: Option<f64>,
}

/// What one run of a policy did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Whether the run only reported.
    #[serde(default)]
    pub dry_run: bool,
    /// Document versions the selector matched.
    #[serde(default)]
    pub matched: i64,
    /// Document versions moved to another tier.
    #[serde(default)]
    pub transitioned: i64,
    /// Document versions deleted or archived.
    #[serde(default)]
    pub expired: i64,
    /// Bytes copied between tiers.
    #[serde(default)]
    pub bytes_moved: i64,
    /// Document versions the run failed on.
    #[serde(default)]
    pub errors: i64,
}
