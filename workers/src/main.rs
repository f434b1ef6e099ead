//! `vellum-workers`: the command-line entry point of the workers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vellum_core::blob::Tiers;
use vellum_core::clock::Clock;
use vellum_core::config::{PlatformConfig, read_platform};
use vellum_core::documents::{Documents, Grace, Library, MigrationStep, library_of, open_shards_with};
use vellum_core::process::{init_logging, shutdown_signal};
use vellum_core::resharding::{MOVER_CONNECTIONS, ShardProgress, run_move_paced};
use vellum_workers::Settings;
use vellum_workers::announce::{Announcer, Entity, status_update};
use vellum_workers::retention::{RunSettings, drain_tier, run_policy};
use vellum_workers::run::{Options, run};

/// Vellum's asynchronous workers: the outbox relay that publishes document events to NATS
/// JetStream, and signed webhook delivery with retries, a delivery log and automatic
/// deactivation; retention runs (tier transitions, expiration, archiving) and tier
/// draining.
#[derive(Debug, Parser)]
#[command(name = "vellum-workers", version, about, long_about)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "VELLUM_LOG", default_value = "info", global = true)]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "VELLUM_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay the outbox to JetStream and deliver webhooks, until SIGTERM.
    Run(RunArgs),
    /// Move documents between metadata shards as the platform config's `shardMove` says, and
    /// exit once no shard holds a document the routing moved to sends elsewhere, printing
    /// every shard's progress as JSON: what the operator's resharding Job runs. Run again
    /// after a crash, it goes on from where the documents are.
    Reshard {
        #[command(flatten)]
        store: StoreArgs,
        /// Documents handed over per batch; by default the ShardSet's
        /// `spec.resharding.batchSize`.
        #[arg(long)]
        batch: Option<usize>,
        /// The most documents moved per second; by default the ShardSet's
        /// `spec.resharding.documentsPerSecond` (unlimited when it has none).
        #[arg(long)]
        documents_per_second: Option<u32>,
        /// Seconds a source's stored copy stays readable when the target kept its own copy
        /// of the same bytes (downloads that began before the hand-over finish).
        #[arg(long, default_value_t = 300)]
        source_grace_seconds: i64,
        /// The NATS server through which the move's progress reaches the gateways (their
        /// `/topic/migrations`); without one it is only logged.
        #[arg(long, env = "VELLUM_NATS_URL")]
        nats_url: Option<String>,
    },
    /// Bring a metadata database's schema up to date and exit: what the operator's
    /// migration Job runs on every shard before the gateways of a new version start.
    Migrate {
        /// The metadata database (postgres://... or sqlite://...).
        #[arg(long, env = "VELLUM_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Run one retention policy over every document and exit, printing what it did as
    /// JSON: what the operator's CronJob runs. An unfinished run of the same policy is
    /// resumed where it stopped.
    Retention {
        /// The RetentionPolicy to run.
        #[arg(long)]
        policy: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        run: RunSettingsArgs,
    },
    /// Move every blob out of a storage tier into another, so that the tier can be
    /// removed; prints what it did as JSON and fails while blobs remain.
    Drain {
        /// The tier to empty.
        #[arg(long)]
        tier: String,
        /// The tier the blobs move to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        run: RunSettingsArgs,
        /// The NATS server through which the drain's progress reaches the gateways (their
        /// `/topic/migrations`); without one it is only logged.
        #[arg(long, env = "VELLUM_NATS_URL")]
        nats_url: Option<String>,
    },
    /// Read back every stored blob (of one tier, or all) and check its SHA-256; quarantine
    /// those that do not match or are gone (their downloads are refused with the reason)
    /// and release quarantined ones found sound again. Prints each shard's findings as JSON;
    /// fails when a blob could not be read (the next run checks it again).
    Scrub {
        /// Only this tier's blobs.
        #[arg(long)]
        tier: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// The NATS server through which the scrub's progress and findings reach the
        /// gateways (their `/topic/data-quality`, admins); without one they are only logged.
        #[arg(long, env = "VELLUM_NATS_URL")]
        nats_url: Option<String>,
    },
}

