//! End-to-end tests of Vellum, driven the way a platform team drives it: `kubectl apply`
//! of the YAML in `manifests/` against a cluster. The test kit they and every integration
//! test use lives in `e2e/testkit`.
//!
//! The cluster is the one `VELLUM_E2E_KUBECONFIG` names when it is set (a kind cluster
//! made from `kind-config.yaml`, say), else a fresh local cluster per test: the real
//! Kubernetes control plane that `scripts/cluster` builds from its sources, with one
//! `vellum-node` running the workspace's binaries as the images. The variable is the suite's
//! own, not `KUBECONFIG`, so that a shell pointed at a real cluster never has the suite
//! install and delete things there by accident.
#![warn(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Output;

use vellum_node::node::host::Host;

/// The variable naming an existing cluster to run against.
pub const KUBECONFIG_VAR: &str = "VELLUM_E2E_KUBECONFIG";

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The variable naming the directory of the workspace's binaries, when not the one beside
/// the running test (a benchmark, built in `target/release`, runs the debug binaries).
pub const BINARIES_VAR: &str = "VELLUM_E2E_BINARIES";

static BINARIES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Runs the workspace's binaries from `dir` from now on (a benchmark, built in
/// `target/release`, runs the debug binaries the tests run). The first call wins.
pub fn use_binaries_from(dir: PathBuf) {
    let _ = BINARIES.set(dir);
}

/// Where the workspace's binaries are: as [`use_binaries_from`] said, else
/// [`BINARIES_VAR`], else beside the running test.
fn binaries() -> PathBuf {
    if let Some(dir) = BINARIES.get() {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os(BINARIES_VAR).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/debug/deps/<test>-… → target/debug
    exe.parent().and_then(Path::parent).expect("target directory").to_path_buf()
}

/// A binary of the workspace, built beside the running test (`target/debug/<name>`).
///
/// # Panics
/// When it is not built.
pub fn binary(name: &str) -> PathBuf {
    let path = binaries().join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// The host loopback ports of the shared test servers (Postgres, NATS, S3), which a local
/// cluster's node makes reachable at the same addresses from its pods.
fn host_ports() -> Vec<u16> {
    let urls = [
        ("VELLUM_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        ("VELLUM_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        ("VELLUM_TEST_S3_ENDPOINT", "http://127.0.0.1:9000"),
    ];
    urls.iter()
        .filter_map(|(var, default)| {
            let url = std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| (*default).to_owned());
            let authority = url.split("://").nth(1)?.split('/').next()?;
            authority.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// A cluster `scripts/cluster` started for one test, and a thread in its network namespace.
#[derive(Debug)]
struct Local {
    name: String,
    inside: Host,
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = std::process::Command::new(root().join("scripts/cluster")).args(["down", &self.name]).output();
    }
}

/// The cluster a test runs against.
#[derive(Debug)]
pub struct Cluster {
    local: Option<Local>,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

impl Cluster {
    /// The cluster `VELLUM_E2E_KUBECONFIG` names, else a local cluster whose node runs
    /// `images` (image pattern → executable).
    pub async fn start(images: &[(&str, &Path)]) -> anyhow::Result<Self> {
        Self::start_with(images, &[]).await
    }

    /// As [`Cluster::start`], with `scripts/cluster`'s variables `env` (such as
    /// `VELLUM_NODE_KWOK=1` or `VELLUM_CLUSTER_AUDIT=1`) for a local cluster.
    pub async fn start_with(images: &[(&str, &Path)], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let cache = tempfile::tempdir()?;
        if let Some(path) = std::env::var_os(KUBECONFIG_VAR).filter(|p| !p.is_empty()) {
            return Ok(Self { local: None, kubeconfig: PathBuf::from(path), cache });
        }
        let name = format!("e2e{}-{}", std::process::id(), &uuid_suffix());
        let rules: Vec<String> = images.iter().map(|(image, exe)| format!("{image}={}", exe.display())).collect();
        let ports: Vec<String> = host_ports().iter().map(u16::to_string).collect();
        let out = tokio::process::Command::new(root().join("scripts/cluster"))
            .args(["up", &name])
            .env("VELLUM_NODE_BIN", binary("vellum-node"))
            .env("VELLUM_NODE_IMAGES", rules.join(" "))
            .env("VELLUM_NODE_HOST_PORTS", ports.join(" "))
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            let _ = std::process::Command::new(root().join("scripts/cluster")).args(["down", &name]).output();
            anyhow::bail!("scripts/cluster up {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let netns: OwnedFd = std::fs::File::open(format!("/run/netns/vellum-{name}"))?.into();
        let inside = Host::start(netns)?;
        Ok(Self { local: Some(Local { name, inside }), kubeconfig, cache })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The local cluster's state directory (its kubeconfigs, logs and audit log).
    pub fn dir(&self) -> Option<&Path> {
        self.local.as_ref().and(self.kubeconfig.parent())
    }

    /// A kubeconfig for a new user of the local cluster: `cn`, in `group` when given.
    pub async fn user(&self, cn: &str, group: Option<&str>) -> anyhow::Result<PathBuf> {
        let Some(local) = &self.local else { anyhow::bail!("users are made only on a local cluster") };
        let mut args = vec!["user", local.name.as_str(), cn];
        args.extend(group);
        let out = tokio::process::Command::new(root().join("scripts/cluster")).args(&args).output().await?;
        anyhow::ensure!(out.status.success(), "scripts/cluster user: {}", String::from_utf8_lossy(&out.stderr));
        Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
    }

    /// Runs `kubectl` (`VELLUM_TEST_KUBECTL`, else the one on the PATH) against the cluster,
    /// with `stdin` as its input; returns what it printed and how it ended.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::io::Result<Output> {
        use tokio::io::AsyncWriteExt;
        let binary = std::env::var("VELLUM_TEST_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        // The workspace's kubectl plugins (kubectl-vellum) are found as a user's would be:
        // on the PATH.
        let built = binaries();
        let path = std::env::join_paths(
            std::iter::once(built).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .map_err(std::io::Error::other)?;
        let mut child = tokio::process::Command::new(binary)
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.cache.path())
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

    /// A loopback address of this machine that leads to `target` inside the cluster's
    /// network (a Service's cluster IP and port, say); `target` itself on another cluster.
    pub async fn forward(&self, target: SocketAddr) -> std::io::Result<SocketAddr> {
        let Some(local) = &self.local else { return Ok(target) };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inside = local.inside.clone();
        tokio::spawn(async move {
            while let Ok((mut outer, _)) = listener.accept().await {
                let inside = inside.clone();
                tokio::spawn(async move {
                    if let Ok(mut inner) = inside.connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut outer, &mut inner).await;
                    }
                });
            }
        });
        Ok(addr)
    }

    /// A listener on a free port of `127.0.0.1` where the cluster's pods reach it (inside
    /// the local cluster's network namespace; this machine's loopback otherwise).
    pub async fn listen(&self) -> std::io::Result<tokio::net::TcpListener> {
        match &self.local {
            Some(local) => local.inside.listen(SocketAddr::from(([127, 0, 0, 1], 0))).await,
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await,
        }
    }
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{:x}", nanos & 0xfff_fff)
}
