//! `vellum-gateway`: the command-line entry point of the gateway.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vellum_core::process::{init_logging, shutdown_signal};
use vellum_gateway::auth::{AuthSettings, KeyFiles};
use vellum_gateway::standalone;

/// mimalloc rather than the system allocator: a request allocates and frees many small
/// blocks across two worker threads, where glibc's malloc spent a fifth of a cache hit's
/// time (its free lists and consolidation, per `perf` on the throughput benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Vellum gateway: the HTTP API application clients use to upload, version, tier and
/// download documents.
#[derive(Debug, Parser)]
#[command(name = "vellum-gateway", version, about, long_about)]
struct Cli {
    /// Log filter, as RUST_LOG takes it (`info`, `vellum_gateway=debug,info`).
    #[arg(long, env = "VELLUM_LOG", default_value = "info", global = true)]
    log: String,
    /// Log lines as JSON objects rather than text.
    #[arg(long, env = "VELLUM_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the gateway and its workers on the embedded defaults: SQLite metadata, local-file
    /// tiers and the in-process event bus. No cluster, database or object store needed.
    Standalone(StandaloneArgs),
    /// Runs one gateway replica of a cluster: Postgres metadata, events through NATS
    /// JetStream (real-time clients of every replica see every event), webhook delivery by
    /// `vellum-workers run`. Replicas must share the JWT keys and the link key.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    common: StandaloneArgs,
    /// The NATS server with JetStream the replicas share.
    #[arg(long, env = "VELLUM_NATS_URL")]
    nats_url: String,
    /// The key signing download links, shared by the replicas (at least 32 bytes).
    #[arg(long, env = "VELLUM_LINK_KEY", hide_env_values = true)]
    link_key: String,
    /// The namespace of this platform's resources: webhooks created through the API become
    /// Webhook resources and Secrets there, through the Kubernetes API (the pod's
    /// ServiceAccount). Without it they live in the metadata database.
    #[arg(long, env = "VELLUM_KUBE_NAMESPACE")]
    kube_namespace: Option<String>,
}

