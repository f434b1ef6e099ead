//! API types of Vellum's five custom resources (group `vellum.dev`, version `v1alpha1`)
//! and the constants every other crate shares about them: group, label keys, annotations,
//! finalizer names, field managers, condition types and reasons.
//!
//! This crate holds types and constants only. It depends on nothing of ours, so the
//! operator, the gateway and the workers all read one definition of the API.
#![warn(clippy::unwrap_used)]
// Several `#[x_kube(validation = …)]` rules on one item are how kube-derive takes them.
#![allow(clippy::duplicated_attributes)]

pub mod blue_green_release;
pub mod common;
pub mod retention_policy;
pub mod shard_set;
pub mod storage_tier;
pub mod webhook;

pub use blue_green_release::{BlueGreenRelease, BlueGreenReleaseSpec, BlueGreenReleaseStatus};
pub use retention_policy::{RetentionPolicy, RetentionPolicySpec, RetentionPolicyStatus};
pub use shard_set::{ShardSet, ShardSetSpec, ShardSetStatus};
pub use storage_tier::{StorageTier, StorageTierSpec, StorageTierStatus};
pub use webhook::{Webhook, WebhookSpec, WebhookStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Vellum resource.
pub const GROUP: &str = "vellum.dev";
/// The API version of every Vellum resource.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get vellum` category all five resources belong to.
pub const CATEGORY: &str = "vellum";

/// Recommended Kubernetes labels, stamped on everything the operator creates.
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const VERSION: &str = "app.kubernetes.io/version";
    /// The color (`blue` or `green`) of a blue-green pod.
    pub const COLOR: &str = "vellum.dev/color";
    /// Set by Kubernetes on an EndpointSlice: the Service it lists endpoints of.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    /// Value of `app.kubernetes.io/part-of` and `app.kubernetes.io/name`.
    pub const PART_OF_VALUE: &str = "vellum";
    /// Value of `app.kubernetes.io/managed-by`.
    pub const MANAGED_BY_VALUE: &str = "vellum-operator";
    /// Value of `app.kubernetes.io/managed-by` on what the gateway creates (a Webhook made
    /// through `POST /api/webhooks`, and its Secret).
    pub const MANAGED_BY_GATEWAY: &str = "vellum-gateway";
}

/// Annotations a person sets on a resource to ask the operator for something.
pub mod annotations {
    /// On a BlueGreenRelease: promote the preview color now.
    pub const PROMOTE: &str = "vellum.dev/promote";
    /// On a BlueGreenRelease: abort the rollout and keep the active color.
    pub const ABORT: &str = "vellum.dev/abort";
    /// On a BlueGreenRelease: roll out again what failed or was aborted.
    pub const RETRY: &str = "vellum.dev/retry";
    /// On a Webhook: reactivate an endpoint that was deactivated.
    pub const REACTIVATE: &str = "vellum.dev/reactivate";
    /// On a ConfigMap: hash of the compiled platform config it holds.
    pub const CONFIG_HASH: &str = "vellum.dev/config-hash";
    /// On a Webhook made through the gateway's API: the name its creator gave it.
    pub const DISPLAY_NAME: &str = "vellum.dev/display-name";
    /// On a Webhook made through the gateway's API: who created it.
    pub const CREATED_BY: &str = "vellum.dev/created-by";
}

/// Finalizers, only for state that lives outside Kubernetes.
pub mod finalizers {
    /// A StorageTier keeps its finalizer until its blobs have been drained elsewhere.
    pub const TIER_DRAIN: &str = "vellum.dev/tier-drain";
    /// A ShardSet keeps its finalizer until its routing has been withdrawn: no running
    /// BlueGreenRelease routes its documents by it.
    pub const SHARD_ROUTING: &str = "vellum.dev/shard-routing";
}

/// Server-side apply field managers, one per controller.
pub mod field_managers {
    pub const STORAGE_TIER: &str = "vellum.dev/storagetier";
    pub const RETENTION_POLICY: &str = "vellum.dev/retentionpolicy";
    pub const WEBHOOK: &str = "vellum.dev/webhook";
    pub const SHARD_SET: &str = "vellum.dev/shardset";
    pub const BLUE_GREEN_RELEASE: &str = "vellum.dev/bluegreenrelease";
    /// The gateway, when it creates Webhook resources for `POST /api/webhooks`.
    pub const GATEWAY: &str = "vellum.dev/gateway";
}

