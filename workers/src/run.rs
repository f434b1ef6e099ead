//! `vellum-workers run`: the outbox relay to JetStream, the durable webhook consumer and
//! the delivery engine, against a metadata database, a NATS server and a platform config.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use vellum_core::clock::Clock;
use vellum_core::config::{PlatformConfig, SecretBundle, read_platform};
use vellum_core::documents::{open_shards, reopen_shards, rotate_credentials};
use vellum_core::events::relay;
use vellum_core::store::Metadata;
use vellum_core::webhooks;

use vellum_core::store::StoreError;
use vellum_jetstream::{JetStreamSink, ensure_stream};

use crate::webhooks::consumer::consume_into_webhooks;
use crate::webhooks::{Engine, Sender, Settings};

/// Why the workers could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading the platform config: {0}")]
    Config(String),
    #[error("{0}")]
    Shards(String),
    #[error("building the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("loading the webhook endpoints: {0}")]
    Endpoints(#[from] StoreError),
    #[error("{0}")]
    Nats(String),
    #[error("serving health and metrics on {at}: {source}")]
    Serve { at: std::net::SocketAddr, source: std::io::Error },
}

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct Options {
    pub database_url: String,
    pub nats_url: String,
    /// The directory of the platform's resources and Secrets (YAML), read again every
    /// `reload` so that changed webhooks take effect without a restart.
    pub config_dir: PathBuf,
    /// Where the compiled config's secret values are, when `config_dir` holds a compiled
    /// config.
    pub secrets_dir: Option<PathBuf>,
    pub reload: Duration,
    /// How often the outbox is polled for events other processes wrote.
    pub relay_poll: Duration,
    /// How long finished deliveries stay in the log.
    pub log_retention: Duration,
    pub settings: Settings,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`; nowhere when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

fn load(options: &Options) -> Result<(PlatformConfig, SecretBundle), RunError> {
    read_platform(&options.config_dir, options.secrets_dir.as_deref()).map_err(RunError::Config)
}

/// Runs until `stop` turns true; attempts in flight finish before it returns.
pub async fn run(options: Options, mut stop: watch::Receiver<bool>) -> Result<(), RunError> {
    let (config, secrets) = load(&options)?;
    // Every shard's outbox is relayed; the first shard keeps the delivery log.
    let shards = open_shards(&config, &secrets, &options.database_url).await.map_err(RunError::Shards)?;
    let meta = shards[0].clone();
    let clock = Clock::system();
    let sender = Sender::new(config.webhook_destinations.clone())?;
    let engine = Engine::new(meta.clone(), clock.clone(), sender, options.settings.clone());
    engine.set_endpoints(crate::configured_endpoints(&config, &secrets)).await?;

    // Start even while NATS is away: the outbox keeps the events until it is back.
    let client = vellum_jetstream::connect(&options.nats_url, "vellum-workers").await.map_err(RunError::Nats)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    engine.report_to(std::sync::Arc::clone(&metrics));
    let outbox_watch = tokio::spawn(crate::metrics::watch_outbox(
        std::sync::Arc::clone(&metrics),
        shards.clone(),
        clock.clone(),
        Duration::from_secs(5),
    ));
    let routing = std::sync::Arc::new(std::sync::RwLock::new(crate::metrics::Routing::of(&config)));
    let server = match options.metrics_listen {
        Some(at) => Some(serve_health(at, metrics, &meta, &client, &routing).await?),
        None => None,
    };
    let js = async_nats::jetstream::new(client);
    if let Err(e) = ensure_stream(&js).await {
        tracing::warn!(error = %e, "JetStream is not reachable yet; events wait in the outbox");
    }

    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Without a ShardSet the one database is the command line's.
    let names: Vec<String> = if config.shards.is_some() {
        config.all_shards().iter().map(|s| s.name.clone()).collect()
    } else {
        vec!["main".to_owned()]
    };
    let mut relays: Vec<Relay> = Vec::new();
    for (name, meta) in names.into_iter().zip(shards) {
        relays.push(Relay::start(name, meta, &clock, &js, options.relay_poll, &stop));
    }
    let consumer_task = tokio::spawn(consume_into_webhooks(js.clone(), engine.clone(), until_stopped(stop.clone())));
    tracing::info!(endpoints = engine.endpoints().len(), "workers running");

    let (mut current, mut current_secrets) = (config, secrets);
    let mut last_prune = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep(options.reload) => {}
        }
        match load(&options) {
            Ok((config, secrets)) => {
                let pools: Vec<(String, Metadata)> = relays.iter().map(|r| (r.name.clone(), r.meta.clone())).collect();
                for problem in rotate_credentials(&pools, &config, &secrets) {
                    tracing::warn!(problem = %problem, "keeping the shard's database credentials");
                }
                if config.shards.is_some()
                    && config.all_shards().iter().map(|s| &s.name).ne(relays.iter().map(|r| &r.name))
                {
                    relays = reroute(relays, &config, &secrets, &clock, &js, options.relay_poll, &stop).await;
                }
                if relays_all_of(&relays, &config) {
                    *routing.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        crate::metrics::Routing::of(&config);
                }
                // A rotated webhook key changes a value, not the config: either reloads.
                if config != current || secrets != current_secrets {
                    if config.webhook_destinations != current.webhook_destinations {
                        tracing::warn!("the webhook destination allow-list changed; it takes effect on restart");
                    }
                    engine.set_endpoints(crate::configured_endpoints(&config, &secrets)).await?;
                    tracing::info!(endpoints = engine.endpoints().len(), "platform config reloaded");
                    current = config;
                    current_secrets = secrets;
                }
            }
            Err(e) => tracing::warn!(error = %e, "keeping the previous platform config"),
        }
        if last_prune.elapsed() >= Duration::from_secs(3600) {
            last_prune = tokio::time::Instant::now();
            let retention = i64::try_from(options.log_retention.as_millis()).unwrap_or(i64::MAX);
            match webhooks::prune(&meta, clock.now_ms().saturating_sub(retention)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deliveries = n, "pruned the webhook delivery log"),
                Err(e) => tracing::warn!(error = %e, "pruning the webhook delivery log"),
            }
        }
    }
    engine.shutdown().await;
    outbox_watch.abort();
    if let Some(server) = server {
        server.abort();
    }
    for relay in relays {
        let _ = relay.task.await;
    }
    let _ = consumer_task.await;
    Ok(())
}

/// Serves `/healthz`, `/readyz` and `/metrics` at `at`.
async fn serve_health(
    at: std::net::SocketAddr,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    meta: &Metadata,
    client: &async_nats::Client,
    routing: &std::sync::Arc<std::sync::RwLock<crate::metrics::Routing>>,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let (bound, task) =
        crate::metrics::serve(at, metrics, meta.clone(), client.clone(), std::sync::Arc::clone(routing))
            .await
            .map_err(|source| RunError::Serve { at, source })?;
    tracing::info!(%bound, "health and metrics serving");
    Ok(task)
}

/// Whether `relays` relay every shard `config` names and no other: the routing is loaded.
fn relays_all_of(relays: &[Relay], config: &PlatformConfig) -> bool {
    let shards = config.all_shards();
    let wanted: std::collections::BTreeSet<&String> = shards.iter().map(|s| &s.name).collect();
    let relayed: std::collections::BTreeSet<&String> = relays.iter().map(|r| &r.name).collect();
    config.shards.is_none() || wanted == relayed
}

/// A routing change adds shards (their outboxes are relayed from now on) or removes them
/// (relayed until empty, then let go). When a shard does not open, nothing changes.
async fn reroute(
    relays: Vec<Relay>,
    config: &PlatformConfig,
    secrets: &SecretBundle,
    clock: &Clock,
    js: &async_nats::jetstream::Context,
    poll: Duration,
    stop: &watch::Receiver<bool>,
) -> Vec<Relay> {
    let pools: Vec<(String, Metadata)> = relays.iter().map(|r| (r.name.clone(), r.meta.clone())).collect();
    let now = match reopen_shards(&pools, config, secrets).await {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, "keeping the shards as they were");
            return relays;
        }
    };
    let (mut kept, left): (Vec<Relay>, Vec<Relay>) =
        relays.into_iter().partition(|r| now.iter().any(|(name, _)| *name == r.name));
    for (name, meta) in now {
        if kept.iter().all(|r| r.name != name) {
            tracing::info!(shard = %name, "relaying a new shard's outbox");
            kept.push(Relay::start(name, meta, clock, js, poll, stop));
        }
    }
    for relay in left {
        tokio::spawn(relay.retire());
    }
    kept
}

/// One shard's outbox relay.
struct Relay {
    name: String,
    meta: Metadata,
    /// Stops this relay alone (the shard left the routing).
    retired: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(
        name: String,
        meta: Metadata,
        clock: &Clock,
        js: &async_nats::jetstream::Context,
        poll: Duration,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        let (retired, mut retire) = watch::channel(false);
        let mut stop = stop.clone();
        let (relayed, clock, sink) = (meta.clone(), clock.clone(), JetStreamSink::new(js.clone()));
        let until = async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = retire.wait_for(|s| *s) => {}
            }
        };
        let task = tokio::spawn(async move { relay(&relayed, &clock, &sink, &Notify::new(), poll, until).await });
        Self { name, meta, retired, task }
    }

    /// Lets a shard that left the routing go once its outbox is relayed: its database is
    /// not touched after.
    async fn retire(self) {
        loop {
            match vellum_core::events::outbox::depth(&self.meta).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => tracing::warn!(shard = %self.name, error = %e, "reading a leaving shard's outbox"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.retired.send_replace(true);
        let _ = self.task.await;
        self.meta.pool().close().await;
        tracing::info!(shard = %self.name, "a shard that left the routing is let go");
    }
}
