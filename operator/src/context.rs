//! What every controller shares: the client, caches of the resources a platform is compiled
//! from, the event recorder, metrics, database pools, and the helpers that apply objects and
//! status with server-side apply and turn errors into backed-off requeues.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use vellum_core::config::{SecretStore, Sources, lookup, secret_data};
use vellum_core::store::Metadata;
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, ShardSet, StorageTier, Webhook};

use crate::metrics::Metrics;

/// Why a reconcile failed; it is retried with backoff. Its [`Error::reason`] is the
/// metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A platform's metadata database failed while the reconcile used it.
    #[error("metadata database ({what}): {}", source.brief())]
    Database {
        what: &'static str,
        #[source]
        source: vellum_core::store::StoreError,
    },
    /// A finalizer's cleanup is not done yet (a StorageTier still holds blobs): the object
    /// stays, its status says why, and it is looked at again shortly.
    #[error("waiting before removing the finalizer: {0}")]
    Waiting(Refused),
    /// The finalizer helper refused the object itself (no name, a bad finalizer name).
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) | F::RemoveFinalizer(e) => Self::Kube(e),
            other => Self::Finalizer(other.to_string()),
        }
    }
}

impl Error {
    /// The label of this failure in `vellum_operator_reconcile_failures`: the API server's
    /// reason (`Conflict`, `Forbidden`, ...), or what failed to answer.
    pub fn reason(&self) -> String {
        match self {
            Self::Kube(kube::Error::Api(s)) => s.reason.clone(),
            Self::Kube(_) => "Transport".to_owned(),
            Self::Database { .. } => "Database".to_owned(),
            Self::Waiting(refused) => refused.reason.to_owned(),
            Self::Finalizer(_) => "Finalizer".to_owned(),
        }
    }
}

/// Why an object cannot progress as it is: the reason constant becomes the condition's
/// reason and the Event's, and the message says what to change. Not retried with backoff:
/// a change to the object or to what it refers to wakes it again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

