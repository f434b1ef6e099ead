//! The gateway's two composition roots, on one assembly of the HTTP API:
//!
//! - [`start`], standalone mode: the one process that runs every role — the HTTP API, the
//!   outbox relays into the in-process bus, webhook delivery and the retention scheduler —
//!   on the embedded defaults (SQLite, local-file tiers), configured by the same
//!   StorageTier, Webhook and RetentionPolicy YAML a platform team applies to a cluster.
//! - [`crate::replica::start`], a replica of a cluster (`vellum-gateway serve`): the HTTP
//!   API, real-time fan-out from the JetStream stream and config reload only. The outbox
//!   relays and webhook delivery are `vellum-workers run`'s, so an endpoint's concurrency
//!   and rate limits hold across the platform however many replicas serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vellum_core::blob::Tiers;
use vellum_core::clock::Clock;
use vellum_core::config::{CONFIG_FILE, SecretBundle, compile_dir, compile_files, read_platform};
use vellum_core::documents::{
    Documents, Library, library_of, open_shards, reopen_shards, rotate_credentials, routes_as, shard_connections,
};
use vellum_core::events::{Bus, relay};

use vellum_core::store::Metadata;
use vellum_core::webhooks::DestinationPolicy;
use vellum_workers::{Engine, LocalSink, Sender, Settings};

use crate::auth::{Auth, AuthSettings};
use crate::realtime::Hub;
use crate::webhooks::{WebhookBase, WebhookService};
use crate::{AppState, app};

/// What standalone mode needs to start.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// Where the database, the local tiers and the generated keys live.
    pub data_dir: PathBuf,
    /// The directory of StorageTier, Webhook, RetentionPolicy and Secret YAML, or of the
    /// compiled `platform.json` the operator writes into the platform ConfigMap; the
    /// embedded defaults ([`EMBEDDED_CONFIG`]) when absent.
    pub config_dir: Option<PathBuf>,
    /// Where the compiled config's `secrets.json` is (the platform Secret's mount).
    pub secrets_dir: Option<PathBuf>,
    /// How often a compiled config is read again; a change (a StorageTier, a Webhook) takes
    /// effect without a restart.
    pub config_reload: Duration,
    /// The metadata database; SQLite in the data directory when absent.
    pub database_url: Option<String>,
    /// Token checking; a secret is generated (and kept in the data directory) when none
    /// of secret, public keys and JWKS is given.
    pub auth: AuthSettings,
    pub max_upload_bytes: u64,
    /// The URL clients reach the gateway at; `http://<listen>` when absent.
    pub public_url: Option<String>,
    /// Non-public networks webhooks may reach, beside the platform config's allow-list
    /// (a local receiver on 127.0.0.1 while developing, say).
    pub allow_webhook_cidrs: Vec<String>,
    /// Cluster mode: events go through this NATS server's JetStream, and real-time clients
    /// of every replica sharing it (and the database) see the same events. The in-process
    /// bus otherwise.
    pub nats_url: Option<String>,
    /// The key signing download links; replicas of a cluster must share it. Generated in
    /// the data directory when absent.
    pub link_key: Option<Vec<u8>>,
    /// Cluster mode: the namespace whose Webhook resources and Secrets `POST /api/webhooks`
    /// creates, through the Kubernetes API. The local store otherwise.
    pub kube_namespace: Option<String>,
    /// Timeouts, the connection cap and the upload places.
    pub limits: crate::limits::Limits,
    /// Serve `/metrics` here instead of on `listen` (which then answers it 404), so that only
    /// what reaches this address (a cluster's scraper) reads the metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Origins whose browser pages may call the API (`http://localhost:3000`); none by
    /// default.
    pub cors_origins: Vec<String>,
    /// How much of the documents' metadata this gateway keeps in memory, and how long.
    pub metadata_cache: crate::cache::CacheSettings,
}

/// The platform config standalone mode runs on without `--config-dir`: the repository's
/// `config/standalone/`, built into the binary, so the gateway starts from any directory.
pub const EMBEDDED_CONFIG: [(&str, &str); 2] = [
    ("storagetiers.yaml", include_str!("../../config/standalone/storagetiers.yaml")),
    ("retentionpolicies.yaml", include_str!("../../config/standalone/retentionpolicies.yaml")),
];

