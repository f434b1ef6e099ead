//! ShardSet: every shard's reachability, schema version, document count and latency, and
//! the routing version. Migrations run as the release's Jobs; a change of the shard list
//! that moves documents is run by the release as a live resharding, which writes its
//! progress into `status.rebalance` under a field manager of its own (see
//! `release::reshard`).

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use vellum_core::config::{Sources, compile, lookup};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::shard_set::{ShardSetStatus, ShardStatus};
use vellum_crds::{BlueGreenRelease, ShardSet, field_managers, finalizers};

use crate::context::{Context, Refused, Result, apply_status, condition, ready_event, unusable};

const MANAGER: &str = field_managers::SHARD_SET;

///
/// Through the `vellum.dev/shard-routing` finalizer, added first: a ShardSet being deleted
/// stays while a running release routes its documents by it (`withdraw`), so that the
/// databases holding them are never dropped from under the gateways (or a move under way).
pub async fn reconcile(set: Arc<ShardSet>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<ShardSet> = Api::namespaced(ctx.client.clone(), &set.namespace().unwrap_or_default());
    let outcome = finalizer(&api, finalizers::SHARD_ROUTING, set, |event| async {
        match event {
            Finalizer::Apply(set) => observe(set, &ctx).await,
            Finalizer::Cleanup(set) => withdraw(&set, &ctx).await,
        }
    })
    .await;
    outcome.map_err(crate::context::Error::from)
}

/// Lets a ShardSet being deleted go once no running release routes by it; until then its
/// status and an Event say which release does.
async fn withdraw(set: &ShardSet, ctx: &Context) -> Result<Action> {
    let namespace = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let routing = ctx
        .caches
        .releases_in(&namespace)
        .into_iter()
        .find(|r| r.spec.shard_set_ref == name && r.metadata.deletion_timestamp.is_none());
    let Some(release) = routing else {
        tracing::info!(shard_set = %name, "no release routes by the ShardSet; releasing it");
        return Ok(Action::await_change());
    };
    let why = Refused::new(
        reasons::ROUTING_IN_USE,
        format!(
            "BlueGreenRelease {} routes its documents by this ShardSet; it goes once the release is deleted",
            release.name_any()
        ),
    );
    let previous = set.status.clone().unwrap_or_default();
    let probed = previous.shards.iter().map(|s| (s.clone(), reasons::RECONCILED)).collect();
    let next = status(set, Err(why.clone()), probed);
    apply_status(&ctx.client, MANAGER, set, &next).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &next.conditions) {
        ctx.event(set, warning, &reason, note).await;
    }
    Err(crate::context::Error::Waiting(why))
}

/// Probes every shard and writes what it found.
async fn observe(set: Arc<ShardSet>, ctx: &Context) -> Result<Action> {
    let namespace = set.namespace().unwrap_or_default();
    let sources =
        Sources { shard_sets: vec![(*set).clone()], secrets: ctx.caches.secrets(&namespace), ..Sources::default() };
    let mut shards = Vec::new();
    for shard in &set.spec.shards {
        let r = &shard.url_secret_ref;
        let url = lookup(&sources.secrets, &r.name, &r.key).map_err(Refused::from).and_then(|v| {
            String::from_utf8(v.to_vec()).map_err(|_| Refused::new(reasons::INVALID_SPEC, "the URL is not UTF-8"))
        });
        shards.push(match url {
            Err(refused) => shard_status(&shard.name, Err(refused)),
            Ok(url) => shard_status(&shard.name, probe(ctx, &url).await),
        });
    }
    let previous = set.status.clone().unwrap_or_default();
    let valid = validate(&set, &sources).and_then(|()| in_use(&set, ctx.caches.release_of(&namespace).as_ref()));
    let status = status(&set, valid, shards);
    apply_status(&ctx.client, MANAGER, set.as_ref(), &status).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &status.conditions) {
        ctx.event(set.as_ref(), warning, &reason, note).await;
    }
    let ready = status.conditions.is_true(conditions::READY);
    Ok(Action::requeue(if ready { ctx.resync } else { ctx.resync / 4 }))
}

/// The spec's own problems (a shard listed twice, a missing Secret), from the compiler.
pub fn validate(set: &ShardSet, sources: &Sources) -> Result<(), Refused> {
    let own = format!("ShardSet/{}", set.name_any());
    match compile(sources).err().and_then(|errors| errors.into_iter().find(|e| e.resource == own)) {
        Some(e) => Err(Refused::from(&e)),
        None => Ok(()),
    }
}

/// A namespace's platform has one ShardSet, the one its release names: another is refused
/// on its own (the release and the rest of the platform carry on).
pub fn in_use(set: &ShardSet, release: Option<&BlueGreenRelease>) -> Result<(), Refused> {
    match release {
        Some(release) if release.spec.shard_set_ref != set.name_any() => Err(Refused::new(
            reasons::INVALID_SPEC,
            format!(
                "a platform has one ShardSet: BlueGreenRelease {} uses ShardSet {}, not this one",
                release.name_any(),
                release.spec.shard_set_ref
            ),
        )),
        _ => Ok(()),
    }
}