#[derive(Debug, Args)]
struct StandaloneArgs {
    /// Address to listen on.
    #[arg(long, env = "VELLUM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the database, the local tiers (`file://<relative path>` URLs) and
    /// generated keys.
    #[arg(long, env = "VELLUM_DATA_DIR", default_value = ".vellum")]
    data_dir: PathBuf,
    /// Directory of StorageTier, Webhook, RetentionPolicy and Secret YAML: the same files a
    /// platform team applies to a cluster. Without it, standalone mode runs on the embedded
    /// defaults (the repository's `config/standalone`: four local tiers under the data
    /// directory and its retention policies).
    #[arg(long, env = "VELLUM_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Where the secret values of a compiled config (`secrets.json`, from the platform
    /// Secret the operator writes) are mounted.
    #[arg(long, env = "VELLUM_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Seconds between reads of a compiled config; a changed one takes effect without a
    /// restart.
    #[arg(long, env = "VELLUM_CONFIG_RELOAD_SECONDS", default_value_t = 5)]
    config_reload_seconds: u64,
    /// Metadata database (`sqlite://…` or `postgres://…`); SQLite in the data directory by
    /// default.
    #[arg(long, env = "VELLUM_DATABASE_URL")]
    database_url: Option<String>,
    /// Non-public networks webhooks may reach (CIDR or address; repeat or comma-separate),
    /// beside the platform config's allow-list: `--allow-webhook-cidr 127.0.0.1` for a
    /// receiver on this machine.
    #[arg(long = "allow-webhook-cidr", env = "VELLUM_ALLOW_WEBHOOK_CIDRS", value_delimiter = ',')]
    allow_webhook_cidr: Vec<String>,
    /// The URL clients reach the gateway at, used in the links it hands out.
    #[arg(long, env = "VELLUM_PUBLIC_URL")]
    public_url: Option<String>,
    /// Serve /metrics on this address instead of the API's (which then answers it 404).
    #[arg(long, env = "VELLUM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// An origin whose browser pages may call the API and SockJS, with credentials
    /// (`http://localhost:3000`); repeat or comma-separate. None by default: no CORS headers.
    #[arg(long = "cors-origin", env = "VELLUM_CORS_ORIGINS", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Largest document accepted, in bytes.
    #[arg(long, env = "VELLUM_MAX_UPLOAD_BYTES", default_value_t = 5 << 30)]
    max_upload_bytes: u64,
    /// Bytes of document metadata and version lists this gateway keeps in memory, to
    /// answer reads again without the database (0: no cache). Every replica drops what an
    /// event says changed.
    #[arg(long, env = "VELLUM_METADATA_CACHE_BYTES", default_value_t = 64 << 20)]
    metadata_cache_bytes: u64,
    /// Seconds a cached entry is used at most: how late a change that announces no event
    /// (a tier drain moving blobs) may show.
    #[arg(long, env = "VELLUM_METADATA_CACHE_TTL_SECONDS", default_value_t = 60)]
    metadata_cache_ttl_seconds: u64,
    #[command(flatten)]
    jwt: JwtArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What one careless or hostile client may take of a replica.
#[derive(Debug, Args)]
struct LimitArgs {
    /// Seconds a client has to send a whole request head; an idle keep-alive connection is
    /// closed after as long.
    #[arg(long, env = "VELLUM_HEADER_TIMEOUT_SECONDS", default_value_t = 30)]
    header_timeout_seconds: u64,
    /// Seconds a request body may send nothing before the request fails.
    #[arg(long, env = "VELLUM_BODY_TIMEOUT_SECONDS", default_value_t = 60)]
    body_timeout_seconds: u64,
    /// Open connections at most, WebSockets included; at the cap the longest-open idle
    /// connection makes room, or a new one is refused when all are busy. Keep it under the
    /// process's file descriptor limit.
    #[arg(long, env = "VELLUM_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Uploads in progress at once; more are answered 503 with Retry-After.
    #[arg(long, env = "VELLUM_MAX_UPLOADS", default_value_t = 64)]
    max_uploads: usize,
    /// Failed token checks allowed per client address and second (twice as many in a
    /// burst); past it the address gets 429 without its tokens being checked (0: unlimited).
    #[arg(long, env = "VELLUM_AUTH_FAILURES_PER_SECOND", default_value_t = 20)]
    auth_failures_per_second: u32,
}

impl LimitArgs {
    fn limits(&self) -> vellum_gateway::limits::Limits {
        vellum_gateway::limits::Limits {
            header_timeout: std::time::Duration::from_secs(self.header_timeout_seconds.max(1)),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_seconds.max(1)),
            max_connections: self.max_connections.max(1),
            max_uploads: self.max_uploads.max(1),
            auth_failures_per_second: self.auth_failures_per_second,
        }
    }
}

#[derive(Debug, Args)]
struct JwtArgs {
    /// HS256 shared secret. Without it (and without public keys or JWKS) a secret is
    /// generated and kept in the data directory.
    #[arg(long, env = "VELLUM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A file holding the HS256 shared secret (a mounted Secret key): read again when it
    /// changes, so a rotated secret takes effect without a restart.
    #[arg(long, env = "VELLUM_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// RS256 or ES256 public key files (PEM); repeat or separate with commas. Read again
    /// when they change.
    #[arg(long, env = "VELLUM_JWT_PUBLIC_KEY", value_delimiter = ',')]
    jwt_public_key: Vec<PathBuf>,
    /// A JWKS file whose keys (chosen by `kid`) verify tokens. Read again when it changes:
    /// publish a new key beside the old one to roll over.
    #[arg(long, env = "VELLUM_JWT_JWKS")]
    jwt_jwks: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "VELLUM_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "VELLUM_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Requests per second allowed to one user (0: unlimited).
    #[arg(long, env = "VELLUM_RATE_LIMIT", default_value_t = 50)]
    rate_limit: u32,
    /// Requests one user may burst above the rate.
    #[arg(long, env = "VELLUM_RATE_BURST", default_value_t = 100)]
    rate_burst: u32,
}

