//! `vellum-operator run`: caches, the five controllers, leader election through a Lease,
//! and the metrics and health endpoints.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vellum_crds::{BlueGreenRelease, RetentionPolicy, ShardSet, StorageTier, Webhook, field_managers, labels};

use crate::context::{Caches, Context, Error, key, report_forbidden};
use crate::controllers::{release, retention, shards, tier, webhook};
use crate::metrics::Metrics;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own).
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease (its pod name).
    pub identity: String,
    /// Seconds a leader holds the Lease without renewing it.
    pub lease_seconds: u64,
    /// How often healthy resources are looked at again.
    pub resync: Duration,
}

/// A reflector over every object of `K`, run in the background; its store fills as the
/// watch lists.
fn cache<K>(client: &Client) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                tracing::warn!(error = %e, kind = %K::kind(&()), "cache watch");
            }
        }
    });
    reader
}

/// What a person asked of an object: its spec (the generation), its annotations, its
/// finalizers and whether it is being deleted, but not its status, which the operator
/// writes itself: a change there must not trigger another reconcile.
fn intent<K: Resource>(object: &K) -> u64 {
    let meta = object.meta();
    hash_of((
        &meta.generation,
        &meta.annotations,
        &meta.finalizers,
        meta.deletion_timestamp.as_ref().map(|t| t.0.as_millisecond()),
    ))
}

/// A 64-bit hash of `value`, for telling whether what a watch passes on changed.
fn hash_of(value: impl Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The objects of a watch whose `key` changed (or that are seen for the first time), and
/// every deleted one.
fn changes_by<K, F>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    mut key: F,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
    F: FnMut(&K) -> u64 + Send + 'static,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    events.flat_map(move |event| {
        let passed: Vec<Result<K, watcher::Error>> = match event {
            Err(e) => vec![Err(e)],
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let uid = object.meta().uid.clone().unwrap_or_default();
                let hash = key(&object);
                if seen.insert(uid, hash) == Some(hash) { Vec::new() } else { vec![Ok(object)] }
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(object.meta().uid.as_deref().unwrap_or_default());
                vec![Ok(object)]
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => Vec::new(),
        };
        futures::stream::iter(passed)
    })
}

/// The objects of a watch whose intent changed (see [`intent`]), and every deleted one.
/// Status-only updates pass no further, so that a controller writing status, or a status
/// another controller watches, never starts a reconcile loop; timed requeues still
/// refresh what a status shows.
fn intent_changes<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    changes_by(events, intent)
}

/// What a release waits on in a ShardSet: its intent and its readiness (conditions, routing
/// version, each shard's readiness and schema version), but not the latency and document
/// counts every probe rewrites.
fn shard_set_readiness(set: &ShardSet) -> u64 {
    let status = set.status.as_ref().map(|status| {
        let conditions: Vec<_> =
            status.conditions.0.iter().map(|c| (&c.type_, &c.status, &c.reason, c.observed_generation)).collect();
        let shards: Vec<_> = status.shards.iter().map(|s| (&s.name, s.ready, s.schema_version)).collect();
        (conditions, status.observed_generation, status.routing_version, status.ready_shards, shards)
    });
    hash_of((intent(set), status))
}

/// Releases whose arrival, change or departure changes what the Webhooks of their
/// namespace are checked against: the allow-list and ShardSet of the namespace's first
/// release by name (see [`Caches::release_of`]). A hundred releases created with the same
/// allow-list wake a thousand Webhooks once, not a hundred times.
fn webhook_inputs_changes(
    events: impl Stream<Item = Result<watcher::Event<BlueGreenRelease>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<BlueGreenRelease, watcher::Error>> + Send + 'static {
    let mut namespaces: HashMap<String, std::collections::BTreeMap<String, u64>> = HashMap::new();
    events.flat_map(move |event| {
        let mut changed = |release: &BlueGreenRelease, present: bool| {
            let releases = namespaces.entry(release.namespace().unwrap_or_default()).or_default();
            let before = releases.values().next().copied();
            if present {
                releases.insert(
                    release.name_any(),
                    hash_of((&release.spec.webhook_allowed_cidrs, &release.spec.shard_set_ref)),
                );
            } else {
                releases.remove(&release.name_any());
            }
            before != releases.values().next().copied()
        };
        let passed: Vec<Result<BlueGreenRelease, watcher::Error>> = match event {
            Err(e) => vec![Err(e)],
            Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => {
                changed(&r, true).then(|| Ok(r)).into_iter().collect()
            }
            Ok(watcher::Event::Delete(r)) => changed(&r, false).then(|| Ok(r)).into_iter().collect(),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => Vec::new(),
        };
        futures::stream::iter(passed)
    })
}

