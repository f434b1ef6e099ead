//! ShardSet: every shard's reachability, schema version, document count and latency, and
//! the routing version. Migrations run as the release's Jobs; a change of the shard list
//! that would move documents is refused until rebalancing exists.

use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use vellum_core::config::{ShardsConfig, Sources, compile, lookup};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::shard_set::{ShardSetStatus, ShardStatus};
use vellum_crds::{ShardSet, field_managers};

use crate::context::{Context, Result, apply_status, condition, redact};

/// Whether `next` routes every document where `published` did. Identical shard lists and
/// routing do; anything else would move documents, which needs a rebalance.
pub fn routes_the_same(published: &ShardsConfig, next: &ShardsConfig) -> bool {
    let shape = |s: &ShardsConfig| {
        (
            s.routing.clone(),
            s.shards.iter().map(|x| (x.name.clone(), x.weight, x.range_start.clone())).collect::<Vec<_>>(),
        )
    };
    shape(published) == shape(next)
}

async fn probe(ctx: &Context, url: &str) -> std::result::Result<(i64, i64, f64), String> {
    let started = Instant::now();
    let db = ctx.database(url).await?;
    let probe = async {
        let version = db.schema_version().await.map_err(|e| redact(&e.to_string(), url))?;
        let documents: i64 =
            if version > 0 { db.count_documents().await.map_err(|e| redact(&e.to_string(), url))? } else { 0 };
        Ok::<_, String>((version, documents))
    };
    let result = tokio::time::timeout(ctx.probe_timeout, probe)
        .await
        .map_err(|_| format!("no answer within {} s", ctx.probe_timeout.as_secs()))
        .and_then(|r| r);
    match result {
        Ok((version, documents)) => Ok((version, documents, started.elapsed().as_secs_f64() * 1000.0)),
        Err(e) => {
            ctx.forget_database(url).await;
            Err(e)
        }
    }
}

pub async fn reconcile(set: Arc<ShardSet>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let previous = set.status.clone().unwrap_or_default();
    let generation = set.metadata.generation;
    let secrets = ctx.caches.secrets(&namespace);
    let mut shards = Vec::new();
    for shard in &set.spec.shards {
        let r = &shard.url_secret_ref;
        let url = lookup(&secrets, &r.name, &r.key).and_then(|v| {
            String::from_utf8(v.to_vec()).map_err(|_| (reasons::INVALID_SPEC, "the URL is not UTF-8".to_owned()))
        });
        let status = match url {
            Err((_, message)) => {
                ShardStatus { name: shard.name.clone(), ready: false, message: Some(message), ..ShardStatus::default() }
            }
            Ok(url) => match probe(&ctx, &url).await {
                Ok((version, documents, latency)) => ShardStatus {
                    name: shard.name.clone(),
                    ready: version > 0,
                    schema_version: Some(version),
                    documents: Some(documents),
                    latency_ms: Some((latency * 100.0).round() / 100.0),
                    message: (version == 0)
                        .then(|| "reachable; no schema yet (the release's migration Job creates it)".to_owned()),
                },
                Err(e) => ShardStatus {
                    name: shard.name.clone(),
                    ready: false,
                    message: Some(format!("unreachable: {e}")),
                    ..ShardStatus::default()
                },
            },
        };
        shards.push(status);
    }

    // The spec's own problems (a shard listed twice, a missing Secret) come from the compiler.
    let sources = Sources { shard_sets: vec![(*set).clone()], secrets, ..Sources::default() };
    let own = format!("ShardSet/{name}");
    let spec_problem = compile(&sources).err().and_then(|errors| errors.into_iter().find(|e| e.resource == own));
    let ready_shards = shards.iter().filter(|s| s.ready).count();
    let (ready, reason, message) = if let Some(e) = spec_problem {
        (false, e.reason, e.message)
    } else if let Some(down) = shards.iter().find(|s| !s.ready && s.schema_version.is_none()) {
        (
            false,
            reasons::SHARD_UNREACHABLE,
            format!("shard {}: {}", down.name, down.message.clone().unwrap_or_default()),
        )
    } else if ready_shards < shards.len() {
        (
            false,
            reasons::MIGRATING,
            format!("{ready_shards} of {} shards have a schema; migrations pending", shards.len()),
        )
    } else {
        (true, reasons::RECONCILED, format!("{ready_shards} shards reachable and migrated"))
    };
    let routing_version = match (previous.routing_version, previous.observed_generation) {
        (Some(v), Some(g)) if Some(g) == generation => v,
        (Some(v), _) => v + 1,
        (None, _) => 1,
    };
    let was = previous.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let ready_condition =
        condition(&previous.conditions, conditions::READY, ready, reason, message.clone(), generation);
    let now = Some((ready_condition.status.clone(), ready_condition.reason.clone()));
    let status = ShardSetStatus {
        conditions: Conditions(vec![ready_condition]),
        observed_generation: generation,
        routing_version: Some(routing_version),
        ready_shards: i32::try_from(ready_shards).ok(),
        shards,
        rebalance: previous.rebalance,
    };
    apply_status(&ctx.client, field_managers::SHARD_SET, set.as_ref(), &status).await?;
    if was != now {
        ctx.event(set.as_ref(), !ready, if ready { "Ready" } else { reason }, message).await;
    }
    Ok(Action::requeue(if ready { ctx.resync } else { ctx.resync / 4 }))
}