/// Where the documents are: the metadata database, the platform config and the local tiers.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The metadata database (postgres://... or sqlite://...).
    #[arg(long, env = "VELLUM_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The directory of the platform's resources and Secrets (YAML), or of the compiled
    /// `platform.json` the operator writes.
    #[arg(long, env = "VELLUM_CONFIG_DIR")]
    config_dir: PathBuf,
    /// Where the compiled config's secret values (`secrets.json`) are mounted.
    #[arg(long, env = "VELLUM_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// The directory `file://<relative path>` tiers are resolved against.
    #[arg(long, env = "VELLUM_DATA_DIR", default_value = ".vellum")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct RunSettingsArgs {
    /// Documents (or blobs) read per batch.
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Blob moves and expirations in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds a moved blob's old copy stays readable for downloads that began before the move.
    #[arg(long, default_value_t = 300)]
    source_grace_seconds: i64,
}

impl RunSettingsArgs {
    fn settings(&self) -> RunSettings {
        let grace = Grace { source_ms: self.source_grace_seconds.max(0) * 1000, ..Grace::default() };
        RunSettings { batch: self.batch.max(1), concurrency: self.concurrency.max(1), grace }
    }
}

impl StoreArgs {
    /// The platform's documents on every shard, and its config.
    async fn open(&self) -> anyhow::Result<(Library, PlatformConfig)> {
        self.open_with(0).await
    }

    /// [`Self::open`], each shard's pool opening at least `least` connections.
    async fn open_with(&self, least: u32) -> anyhow::Result<(Library, PlatformConfig)> {
        let (config, secrets) =
            read_platform(&self.config_dir, self.secrets_dir.as_deref()).map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating the data directory {}", self.data_dir.display()))?;
        let data_dir = self.data_dir.canonicalize().context("resolving the data directory")?;
        let tiers = Tiers::open(&config, &secrets, &data_dir).context("opening the storage tiers")?;
        let shards =
            open_shards_with(&config, &secrets, &self.database_url, least).await.map_err(anyhow::Error::msg)?;
        let shards = shards
            .into_iter()
            .map(|meta| Documents::new(meta, tiers.clone(), Clock::system(), None, u64::MAX))
            .collect();
        Ok((library_of(&config, shards).map_err(anyhow::Error::msg)?, config))
    }
}

/// Prints one shard's report as JSON: alone on a single shard, named among several.
fn print_report(library: &Library, shard: &str, report: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = if library.shards().len() == 1 {
        serde_json::to_string_pretty(report)?
    } else {
        serde_json::to_string_pretty(&serde_json::json!({"shard": shard, "report": report}))?
    };
    println!("{json}");
    Ok(())
}