impl JwtArgs {
    /// Key files are read (and read again when they change) by the gateway itself.
    fn settings(&self) -> AuthSettings {
        AuthSettings {
            secret: self.jwt_secret.as_ref().map(|s| s.clone().into_bytes()),
            files: KeyFiles {
                secret: self.jwt_secret_file.clone(),
                public_keys: self.jwt_public_key.clone(),
                jwks: self.jwt_jwks.clone(),
            },
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            rate_per_second: self.rate_limit,
            rate_burst: self.rate_burst,
            ..AuthSettings::default()
        }
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.common.database_url.as_deref().is_some_and(|u| u.starts_with("postgres")),
        "serve needs --database-url postgres://…: the replicas share one metadata database"
    );
    anyhow::ensure!(
        args.common.jwt.settings().has_keys(),
        "serve needs --jwt-secret, --jwt-secret-file, --jwt-public-key or --jwt-jwks: the replicas must accept the same tokens"
    );
    anyhow::ensure!(args.link_key.len() >= 32, "--link-key must have at least 32 bytes");
    anyhow::ensure!(
        args.common.config_dir.is_some(),
        "serve needs --config-dir: the platform config the replicas share (the operator mounts it)"
    );
    let mut options = options(&args.common);
    options.nats_url = Some(args.nats_url);
    options.link_key = Some(args.link_key.into_bytes());
    options.kube_namespace = args.kube_namespace;
    let running = vellum_gateway::replica::start(options).await?;
    println!("Vellum gateway replica serving at {}", running.url);
    shutdown_signal().await;
    println!("shutting down: finishing in-flight requests");
    Ok(running.shutdown().await?)
}

fn options(args: &StandaloneArgs) -> standalone::Options {
    standalone::Options {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        config_dir: args.config_dir.clone(),
        secrets_dir: args.secrets_dir.clone(),
        config_reload: std::time::Duration::from_secs(args.config_reload_seconds.max(1)),
        database_url: args.database_url.clone(),
        auth: args.jwt.settings(),
        max_upload_bytes: args.max_upload_bytes,
        public_url: args.public_url.clone(),
        allow_webhook_cidrs: args.allow_webhook_cidr.clone(),
        nats_url: None,
        link_key: None,
        kube_namespace: None,
        limits: args.limits.limits(),
        metrics_listen: args.metrics_listen,
        cors_origins: args.cors_origin.clone(),
        metadata_cache: vellum_gateway::cache::CacheSettings {
            max_bytes: args.metadata_cache_bytes,
            ttl: std::time::Duration::from_secs(args.metadata_cache_ttl_seconds.max(1)),
        },
    }
}

async fn run_standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let options = options(&args);
    let running = standalone::start(options).await?;
    let url = &running.url;
    println!("Vellum standalone gateway serving at {url}");
    println!("  data directory:   {}", args.data_dir.display());
    match &args.config_dir {
        Some(dir) => println!("  platform config:  {}", dir.display()),
        None => println!("  platform config:  the embedded defaults (config/standalone; --config-dir to change)"),
    }
    match &running.admin_token {
        Some(token) => {
            println!("  admin token (30 days):\n{token}\n");
            println!("Try it:");
            println!("  export TOKEN={token}");
            println!("  curl -H \"Authorization: Bearer $TOKEN\" -F file=@README.md {url}/api/v1/documents");
            println!("  curl -H \"Authorization: Bearer $TOKEN\" {url}/api/v1/documents");
        }
        None => println!("  tokens: signed by your identity provider (public keys or JWKS given)"),
    }
    shutdown_signal().await;
    println!("shutting down: finishing in-flight requests");
    Ok(running.shutdown().await?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Standalone(args) => run_standalone(args).await,
            Command::Serve(args) => run_serve(args).await,
        }
    })
}