impl Refused {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// The `(reason, message)` pairs of the config compiler's lookups.
impl From<(&'static str, String)> for Refused {
    fn from((reason, message): (&'static str, String)) -> Self {
        Self { reason, message }
    }
}

impl From<&vellum_core::config::ConfigError> for Refused {
    fn from(e: &vellum_core::config::ConfigError) -> Self {
        Self { reason: e.reason, message: e.message.clone() }
    }
}

/// How one step of a reconcile pipeline stops: it failed and is retried, or the object is
/// refused until it changes.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Failed(#[from] Error),
    #[error(transparent)]
    Refused(#[from] Refused),
}

impl From<kube::Error> for StepError {
    fn from(e: kube::Error) -> Self {
        Self::Failed(Error::Kube(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every endpoint's delivery summary, by Webhook name.
pub type DeliverySummaries = HashMap<String, vellum_core::webhooks::Summary>;

/// How long one read of a platform's delivery summaries serves its Webhooks' statuses.
pub const SUMMARIES_FRESH: Duration = Duration::from_secs(1);

/// Read-only caches of everything a platform is compiled from, kept by reflectors.
#[derive(Clone)]
pub struct Caches {
    pub tiers: Store<StorageTier>,
    pub webhooks: Store<Webhook>,
    pub policies: Store<RetentionPolicy>,
    pub shard_sets: Store<ShardSet>,
    pub releases: Store<BlueGreenRelease>,
    pub secrets: Store<Secret>,
}

impl Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish_non_exhaustive()
    }
}

fn in_namespace<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespace: &str) -> Vec<K> {
    let mut items: Vec<K> =
        store.state().iter().filter(|o| o.namespace().as_deref() == Some(namespace)).map(|o| (**o).clone()).collect();
    items.sort_by_key(ResourceExt::name_any);
    items
}

impl Caches {
    /// The Secrets of a namespace, as the compiler takes them.
    pub fn secrets(&self, namespace: &str) -> SecretStore {
        in_namespace(&self.secrets, namespace).into_iter().map(|s| (s.name_any(), secret_data(&s))).collect()
    }

    /// Everything one namespace's platform is compiled from.
    /// Every resource of a namespace's platform. Of its ShardSets, only the one the release
    /// names (all of them before there is a release): another ShardSet is refused on its
    /// own, and does not break the platform.
    pub fn sources(&self, namespace: &str) -> Sources {
        let mut shard_sets = in_namespace(&self.shard_sets, namespace);
        if let Some(release) = self.release_of(namespace) {
            shard_sets.retain(|set| set.name_any() == release.spec.shard_set_ref);
        }
        Sources {
            tiers: self.tiers_in(namespace),
            webhooks: in_namespace(&self.webhooks, namespace),
            retention_policies: in_namespace(&self.policies, namespace),
            shard_sets,
            releases: self.releases_in(namespace),
            secrets: self.secrets(namespace),
        }
    }

    pub fn tiers_in(&self, namespace: &str) -> Vec<StorageTier> {
        in_namespace(&self.tiers, namespace)
    }

    pub fn releases_in(&self, namespace: &str) -> Vec<BlueGreenRelease> {
        in_namespace(&self.releases, namespace)
    }

    pub fn shard_set(&self, namespace: &str, name: &str) -> Option<ShardSet> {
        self.shard_sets.get(&ObjectRef::new(name).within(namespace)).map(|s| (*s).clone())
    }

    /// The shard whose database keeps a namespace's delivery log: the first of its
    /// release's ShardSet.
    pub fn log_shard(&self, namespace: &str) -> Option<vellum_crds::shard_set::Shard> {
        let release = self.release_of(namespace)?;
        self.shard_set(namespace, &release.spec.shard_set_ref)?.spec.shards.into_iter().next()
    }

    /// The release a namespace's platform is run by: the first by name.
    pub fn release_of(&self, namespace: &str) -> Option<BlueGreenRelease> {
        self.releases_in(namespace).into_iter().next()
    }

    /// References to every object of `store` in `namespace`, for watches that wake all of
    /// them when something they share changes.
    pub fn refs_in<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespace: &str) -> Vec<ObjectRef<K>> {
        in_namespace(store, namespace).iter().map(ObjectRef::from_obj).collect()
    }
}

/// The controllers' shared context.
pub struct Context {
    pub client: Client,
    pub caches: Caches,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Metadata database pools by URL, opened on first use, with when each was last asked
    /// for: a pool unused for [`Context::pool_unused_after`] is closed (see
    /// [`Context::database`]).
    databases: tokio::sync::Mutex<HashMap<String, (Metadata, std::time::Instant)>>,
    /// Delivery summaries of each namespace's platform, and when they were read: one read
    /// serves every Webhook reconciled within [`SUMMARIES_FRESH`].
    summaries: tokio::sync::Mutex<HashMap<String, (std::time::Instant, Arc<DeliverySummaries>)>>,
    /// Consecutive failures per object, for the backoff of its next retry.
    failures: Mutex<HashMap<String, u32>>,
    /// How long a tier or shard probe may take.
    pub probe_timeout: Duration,
    /// How often healthy resources are looked at again (probes, delivery statistics).
    pub resync: Duration,
    /// The operator's own HTTP client, for what the platform's pods answer (a gateway's
    /// `/readyz`). Never through a proxy: the pods are inside the cluster.
    pub http: reqwest::Client,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, caches: Caches, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            caches,
            recorder,
            metrics,
            databases: tokio::sync::Mutex::default(),
            summaries: tokio::sync::Mutex::default(),
            failures: Mutex::default(),
            probe_timeout: Duration::from_secs(10),
            resync: Duration::from_secs(60),
            http: reqwest::Client::builder().no_proxy().build().unwrap_or_default(),
        }
    }

    /// A database that did not answer within [`Context::probe_timeout`].
    pub fn no_answer(&self) -> Refused {
        Refused::new(reasons::SHARD_UNREACHABLE, format!("no answer within {} s", self.probe_timeout.as_secs()))
    }

    /// How long a pool is kept unused: three resyncs. Every shard of a platform is probed
    /// once a resync, so only the pool of a database no ShardSet names any more (a shard
    /// that left, a platform deleted) goes unused that long.
    fn pool_unused_after(&self) -> Duration {
        self.resync.saturating_mul(3)
    }

    /// A pool on the metadata database at `url`, opened once and kept while it is used.
    /// Pools unused for three resyncs are closed here, so the operator
    /// holds no connection to a database that left the platform. Errors never quote the
    /// URL, which holds a password.
    pub async fn database(&self, url: &str) -> Result<Metadata, Refused> {
        let now = std::time::Instant::now();
        let mut pools = self.databases.lock().await;
        let unused_after = self.pool_unused_after();
        let mut unused = Vec::new();
        pools.retain(|key, (pool, used)| {
            let keep = key == url || now.duration_since(*used) < unused_after;
            if !keep {
                unused.push(pool.clone());
            }
            keep
        });
        for pool in unused {
            // Closing waits for connections in use to come back: not under the lock.
            tokio::spawn(async move { pool.pool().close().await });
        }
        if let Some((pool, used)) = pools.get_mut(url) {
            *used = now;
            return Ok(pool.clone());
        }
        let pool = tokio::time::timeout(self.probe_timeout, Metadata::connect(url))
            .await
            .map_err(|_| self.no_answer())?
            .map_err(|e| unusable(&e, url))?;
        pools.insert(url.to_owned(), (pool.clone(), now));
        Ok(pool)
    }

