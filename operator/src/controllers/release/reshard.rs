//! Live resharding, as a release drives it. A ShardSet whose routing no longer routes as the
//! published one does is not put in force at once; instead:
//!
//! 1. **Moving.** The published config keeps the routing in force and names the move to the
//!    ShardSet's (`shardMove`). Gateways load it and give new documents ids that stay where
//!    they land.
//! 2. Once every gateway and worker reports the move loaded (its `/readyz`), a Job runs
//!    `vellum-workers reshard`, which marks the shards and hands the moving documents over
//!    in batches (see `vellum_core::resharding`). Its progress, recorded on the shards, is
//!    the ShardSet's `status.rebalance`.
//! 3. **Flipping.** When the Job has succeeded, the ShardSet's routing is published in force.
//! 4. **Finishing.** Once every gateway and worker routes by it, the shards' marks and
//!    markers are cleared and the Job goes.
//!
//! A spec changed back before the flip is a move back: the shards the move brought in are
//! drained into the routing in force, by the same steps. A spec changed to a third routing
//! moves there, draining what the abandoned move brought in.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::Value;
use vellum_core::config::{PlatformConfig, ShardConfig, ShardMove, ShardsConfig};
use vellum_core::resharding::{ShardProgress, finish_move, progress};
use vellum_core::routing::RoutingTable;
use vellum_crds::BlueGreenRelease;
use vellum_crds::shard_set::{RebalanceStatus, ShardProgressStatus};

use super::{MANAGER, Objects, build};
use crate::context::{Context, StepError, apply};
use crate::controllers::platform::{names, release_labels, secret_keys, short_hash};
use crate::controllers::shared::{not_found, routes_the_same, time_of};

/// The field manager of a ShardSet's `status.rebalance`, which the release writes.
pub const STATUS_MANAGER: &str = "vellum-operator/resharding";

/// How soon a move under way is looked at again.
pub const STEP: Duration = Duration::from_secs(2);

/// The key of a move: the routing it moves to and the shards it drains. Its Job is named
/// by it, so that a move changed midway runs a Job of its own.
pub fn move_key(to: &ShardsConfig, draining: &[ShardConfig]) -> String {
    let version = RoutingTable::build(to).map(|t| t.version().to_owned()).unwrap_or_default();
    let drained: Vec<&str> = draining.iter().map(|s| s.name.as_str()).collect();
    short_hash(&[&version, &drained.join(",")])
}

/// The routing a config is published with: the ShardSet's `desired` when it routes as the
/// published one does (and no move is left to finish); otherwise the published routing
/// stays in force and the move to `desired` is published beside it, or, once the move's Job
/// has succeeded (`moved` is its key), `desired` is put in force (the flip).
pub fn plan(published: Option<&PlatformConfig>, desired: ShardsConfig, moved: Option<&str>) -> RoutingPlan {
    let Some(published) = published else { return RoutingPlan::steady(desired) };
    let Some(in_force) = &published.shards else { return RoutingPlan::steady(desired) };
    let known = |name: &str, shards: &ShardsConfig| shards.shards.iter().any(|s| s.name == name);
    // Shards an earlier move brought in (or was draining) that neither routing keeps.
    let draining: Vec<ShardConfig> = published
        .shard_move
        .iter()
        .flat_map(|m| m.to.shards.iter().chain(&m.draining))
        .filter(|s| !known(&s.name, in_force) && !known(&s.name, &desired))
        .fold(Vec::new(), |mut all, s| {
            if all.iter().all(|x: &ShardConfig| x.name != s.name) {
                all.push(s.clone());
            }
            all
        });
    if routes_the_same(in_force, &desired) && draining.is_empty() {
        return RoutingPlan::steady(desired);
    }
    let key = move_key(&desired, &draining);
    if moved == Some(key.as_str()) {
        return RoutingPlan { shards: desired, shard_move: None, flipped: true };
    }
    RoutingPlan { shards: in_force.clone(), shard_move: Some(ShardMove { to: desired, draining }), flipped: false }
}

/// What [`plan`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingPlan {
    /// The routing in force.
    pub shards: ShardsConfig,
    /// The move published beside it.
    pub shard_move: Option<ShardMove>,
    /// The move's Job succeeded: `shards` is the routing it reached.
    pub flipped: bool,
}

impl RoutingPlan {
    fn steady(shards: ShardsConfig) -> Self {
        Self { shards, shard_move: None, flipped: false }
    }
}