/// In debug builds, `VELLUM_FAULT_ABORT_AT=<step>` stops the process dead (no cleanup,
/// as a kill would) when a tier migration reaches that step: how the fault-injection
/// tests kill a worker mid-migration. Release builds ignore it.
fn fault_hook() -> impl Fn(MigrationStep) + Send + Sync {
    let at = if cfg!(debug_assertions) { std::env::var("VELLUM_FAULT_ABORT_AT").ok() } else { None };
    move |step: MigrationStep| {
        if at.as_deref() == Some(step.name()) {
            eprintln!("fault injection: aborting after the migration step {:?}", step.name());
            std::process::abort();
        }
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The metadata database (postgres://... or sqlite://...).
    #[arg(long, env = "VELLUM_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The NATS server, with JetStream enabled.
    #[arg(long, env = "VELLUM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The directory of the platform's resources and Secrets (YAML), or of the compiled
    /// `platform.json` the operator writes.
    #[arg(long, env = "VELLUM_CONFIG_DIR")]
    config_dir: PathBuf,
    /// Where the compiled config's secret values (`secrets.json`) are mounted.
    #[arg(long, env = "VELLUM_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Seconds between reads of the config directory.
    #[arg(long, env = "VELLUM_CONFIG_RELOAD_SECONDS", default_value_t = 10)]
    config_reload_seconds: u64,
    /// Milliseconds between polls of the outbox for new events.
    #[arg(long, env = "VELLUM_RELAY_POLL_MS", default_value_t = 100)]
    relay_poll_ms: u64,
    /// Days finished deliveries stay in the delivery log.
    #[arg(long, env = "VELLUM_DELIVERY_LOG_DAYS", default_value_t = 30)]
    delivery_log_days: u64,
    /// Seconds beyond an endpoint's timeout before a delivery held by a worker that died is
    /// sent again by another.
    #[arg(long, env = "VELLUM_LEASE_MARGIN_SECONDS", default_value_t = 30)]
    lease_margin_seconds: u64,
    /// Hours a rotated-out signing key keeps signing beside the new one.
    #[arg(long, env = "VELLUM_KEY_GRACE_HOURS", default_value_t = 24)]
    key_grace_hours: u64,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (`vellum_worker_…`).
    #[arg(long, env = "VELLUM_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let options = Options {
                    database_url: args.database_url,
                    nats_url: args.nats_url,
                    config_dir: args.config_dir,
                    secrets_dir: args.secrets_dir,
                    reload: Duration::from_secs(args.config_reload_seconds.max(1)),
                    relay_poll: Duration::from_millis(args.relay_poll_ms.max(10)),
                    log_retention: Duration::from_secs(args.delivery_log_days * 24 * 3600),
                    metrics_listen: args.metrics_listen,
                    settings: Settings {
                        key_grace: Duration::from_secs(args.key_grace_hours * 3600),
                        lease_margin: Duration::from_secs(args.lease_margin_seconds),
                        ..Settings::default()
                    },
                };
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let mut worker = tokio::spawn(run(options, stopped));
                tokio::select! {
                    () = shutdown_signal() => {
                        tracing::info!("shutting down: finishing attempts in flight");
                        stop.send_replace(true);
                        Ok(worker.await.context("the worker panicked")??)
                    }
                    result = &mut worker => Ok(result.context("the worker panicked")??),
                }
            }
            Command::Retention { policy, store, run } => {
                let (library, config) = store.open().await?;
                let hook = fault_hook();
                // Shard by shard, each run recorded (and resumed) in its own database.
                for (shard, docs) in library.names().iter().zip(library.shards()) {
                    let report = run_policy(docs, &config, &policy, run.settings(), &hook)
                        .await
                        .with_context(|| format!("shard {shard}"))?;
                    print_report(&library, shard, &report)?;
                }
                Ok(())
            }
            Command::Drain { tier, to, store, run, nats_url } => {
                drain(&tier, &to, store, &run, nats_url.as_deref()).await
            }
            Command::Scrub { tier, store, nats_url } => scrub(tier.as_deref(), store, nats_url.as_deref()).await,
            Command::Reshard { store, batch, documents_per_second, source_grace_seconds, nats_url } => {
                reshard(store, batch, documents_per_second, source_grace_seconds, nats_url.as_deref()).await
            }
            Command::Migrate { database_url } => {
                let meta = vellum_core::store::Metadata::open(&database_url)
                    .await
                    .context("migrating the metadata database")?;
                let version = meta.schema_version().await.context("reading the schema version")?;
                println!("schema is at version {version}");
                Ok(())
            }
        }
    })
}

