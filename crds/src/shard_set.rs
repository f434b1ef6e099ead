//! ShardSet: the metadata databases and how documents are routed among them.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, SecretKeyRef};

/// The Postgres databases holding document metadata, and the routing that decides which
/// database holds which document.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vellum.dev",
    version = "v1alpha1",
    kind = "ShardSet",
    namespaced,
    status = "ShardSetStatus",
    shortname = "shs",
    category = "vellum",
    doc = "The Postgres databases holding document metadata and the routing of documents among them.",
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.routing.strategy"),
    printcolumn(name = "Shards", type_ = "string", json_path = ".status.shardNames"),
    printcolumn(name = "Ready Shards", type_ = "integer", json_path = ".status.readyShards"),
    printcolumn(name = "Routing Version", type_ = "integer", json_path = ".status.routingVersion"),
    printcolumn(name = "Rebalance", type_ = "string", json_path = ".status.rebalance.phase"),
    printcolumn(name = "Moved %", type_ = "number", json_path = ".status.rebalance.percent"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.routing.strategy != 'Range' || (self.shards.all(s, has(s.rangeStart)) && self.shards.exists(s, s.rangeStart == ''))").message("Range routing needs a rangeStart on every shard and one shard starting at ''").field_path(".shards"))]
#[x_kube(validation = Rule::new("self.routing.strategy != 'Range' || self.shards.all(s, self.shards.exists_one(t, t.rangeStart == s.rangeStart))").message("rangeStart values must be unique").field_path(".shards"))]
#[x_kube(validation = Rule::new("self.routing.strategy == 'Range' || self.shards.all(s, !has(s.rangeStart))").message("rangeStart applies only to Range routing").field_path(".shards"))]
pub struct ShardSetSpec {
    /// The databases, one per shard. Shard names must be unique.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("shard names must be unique"))]
    pub shards: Vec<Shard>,
    /// How document ids are mapped to shards.
    #[serde(default)]
    pub routing: Routing,
    /// How fast documents move when the routing changes (a live resharding).
    #[serde(default)]
    pub resharding: ReshardingPace,
}

/// How fast a live resharding moves documents: in batches of `batchSize`, at most
/// `documentsPerSecond` of them (unlimited when absent), to bound the load a move puts on
/// the shards' databases. Read when the resharding Job's pod starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReshardingPace {
    /// Documents handed over per batch (one transaction on each side).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: u32,
    /// The most documents moved per second, over the whole move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub documents_per_second: Option<u32>,
}

impl Default for ReshardingPace {
    fn default() -> Self {
        Self { batch_size: default_batch_size(), documents_per_second: None }
    }
}

fn default_batch_size() -> u32 {
    500
}

/// One metadata database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    /// Name of the shard, stable for its whole life: routing tables refer to it.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Secret key holding the Postgres connection URL (`postgres://user:password@host/db`).
    pub url_secret_ref: SecretKeyRef,
    /// Relative share of documents under ConsistentHash routing.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
    /// Under Range routing: the lowest document-id prefix (lowercase hex, up to 8 digits)
    /// this shard holds; it holds every id up to the next shard's `rangeStart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), regex(pattern = r"^[0-9a-f]{0,8}$"))]
    pub range_start: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// How document ids are mapped to shards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// The routing strategy.
    #[serde(default)]
    pub strategy: RoutingStrategy,
    /// Under ConsistentHash: points on the hash ring per unit of shard weight.
    #[serde(default = "default_virtual_nodes")]
    #[schemars(range(min = 1, max = 4096))]
    pub virtual_nodes: u32,
}

impl Default for Routing {
    fn default() -> Self {
        Self { strategy: RoutingStrategy::default(), virtual_nodes: default_virtual_nodes() }
    }
}

fn default_virtual_nodes() -> u32 {
    128
}

/// A routing strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RoutingStrategy {
    /// A hash ring with virtual nodes: adding a shard moves about 1/n of the documents.
    #[default]
    ConsistentHash,
    /// Contiguous ranges of document-id prefixes, one per shard.
    Range,
}

/// Observed state of a ShardSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardSetStatus {
    /// `Ready` (every shard reachable and migrated), `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Conditions,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Version of the routing table published in the platform config; bumped on every change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_version: Option<i64>,
    /// Shards that are reachable and at the current schema version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_shards: Option<i32>,
    /// The shards by name, comma-separated, for `kubectl get` (the API server prints only
    /// the first element of a list in a column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_names: Option<String>,
    /// State of each shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Progress of a rebalance, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceStatus>,
}

/// Observed state of one shard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Name of the shard.
    pub name: String,
    /// Whether the shard answered and is at the current schema version.
    #[serde(default)]
    pub ready: bool,
    /// Latest schema migration applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i64>,
    /// Documents stored on the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<i64>,
    /// Round-trip time of the last probe, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why the shard is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Progress of moving documents between shards (a live resharding), as the release that
/// runs it reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// `Announcing` (gateways loading the move), `Moving` (documents handed over in
    /// batches), `Flipping` (the new routing in force, gateways loading it), `Complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// What the phase waits for, or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The routing in force (a hash of what decides where documents go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_routing_version: Option<String>,
    /// The routing documents move to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_routing_version: Option<String>,
    /// Documents handed over so far.
    #[serde(default)]
    pub moved_documents: i64,
    /// Documents that move in all.
    #[serde(default)]
    pub total_documents: i64,
    /// Bytes of the handed-over documents' versions.
    #[serde(default)]
    pub moved_bytes: i64,
    /// Percent done.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Documents handed over per second since the move began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents_per_second: Option<f64>,
    /// Seconds left at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds_left: Option<i64>,
    /// When the move began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Every shard either routing names: documents it holds and its part of the move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardProgressStatus>,
}

/// One shard's part of a move.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardProgressStatus {
    /// Name of the shard.
    pub name: String,
    /// Documents the shard holds now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<i64>,
    /// Documents that leave it in all.
    #[serde(default)]
    pub total_documents: i64,
    /// Documents that left it so far.
    #[serde(default)]
    pub moved_documents: i64,
}