/// A controller's primary resource: a store of every object, and the objects whose intent
/// changed.
fn primary<K>(client: &Client) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff().reflect(writer);
    (reader, intent_changes(events))
}

/// Objects of another kind whose intent changed.
fn spec_changes<K>(client: &Client) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    intent_changes(watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff())
}

/// Wraps a reconcile with metrics, logging and success bookkeeping.
async fn observed<K, F>(
    name: &'static str,
    manager: &'static str,
    object: Arc<K>,
    ctx: Arc<Context>,
    run: F,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    F: Future<Output = Result<Action, Error>>,
{
    let started = Instant::now();
    // Everything the reconcile logs carries which object it was about.
    let meta = object.meta();
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = meta.namespace.as_deref().unwrap_or_default(),
        name = meta.name.as_deref().unwrap_or_default(),
    );
    let result = tracing::Instrument::instrument(run, span).await;
    ctx.metrics.reconciled(name, started.elapsed());
    match &result {
        Ok(_) => ctx.succeeded(&key(object.as_ref())),
        // A missing RBAC rule is said on the object, not only in the operator's log.
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 403 => {
            report_forbidden(&ctx, manager, object.as_ref(), &status.message).await;
        }
        Err(_) => {}
    }
    result
}

fn error_policy<K: Resource<DynamicType = ()>>(name: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |object, error, ctx| {
        if let Error::Waiting(why) = error {
            // Not a failure: a cleanup under way, looked at again soon and on every change.
            tracing::debug!(controller = name, object = %key(object.as_ref()), reason = why.reason, "waiting");
            return Action::requeue(WAITING_POLL);
        }
        ctx.metrics.failed(name, &error.reason());
        tracing::warn!(controller = name, object = %key(object.as_ref()), error = %error, "reconcile failed; retrying with backoff");
        ctx.backoff(&key(object.as_ref()))
    }
}

/// Drains a controller's output, logging what it could not even attempt.
async fn drain<K, E, S>(name: &'static str, stream: S)
where
    K: Resource + Debug,
    E: std::error::Error,
    S: Stream<Item = Result<(ObjectRef<K>, Action), E>>,
    K::DynamicType: Debug + Eq + Hash,
{
    stream
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(controller = name, error = %e, "controller");
            }
        })
        .await;
}

/// Whether the operator made this object itself (the aggregated platform Secret of a
/// release): nothing a person wrote changed, so nothing else needs to look again.
fn ours(object: &impl ResourceExt) -> bool {
    object.labels().get(labels::MANAGED_BY).is_some_and(|v| v == labels::MANAGED_BY_VALUE)
}

/// Every object of `K` in the namespace of `object`: a change to something a whole
/// platform shares wakes all of them.
fn all_in_namespace<K, O>(store: Store<K>) -> impl Fn(O) -> Vec<ObjectRef<K>> + Send + Sync + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    O: ResourceExt,
{
    move |object: O| Caches::refs_in(&store, &object.namespace().unwrap_or_default())
}

/// Like [`all_in_namespace`] for Secrets, but not for the operator's own.
fn all_for_secret<K>(store: Store<K>) -> impl Fn(Secret) -> Vec<ObjectRef<K>> + Send + Sync + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    move |secret: Secret| {
        if ours(&secret) { Vec::new() } else { Caches::refs_in(&store, &secret.namespace().unwrap_or_default()) }
    }
}

/// The Webhooks a Secret matters to: those signing with it, or all of the namespace's
/// when it holds the URL of the database their delivery log is in.
fn webhooks_of_secret(caches: Caches) -> impl Fn(Secret) -> Vec<ObjectRef<Webhook>> + Send + Sync + 'static {
    move |secret: Secret| {
        if ours(&secret) {
            return Vec::new();
        }
        let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
        let holds_log = caches.log_shard(&namespace).is_some_and(|s| s.url_secret_ref.name == name);
        caches
            .webhooks
            .state()
            .iter()
            .filter(|w| w.namespace().as_deref() == Some(namespace.as_str()))
            .filter(|w| holds_log || w.spec.secret_ref.name == name)
            .map(|w| ObjectRef::from_obj(w.as_ref()))
            .collect()
    }
}

/// Reconciles of one kind running at once: enough to hide API and database latency, few
/// enough that a thousand objects changing at once queue here rather than exhaust the
/// database pool or flood the API server.
const CONCURRENCY: u16 = 16;

/// How often a cleanup under way (a StorageTier draining) is looked at besides the changes
/// of what it waits on.
const WAITING_POLL: Duration = Duration::from_secs(5);

/// How long a release waits for the changes around it to settle before compiling.
const RELEASE_DEBOUNCE: Duration = Duration::from_millis(500);

fn limits() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(CONCURRENCY)
}

