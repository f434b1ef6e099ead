//! `kube-sim`: serves a simulated Kubernetes API until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// A local Kubernetes API simulator for tests: kubectl and kube-rs clients talk to it as
/// to a cluster.
#[derive(Debug, Parser)]
#[command(name = "kube-sim", version)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:6443", env = "KUBE_SIM_LISTEN")]
    listen: SocketAddr,
    /// Where to write a kubeconfig naming the simulator.
    #[arg(long, default_value = "kube-sim.kubeconfig", env = "KUBE_SIM_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Which executable a container image runs: `PATTERN=EXECUTABLE` (`*` matches anything;
    /// a pattern without a tag matches every tag), or `PATTERN=kwok` to mark its pods
    /// running and ready without starting anything. May be repeated.
    #[arg(long = "image", value_name = "PATTERN=EXECUTABLE")]
    images: Vec<kube_sim::ImageRule>,
    /// Every image no `--image` rule names runs as kwok does (instead of failing to pull).
    #[arg(long, env = "KUBE_SIM_KWOK")]
    kwok: bool,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, default_value = "info", env = "KUBE_SIM_LOG")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(&args.log)).init();
    let sim = kube_sim::Simulator::start(kube_sim::Options {
        listen: Some(args.listen),
        kubeconfig: Some(args.kubeconfig.clone()),
        images: args.images,
        kwok: args.kwok,
        restart_backoff: None,
    })
    .await?;
    println!("kube-sim serving at {}; KUBECONFIG={}", sim.url(), args.kubeconfig.display());
    tokio::signal::ctrl_c().await?;
    sim.stop().await;
    Ok(())
}
