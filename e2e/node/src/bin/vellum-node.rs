//! `vellum-node`: a node of a real Kubernetes control plane (see `vellum_node::node`), run by
//! `scripts/cluster up`. It moves into the cluster's network namespace first (`--netns`),
//! keeping a thread in the host's for the ports it mirrors (`--host-port`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

/// A Kubernetes node that runs pods as local processes.
#[derive(Debug, Parser)]
#[command(name = "vellum-node", version)]
struct Args {
    /// The node's name.
    #[arg(long)]
    name: String,
    /// A kubeconfig with the node's credentials (`system:node:<name>` in `system:nodes`).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// A kubeconfig with the service proxy's credentials (`system:kube-proxy`).
    #[arg(long)]
    proxy_kubeconfig: PathBuf,
    /// The node's address; the kubelet API listens on port 10250 there.
    #[arg(long)]
    address: Ipv4Addr,
    /// The pods' /16 (`A.B.0.0/16`), routed to the namespace's loopback.
    #[arg(long, default_value = "10.88.0.0/16")]
    pod_range: String,
    /// The `kubernetes` Service's address and port, given to containers.
    #[arg(long, default_value = "10.96.0.1:443")]
    api_service: SocketAddr,
    /// The network namespace to run in (a path such as `/run/netns/NAME`).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// A host loopback port reachable at the same port of the namespace's loopback. May be
    /// repeated.
    #[arg(long = "host-port")]
    host_ports: Vec<u16>,
    /// Which executable a container image runs: `PATTERN=EXECUTABLE` or `PATTERN=kwok`.
    /// May be repeated.
    #[arg(long = "image", value_name = "PATTERN=EXECUTABLE")]
    images: Vec<vellum_node::ImageRule>,
    /// Images no rule names run as kwok does.
    #[arg(long)]
    kwok: bool,
    /// Where the pods' files go.
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    tls_cert: PathBuf,
    #[arg(long)]
    tls_key: PathBuf,
    /// The CA that signs the API server's kubelet client certificate.
    #[arg(long)]
    client_ca: PathBuf,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, default_value = "info", env = "VELLUM_NODE_LOG")]
    log: String,
}

fn pod_prefix(range: &str) -> anyhow::Result<[u8; 2]> {
    let (net, bits) = range.split_once('/').ok_or_else(|| anyhow::anyhow!("--pod-range is A.B.0.0/16, not {range}"))?;
    let ip: Ipv4Addr = net.parse()?;
    anyhow::ensure!(bits == "16", "--pod-range must be a /16, not /{bits}");
    let [a, b, _, _] = ip.octets();
    Ok([a, b])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(&args.log)).init();
    // Before any thread starts: every thread made later is in the cluster's namespace,
    // except the one kept in the host's.
    let host = match &args.netns {
        Some(path) => {
            let own = std::fs::File::open("/proc/self/ns/net")?;
            let target = std::fs::File::open(path)?;
            nix::sched::setns(target, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Some(vellum_node::node::host::Host::start(own.into())?)
        }
        None => None,
    };
    let options = vellum_node::node::Options {
        name: args.name,
        kubeconfig: args.kubeconfig,
        proxy_kubeconfig: args.proxy_kubeconfig,
        address: args.address,
        pod_prefix: pod_prefix(&args.pod_range)?,
        api_service: args.api_service,
        images: args.images,
        kwok: args.kwok,
        root: args.root,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        client_ca: args.client_ca,
        host_ports: args.host_ports,
        host,
    };
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(vellum_node::node::run(options))
}
