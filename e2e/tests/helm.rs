//! The chart installs the operator as Helm users install it: `helm lint` finds nothing,
//! `helm template` renders what the real API server accepts (a server-side dry run), and
//! `helm install` on a local cluster brings up the operator, which elects a leader and
//! reconciles; `helm uninstall` removes what it installed. helm is built from its sources
//! by `scripts/cluster helm`.

use std::path::{Path, PathBuf};

use vellum_e2e::{Cluster, binary};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// helm, and a home of its own for its caches and settings.
struct Helm {
    binary: PathBuf,
    home: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Helm {
    fn new(cluster: &Cluster) -> Self {
        let out = std::process::Command::new(root().join("scripts/cluster")).arg("helm").output().unwrap();
        assert!(out.status.success(), "scripts/cluster helm: {}", String::from_utf8_lossy(&out.stderr));
        let binary = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { binary, home: tempfile::tempdir().unwrap(), kubeconfig: cluster.kubeconfig().to_owned() }
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        let home = self.home.path();
        tokio::process::Command::new(&self.binary)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .current_dir(root())
            .output()
            .await
            .unwrap()
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "helm {args:?} failed: {text}");
        text
    }
}

async fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> String {
    let out = cluster.kubectl(args, stdin).await.unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_chart_lints_renders_installs_and_uninstalls() {
    let operator = binary("vellum-operator");
    let cluster = Cluster::start(&[("vellum/operator", &operator)]).await.unwrap();
    let helm = Helm::new(&cluster);
    let version = helm.ok(&["version", "--short"]).await;
    assert!(version.starts_with("v4."), "{version}");

    let lint = helm.ok(&["lint", "--strict", "charts/vellum"]).await;
    assert!(lint.contains("1 chart(s) linted, 0 chart(s) failed"), "{lint}");

    // What the chart renders, judged by the API server without being stored.
    kubectl(&cluster, &["create", "namespace", "vellum-system"], None).await;
    let rendered =
        helm.ok(&["template", "vellum", "charts/vellum", "--namespace", "vellum-system", "--include-crds"]).await;
    let judged = kubectl(&cluster, &["apply", "--dry-run=server", "-f", "-"], Some(&rendered)).await;
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/",
        "clusterrole.rbac.authorization.k8s.io/",
        "serviceaccount/",
        "deployment.apps/",
    ] {
        assert!(judged.contains(kind), "no {kind} in {judged}");
    }
    assert!(judged.lines().all(|l| l.ends_with("(server dry run)")), "{judged}");

    // Installed for real: the operator runs, leads and reconciles.
    helm.ok(&["install", "vellum", "charts/vellum", "--namespace", "vellum-system", "--wait", "--timeout", "120s"])
        .await;
    let status = helm.ok(&["status", "vellum", "--namespace", "vellum-system"]).await;
    assert!(status.contains("STATUS: deployed"), "{status}");
    let lease =
        ["-n", "vellum-system", "get", "lease", "vellum-operator-leader", "-o", "jsonpath={.spec.holderIdentity}"];
    let mut holder = String::new();
    for _ in 0..120 {
        if let Ok(out) = cluster.kubectl(&lease, None).await {
            holder = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if !holder.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(holder.starts_with("vellum-"), "no leader: {holder:?}");
    kubectl(&cluster, &["create", "namespace", "docs"], None).await;
    let tier = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, backend: {url: 'memory://'}}\n";
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(tier)).await;
    let mut reason = String::new();
    for _ in 0..120 {
        reason = kubectl(
            &cluster,
            &[
                "-n",
                "docs",
                "get",
                "storagetier",
                "hot",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
            ],
            None,
        )
        .await;
        if !reason.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(!reason.is_empty(), "the chart's operator did not reconcile");

    helm.ok(&["uninstall", "vellum", "--namespace", "vellum-system", "--wait", "--timeout", "120s"]).await;
    let left =
        kubectl(&cluster, &["-n", "vellum-system", "get", "deployment,serviceaccount,pods", "-o", "name"], None).await;
    assert!(!left.contains("vellum"), "left behind: {left}");
    let roles = kubectl(&cluster, &["get", "clusterrole", "-o", "name"], None).await;
    assert!(!roles.contains("vellum-operator"), "{roles}");
}