/// Condition types and reasons shared by all five resources.
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    /// Webhook only: the endpoint was deactivated by its failure rate or a 410 Gone.
    pub const DEACTIVATED: &str = "Deactivated";
    /// BlueGreenRelease only: what `spec` asks for serves, promoted (`kubectl wait
    /// --for=condition=Promoted`).
    pub const PROMOTED: &str = "Promoted";

    pub mod reasons {
        pub const RECONCILED: &str = "Reconciled";
        pub const INVALID_SPEC: &str = "InvalidSpec";
        pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
        pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
        pub const TIER_NOT_FOUND: &str = "TierNotFound";
        pub const TIER_UNREACHABLE: &str = "TierUnreachable";
        pub const SHARD_UNREACHABLE: &str = "ShardUnreachable";
        pub const DESTINATION_FORBIDDEN: &str = "DestinationForbidden";
        pub const FAILURE_RATE_EXCEEDED: &str = "FailureRateExceeded";
        pub const ENDPOINT_GONE: &str = "EndpointGone";
        pub const PAUSED: &str = "Paused";
        pub const INVALID_CREDENTIALS: &str = "InvalidCredentials";
        pub const BUCKET_NOT_FOUND: &str = "BucketNotFound";
        pub const SHARD_SET_NOT_FOUND: &str = "ShardSetNotFound";
        /// A platform-wide problem: no default tier, a resource the release depends on is invalid.
        pub const INVALID_CONFIG: &str = "InvalidConfig";
        pub const MIGRATING: &str = "Migrating";
        pub const MIGRATION_FAILED: &str = "MigrationFailed";
        pub const DEPLOYING: &str = "Deploying";
        /// A release's gateways do not become ready, and their pods say why.
        pub const GATEWAYS_NOT_READY: &str = "GatewaysNotReady";
        /// A BlueGreenRelease's version changed, and rolling out a second color is not
        /// supported by this operator yet.
        pub const NEW_VERSION_REFUSED: &str = "NewVersionRefused";
        /// The phases of a blue-green rollout, each the reason of its Event.
        pub const SMOKE_TESTING: &str = "SmokeTesting";
        pub const SMOKE_CHECK_FAILED: &str = "SmokeCheckFailed";
        pub const AWAITING_PROMOTION: &str = "AwaitingPromotion";
        pub const SWITCHING: &str = "Switching";
        pub const ANALYZING: &str = "Analyzing";
        pub const ANALYSIS_FAILED: &str = "AnalysisFailed";
        pub const ROLLING_BACK: &str = "RollingBack";
        pub const ROLLED_BACK: &str = "RolledBack";
        pub const PROMOTED: &str = "Promoted";
        pub const ABORTED: &str = "Aborted";
        /// A rollout phase took longer than `promotion.progressDeadlineSeconds`.
        pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
        /// A RetentionPolicy waits for a BlueGreenRelease whose workers will run it.
        pub const WAITING_FOR_RELEASE: &str = "WaitingForRelease";
        pub const DELIVERY_LOG_UNAVAILABLE: &str = "DeliveryLogUnavailable";
        /// The API server refused the operator a request (its RBAC lacks a rule); the
        /// message names the verb and the resource.
        pub const FORBIDDEN: &str = "Forbidden";
        /// A StorageTier being deleted moves the blobs it holds to the default tier first.
        pub const DRAINING: &str = "Draining";
        /// A StorageTier being deleted holds blobs that have nowhere to go (it is the
        /// default tier, or the platform's databases cannot be read); the message says what
        /// to change.
        pub const DRAIN_BLOCKED: &str = "DrainBlocked";
        /// The Job draining a StorageTier failed; its logs say why.
        pub const DRAIN_FAILED: &str = "DrainFailed";
        /// A ShardSet being deleted routes a running BlueGreenRelease's documents; it goes
        /// once no release routes by it.
        pub const ROUTING_IN_USE: &str = "RoutingInUse";
    }
}

/// The CustomResourceDefinitions of all five resources, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    [StorageTier::crd(), RetentionPolicy::crd(), Webhook::crd(), ShardSet::crd(), BlueGreenRelease::crd()]
        .into_iter()
        .map(known_formats_only)
        .collect()
}

/// The `format`s the API server knows (apiextensions' list); it warns about every other
/// one on each apply.
const KNOWN_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

/// Drops the formats schemars gives unsigned integers (`uint32`, …) and any other the API
/// server does not know; their `minimum: 0` stays, which is what they said.
fn known_formats_only(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("format").and_then(serde_json::Value::as_str).is_some_and(|f| !KNOWN_FORMATS.contains(&f)) {
                    map.remove("format");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    strip(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}