/// Empties `tier` into `to` on every shard, announcing the progress to the gateways (at
/// most once a second) and printing each shard's report as JSON; fails while blobs remain.
async fn drain(
    tier: &str,
    to: &str,
    store: StoreArgs,
    run: &RunSettingsArgs,
    nats_url: Option<&str>,
) -> anyhow::Result<()> {
    let (library, _) = store.open().await?;
    let announcer = Announcer::connect(nats_url, "migrations").await;
    let now = || vellum_core::clock::Clock::system().now_ms();
    let entity_id = format!("tier-drain/{tier}");
    let entity = Entity { kind: "migration", id: &entity_id, phase: "Draining" };
    let mut total = 0i64;
    for docs in library.shards() {
        let blobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blobs WHERE tier = $1")
            .bind(tier)
            .fetch_one(docs.meta().pool())
            .await
            .context("counting the tier's blobs")?;
        total += blobs;
    }
    let started = format!("moving {total} stored objects from tier {tier} to {to}");
    announcer.send(status_update("phase_changed", "RUNNING", entity, (0, total), &started, now()));
    let (mut moved_before, mut remaining) = (0i64, 0i64);
    for (shard, docs) in library.names().iter().zip(library.shards()) {
        let progress = |moved: i64| {
            let moved = moved_before + moved;
            announcer.progress(|| {
                let message = format!("{moved} of {total} stored objects moved to tier {to}");
                status_update("progress_updated", "RUNNING", entity, (moved, total), &message, now())
            });
        };
        let report = match drain_tier(docs, tier, to, run.settings(), &progress).await {
            Ok(report) => report,
            Err(e) => {
                let why = format!("draining tier {tier} failed on shard {shard} (the Job retries): {e}");
                announcer.send(status_update("failed", "FAILED", entity, (moved_before, total), &why, now()));
                announcer.finish().await;
                return Err(anyhow::Error::new(e).context(format!("shard {shard}")));
            }
        };
        moved_before += report.moved;
        remaining += report.remaining;
        print_report(&library, shard, &report)?;
    }
    if remaining > 0 {
        let why = format!("{remaining} stored objects remain in tier {tier} (the Job retries)");
        announcer.send(status_update("failed", "FAILED", entity, (moved_before, total), &why, now()));
        announcer.finish().await;
        anyhow::bail!("{remaining} blobs remain in storage tier {tier}");
    }
    let done = format!("tier {tier} is empty: {moved_before} stored objects moved to {to}");
    announcer.send(status_update("completed", "COMPLETED", entity, (moved_before, total), &done, now()));
    announcer.finish().await;
    Ok(())
}

/// Scrubs every shard's blobs (of `tier`, or all), announcing the progress and each
/// quarantined blob to the gateways' `/topic/data-quality`, and printing each shard's
/// findings as JSON; fails when a blob could not be read.
async fn scrub(tier: Option<&str>, store: StoreArgs, nats_url: Option<&str>) -> anyhow::Result<()> {
    let (library, _) = store.open().await?;
    let announcer = Announcer::connect(nats_url, "data-quality").await;
    let now = || vellum_core::clock::Clock::system().now_ms();
    let entity_id = format!("integrity-scrub/{}", vellum_core::clock::rfc3339(now()));
    let entity = Entity { kind: "integrity-scrub", id: &entity_id, phase: "Scrubbing" };
    let mut total = 0i64;
    for docs in library.shards() {
        total += docs.scrub_total(tier).await.context("counting the blobs")?;
    }
    let scope = tier.map_or_else(|| "every tier".to_owned(), |t| format!("tier {t}"));
    let started = format!("checking the SHA-256 of {total} stored objects of {scope}");
    announcer.send(status_update("phase_changed", "RUNNING", entity, (0, total), &started, now()));
    let (mut checked_before, mut unsound, mut errors) = (0i64, 0u64, 0u64);
    for (shard, docs) in library.names().iter().zip(library.shards()) {
        let progress = |checked: u64| {
            let checked = checked_before + i64::try_from(checked).unwrap_or(i64::MAX);
            announcer.progress(|| {
                let message = format!("{checked} of {total} stored objects checked");
                status_update("progress_updated", "RUNNING", entity, (checked, total), &message, now())
            });
        };
        let report = match docs.scrub(tier, &progress).await {
            Ok(report) => report,
            Err(e) => {
                let why = format!("the scrub failed on shard {shard}: {e}");
                announcer.send(status_update("failed", "FAILED", entity, (checked_before, total), &why, now()));
                announcer.finish().await;
                return Err(anyhow::Error::new(e).context(format!("shard {shard}")));
            }
        };
        for blob in &report.quarantined {
            let about = Entity { kind: "blob", id: &blob.sha256, phase: "Scrubbing" };
            let message = format!(
                "stored object {} quarantined: {}; downloads of documents {:?} are refused until it is restored",
                blob.sha256, blob.reason, blob.documents
            );
            announcer.send(status_update("status_changed", "QUARANTINED", about, (1, 1), &message, now()));
        }
        checked_before += i64::try_from(report.checked + report.errors).unwrap_or(i64::MAX);
        unsound += report.unsound;
        errors += report.errors;
        let json = serde_json::json!({"shard": shard, "scrub": report});
        println!("{json}");
    }
    if errors > 0 {
        let why = format!("{errors} of {total} stored objects could not be read (the next run checks them again)");
        announcer.send(status_update("failed", "FAILED", entity, (checked_before, total), &why, now()));
        announcer.finish().await;
        anyhow::bail!("{why}");
    }
    let done = if unsound == 0 {
        format!("all {total} stored objects of {scope} are sound")
    } else {
        format!("{unsound} of {total} stored objects of {scope} are not sound and quarantined")
    };
    announcer.send(status_update("completed", "COMPLETED", entity, (checked_before, total), &done, now()));
    announcer.finish().await;
    Ok(())
}

