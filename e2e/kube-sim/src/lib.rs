//! kube-sim: a local Kubernetes API simulator.
//!
//! It serves the Kubernetes API over plain HTTP on a loopback address from memory, so that
//! real clients (kubectl, kube-rs) can be tested on a machine without a cluster: discovery,
//! the built-in types a platform operator touches, CustomResourceDefinitions and the custom
//! resources they serve, and the verbs with the API server's semantics (resource versions,
//! watches that resume, optimistic concurrency, the four patch types, finalizers, garbage
//! collection), controllers for Deployments, Jobs, CronJobs and Services, and a kubelet that
//! runs pods as local processes, each on a loopback address of its own. It knows nothing of
//! any particular operator.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let sim = kube_sim::Simulator::start(kube_sim::Options::default()).await?;
//! // KUBECONFIG=<sim.kubeconfig()> kubectl get namespaces
//! # Ok(()) }
//! ```

pub mod api;
pub mod controllers;
pub mod jobs;
pub mod kubelet;
pub mod managed;
pub mod meta;
pub mod network;
pub mod node;
pub mod openapi;
pub mod patch;
pub mod registry;
pub mod schema;
pub mod select;
pub mod services;
pub mod status;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use kubelet::{ImageRule, Kubelet, Runtime};
pub use store::Store;

/// How to start a simulator.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The address to listen on; a free loopback port when `None`.
    pub listen: Option<SocketAddr>,
    /// Where to write the kubeconfig; a private temporary directory when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// Which executable each container image runs (or that it runs as kwok does).
    pub images: Vec<ImageRule>,
    /// Images no rule names are marked running and ready without a process (kwok mode)
    /// instead of failing to pull.
    pub kwok: bool,
    /// The first delay before restarting a crashed container (1 s when `None`; doubles up to
    /// five minutes, as a kubelet's back-off).
    pub restart_backoff: Option<Duration>,
}

/// A running simulator; it stops when dropped.
#[derive(Debug)]
pub struct Simulator {
    addr: SocketAddr,
    store: Store,
    kubelet: Kubelet,
    proxies: services::Proxies,
    kubeconfig: PathBuf,
    _dir: Option<tempfile::TempDir>,
    _state: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    controllers: JoinHandle<()>,
    requests: api::Requests,
}

/// A kubeconfig naming a simulator at `url`, as `kubectl` and kube-rs read it.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\n\
         contexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\n\
         current-context: kube-sim\nusers:\n- name: kube-sim\n  user:\n    token: kube-sim\npreferences: {{}}\n"
    )
}

/// Runs `kubectl` (`KUBE_SIM_KUBECTL`, else `kubectl` on the PATH) against the cluster
/// `kubeconfig` names, with its discovery cache in `cache` (one per cluster), `stdin` as its
/// input; returns what it printed and how it ended.
pub async fn run_kubectl(
    kubeconfig: &Path,
    cache: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::io::Result<std::process::Output> {
    use tokio::io::AsyncWriteExt;
    let binary = std::env::var("KUBE_SIM_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut child = tokio::process::Command::new(binary)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBECACHEDIR", cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await?;
        }
        drop(input);
    }
    child.wait_with_output().await
}

/// The cluster's controllers and the kubelet, a few times a second.
async fn controllers(store: Store, kubelet: Kubelet, proxies: services::Proxies) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        controllers::run_once(&store);
        kubelet.sync();
        proxies.sync(&store);
    }
}

impl Simulator {
    /// Binds, writes the kubeconfig and serves until dropped or [`Simulator::stop`]ped.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let listener =
            tokio::net::TcpListener::bind(options.listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into())).await?;
        let addr = listener.local_addr()?;
        let (dir, path) = if let Some(path) = options.kubeconfig {
            (None, path)
        } else {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("kubeconfig");
            (Some(dir), path)
        };
        std::fs::write(&path, kubeconfig(&format!("http://{addr}")))?;
        let store = Store::with_network(Arc::new(network::Network::reserve()?));
        let state = tempfile::Builder::new().prefix("kube-sim-").tempdir()?;
        let config = kubelet::Config {
            images: options.images,
            kwok: options.kwok,
            restart_backoff: options.restart_backoff.unwrap_or(Duration::from_secs(1)),
            kubeconfig: Some(path.clone()),
        };
        let api = Arc::new(kubelet::SimApi { store: store.clone(), api_server: addr });
        let kubelet = Kubelet::new(api, config, state.path().join("pods"));
        let requests = api::Requests::default();
        let app = api::router(api::Sim { store: store.clone(), kubelet: kubelet.clone(), requests: requests.clone() });
        let proxies = services::Proxies::default();
        let controllers = tokio::spawn(controllers(store.clone(), kubelet.clone(), proxies.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the simulator's server stopped");
            }
        });
        tracing::info!(%addr, kubeconfig = %path.display(), "kube-sim serving");
        Ok(Self {
            addr,
            store,
            kubelet,
            proxies,
            kubeconfig: path,
            _dir: dir,
            _state: state,
            stop: Some(stop),
            server: Some(server),
            controllers,
            requests,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig file naming this simulator.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// API requests served so far, by client (the `User-Agent`'s product).
    pub fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.requests.snapshot()
    }

    /// Direct access to the objects (for tests that arrange state without a client).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `kubectl` (`KUBE_SIM_KUBECTL`, else `kubectl` on the PATH) against this
    /// simulator with `stdin` as its input, and returns what it printed and how it ended.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::io::Result<std::process::Output> {
        let dir = self.kubeconfig.parent().unwrap_or_else(|| Path::new("."));
        run_kubectl(&self.kubeconfig, &dir.join("cache"), args, stdin).await
    }

    /// Stops serving; open watches end.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        self.controllers.abort();
        self.kubelet.shutdown();
        self.proxies.shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            // Watches stay open until their deadline; do not wait for them.
            server.abort();
            let _ = server.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.controllers.abort();
        self.kubelet.shutdown();
        self.proxies.shutdown();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