/// The key of the published move whose Job has succeeded, if one has.
pub async fn succeeded(
    ctx: &Context,
    release: &BlueGreenRelease,
    published: Option<&PlatformConfig>,
) -> Result<Option<String>, kube::Error> {
    let Some(moving) = published.and_then(|p| p.shard_move.as_ref()) else { return Ok(None) };
    let key = move_key(&moving.to, &moving.draining);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &release.namespace().unwrap_or_default());
    let done = jobs
        .get_opt(&names::reshard(&release.name_any(), &key))
        .await?
        .and_then(|job| job.status?.succeeded)
        .is_some_and(|n| n > 0);
    Ok(done.then_some(key))
}

/// What a move under way needs, once the config naming it is applied: its Job once every
/// gateway and worker loaded the move; after the flip, the shards' marks cleared once every one
/// routes by the new table. Returns why the release waits, if it does, and the ShardSet's
/// rebalance status.
pub async fn step(
    release: &BlueGreenRelease,
    ctx: &Context,
    objects: &Objects,
    config: &PlatformConfig,
) -> Result<Option<Moving>, StepError> {
    let name = release.name_any();
    let namespace = release.namespace().unwrap_or_default();
    let Some(shards) = &config.shards else { return Ok(None) };
    // Nothing to do (and nothing asked of the API or the shards) unless a move is published
    // or the ShardSet's status says one has not finished.
    let unfinished = ctx
        .caches
        .shard_set(&namespace, &release.spec.shard_set_ref)
        .and_then(|set| set.status.clone()?.rebalance?.phase)
        .is_some_and(|phase| phase != "Complete");
    if config.shard_move.is_none() && !unfinished && !objects.flipped {
        return Ok(None);
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let table = RoutingTable::build(shards).map(|t| t.version().to_owned()).unwrap_or_default();
    let next = config.shard_move.as_ref().and_then(|m| RoutingTable::build(&m.to).ok()).map(|t| t.version().to_owned());
    let lagging = replicas_not_routing(ctx, &namespace, &name, &table, next.as_deref()).await?;
    let urls = shard_urls(objects);
    let Some(moving) = &config.shard_move else {
        // After a flip: the marks go once no gateway follows a marker any more.
        let mut marked = Vec::new();
        for shard in &shards.shards {
            if let Some(url) = urls.get(&shard.name)
                && let Ok(db) = ctx.database(url).await
                && progress(&db).await.is_ok_and(|p| p.moving_to.is_some())
            {
                marked.push((shard.name.clone(), db));
            }
        }
        if marked.is_empty() {
            return Ok(None);
        }
        if lagging.is_empty() {
            for (shard, db) in &marked {
                finish_move(db, jiff_now_ms()).await.map_err(|e| {
                    StepError::Refused(crate::context::Refused::new(
                        vellum_crds::conditions::reasons::SHARD_UNREACHABLE,
                        format!("clearing shard {shard}'s move: {e}"),
                    ))
                })?;
            }
            for job in jobs.list(&ListParams::default().labels(&selector(&name))).await?.items {
                jobs.delete(&job.name_any(), &DeleteParams::background()).await.map(drop).or_else(not_found)?;
            }
            return Ok(Some(Moving::finished(&table)));
        }
        return Ok(Some(Moving::waiting(format!(
            "the routing {table} is in force; waiting for {} to load it before clearing the move",
            lagging.join(", ")
        ))));
    };
    let key = move_key(&moving.to, &moving.draining);
    // A Job of an abandoned move goes (its marks are taken over by this move's).
    for job in jobs.list(&ListParams::default().labels(&selector(&name))).await?.items {
        if job.name_any() != names::reshard(&name, &key) {
            jobs.delete(&job.name_any(), &DeleteParams::background()).await.map(drop).or_else(not_found)?;
        }
    }
    let mut status = read_progress(ctx, &urls, config).await;
    status.target_routing_version = next.clone();
    status.current_routing_version = Some(table.clone());
    if !lagging.is_empty() && jobs.get_opt(&names::reshard(&name, &key)).await?.is_none() {
        status.phase = Some("Announcing".into());
        status.message = Some(format!("waiting for {} to load the move", lagging.join(", ")));
        return Ok(Some(Moving { status, requeue: STEP }));
    }
    let job = apply(&ctx.client, MANAGER, &build::build_reshard_job(release, &key)).await?;
    let failed = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
    status.phase = Some("Moving".into());
    if failed > 0 {
        status.message = Some(format!("the resharding Job {} failed {failed} times; it is retried", job.name_any()));
    }
    Ok(Some(Moving { status, requeue: STEP }))
}

/// A move's state for the ShardSet's status, and when to look again.
#[derive(Clone, Debug, PartialEq)]
pub struct Moving {
    pub status: RebalanceStatus,
    pub requeue: Duration,
}

impl Moving {
    fn waiting(message: String) -> Self {
        Self {
            status: RebalanceStatus {
                phase: Some("Flipping".into()),
                message: Some(message),
                ..RebalanceStatus::default()
            },
            requeue: STEP,
        }
    }

    fn finished(table: &str) -> Self {
        Self {
            status: RebalanceStatus {
                phase: Some("Complete".into()),
                current_routing_version: Some(table.to_owned()),
                message: Some(format!("every document is where routing {table} sends it")),
                percent: 100.0,
                ..RebalanceStatus::default()
            },
            requeue: STEP,
        }
    }
}

/// The label selector of a release's resharding Jobs.
fn selector(release: &str) -> String {
    release_labels(release, "resharding", None).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn jiff_now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

/// Every shard's URL, by name, from the platform Secret the release built.
fn shard_urls(objects: &Objects) -> BTreeMap<String, String> {
    let data = objects.secret.data.clone().unwrap_or_default();
    data.into_iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(secret_keys::SHARD_PREFIX)?.to_owned();
            Some((name, String::from_utf8(value.0).ok()?))
        })
        .collect()
}