/// `vellum-workers reshard`: runs the move the config names, at its pace, announcing its
/// progress to the gateways, and prints every shard's part of it as JSON.
async fn reshard(
    store: StoreArgs,
    batch: Option<usize>,
    documents_per_second: Option<u32>,
    source_grace_seconds: i64,
    nats_url: Option<&str>,
) -> anyhow::Result<()> {
    // This process only moves documents: room for the mover's two lanes on each shard.
    let (library, config) = store.open_with(MOVER_CONNECTIONS).await?;
    let pace = config.shard_move.as_ref().map(|m| m.to.resharding.clone()).unwrap_or_default();
    let batch = batch.unwrap_or(pace.batch_size as usize);
    let per_second = documents_per_second.or(pace.documents_per_second);
    let next = library.next().map(|t| t.version().to_owned()).unwrap_or_default();
    let announcer = Announcer::connect(nats_url, "migrations").await;
    let now = || vellum_core::clock::Clock::system().now_ms();
    let entity_id = format!("shard-move/{next}");
    let entity = Entity { kind: "migration", id: &entity_id, phase: "Moving" };
    let started = format!("moving documents to routing {next}");
    announcer.send(status_update("phase_changed", "RUNNING", entity, (0, 0), &started, now()));
    // Progress in the log and to the gateways at most once a second.
    let logged = std::sync::Mutex::new(std::time::Instant::now());
    let report = |sums: &[(String, ShardProgress)]| {
        let (moved, total) = sums.iter().fold((0, 0), |(m, t), (_, p)| (m + p.moved_documents, t + p.total_documents));
        announcer.progress(|| {
            let message = format!("{moved} of {total} documents moved");
            status_update("progress_updated", "RUNNING", entity, (moved, total), &message, now())
        });
        let mut last = logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() >= Duration::from_secs(1) {
            *last = std::time::Instant::now();
            tracing::info!(routing_version = %next, moved, total, "moving documents between shards");
        }
    };
    let moved = run_move_paced(&library, batch, source_grace_seconds.max(0) * 1000, per_second, &report).await;
    let sums = match moved {
        Ok(sums) => sums,
        Err(e) => {
            let why = format!("moving documents failed (the Job retries): {e}");
            announcer.send(status_update("failed", "FAILED", entity, (0, 0), &why, now()));
            announcer.finish().await;
            return Err(anyhow::Error::new(e).context("moving documents between shards"));
        }
    };
    let (moved, total) = sums.iter().fold((0, 0), |(m, t), (_, p)| (m + p.moved_documents, t + p.total_documents));
    let done = format!("{moved} documents moved; the routing flips next");
    announcer.send(status_update("completed", "COMPLETED", entity, (moved, total), &done, now()));
    announcer.finish().await;
    let shards: serde_json::Map<String, serde_json::Value> =
        sums.into_iter().map(|(name, p)| (name, serde_json::json!(p))).collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"routingVersion": next, "shards": shards}))?);
    Ok(())
}
