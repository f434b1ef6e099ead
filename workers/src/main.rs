//! `vellum-workers`: the command-line entry point of the workers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vellum_core::process::{init_logging, shutdown_signal};
use vellum_workers::Settings;
use vellum_workers::run::{Options, run};

/// Vellum's asynchronous workers: the outbox relay that publishes document events to NATS
/// JetStream, and signed webhook delivery with retries, a delivery log and automatic
/// deactivation. Tier migration, retention runs and shard rebalancing come as their own
/// subcommands.
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
    /// Bring a metadata database's schema up to date and exit: what the operator's
    /// migration Job runs on every shard before the gateways of a new version start.
    Migrate {
        /// The metadata database (postgres://... or sqlite://...).
        #[arg(long, env = "VELLUM_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
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
                        worker.await.context("the worker panicked")?
                    }
                    result = &mut worker => result.context("the worker panicked")?,
                }
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