/// What the mover recorded on every shard of `config`, summed.
async fn read_progress(ctx: &Context, urls: &BTreeMap<String, String>, config: &PlatformConfig) -> RebalanceStatus {
    let mut status = RebalanceStatus::default();
    let mut started: Option<i64> = None;
    let mut updated: Option<i64> = None;
    for shard in config.all_shards() {
        let Some(url) = urls.get(&shard.name) else { continue };
        let (recorded, documents): (ShardProgress, Option<i64>) = match ctx.database(url).await {
            Ok(db) => (progress(&db).await.unwrap_or_default(), db.count_documents().await.ok()),
            Err(_) => (ShardProgress::default(), None),
        };
        status.total_documents += recorded.total_documents;
        status.moved_documents += recorded.moved_documents;
        status.moved_bytes += recorded.moved_bytes;
        started = match (started, recorded.started_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        updated = updated.max(recorded.updated_at);
        status.shards.push(ShardProgressStatus {
            name: shard.name.clone(),
            documents,
            moved_documents: recorded.moved_documents,
            total_documents: recorded.total_documents,
        });
    }
    #[allow(clippy::cast_precision_loss)]
    if status.total_documents > 0 {
        status.percent = ((status.moved_documents as f64 / status.total_documents as f64) * 1000.0).round() / 10.0;
    }
    if let (Some(started), Some(updated)) = (started, updated)
        && updated > started
    {
        #[allow(clippy::cast_precision_loss)]
        let rate = status.moved_documents as f64 * 1000.0 / (updated - started) as f64;
        status.documents_per_second = Some((rate * 10.0).round() / 10.0);
        if rate > 0.0 {
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            let left = ((status.total_documents - status.moved_documents).max(0) as f64 / rate).ceil() as i64;
            status.estimated_seconds_left = Some(left);
        }
    }
    status.started_at = started.and_then(time_of);
    status
}

/// The gateway and worker pods of `release` whose `/readyz` does not report routing `table`
/// in force and `next` as the move (or could not be asked), by name: a worker relays the
/// outbox of every shard of the routing it reports.
async fn replicas_not_routing(
    ctx: &Context,
    namespace: &str,
    release: &str,
    table: &str,
    next: Option<&str>,
) -> Result<Vec<String>, kube::Error> {
    let mut lagging = Vec::new();
    let mut pods = super::diagnose::pods_with(ctx, namespace, &release_labels(release, "gateway", None)).await?;
    pods.extend(super::diagnose::pods_with(ctx, namespace, &release_labels(release, "workers", None)).await?);
    for pod in pods {
        let name = pod.name_any();
        let Some(url) = super::diagnose::readyz_url(&pod) else {
            lagging.push(name);
            continue;
        };
        let body: Option<Value> = match ctx.http.get(&url).timeout(Duration::from_secs(2)).send().await {
            Ok(response) => response.bytes().await.ok().and_then(|b| serde_json::from_slice(&b).ok()),
            Err(_) => None,
        };
        let routes = body
            .as_ref()
            .is_some_and(|b| b["routingVersion"].as_str() == Some(table) && b["movingTo"].as_str() == next);
        if !routes {
            lagging.push(name);
        }
    }
    Ok(lagging)
}

#[cfg(test)]
mod tests {
    use vellum_core::config::SecretHandle;
    use vellum_crds::shard_set::{Routing, RoutingStrategy};

    use super::*;

    fn set(names: &[&str]) -> ShardsConfig {
        ShardsConfig {
            shard_set: "docs".into(),
            shards: names
                .iter()
                .map(|n| ShardConfig {
                    name: (*n).to_owned(),
                    url: SecretHandle::new("urls", n),
                    weight: 1,
                    range_start: None,
                })
                .collect(),
            routing: Routing { strategy: RoutingStrategy::ConsistentHash, virtual_nodes: 64 },
            resharding: vellum_crds::shard_set::ReshardingPace::default(),
        }
    }

    fn published(shards: &[&str], moving: Option<(&[&str], &[&str])>) -> PlatformConfig {
        let mut config: PlatformConfig = serde_json::from_value(serde_json::json!({
            "tiers": {}, "defaultTier": "hot", "webhooks": {}, "retentionPolicies": {}
        }))
        .unwrap();
        config.shards = Some(set(shards));
        config.shard_move = moving.map(|(to, draining)| ShardMove { to: set(to), draining: set(draining).shards });
        config
    }

    #[test]
    fn the_same_routing_is_published_as_is_and_a_new_one_is_moved_to_then_flipped() {
        assert_eq!(plan(None, set(&["a"]), None), RoutingPlan::steady(set(&["a"])), "the first publication");
        let one = published(&["a"], None);
        assert_eq!(plan(Some(&one), set(&["a"]), None), RoutingPlan::steady(set(&["a"])));

        let grow = plan(Some(&one), set(&["a", "b", "c"]), None);
        assert_eq!(grow.shards, set(&["a"]), "the routing in force stays");
        assert_eq!(grow.shard_move, Some(ShardMove { to: set(&["a", "b", "c"]), draining: vec![] }));
        let key = move_key(&set(&["a", "b", "c"]), &[]);
        let moving = published(&["a"], Some((&["a", "b", "c"], &[])));
        assert_eq!(plan(Some(&moving), set(&["a", "b", "c"]), None), grow, "until its Job succeeds");
        assert_eq!(plan(Some(&moving), set(&["a", "b", "c"]), Some("another")), grow);
        let flipped = plan(Some(&moving), set(&["a", "b", "c"]), Some(&key));
        assert_eq!((flipped.shards, flipped.shard_move, flipped.flipped), (set(&["a", "b", "c"]), None, true));
    }

    #[test]
    fn a_move_reverted_or_changed_before_its_flip_drains_what_it_brought_in() {
        let moving = published(&["a"], Some((&["a", "b", "c"], &[])));
        let back = plan(Some(&moving), set(&["a"]), None);
        assert_eq!(back.shards, set(&["a"]));
        assert_eq!(back.shard_move, Some(ShardMove { to: set(&["a"]), draining: set(&["b", "c"]).shards }));
        let key = move_key(&set(&["a"]), &set(&["b", "c"]).shards);
        let reverting = published(&["a"], Some((&["a"], &["b", "c"])));
        assert_eq!(plan(Some(&reverting), set(&["a"]), None), back, "the drain goes on");
        assert_eq!(
            plan(Some(&reverting), set(&["a"]), Some(&key)),
            RoutingPlan { flipped: true, ..RoutingPlan::steady(set(&["a"])) }
        );

        let third = plan(Some(&moving), set(&["a", "b", "d"]), None);
        assert_eq!(third.shards, set(&["a"]));
        assert_eq!(third.shard_move, Some(ShardMove { to: set(&["a", "b", "d"]), draining: set(&["c"]).shards }));
        assert_ne!(move_key(&set(&["a", "b", "d"]), &set(&["c"]).shards), move_key(&set(&["a", "b", "c"]), &[]));
        // A shard removed: 3 -> 2 moves its documents to the other two.
        let three = published(&["a", "b", "c"], None);
        let shrink = plan(Some(&three), set(&["a", "b"]), None);
        assert_eq!((shrink.shards, shrink.shard_move.unwrap().to), (set(&["a", "b", "c"]), set(&["a", "b"])));
    }
}
