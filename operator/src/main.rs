//! `vellum-operator`: the command-line entry point of the operator.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vellum_operator::manifests;

/// The Vellum Kubernetes operator.
///
/// `run` provisions document platforms from StorageTier, Webhook, RetentionPolicy, ShardSet
/// and BlueGreenRelease resources; the other commands generate the manifests that install
/// it: the five CustomResourceDefinitions (from the Rust API types), the RBAC and the
/// operator Deployment.
#[derive(Debug, Parser)]
#[command(name = "vellum-operator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers, while this replica holds the leader-election Lease.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions of StorageTier, RetentionPolicy, Webhook, ShardSet
    /// and BlueGreenRelease as one YAML stream, ready for `kubectl apply -f -`.
    Crds,
    /// Print the plain install manifest: namespace, CRDs, ServiceAccount, least-privilege RBAC
    /// and the operator Deployment.
    InstallManifest {
        /// Namespace the operator runs in.
        #[arg(long, default_value = manifests::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Operator container image.
        #[arg(long, default_value = manifests::DEFAULT_IMAGE)]
        image: String,
        /// Operator replicas (one acts, the others wait on the leader-election Lease).
        #[arg(long, default_value_t = 2)]
        replicas: i32,
        /// Log filter passed to the operator as `RUST_LOG`.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Write every generated manifest (`manifests/crds/`, `manifests/install.yaml`, the chart's
    /// CRDs and RBAC rules) under a repository checkout.
    Generate {
        /// Root of the repository checkout.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "VELLUM_METRICS_LISTEN", default_value = "127.0.0.1:8080")]
    metrics_listen: std::net::SocketAddr,
    /// Namespace of the leader-election Lease; the pod's own by default.
    #[arg(long, env = "POD_NAMESPACE", default_value = manifests::DEFAULT_NAMESPACE)]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "vellum-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease; the pod name by default.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds the leader holds the Lease without renewing it: how long a dead leader's
    /// work waits for another replica.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds between looks at healthy resources (tier probes, delivery statistics).
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "VELLUM_LOG_JSON")]
    log_json: bool,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let identity =
        args.identity.unwrap_or_else(|| format!("vellum-operator-{}", hex::encode(rand::random::<[u8; 4]>())));
    let options = vellum_operator::run::Options {
        metrics_listen: args.metrics_listen,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        lease_seconds: args.lease_seconds.max(2),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
    };
    Ok(vellum_operator::run::run(client, options, vellum_core::process::shutdown_signal()).await?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            vellum_core::process::init_logging(&args.log, args.log_json).map_err(anyhow::Error::msg)?;
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
            runtime.block_on(run(args))?;
        }
        Command::Crds => print!("{}", manifests::crds_yaml()),
        Command::InstallManifest { namespace, image, replicas, log_level } => {
            let opts = manifests::InstallOptions { namespace, image, replicas, log_level };
            print!("{}", manifests::install_manifest(&opts));
        }
        Command::Generate { root } => {
            for file in manifests::generated_files() {
                let path = root.join(&file.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                std::fs::write(&path, &file.content).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", file.path);
            }
        }
    }
    Ok(())
}