/// Runs the controllers until `shutdown` resolves.
pub async fn controllers(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let caches = Caches {
        tiers: cache::<StorageTier>(&client),
        webhooks: cache::<Webhook>(&client),
        policies: cache::<RetentionPolicy>(&client),
        shard_sets: cache::<ShardSet>(&client),
        releases: cache::<BlueGreenRelease>(&client),
        secrets: cache::<Secret>(&client),
    };
    let filled = tokio::try_join!(
        caches.tiers.wait_until_ready(),
        caches.webhooks.wait_until_ready(),
        caches.policies.wait_until_ready(),
        caches.shard_sets.wait_until_ready(),
        caches.releases.wait_until_ready(),
        caches.secrets.wait_until_ready(),
    );
    if filled.is_err() {
        tracing::error!("a cache stopped before it was filled");
        return;
    }
    let reporter = Reporter { controller: "vellum-operator".into(), instance: Some(options.identity.clone()) };
    let mut ctx =
        Context::new(client.clone(), caches.clone(), Recorder::new(client.clone(), reporter), Arc::clone(&metrics));
    ctx.resync = options.resync;
    let ctx = Arc::new(ctx);
    tracing::info!("caches filled; controllers running");

    // Each controller reconciles its own objects when what a person asked of them changes
    // (not their status), and other kinds' objects likewise, except the ShardSet's
    // readiness, which releases wait on.
    tokio::join!(
        run_tiers(client.clone(), Arc::clone(&ctx), shutdown.clone()),
        run_webhooks(client.clone(), Arc::clone(&ctx), shutdown.clone()),
        run_retention_policies(client.clone(), Arc::clone(&ctx), shutdown.clone()),
        run_shard_sets(client.clone(), Arc::clone(&ctx), shutdown.clone()),
        run_releases(client.clone(), Arc::clone(&ctx), shutdown.clone()),
    );
}

/// The StorageTier controller: what wakes it, and its reconcile wrapped in [`observed`].
async fn run_tiers(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default;
    let (reader, trigger) = primary::<StorageTier>(&client);
    let controller = Controller::for_stream(trigger, reader)
        .with_config(limits())
        .watches(Api::<Secret>::all(client.clone()), wc(), all_for_secret(ctx.caches.tiers.clone()))
        // The Job draining a tier being deleted.
        .owns(Api::<Job>::all(client.clone()), wc())
        .graceful_shutdown_on(shutdown)
        .run(
            |o, c| {
                observed(
                    "storagetier",
                    field_managers::STORAGE_TIER,
                    Arc::clone(&o),
                    Arc::clone(&c),
                    tier::reconcile(o, c),
                )
            },
            error_policy("storagetier"),
            ctx,
        );
    drain("storagetier", controller).await;
}

/// The Webhook controller: what wakes it, and its reconcile wrapped in [`observed`].
async fn run_webhooks(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default;
    let (reader, trigger) = primary::<Webhook>(&client);
    let controller = Controller::for_stream(trigger, reader)
        .with_config(limits())
        .watches(Api::<Secret>::all(client.clone()), wc(), webhooks_of_secret(ctx.caches.clone()))
        .watches_stream(
            webhook_inputs_changes(watcher(Api::all(client.clone()), wc()).default_backoff()),
            all_in_namespace(ctx.caches.webhooks.clone()),
        )
        .graceful_shutdown_on(shutdown)
        .run(
            |o, c| {
                observed("webhook", field_managers::WEBHOOK, Arc::clone(&o), Arc::clone(&c), webhook::reconcile(o, c))
            },
            error_policy("webhook"),
            ctx,
        );
    drain("webhook", controller).await;
}

/// The RetentionPolicy controller: what wakes it, and its reconcile wrapped in [`observed`].
async fn run_retention_policies(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default;
    let (reader, trigger) = primary::<RetentionPolicy>(&client);
    let controller = Controller::for_stream(trigger, reader)
        .with_config(limits())
        .owns(Api::<CronJob>::all(client.clone()), wc())
        .watches_stream(spec_changes::<StorageTier>(&client), all_in_namespace(ctx.caches.policies.clone()))
        .watches_stream(spec_changes::<BlueGreenRelease>(&client), all_in_namespace(ctx.caches.policies.clone()))
        .graceful_shutdown_on(shutdown)
        .run(
            |o, c| {
                observed(
                    "retentionpolicy",
                    field_managers::RETENTION_POLICY,
                    Arc::clone(&o),
                    Arc::clone(&c),
                    retention::reconcile(o, c),
                )
            },
            error_policy("retentionpolicy"),
            ctx,
        );
    drain("retentionpolicy", controller).await;
}