/// A shard's schema version, document count and round-trip latency in milliseconds.
async fn probe(ctx: &Context, url: &str) -> Result<(i64, i64, f64), Refused> {
    let started = Instant::now();
    let db = ctx.database(url).await?;
    let probe = async {
        let version = db.schema_version().await.map_err(|e| unusable(&e, url))?;
        let documents: i64 = if version > 0 { db.count_documents().await.map_err(|e| unusable(&e, url))? } else { 0 };
        Ok::<_, Refused>((version, documents))
    };
    let result = tokio::time::timeout(ctx.probe_timeout, probe).await.map_err(|_| ctx.no_answer()).and_then(|r| r);
    match result {
        Ok((version, documents)) => Ok((version, documents, started.elapsed().as_secs_f64() * 1000.0)),
        Err(e) => {
            ctx.forget_database(url).await;
            Err(e)
        }
    }
}

/// One shard's line of the status, from its probe, and the reason it gives the set's
/// `Ready` condition when it is the first shard that keeps the set from being ready.
pub fn shard_status(name: &str, probed: Result<(i64, i64, f64), Refused>) -> (ShardStatus, &'static str) {
    match probed {
        Ok((version, documents, latency)) => (
            ShardStatus {
                name: name.to_owned(),
                ready: version > 0,
                schema_version: Some(version),
                documents: Some(documents),
                latency_ms: Some((latency * 100.0).round() / 100.0),
                message: (version == 0)
                    .then(|| "reachable; no schema yet (the release's migration Job creates it)".to_owned()),
            },
            if version > 0 { reasons::RECONCILED } else { reasons::MIGRATING },
        ),
        Err(refused) => {
            let message = match refused.reason {
                reasons::SHARD_UNREACHABLE => format!("unreachable: {}", refused.message),
                reasons::INVALID_CREDENTIALS => format!("credentials refused: {}", refused.message),
                _ => refused.message,
            };
            (
                ShardStatus { name: name.to_owned(), ready: false, message: Some(message), ..ShardStatus::default() },
                refused.reason,
            )
        }
    }
}