/// A running standalone gateway.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub url: String,
    /// Where `/metrics` is served when it has an address of its own.
    pub metrics_addr: Option<SocketAddr>,
    /// A token with the admin role, valid for 30 days; absent when tokens are checked
    /// only against public keys (nothing here can sign them).
    pub admin_token: Option<String>,
    pub state: AppState,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    relays: Vec<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
    reloader: Option<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
    /// Tasks that only read (real-time feeds, the JWT key watcher), aborted at shutdown.
    hub_feeds: Vec<JoinHandle<()>>,
}

/// Why the gateway could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or socket of the process: what was being done, and the system's error.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The options or the platform config ask for something that cannot run.
    #[error("{0}")]
    Invalid(String),
    #[error("opening the storage tiers: {0}")]
    Tiers(#[from] vellum_core::blob::BlobError),
    #[error("setting up token checking: {0}")]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error("building the webhook HTTP client: {0}")]
    HttpClient(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the metadata store: {0}")]
    Store(#[from] vellum_core::store::StoreError),
    #[error("connecting to the Kubernetes API (the pod's ServiceAccount, or KUBECONFIG): {0}")]
    Kube(#[from] kube::Error),
    #[error("the server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StartError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Reads a key file from the data directory, or creates it with 32 random bytes.
fn key_file(path: &Path) -> Result<Vec<u8>, StartError> {
    match std::fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        Ok(_) => {
            Err(StartError::Invalid(format!("{} is empty; delete it to have a new key generated", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            let text = hex::encode(key);
            write_private(path, text.as_bytes()).map_err(StartError::io(format!("writing {}", path.display())))?;
            Ok(text.into_bytes())
        }
        Err(e) => Err(StartError::io(format!("reading {}", path.display()))(e)),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Token checking, and the key signing download links: as given, or generated once in the
/// data directory.
fn credentials(options: &Options, data_dir: &Path) -> Result<(Auth, Vec<u8>), StartError> {
    let mut auth_settings = options.auth.clone();
    if !auth_settings.has_keys() {
        // Kept as a file, so that replacing it rotates the key without a restart.
        let path = data_dir.join("jwt-secret");
        key_file(&path)?;
        auth_settings.files.secret = Some(path);
    }
    let link_key = match options.link_key.clone() {
        Some(key) if !key.is_empty() => key,
        Some(_) => return Err(StartError::Invalid("the link key is empty".into())),
        None => key_file(&data_dir.join("link-key"))?,
    };
    auth_settings.smoke_key = Some(vellum_core::signing::smoke_token_key(&link_key));
    let auth = Auth::new(&auth_settings)?;
    Ok((auth, link_key))
}

/// Which composition root is starting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Every role in this process.
    Standalone,
    /// One gateway replica of a cluster, beside `vellum-workers run`.
    Replica,
}

/// Starts standalone mode and returns once it serves.
pub async fn start(options: Options) -> Result<Running, StartError> {
    if options.nats_url.is_some() {
        return Err(StartError::Invalid(
            "standalone mode runs without NATS; a replica of a cluster starts with `vellum-gateway serve`".into(),
        ));
    }
    launch(options, Role::Standalone).await
}

/// Assembles the HTTP API and starts what `role` runs beside it.
#[allow(clippy::too_many_lines)] // the one place that wires the roles together
pub(crate) async fn launch(options: Options, role: Role) -> Result<Running, StartError> {
    std::fs::create_dir_all(&options.data_dir)
        .map_err(StartError::io(format!("creating the data directory {}", options.data_dir.display())))?;
    let data_dir = options.data_dir.canonicalize().map_err(StartError::io("resolving the data directory"))?;

    // Webhooks created through the API are compiled beside the platform's own: beside the
    // operator's compiled config, or beside the resources of the directory (standalone).
    let compiled = options.config_dir.as_ref().filter(|dir| dir.join(CONFIG_FILE).exists());
    let (base, mut config, secrets) = if let Some(dir) = compiled {
        let (config, secrets) = read_platform(dir, options.secrets_dir.as_deref()).map_err(StartError::Invalid)?;
        (WebhookBase::Compiled(config.clone(), secrets.clone()), config, secrets)
    } else {
        let (sources, config, secrets) = match &options.config_dir {
            Some(dir) => compile_dir(dir),
            None => compile_files(&EMBEDDED_CONFIG),
        }
        .map_err(StartError::Invalid)?;
        (WebhookBase::Sources(sources), config, secrets)
    };
    let compiled = compiled.cloned();
    // The hash of the config as read, which reloads compare with and the ConfigMap carries;
    // the command line's extra webhook networks below are not part of it.
    let config_hash = config.content_hash();
    let tiers = Tiers::open(&config, &secrets, &data_dir)?;
    let extra = DestinationPolicy::parse(options.allow_webhook_cidrs.iter().map(String::as_str))
        .map_err(|e| StartError::Invalid(format!("--allow-webhook-cidr: {e}")))?;
    config.webhook_destinations.allowed_cidrs.extend(extra.allowed_cidrs);

    let database_url =
        options.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", data_dir.join("vellum.db").display()));
    let shards = open_shards(&config, &secrets, &database_url).await.map_err(StartError::Invalid)?;
    if shards.len() > 1 && role == Role::Standalone {
        return Err(StartError::Invalid(format!(
            "the ShardSet has {} shards: several metadata shards need the NATS event stream, which orders \
             their events; run gateway replicas (`vellum-gateway serve --nats-url`) and `vellum-workers run`",
            shards.len()
        )));
    }
    let meta = shards[0].clone();

    let (auth, link_key) = credentials(&options, &data_dir)?;
    let cors_origins =
        crate::cors::parse_origins(&options.cors_origins).map_err(|e| StartError::Invalid(e.to_string()))?;

    let clock = Clock::system();
    let bus = Bus::new();
    let sender = Sender::new(config.webhook_destinations.clone()).map_err(|e| StartError::HttpClient(e.into()))?;
    let engine = match role {
        Role::Standalone => Engine::new(meta.clone(), clock.clone(), sender, Settings::default()),
        Role::Replica => Engine::without_dispatch(meta.clone(), clock.clone(), sender, Settings::default()),
    };
    let kube = crate::webhooks::cluster::KubeWebhooks::connect_to(options.kube_namespace.clone()).await?;
    let webhooks = WebhookService::start(engine.clone(), base, clock.clone(), kube).await?;
    let hub = Arc::new(Hub::new(meta.clone(), clock.clone()));
    let nats = match (&options.nats_url, role) {
        (Some(url), Role::Replica) => {
            Some(vellum_jetstream::connect(url, "vellum-gateway").await.map_err(StartError::Invalid)?)
        }
        (None, Role::Replica) => {
            return Err(StartError::Invalid("a replica of a cluster needs the NATS event stream (--nats-url)".into()));
        }
        (_, Role::Standalone) => None,
    };
    let mut hub_feeds = match &nats {
        Some(client) => crate::cluster::connect(&hub, client),
        None => vec![hub.feed_from(&bus)],
    };
    let (per_shard, buses) = shard_documents(&shards, &tiers, &clock, &bus, options.max_upload_bytes);
    let docs = library_of(&config, per_shard).map_err(StartError::Invalid)?;

    let listener =
        TcpListener::bind(options.listen).await.map_err(StartError::io(format!("listening on {}", options.listen)))?;
    let addr = listener.local_addr().map_err(StartError::io("reading the listening address"))?;
    let url = options.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let admin_token = auth.mint("admin", &["admin", "user"], Duration::from_secs(30 * 24 * 3600));
    let state = AppState::new(crate::Shared {
        library: Arc::new(std::sync::RwLock::new(Arc::new(docs))),
        auth: Arc::new(auth),
        link_key: link_key.into(),
        public_url: url.trim_end_matches('/').into(),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        webhooks: Arc::new(webhooks),
        hub: Arc::clone(&hub),
        platform: Arc::new(std::sync::RwLock::new(Arc::new(config.clone()))),
        sockjs: Arc::default(),
        admission: Arc::new(crate::limits::Admission::new(&options.limits)),
        metrics_elsewhere: options.metrics_listen.is_some(),
        cors_origins,
        bulk: Arc::default(),
        cache: Arc::new(crate::cache::MetadataCache::new(options.metadata_cache)),
    });

    state.metrics.set_config_hash(&config_hash);
    state.auth.count_in(state.metrics.seed.authentication_attempts.clone());
    state.hub.count_in(state.metrics.seed.clone());
    state.cache.count_in(state.metrics.seed.cache("documents"), state.metrics.seed.cache("versions"));
    state.hub.keep_right(Arc::clone(&state.cache));
    let (stop, stopped) = watch::channel(false);
    // Standalone, this process relays its outbox; in a cluster the workers do.
    let relays = match role {
        Role::Standalone => spawn_relays(&shards, &buses, &engine, &bus, &clock, &stopped),
        Role::Replica => Vec::new(),
    };
    let sweeper = tokio::spawn(sweep_uploads(state.clone(), stopped.clone()));
    if state.auth.reloads() {
        hub_feeds.push(tokio::spawn(watch_keys(Arc::clone(&state.auth), options.config_reload)));
    }
    let scheduler_wanted = compiled.is_none();
    let reloader = compiled.map(|dir| {
        tokio::spawn(reload(
            state.clone(),
            options.clone(),
            dir,
            data_dir.clone(),
            config_hash,
            secrets.clone(),
            stopped.clone(),
        ))
    });
    // In a cluster the operator's CronJobs run the retention policies.
    let scheduler = scheduler_wanted.then(|| tokio::spawn(schedule_retention(state.clone(), stopped.clone())));
    hub_feeds.push(tokio::spawn(prune_limiters(state.clone())));
    // Bulk jobs: any replica runs those no replica holds (a job survives its replica).
    hub_feeds.push(tokio::spawn(crate::bulk::run(state.clone(), stopped.clone())));
    let metrics_addr = match options.metrics_listen {
        Some(at) => {
            let (bound, task) = serve_metrics(at, &state, &options.limits).await?;
            hub_feeds.push(task);
            Some(bound)
        }
        None => None,
    };
    let server = tokio::spawn({
        let router = app(state.clone());
        let stop = until_stopped(stopped);
        let limits = options.limits.clone();
        async move { crate::serve::serve(listener, router, &limits, stop).await }
    });
    tracing::info!(%addr, tiers = config.tiers.len(), webhooks = config.webhooks.len(), cluster = nats.is_some(), "gateway serving");
    Ok(Running {
        addr,
        url,
        metrics_addr,
        admin_token,
        state,
        stop,
        server,
        relays,
        sweeper,
        reloader,
        scheduler,
        hub_feeds,
    })
}

/// Reads the JWT key files every `every` and uses rotated keys from then on; a file that
/// does not read or parse keeps the keys in use, with a warning. Aborted at shutdown.
async fn watch_keys(auth: Arc<Auth>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match auth.reload() {
            Ok(true) => tracing::info!("JWT keys reloaded: tokens are checked against the rotated keys"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "keeping the JWT keys in use"),
        }
    }
}

/// Serves `/metrics` alone on `at`; the task is aborted at shutdown with the other
/// read-only ones.
async fn serve_metrics(
    at: SocketAddr,
    state: &AppState,
    limits: &crate::limits::Limits,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let listener = TcpListener::bind(at).await.map_err(StartError::io(format!("listening for metrics on {at}")))?;
    let bound = listener.local_addr().map_err(StartError::io("reading the metrics address"))?;
    let (router, limits) = (crate::metrics::own_router(state.clone()), limits.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = crate::serve::serve(listener, router, &limits, std::future::pending()).await {
            tracing::error!(error = %e, "serving metrics");
        }
    });
    Ok((bound, task))
}

/// Forgets, once a minute, the users and client addresses whose rate budgets are whole
/// again, so that the limiters hold only who is active now. Aborted at shutdown.
async fn prune_limiters(state: AppState) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        state.auth.prune();
        state.admission.prune();
    }
}

/// Resolves once `stopped` turns true.
async fn until_stopped(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Standalone mode's outbox relay, one per shard, until `stopped` turns true: events become
/// webhook deliveries (durably) and then reach the in-process bus, in outbox order, woken by
/// every commit that wrote one.
fn spawn_relays(
    shards: &[Metadata],
    buses: &[Bus],
    engine: &Engine,
    bus: &Bus,
    clock: &Clock,
    stopped: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    shards
        .iter()
        .zip(buses)
        .map(|(meta, shard_bus)| {
            let (meta, clock, wake) = (meta.clone(), clock.clone(), Arc::clone(&shard_bus.wake));
            let sink = LocalSink { engine: engine.clone(), bus: bus.clone() };
            let stop = until_stopped(stopped.clone());
            tokio::spawn(async move { relay(&meta, &clock, &sink, &wake, Duration::from_secs(1), stop).await })
        })
        .collect()
}

/// One document service per metadata shard, each with its own outbox wake-up (and relay);
/// the first shard's relay feeds the in-process `bus` when there is no NATS.
fn shard_documents(
    shards: &[Metadata],
    tiers: &Tiers,
    clock: &Clock,
    bus: &Bus,
    max_upload: u64,
) -> (Vec<Documents>, Vec<Bus>) {
    let buses: Vec<Bus> = (0..shards.len()).map(|i| if i == 0 { bus.clone() } else { Bus::new() }).collect();
    let docs = shards
        .iter()
        .zip(&buses)
        .map(|(meta, bus)| Documents::new(meta.clone(), tiers.clone(), clock.clone(), Some(bus.clone()), max_upload))
        .collect();
    (docs, buses)
}

/// Reads the compiled config every `config_reload` until `stop` turns true, and applies a
/// changed one: new tiers for uploads and downloads, new webhook endpoints. A config that
/// does not read or open keeps the previous one serving, with a warning.
#[allow(clippy::too_many_arguments)]
async fn reload(
    state: AppState,
    options: Options,
    config_dir: PathBuf,
    data_dir: PathBuf,
    mut hash: String,
    mut applied_secrets: SecretBundle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(options.config_reload) => {}
        }
        let (config, secrets) = match read_platform(&config_dir, options.secrets_dir.as_deref()) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the previous platform config");
                continue;
            }
        };
        // Rotated database credentials apply whatever else changed.
        let docs = state.docs();
        for problem in rotate_credentials(&named_shards(&docs), &config, &secrets) {
            tracing::warn!(problem = %problem, "keeping the shard's database credentials");
        }
        // A rotated secret (a webhook's key, a tier's credentials) changes no handle in the
        // config, only a value: either change reloads.
        let new_hash = config.content_hash();
        if new_hash == hash && secrets == applied_secrets {
            continue;
        }
        let tiers = match Tiers::open(&config, &secrets, &data_dir) {
            Ok(tiers) => tiers,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the previous platform config: a tier does not open");
                continue;
            }
        };
        // A routing change (a resharding begins, flips or is reverted): a new library over
        // every shard the config names, built before anything else changes.
        let rerouted = if routes_as(&docs, &config) {
            None
        } else {
            match reroute(&docs, &config, &secrets, options.nats_url.is_some()).await {
                Ok(library) => Some(library),
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the previous platform config: its routing does not apply");
                    continue;
                }
            }
        };
        // Webhooks first: if they cannot be applied, nothing changes and the next read
        // tries the whole config again.
        let applied = secrets.clone();
        if let Err(e) = state.webhooks.rebase(WebhookBase::Compiled(config.clone(), secrets)).await {
            tracing::warn!(error = %e.message, "keeping the previous platform config: its webhooks were not applied");
            continue;
        }
        if let Some(library) = rerouted {
            let (table, next) = (library.table().version().to_owned(), library.next().map(|t| t.version().to_owned()));
            state.set_docs(library);
            tracing::info!(routing = %table, moving_to = ?next, "the shards' routing changed; requests route by it now");
            // A shard that left is let go when the last request that began before the
            // change is done with it (its pool closes with the last library holding it).
        }
        state.docs().set_tiers(tiers);
        state.set_platform(config.clone());
        state.metrics.set_config_hash(&new_hash);
        tracing::info!(hash = %new_hash, tiers = config.tiers.len(), webhooks = config.webhooks.len(), "platform config reloaded");
        hash = new_hash;
        applied_secrets = applied;
    }
}