/// The ShardSet controller: what wakes it, and its reconcile wrapped in [`observed`].
async fn run_shard_sets(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default;
    let (reader, trigger) = primary::<ShardSet>(&client);
    let controller = Controller::for_stream(trigger, reader)
        .with_config(limits())
        .watches(Api::<Secret>::all(client.clone()), wc(), all_for_secret(ctx.caches.shard_sets.clone()))
        .watches(Api::<Job>::all(client.clone()), wc(), all_in_namespace(ctx.caches.shard_sets.clone()))
        .graceful_shutdown_on(shutdown)
        .run(
            |o, c| {
                observed("shardset", field_managers::SHARD_SET, Arc::clone(&o), Arc::clone(&c), shards::reconcile(o, c))
            },
            error_policy("shardset"),
            ctx,
        );
    drain("shardset", controller).await;
}

/// The BlueGreenRelease controller: what wakes it, and its reconcile wrapped in [`observed`].
async fn run_releases(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let wc = watcher::Config::default;
    let (reader, trigger) = primary::<BlueGreenRelease>(&client);
    let controller = Controller::for_stream(trigger, reader)
        // A release compiles the whole namespace: a burst of changes (a thousand Webhooks
        // applied at once) is compiled once it settles, not once per change.
        .with_config(limits().debounce(RELEASE_DEBOUNCE))
        .owns(Api::<Deployment>::all(client.clone()), wc())
        .owns(Api::<Job>::all(client.clone()), wc())
        .owns(Api::<ConfigMap>::all(client.clone()), wc())
        .owns(Api::<Service>::all(client.clone()), wc())
        .owns(Api::<HorizontalPodAutoscaler>::all(client.clone()), wc())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), wc())
        .owns(Api::<ServiceAccount>::all(client.clone()), wc())
        .owns(Api::<RoleBinding>::all(client.clone()), wc())
        .watches(Api::<Secret>::all(client.clone()), wc(), all_for_secret(ctx.caches.releases.clone()))
        .watches_stream(spec_changes::<StorageTier>(&client), all_in_namespace(ctx.caches.releases.clone()))
        .watches_stream(spec_changes::<Webhook>(&client), all_in_namespace(ctx.caches.releases.clone()))
        .watches_stream(spec_changes::<RetentionPolicy>(&client), all_in_namespace(ctx.caches.releases.clone()))
        .watches_stream(
            changes_by(watcher(Api::<ShardSet>::all(client.clone()), wc()).default_backoff(), shard_set_readiness),
            all_in_namespace(ctx.caches.releases.clone()),
        )
        .graceful_shutdown_on(shutdown)
        .run(
            |o, c| {
                observed(
                    "bluegreenrelease",
                    field_managers::BLUE_GREEN_RELEASE,
                    Arc::clone(&o),
                    Arc::clone(&c),
                    release::reconcile(o, c),
                )
            },
            error_policy("bluegreenrelease"),
            ctx,
        );
    drain("bluegreenrelease", controller).await;
}

/// Why the operator stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the leader-election Lease manager: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("the leader-election task stopped")]
    LeaderElectionStopped,
    #[error("the controllers stopped")]
    ControllersStopped,
    #[error("lost the leader-election Lease: stopping so that another replica leads alone")]
    LostLease,
}

/// Runs the operator: metrics and health at once, the controllers while this replica holds
/// the Lease. Losing the Lease ends the process (its pod restarts and waits its turn), so
/// that two replicas never act at once.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let server = tokio::spawn(crate::metrics::serve(options.metrics_listen, Arc::clone(&metrics)));
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(options.lease_seconds)
        .with_grace(options.lease_seconds.div_ceil(3).max(1))
        .with_field_manager(format!("vellum-operator/{}", options.identity))
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    // A replica waiting for the Lease is ready: it stands by to take over at once.
    metrics.set_ready(true);
    tracing::info!(identity = %options.identity, lease = %options.lease_name, "waiting for the leader-election Lease");
    futures::pin_mut!(shutdown);
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            () = &mut shutdown => { drop(leading); let _ = lease_task.await; return Ok(()); }
            changed = leading.changed() => if changed.is_err() { return Err(RunError::LeaderElectionStopped) },
        }
    }
    metrics.set_leader(true);
    tracing::info!(identity = %options.identity, "leading: starting the controllers");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let stop = futures::FutureExt::shared(Box::pin(stop));
    let mut controllers = tokio::spawn(controllers(client, options.clone(), Arc::clone(&metrics), stop));
    let lost = loop {
        tokio::select! {
            () = &mut shutdown => break false,
            changed = leading.changed() => {
                if changed.is_err() || !*leading.borrow_and_update() { break true; }
            }
            _ = &mut controllers => return Err(RunError::ControllersStopped),
        }
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut controllers).await;
    metrics.set_leader(false);
    drop(leading);
    let _ = lease_task.await;
    server.abort();
    if lost {
        return Err(RunError::LostLease);
    }
    Ok(())
}
