//! `vellum-operator`: the command-line entry point of the operator.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vellum_operator::manifests;

/// The Vellum Kubernetes operator.
///
/// This build generates the manifests that install Vellum: the five CustomResourceDefinitions
/// (from the Rust API types), the RBAC and the operator Deployment. The controllers that
/// provision a platform from the custom resources (`vellum-operator run`) are not part of it yet.
#[derive(Debug, Parser)]
#[command(name = "vellum-operator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
