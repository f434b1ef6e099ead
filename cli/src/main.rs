//! `kubectl vellum`: installed on the PATH as `kubectl-vellum`, kubectl runs it as a plugin.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubectl_vellum::{Request, ask, get, release_name, render_history, render_status};
use vellum_crds::BlueGreenRelease;

/// Blue-green rollouts of Vellum platforms: what they are doing, and what to do next.
#[derive(Debug, Parser)]
#[command(name = "kubectl vellum", version)]
struct Cli {
    /// The namespace (default: the kubeconfig context's, or `default`).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Phase, colors, conditions, smoke checks, error rate and the last rollouts.
    Status {
        /// The release: bgr/NAME or NAME.
        release: String,
        /// Print again at every change, until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// Switch to the preview color now (a release with `promotion.mode: Manual`).
    Promote { release: String },
    /// End the rollout under way; the old color keeps serving.
    Abort { release: String },
    /// Roll out again the version that failed or was aborted.
    Retry { release: String },
    /// Past rollouts with their outcome and durations, newest first.
    History { release: String },
}

async fn client(cli: &Cli) -> anyhow::Result<(kube::Client, String)> {
    let options = KubeConfigOptions { context: cli.context.clone(), ..KubeConfigOptions::default() };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options).await?
        }
        None if cli.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer().await.context("finding a kubeconfig or an in-cluster ServiceAccount")?,
    };
    let namespace = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((kube::Client::try_from(config)?, namespace))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (client, namespace) = client(&cli).await?;
    let api: Api<BlueGreenRelease> = Api::namespaced(client, &namespace);
    match &cli.command {
        Command::Status { release, watch } => {
            let name = release_name(release)?;
            let current = get(&api, &name).await?;
            print!("{}", render_status(&current, Timestamp::now()));
            if *watch {
                let mut changes = std::pin::pin!(kube::runtime::watcher::watch_object(api.clone(), &name));
                let mut seen = current.metadata.resource_version.clone();
                while let Some(change) = changes.next().await {
                    match change? {
                        Some(release) if release.metadata.resource_version != seen => {
                            seen.clone_from(&release.metadata.resource_version);
                            println!();
                            print!("{}", render_status(&release, Timestamp::now()));
                        }
                        Some(_) => {}
                        None => anyhow::bail!("BlueGreenRelease {name} was deleted"),
                    }
                }
            }
        }
        Command::Promote { release } => request(&api, release, Request::Promote).await?,
        Command::Abort { release } => request(&api, release, Request::Abort).await?,
        Command::Retry { release } => request(&api, release, Request::Retry).await?,
        Command::History { release } => {
            let current = get(&api, &release_name(release)?).await?;
            let status = current.status.unwrap_or_default();
            if status.history.is_empty() {
                println!("no rollout has ended yet");
            } else {
                print!("{}", render_history(&status, Timestamp::now(), usize::MAX));
            }
        }
    }
    Ok(())
}

async fn request(api: &Api<BlueGreenRelease>, release: &str, request: Request) -> anyhow::Result<()> {
    let name = release_name(release)?;
    let asked = ask(api, &name, request).await?;
    let phase = asked.status.and_then(|s| s.phase).map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    println!("bluegreenrelease.vellum.dev/{name} annotated {} (phase {phase})", request.annotation());
    Ok(())
}
