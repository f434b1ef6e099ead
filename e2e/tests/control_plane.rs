//! The real Kubernetes control plane, built from its sources by `scripts/cluster` (etcd,
//! kube-apiserver with Node,RBAC authorization, kube-controller-manager, kube-scheduler),
//! judges what `manifests/` holds as a user's cluster would: the CRDs are admitted (their
//! CEL rules within the API server's cost budget, every schema format one it knows), RBAC
//! grants the operator what it needs and nothing it must not have, every example is
//! accepted, and the controllers act. Its node is `vellum-node`: the operator's pods run
//! there as the workspace's own binary, under the ServiceAccount and RBAC of
//! `manifests/install.yaml`, reach the API server in-cluster (the projected token, the
//! `kubernetes` Service's cluster IP through the node's service proxy), elect a leader and
//! reconcile the examples; `kubectl logs` reads them through the API server and the kubelet
//! API.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn kubectl_binary() -> String {
    std::env::var("KUBE_SIM_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// A cluster of this test's own, stopped (and its network namespace deleted) when dropped.
struct Cluster {
    name: String,
    kubeconfig: String,
}

/// A binary of the workspace, built beside this test.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let path = exe.parent().and_then(Path::parent).expect("target directory").join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` first", path.display());
    path
}

impl Cluster {
    fn up() -> Self {
        let name = format!("e2e-{}", std::process::id());
        let images = format!("vellum/operator={}", binary("vellum-operator").display());
        let out = Command::new(root().join("scripts/cluster"))
            .args(["up", &name])
            .env("KUBECTL", kubectl_binary())
            .env("VELLUM_NODE_BIN", binary("vellum-node"))
            .env("VELLUM_NODE_IMAGES", images)
            .output()
            .expect("scripts/cluster runs");
        assert!(out.status.success(), "scripts/cluster up failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Self { name, kubeconfig }
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(root())
            .output()
            .expect("kubectl runs (set KUBE_SIM_KUBECTL or put kubectl on the PATH)")
    }

    /// Standard output of a kubectl command that must succeed without warnings.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl {args:?} failed: {stderr}");
        let warnings: Vec<&str> =
            stderr.lines().filter(|l| l.starts_with("Warning:") && !l.contains("version difference")).collect();
        assert!(warnings.is_empty(), "kubectl {args:?} warned: {warnings:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/cluster")).args(["down", &self.name]).output();
    }
}

