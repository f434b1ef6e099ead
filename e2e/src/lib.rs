//! End-to-end tests of Vellum, driven the way a platform team drives it: `kubectl apply`
//! of the YAML in `manifests/` against a cluster. They arrive with the Kubernetes API
//! simulator that lets them run on a machine without a cluster; the test kit they and every
//! integration test use lives in `e2e/testkit`.
//!
//! The cluster is the one `VELLUM_E2E_KUBECONFIG` names when it is set (a kind cluster
//! made from `kind-config.yaml`, say), else a fresh simulator per test. The variable is the
//! suite's own, not `KUBECONFIG`, so that a shell pointed at a real cluster never has the
//! suite install and delete things there by accident.
#![warn(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

use kube_sim::{Options, Simulator};

/// The variable naming an existing cluster to run against.
pub const KUBECONFIG_VAR: &str = "VELLUM_E2E_KUBECONFIG";

/// The cluster a test runs against.
#[derive(Debug)]
pub struct Cluster {
    sim: Option<Simulator>,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

impl Cluster {
    /// The cluster `VELLUM_E2E_KUBECONFIG` names, else a simulator started with `options`.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let cache = tempfile::tempdir()?;
        if let Some(path) = std::env::var_os(KUBECONFIG_VAR).filter(|p| !p.is_empty()) {
            return Ok(Self { sim: None, kubeconfig: PathBuf::from(path), cache });
        }
        let sim = Simulator::start(options).await?;
        let kubeconfig = sim.kubeconfig().to_owned();
        Ok(Self { sim: Some(sim), kubeconfig, cache })
    }

    /// The simulator, when the test runs against one.
    pub fn simulator(&self) -> Option<&Simulator> {
        self.sim.as_ref()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs `kubectl` (`KUBE_SIM_KUBECTL`, else the one on the PATH) against the cluster.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::io::Result<Output> {
        kube_sim::run_kubectl(&self.kubeconfig, self.cache.path(), args, stdin).await
    }
}
