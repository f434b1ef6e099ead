//! StorageTier: a place to keep blobs.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, SecretRef};

/// A place to keep document blobs: a bucket or directory reached through `object_store`,
/// with a temperature class, a price and an optional compression setting.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vellum.dev",
    version = "v1alpha1",
    kind = "StorageTier",
    namespaced,
    status = "StorageTierStatus",
    shortname = "st",
    category = "vellum",
    doc = "A place to keep document blobs, with a temperature class, a price and compression settings.",
    printcolumn(name = "Class", type_ = "string", json_path = ".spec.class"),
    printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Objects", type_ = "integer", json_path = ".status.objects"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".status.bytes"),
    printcolumn(name = "Cost/Month", type_ = "number", json_path = ".status.estimatedMonthlyCost"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct StorageTierSpec {
    /// Temperature class of the tier; retention policies move documents from hotter to
    /// colder classes as they age.
    pub class: TierClass,
    /// Where the blobs live.
    pub backend: Backend,
    /// Price of one GiB stored for a month, in the platform's currency; used for cost
    /// estimates and savings reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub cost_per_gb_month: Option<f64>,
    /// Compression applied to blobs written to this tier.
    #[serde(default)]
    pub compression: Compression,
    /// Whether uploads land in this tier. At most one tier per namespace may be the
    /// default; the operator marks the others as not Ready.
    #[serde(default)]
    pub default: bool,
    /// When the tier's stored objects are read back and their SHA-256 checked (an
    /// integrity scrub): those altered or gone are quarantined (their downloads are
    /// refused with the reason) and reported to admins on `/topic/data-quality`. Not
    /// scrubbed when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<Scrub>,
}

/// The schedule of a tier's integrity scrubs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scrub {
    /// When a scrub runs, as a five-field cron expression (UTC) or a macro such as `@weekly`.
    #[schemars(length(max = 128), regex(pattern = crate::common::CRON_SCHEDULE))]
    pub schedule: String,
    /// Stop scrubbing until this is set back to false.
    #[serde(default)]
    pub suspend: bool,
}

/// Temperature class of a storage tier, from hottest to coldest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum TierClass {
    /// Frequently read documents.
    Hot,
    /// Documents read now and then.
    Warm,
    /// Documents rarely read.
    Cold,
    /// Archived documents, read almost never.
    Frozen,
}

/// The object store behind a tier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.url.startsWith('memory://') || !has(self.secretRef)").message("a memory:// backend takes no credentials"))]
pub struct Backend {
    /// URL of the bucket or directory, as `object_store` parses it: `file:///var/lib/vellum/hot`,
    /// `memory://`, `s3://bucket/prefix`, `gs://bucket`, `az://container`.
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^(file|memory|s3|s3a|gs|az|azure|abfs|abfss)://[^\s]*$")
    )]
    pub url: String,
    /// Secret holding the backend credentials, as `object_store` option names
    /// (for example `aws_access_key_id` and `aws_secret_access_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Endpoint of an S3-compatible service other than AWS (for example `http://minio:9000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/?#]+[^\s]*$"))]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Further non-secret `object_store` options (for example `allow_http: "true"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// Compression of the blobs written to a tier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// Whether blobs are compressed with zstd.
    #[serde(default)]
    pub enabled: bool,
    /// zstd compression level, from 1 (fastest) to 22 (smallest).
    #[serde(default = "default_zstd_level")]
    #[schemars(range(min = 1, max = 22))]
    pub level: i32,
    /// Content types stored as they are, because they are already compressed.
    /// A trailing `/*` matches a whole family (`image/*`).
    #[serde(default = "default_skip_content_types")]
    #[schemars(length(max = 64))]
    pub skip_content_types: Vec<String>,
}

impl Default for Compression {
    fn default() -> Self {
        Self { enabled: false, level: default_zstd_level(), skip_content_types: default_skip_content_types() }
    }
}

fn default_zstd_level() -> i32 {
    3
}

fn default_skip_content_types() -> Vec<String> {
    [
        "image/*",
        "video/*",
        "audio/*",
        "application/zip",
        "application/gzip",
        "application/zstd",
        "application/x-7z-compressed",
        "application/x-rar-compressed",
    ]
    .map(String::from)
    .to_vec()
}

/// Observed state of a StorageTier.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageTierStatus {
    /// `Ready` (the backend answered a write, read and delete of a probe object),
    /// `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Conditions,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the last probe reached the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// Number of blobs stored in this tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<i64>,
    /// Bytes stored in this tier, after compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// Estimated monthly cost of the bytes stored, from `costPerGbMonth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_monthly_cost: Option<f64>,
    /// The CronJob that scrubs this tier on `spec.scrub.schedule`, once in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_cron_job: Option<String>,
}