#[test]
fn the_real_control_plane_admits_the_manifests_and_enforces_their_rbac() {
    let cluster = Cluster::up();

    let version: serde_json::Value = serde_json::from_str(&cluster.ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.37.2", "{version}");
    let livez = cluster.ok(&["get", "--raw", "/livez?verbose"]);
    assert!(livez.contains("[+]etcd ok"), "{livez}");

    // The CRDs, RBAC and the operator's Deployment, as a platform team installs them.
    cluster.ok(&["apply", "-f", "manifests/install.yaml"]);
    for crd in ["storagetiers", "retentionpolicies", "webhooks", "shardsets", "bluegreenreleases"] {
        cluster.ok(&["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}.vellum.dev")]);
    }
    let operator = "system:serviceaccount:vellum-system:vellum-operator";
    let can = |verb: &str, resource: &str, namespace: &str| {
        let out = cluster.kubectl(&["auth", "can-i", verb, resource, "-n", namespace, "--as", operator]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can("delete", "nodes", "default"), "no");
    assert_eq!(can("get", "secrets", "kube-system"), "yes", "the operator reads the Secrets resources refer to");
    assert_eq!(can("patch", "deployments.apps", "docs"), "yes");
    assert_eq!(can("create", "leases.coordination.k8s.io", "vellum-system"), "yes");
    assert_eq!(can("create", "clusterrolebindings.rbac.authorization.k8s.io", "default"), "no");

    // Every example, judged by the API server's own schema and CEL checks.
    cluster.ok(&["create", "namespace", "docs"]);
    let applied = cluster.ok(&["apply", "-n", "docs", "-f", "manifests/examples/"]);
    assert_eq!(applied.lines().filter(|l| l.contains(" created")).count(), applied.lines().count(), "{applied}");
    let listed = cluster.ok(&["get", "vellum", "-n", "docs", "-o", "name"]);
    for kind in ["storagetier", "retentionpolicy", "webhook", "shardset", "bluegreenrelease"] {
        assert!(listed.contains(&format!("{kind}.vellum.dev/")), "no {kind} in {listed}");
    }
    // A resource the CRD's rules refuse is refused by the server, naming the field.
    let bad = "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: bad}\nspec:\n  routing: {strategy: Range}\n  shards:\n  - {name: a, urlSecretRef: {name: s, key: a}}\n";
    let refused = Command::new(kubectl_binary())
        .args(["--kubeconfig", &cluster.kubeconfig, "apply", "-n", "docs", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bad.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the server admitted a Range ShardSet without rangeStart");
    assert!(message.contains("spec.shards") && message.contains("rangeStart"), "{message}");

    // The node: registered, Ready, its Lease renewed.
    let node = format!("{}-node", cluster.name);
    let ready = cluster.ok(&["get", "node", &node, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]);
    assert_eq!(ready, "True");
    cluster.ok(&["-n", "kube-node-lease", "get", "lease", &node]);

    // The controllers act: the operator's Deployment gets a ReplicaSet and two pods, which
    // the scheduler binds to the node and the node runs, on addresses outside loopback.
    cluster.ok(&["-n", "vellum-system", "rollout", "status", "deployment/vellum-operator", "--timeout=90s"]);
    let ips = cluster.ok(&[
        "get",
        "pods",
        "-n",
        "vellum-system",
        "-l",
        "app.kubernetes.io/component=operator",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    let ips: Vec<std::net::Ipv4Addr> = ips.split_whitespace().map(|ip| ip.parse().unwrap()).collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips.iter().all(|ip| !ip.is_loopback() && ip.octets()[..2] == [10, 88]), "{ips:?}");

    // In-cluster, under its own ServiceAccount: one replica leads, and the examples get
    // the conditions only the operator writes.
    let mut holder = String::new();
    for _ in 0..60 {
        holder = cluster.ok(&[
            "-n",
            "vellum-system",
            "get",
            "lease",
            "vellum-operator-leader",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        if !holder.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(holder.starts_with("vellum-operator-"), "no leader: {holder:?}");
    let mut conditions = String::new();
    for _ in 0..60 {
        conditions = cluster.ok(&[
            "-n",
            "docs",
            "get",
            "retentionpolicy",
            "standard-lifecycle",
            "-o",
            "jsonpath={.status.conditions[*].type}",
        ]);
        if conditions.contains("Ready") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(conditions.contains("Ready"), "the operator did not reconcile: {conditions:?}");

    // `kubectl logs`: the API server asks the node's kubelet API for the leader's output.
    let logs = cluster.ok(&["-n", "vellum-system", "logs", &holder]);
    assert!(logs.contains("leading: starting the controllers"), "{logs}");
    // And the node's Events appear where `kubectl describe` looks.
    let events = cluster.ok(&[
        "-n",
        "vellum-system",
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={holder}"),
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Started"), "{events}");

    // A deleted pod is stopped and removed, and its replacement takes over.
    cluster.ok(&["-n", "vellum-system", "delete", "pod", &holder, "--timeout=60s"]);
    cluster.ok(&["-n", "vellum-system", "rollout", "status", "deployment/vellum-operator", "--timeout=90s"]);
    let mut next = holder.clone();
    for _ in 0..120 {
        next = cluster.ok(&[
            "-n",
            "vellum-system",
            "get",
            "lease",
            "vellum-operator-leader",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        if next != holder && !next.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_ne!(next, holder, "no replica took the lead over");
}