    /// The URL of the metadata database a namespace's platform keeps its delivery log in
    /// (the first shard of its release's ShardSet), once all of those exist.
    pub fn platform_database_url(&self, namespace: &str) -> Option<String> {
        let shard = self.caches.log_shard(namespace)?;
        let secrets = self.caches.secrets(namespace);
        let value = lookup(&secrets, &shard.url_secret_ref.name, &shard.url_secret_ref.key).ok()?;
        String::from_utf8(value.to_vec()).ok()
    }

    /// A pool on the platform's metadata database, when the platform has one.
    pub async fn platform_database(&self, namespace: &str) -> Result<Option<Metadata>, String> {
        match self.platform_database_url(namespace) {
            Some(url) => self.database(&url).await.map(Some).map_err(|e| e.message),
            None => Ok(None),
        }
    }

    /// Pools on every shard of a namespace's platform, in the ShardSet's order (none when
    /// the platform has no release or ShardSet yet, or a shard's URL is not in its Secret).
    pub async fn platform_shards(&self, namespace: &str) -> Result<Vec<Metadata>, String> {
        let Some(release) = self.caches.release_of(namespace) else { return Ok(Vec::new()) };
        let Some(set) = self.caches.shard_set(namespace, &release.spec.shard_set_ref) else { return Ok(Vec::new()) };
        let secrets = self.caches.secrets(namespace);
        let mut shards = Vec::new();
        for shard in &set.spec.shards {
            let r = &shard.url_secret_ref;
            let Some(url) = lookup(&secrets, &r.name, &r.key).ok().and_then(|v| String::from_utf8(v.to_vec()).ok())
            else {
                return Ok(Vec::new());
            };
            match self.database(&url).await {
                Ok(db) => shards.push(db),
                Err(e) => return Err(format!("shard {}: {}", shard.name, e.message)),
            }
        }
        Ok(shards)
    }

    /// What the blobs of every shard of a namespace's platform hold: none before the
    /// platform has shards, an error when one cannot be read.
    pub async fn shard_usage(&self, namespace: &str) -> Result<Option<vellum_core::documents::UsageCounts>, String> {
        let mut total: Option<vellum_core::documents::UsageCounts> = None;
        for db in &self.platform_shards(namespace).await? {
            let counts = vellum_core::documents::usage_counts(db).await.map_err(|e| e.to_string())?;
            total.get_or_insert_default().add(&counts);
        }
        Ok(total)
    }

    /// [`Context::shard_usage`] for a status that keeps what it showed before when the
    /// shards cannot be read (a database not migrated yet has no blobs table).
    pub async fn platform_usage(&self, namespace: &str) -> Option<vellum_core::documents::UsageCounts> {
        self.shard_usage(namespace).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "reading storage usage");
            None
        })
    }

    /// The delivery summaries of every endpoint of a namespace's platform, read at most once
    /// per [`SUMMARIES_FRESH`]: a burst of Webhook reconciles shares one read (the lock is
    /// held while reading, so concurrent reconciles wait for it rather than read again).
    pub async fn delivery_summaries(
        &self,
        namespace: &str,
        db: &Metadata,
    ) -> Result<Arc<DeliverySummaries>, vellum_core::store::StoreError> {
        let mut cached = self.summaries.lock().await;
        if let Some((read, summaries)) = cached.get(namespace)
            && read.elapsed() < SUMMARIES_FRESH
        {
            return Ok(Arc::clone(summaries));
        }
        let summaries = Arc::new(vellum_core::webhooks::summaries(db).await?);
        cached.insert(namespace.to_owned(), (std::time::Instant::now(), Arc::clone(&summaries)));
        Ok(summaries)
    }

    /// Makes the next reconcile read the summaries afresh (after a reactivation).
    pub async fn forget_summaries(&self, namespace: &str) {
        self.summaries.lock().await.remove(namespace);
    }

    /// Forgets the pool of a namespace's platform database after it failed.
    pub async fn forget_database_of(&self, namespace: &str) {
        if let Some(url) = self.platform_database_url(namespace) {
            self.forget_database(&url).await;
        }
    }

    /// Forgets a pool that stopped working, so the next use connects again.
    pub async fn forget_database(&self, url: &str) {
        self.databases.lock().await.remove(url);
    }

    /// Records a successful reconcile of `key`: its backoff starts over.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
    }

    /// The requeue after the `n`th consecutive failure of `key`: 1 s doubling to 5 min.
    pub fn backoff(&self, key: &str) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_secs(1u64 << (*n - 1).min(9)).min(Duration::from_secs(300));
        Action::requeue(delay)
    }

    /// Publishes a Kubernetes Event about `object`; failing to is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, object: &K, warning: bool, reason: &str, note: String) {
        self.event_of(object, "Reconcile", warning, reason, note).await;
    }

    /// [`Context::event`] under `action`. The recorder folds an Event into an earlier one
    /// of the same object, type, reason and action (a series, keeping the first note): an
    /// action naming what the Event is about (a rollout of one version) keeps Events of
    /// different rollouts apart.
    pub async fn event_of<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        action: &str,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.chars().take(128).collect(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::debug!(error = %e, "publishing an event");
        }
    }
}

