//! The install manifests and the examples, applied with kubectl to a cluster as a platform
//! team applies them: the CRDs are established, every example is
//! accepted, `kubectl get` shows the Webhook's printer columns, and deleting everything
//! leaves nothing behind.
//!
//! Runs against the cluster `VELLUM_E2E_KUBECONFIG` names, else a local cluster whose node
//! runs the workspace's operator.

use std::path::Path;

use vellum_e2e::{Cluster, binary};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

async fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    let out =
        cluster.kubectl(args, None).await.expect("kubectl runs (set VELLUM_TEST_KUBECTL or put kubectl on the PATH)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubectl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test]
async fn the_install_manifests_and_examples_apply_and_delete_cleanly() {
    let operator = binary("vellum-operator");
    let sim = Cluster::start(&[("vellum/operator", &operator)]).await.unwrap();
    let install = repo().join("manifests/install.yaml");
    let examples = repo().join("manifests/examples");
    let (install, examples) = (install.to_str().unwrap(), examples.to_str().unwrap());

    kubectl(&sim, &["apply", "-f", install]).await;
    kubectl(&sim, &["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]).await;
    let crds = kubectl(&sim, &["get", "crd", "-o", "name"]).await;
    for kind in ["storagetiers", "retentionpolicies", "webhooks", "shardsets", "bluegreenreleases"] {
        assert!(crds.contains(&format!("{kind}.vellum.dev")), "{crds}");
    }

    let applied = kubectl(&sim, &["apply", "-f", examples]).await;
    for resource in
        ["webhook.vellum.dev/", "storagetier.vellum.dev/", "shardset.vellum.dev/", "bluegreenrelease.vellum.dev/"]
    {
        assert!(applied.contains(resource), "{resource} in {applied}");
    }
    let table = kubectl(&sim, &["get", "wh"]).await;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(&header[..4], ["NAME", "URL", "READY", "ACTIVE"], "{table}");
    assert!(table.contains("contracts-notifier") && table.contains("https://contracts.example.com"), "{table}");
    let all = kubectl(&sim, &["get", "vellum"]).await;
    assert!(all.contains("contracts-notifier"), "the vellum category lists every kind: {all}");

    kubectl(&sim, &["delete", "-f", examples, "--wait=true"]).await;
    // The namespace comes first in the file and its controller may empty it before kubectl
    // reaches the objects inside, as on a real cluster.
    kubectl(&sim, &["delete", "-f", install, "--wait=true", "--ignore-not-found"]).await;
    let left = kubectl(&sim, &["get", "crd,ns", "-o", "name"]).await;
    assert!(!left.contains("vellum"), "nothing of Vellum is left: {left}");
}