/// The status after every shard was probed: `Ready` when the spec is valid and every shard
/// is reachable and migrated; the routing version goes up with each new generation.
pub fn status(set: &ShardSet, valid: Result<(), Refused>, probed: Vec<(ShardStatus, &'static str)>) -> ShardSetStatus {
    let previous = set.status.clone().unwrap_or_default();
    let generation = set.metadata.generation;
    let ready_shards = probed.iter().filter(|(s, _)| s.ready).count();
    let down = probed.iter().find(|(s, _)| !s.ready && s.schema_version.is_none());
    let (ready, reason, message) = if let Err(refused) = valid {
        (false, refused.reason, refused.message)
    } else if let Some((down, reason)) = down {
        (false, *reason, format!("shard {}: {}", down.name, down.message.clone().unwrap_or_default()))
    } else if ready_shards < probed.len() {
        (
            false,
            reasons::MIGRATING,
            format!("{ready_shards} of {} shards have a schema; migrations pending", probed.len()),
        )
    } else {
        (true, reasons::RECONCILED, format!("{ready_shards} shards reachable and migrated"))
    };
    let routing_version = match (previous.routing_version, previous.observed_generation) {
        (Some(v), Some(g)) if Some(g) == generation => v,
        (Some(v), _) => v + 1,
        (None, _) => 1,
    };
    ShardSetStatus {
        conditions: Conditions(vec![condition(
            &previous.conditions,
            conditions::READY,
            ready,
            reason,
            message,
            generation,
        )]),
        observed_generation: generation,
        routing_version: Some(routing_version),
        ready_shards: i32::try_from(ready_shards).ok(),
        shard_names: Some(set.spec.shards.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",")),
        shards: probed.into_iter().map(|(s, _)| s).collect(),
        // The release's to write (its own field manager): left out of this apply.
        rebalance: None,
    }
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn set(generation: i64, status: Option<ShardSetStatus>) -> ShardSet {
        let mut set: ShardSet = serde_yaml::from_str(
            "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: meta, namespace: ns}\nspec: {shards: [{name: a, urlSecretRef: {name: db, key: a}}, {name: b, urlSecretRef: {name: db, key: b}}]}\n",
        )
        .unwrap();
        set.metadata.generation = Some(generation);
        set.status = status;
        set
    }

    #[test]
    fn ready_needs_every_shard_reachable_and_migrated_and_says_which_is_not() {
        let migrated = vec![shard_status("a", Ok((12, 3, 1.234))), shard_status("b", Ok((12, 0, 0.5)))];
        let ok = status(&set(1, None), Ok(()), migrated.clone());
        let ready = ok.conditions.get(conditions::READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.message.as_str()), ("True", "2 shards reachable and migrated"));
        assert_eq!((ok.ready_shards, ok.routing_version, ok.shards[0].latency_ms), (Some(2), Some(1), Some(1.23)));
        assert_eq!(ok.shard_names.as_deref(), Some("a,b"), "what kubectl get prints under SHARDS");

        let fresh = vec![shard_status("a", Ok((12, 3, 1.0))), shard_status("b", Ok((0, 0, 1.0)))];
        let waiting = status(&set(1, None), Ok(()), fresh);
        assert_eq!(waiting.conditions.get(conditions::READY).unwrap().reason, reasons::MIGRATING);

        let down = vec![
            shard_status("a", Ok((12, 3, 1.0))),
            shard_status("b", Err(Refused::new(reasons::SHARD_UNREACHABLE, "connection refused"))),
        ];
        let down = status(&set(1, None), Ok(()), down);
        let ready = down.conditions.get(conditions::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (reasons::SHARD_UNREACHABLE, "shard b: unreachable: connection refused")
        );

        let password = Refused::new(reasons::INVALID_CREDENTIALS, "password authentication failed for user \"vellum\"");
        let wrong = vec![shard_status("a", Err(password)), shard_status("b", Ok((12, 0, 0.5)))];
        let wrong = status(&set(1, None), Ok(()), wrong);
        let ready = wrong.conditions.get(conditions::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (
                reasons::INVALID_CREDENTIALS,
                "shard a: credentials refused: password authentication failed for user \"vellum\""
            )
        );

        let refused = Refused::new(reasons::SECRET_NOT_FOUND, "Secret db does not exist");
        let invalid = status(&set(1, None), Err(refused), migrated);
        assert_eq!(invalid.conditions.get(conditions::READY).unwrap().reason, reasons::SECRET_NOT_FOUND);
    }

    #[test]
    fn a_shard_set_the_release_does_not_name_is_refused_on_its_own() {
        let release = |shard_set: &str| -> BlueGreenRelease {
            serde_yaml::from_str(&format!(
                "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {{name: docs, namespace: ns}}\nspec: {{version: 1.0.0, gateway: {{image: g}}, workers: {{image: w}}, shardSetRef: {shard_set}, nats: {{url: 'nats://nats:4222'}}, jwt: {{secretRef: {{name: jwt, key: hs256}}}}}}\n"
            ))
            .unwrap()
        };
        let release = release("other");
        let refused = in_use(&set(1, None), Some(&release)).unwrap_err();
        assert_eq!(refused.reason, reasons::INVALID_SPEC);
        assert_eq!(
            refused.message,
            "a platform has one ShardSet: BlueGreenRelease docs uses ShardSet other, not this one"
        );
        assert_eq!(in_use(&set(1, None), None), Ok(()), "before a release, any ShardSet may become the platform's");
        let mut named = release.clone();
        named.spec.shard_set_ref = "meta".into();
        assert_eq!(in_use(&set(1, None), Some(&named)), Ok(()));
    }

    #[test]
    fn the_routing_version_goes_up_once_per_generation() {
        let shards = vec![shard_status("a", Ok((12, 0, 1.0)))];
        let first = status(&set(1, None), Ok(()), shards.clone());
        assert_eq!(first.routing_version, Some(1));
        let again = status(&set(1, Some(first.clone())), Ok(()), shards.clone());
        assert_eq!(again.routing_version, Some(1), "the same generation keeps its routing version");
        let changed = status(&set(2, Some(first)), Ok(()), shards);
        assert_eq!(changed.routing_version, Some(2));
    }

    #[tokio::test]
    async fn the_pool_of_a_database_no_longer_probed_is_closed() {
        let server = Arc::new(std::sync::Mutex::new(crate::controllers::testkit::Server::default()));
        let mut ctx = crate::controllers::testkit::context(&crate::controllers::testkit::World::default(), server);
        Arc::get_mut(&mut ctx).unwrap().resync = std::time::Duration::from_millis(100);
        let dir = tempfile::tempdir().unwrap();
        let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
        let (left, stays) = (url("left.db"), url("stays.db"));
        probe(&ctx, &left).await.unwrap();
        let left_pool = ctx.database(&left).await.unwrap();
        // The shard that stays goes on being probed; the one that left does not.
        for _ in 0..4 {
            probe(&ctx, &stays).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let stays_pool = ctx.database(&stays).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !left_pool.pool().is_closed() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(left_pool.pool().is_closed(), "the pool of the database that left is closed");
        assert!(!stays_pool.pool().is_closed(), "the pool of the database probed is kept");
        // Asked for again, the database that left gets a new pool.
        assert!(!ctx.database(&left).await.unwrap().pool().is_closed());
    }
}