/// A metadata database that cannot be used, as a condition says it: `InvalidCredentials`
/// when it refused who connected, `ShardUnreachable` otherwise, with the server's message
/// (never the URL, which holds a password).
pub fn unusable(e: &vellum_core::store::StoreError, url: &str) -> Refused {
    let reason = if e.is_bad_credentials() { reasons::INVALID_CREDENTIALS } else { reasons::SHARD_UNREACHABLE };
    Refused::new(reason, redact(&e.brief(), url))
}

/// Replaces every occurrence of a secret value in a message.
pub fn redact(message: &str, secret: &str) -> String {
    if secret.is_empty() { message.to_owned() } else { message.replace(secret, "<redacted>") }
}

/// Server-side applies `object` under `manager`, taking over fields others set.
pub async fn apply<K>(client: &Client, manager: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    Ok(api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(object)).await?)
}

/// Server-side applies the status of `object` under `manager`.
pub async fn apply_status<K, S>(client: &Client, manager: &str, object: &K, status: &S) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
    S: Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&object.name_any(), &PatchParams::apply(manager).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Records on `object` that the API server refused a request its reconcile made: `Ready`
/// turns False with reason `Forbidden` and the server's message (which names the verb and
/// the resource, never a value), the rest of its status kept as it was, and a Warning
/// Event says the same. Reporting may itself be refused; that is logged.
pub async fn report_forbidden<K>(ctx: &Context, manager: &str, object: &K, message: &str)
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let mut status =
        serde_json::to_value(object).ok().and_then(|o| o.get("status").cloned()).unwrap_or_else(|| json!({}));
    if !status.is_object() {
        status = json!({});
    }
    let mut conditions: Vec<Condition> =
        serde_json::from_value(status.get("conditions").cloned().unwrap_or_else(|| json!([]))).unwrap_or_default();
    let previous = Conditions(conditions.clone());
    conditions.retain(|c| c.type_ != conditions::READY);
    conditions.push(condition(
        &previous,
        conditions::READY,
        false,
        reasons::FORBIDDEN,
        message,
        object.meta().generation,
    ));
    status["conditions"] = json!(conditions);
    if let Err(e) = apply_status(&ctx.client, manager, object, &status).await {
        tracing::warn!(object = %key(object), error = %e, "cannot report the refusal in status");
    }
    ctx.event(object, true, reasons::FORBIDDEN, message.to_owned()).await;
}

/// A condition of `type_`, keeping the transition time of `previous` when the status did
/// not change.
pub fn condition(
    previous: &Conditions,
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = match previous.get(type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The Event due when the `Ready` condition changed status or reason between two
/// statuses: `(warning, reason, note)`, its reason the condition's reason constant and its
/// note the condition's message.
pub fn ready_event(before: &Conditions, after: &Conditions) -> Option<(bool, String, String)> {
    let now = after.get(conditions::READY)?;
    let was = before.get(conditions::READY).map(|c| (c.status.as_str(), c.reason.as_str()));
    (was != Some((now.status.as_str(), now.reason.as_str())))
        .then(|| (now.status != "True", now.reason.clone(), now.message.clone()))
}

/// A key naming one object, for backoff and logs.
pub fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or(""),
        object.meta().name.as_deref().unwrap_or("")
    )
}