/// The library's shards, by name.
fn named_shards(docs: &Library) -> Vec<(String, Metadata)> {
    docs.names().into_iter().zip(docs.shards().iter().map(|d| d.meta().clone())).collect()
}

/// The library of a config whose routing differs from `docs`': the shards it keeps, and
/// those it adds opened (and migrated).
async fn reroute(
    docs: &Library,
    config: &vellum_core::config::PlatformConfig,
    secrets: &SecretBundle,
    cluster: bool,
) -> Result<Library, String> {
    if config.all_shards().len() > 1 && !cluster {
        return Err("several metadata shards need the NATS event stream (a cluster replica)".into());
    }
    let shards = reopen_shards(&named_shards(docs), config, secrets).await?;
    // The shards kept share the replica's connections with those added or left: each
    // gets a pool of its new share.
    let connections = shard_connections(shards.len());
    let resized = shards.into_iter().map(|(name, meta)| async move {
        meta.resized(connections).await.map_err(|e| format!("resizing the pool of metadata shard {name}: {e}"))
    });
    let per_shard =
        futures::future::try_join_all(resized).await?.into_iter().map(|meta| docs.primary().on(meta)).collect();
    library_of(config, per_shard)
}

/// Runs each retention policy at the times its schedule names, as the operator's CronJobs
/// do in a cluster. A run that fails is logged and tried again at the policy's next time;
/// an unfinished run is resumed by the next.
async fn schedule_retention(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut checked = state.docs().clock().now_ms();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(20)) => {}
        }
        let now = state.docs().clock().now_ms();
        let config = state.platform();
        for (name, policy) in &config.retention_policies {
            let due = vellum_core::retention::next_run(&policy.schedule, checked).is_some_and(|at| at <= now);
            if policy.suspend || !due {
                continue;
            }
            let settings = vellum_workers::retention::RunSettings::default();
            for (shard, docs) in state.docs().names().iter().zip(state.docs().shards()) {
                match vellum_workers::retention::run_policy(docs, &config, name, settings, &|_| {}).await {
                    Ok(report) => {
                        let (matched, transitioned, expired) = (report.matched, report.transitioned, report.expired);
                        tracing::info!(policy = %name, %shard, matched, transitioned, expired, errors = report.errors, "retention run");
                    }
                    Err(e) => tracing::warn!(policy = %name, %shard, error = %e, "retention run failed"),
                }
            }
        }
        checked = now;
    }
}

/// Expires abandoned upload sessions every 10 minutes until `stop` turns true.
async fn sweep_uploads(state: AppState, mut stop: watch::Receiver<bool>) {
    loop {
        match state.docs().expire_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "expired upload sessions"),
            Err(e) => tracing::warn!(error = %e, "expiring upload sessions"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

impl Running {
    /// Stops accepting connections, lets in-flight requests finish (up to the grace
    /// period), and stops the workers.
    pub async fn shutdown(self) -> Result<(), StartError> {
        let _ = self.stop.send(true);
        if let Ok(joined) = tokio::time::timeout(crate::SHUTDOWN_GRACE, self.server).await {
            joined?.map_err(StartError::io("serving"))?;
        } else {
            tracing::warn!("in-flight requests did not finish within the grace period");
        }
        for relay in self.relays {
            relay.await.ok();
        }
        self.sweeper.await.ok();
        if let Some(reloader) = self.reloader {
            reloader.await.ok();
        }
        if let Some(scheduler) = self.scheduler {
            scheduler.await.ok();
        }
        self.state.webhooks.engine().shutdown().await;
        for feed in self.hub_feeds {
            feed.abort();
        }
        Ok(())
    }
}
