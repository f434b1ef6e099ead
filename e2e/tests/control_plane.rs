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

use std::time::Duration;

use vellum_e2e::{Cluster, binary};

#[path = "../../crds/tests/judge/mod.rs"]
mod judge;

/// Standard output of a kubectl command that must succeed without warnings.
async fn ok(cluster: &Cluster, args: &[&str]) -> String {
    let out =
        cluster.kubectl(args, None).await.expect("kubectl runs (set VELLUM_TEST_KUBECTL or put kubectl on the PATH)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl {args:?} failed: {stderr}");
    let warnings: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("Warning:") && !l.contains("version difference")).collect();
    assert!(warnings.is_empty(), "kubectl {args:?} warned: {warnings:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `args` every half second until `done` holds for its output (at most a minute).
async fn until(cluster: &Cluster, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..120 {
        last = ok(cluster, args).await;
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

#[tokio::test]
async fn the_real_control_plane_runs_the_operator_under_its_rbac() {
    let operator = binary("vellum-operator");
    let cluster = Cluster::start(&[("vellum/operator", &operator)]).await.unwrap();
    admits_the_manifests(&cluster).await;
    judges_as_the_client_side_check_does(&cluster).await;
    runs_the_operator(&cluster).await;
    says_what_it_may_not_do(&cluster).await;
}

/// The API server's verdicts: versions, health, CRDs, RBAC and every example.
async fn admits_the_manifests(cluster: &Cluster) {
    let version: serde_json::Value = serde_json::from_str(&ok(cluster, &["version", "-o", "json"]).await).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.37.2", "{version}");
    let livez = ok(cluster, &["get", "--raw", "/livez?verbose"]).await;
    assert!(livez.contains("[+]etcd ok"), "{livez}");

    // The CRDs, RBAC and the operator's Deployment, as a platform team installs them.
    let install = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/install.yaml");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/");
    ok(cluster, &["apply", "-f", install]).await;
    for crd in ["storagetiers", "retentionpolicies", "webhooks", "shardsets", "bluegreenreleases"] {
        ok(cluster, &["wait", "--for=condition=Established", "--timeout=60s", &format!("crd/{crd}.vellum.dev")]).await;
    }
    let account = "system:serviceaccount:vellum-system:vellum-operator";
    let can = |verb: &'static str, resource: &'static str, namespace: &'static str| async move {
        let out =
            cluster.kubectl(&["auth", "can-i", verb, resource, "-n", namespace, "--as", account], None).await.unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can("delete", "nodes", "default").await, "no");
    assert_eq!(can("get", "secrets", "kube-system").await, "yes", "the operator reads the Secrets resources refer to");
    assert_eq!(can("patch", "deployments.apps", "docs").await, "yes");
    assert_eq!(can("create", "leases.coordination.k8s.io", "vellum-system").await, "yes");
    assert_eq!(can("create", "clusterrolebindings.rbac.authorization.k8s.io", "default").await, "no");

    // Every example, judged by the API server's own schema and CEL checks.
    ok(cluster, &["create", "namespace", "docs"]).await;
    let applied = ok(cluster, &["apply", "-n", "docs", "-f", examples]).await;
    assert_eq!(applied.lines().filter(|l| l.contains(" created")).count(), applied.lines().count(), "{applied}");
    let listed = ok(cluster, &["get", "vellum", "-n", "docs", "-o", "name"]).await;
    for kind in ["storagetier", "retentionpolicy", "webhook", "shardset", "bluegreenrelease"] {
        assert!(listed.contains(&format!("{kind}.vellum.dev/")), "no {kind} in {listed}");
    }
    // A resource the CRD's rules refuse is refused by the server, naming the field.
    let bad = "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: bad}\nspec:\n  routing: {strategy: Range}\n  shards:\n  - {name: a, urlSecretRef: {name: s, key: a}}\n";
    let refused = cluster.kubectl(&["apply", "-n", "docs", "-f", "-"], Some(bad)).await.unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the server admitted a Range ShardSet without rangeStart");
    assert!(message.contains("spec.shards") && message.contains("rangeStart"), "{message}");
}

/// Every example and every bad resource of the CRD tests' table, judged by the API server
/// (a server-side dry run) and by the fast client-side check: the same verdict, and a
/// refusal names the same field.
async fn judges_as_the_client_side_check_does(cluster: &Cluster) {
    let mut disagreements = Vec::new();
    let mut judged = 0;
    let verdict = |object: serde_json::Value| async move {
        let out = cluster
            .kubectl(&["create", "--dry-run=server", "-n", "docs", "-f", "-"], Some(&object.to_string()))
            .await
            .unwrap();
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    };
    for (file, mut object) in judge::examples() {
        if object["kind"] == "Secret" {
            continue;
        }
        object["metadata"]["name"] = serde_json::json!(format!("verdict-{judged}"));
        judged += 1;
        let client = judge::validate(&object);
        let server = verdict(object.clone()).await;
        if !client.is_empty() || server.is_err() {
            disagreements.push(format!("{file} {}: client {client:?}, server {server:?}", object["kind"]));
        }
    }
    for case in judge::CASES {
        let mut object = judge::example(case.kind);
        (case.change)(&mut object);
        object["metadata"]["name"] = serde_json::json!(format!("verdict-{judged}"));
        judged += 1;
        let client = judge::validate(&object);
        let client_names_it = client.iter().any(|v| v.path == case.path);
        match verdict(object).await {
            Ok(()) => disagreements
                .push(format!("{} ({}): the server admitted it; the client refused {client:?}", case.name, case.kind)),
            Err(message) if !message.contains(case.path) || !client_names_it => disagreements.push(format!(
                "{} ({}): expected {}; server said {message}; client said {client:?}",
                case.name, case.kind, case.path
            )),
            Err(_) => {}
        }
    }
    assert!(judged > 40, "{judged} resources judged");
    assert!(disagreements.is_empty(), "{} disagreement(s):\n{}", disagreements.len(), disagreements.join("\n"));
}

/// The node runs the operator's pods; in-cluster, they lead, reconcile and hand over.
async fn runs_the_operator(cluster: &Cluster) {
    // The node: registered, Ready, its Lease renewed.
    let nodes = ok(cluster, &["get", "nodes", "-o", "name"]).await;
    let node = nodes.trim().trim_start_matches("node/").to_owned();
    let ready =
        ok(cluster, &["get", "node", &node, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]).await;
    assert_eq!(ready, "True");
    ok(cluster, &["-n", "kube-node-lease", "get", "lease", &node]).await;

    // The controllers act: the operator's Deployment gets a ReplicaSet and two pods, which
    // the scheduler binds to the node and the node runs, on addresses outside loopback.
    ok(cluster, &["-n", "vellum-system", "rollout", "status", "deployment/vellum-operator", "--timeout=90s"]).await;
    let selector = ["-n", "vellum-system", "get", "pods", "-l", "app.kubernetes.io/component=operator"];
    let ips = ok(cluster, &[&selector[..], &["-o", "jsonpath={.items[*].status.podIP}"]].concat()).await;
    let ips: Vec<std::net::Ipv4Addr> = ips.split_whitespace().map(|ip| ip.parse().unwrap()).collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips.iter().all(|ip| !ip.is_loopback() && ip.octets()[..2] == [10, 88]), "{ips:?}");

    // In-cluster, under its own ServiceAccount: one replica leads, and the examples get
    // the conditions only the operator writes.
    let lease =
        ["-n", "vellum-system", "get", "lease", "vellum-operator-leader", "-o", "jsonpath={.spec.holderIdentity}"];
    let holder = until(cluster, &lease, |h| !h.is_empty()).await;
    assert!(holder.starts_with("vellum-operator-"), "no leader: {holder:?}");
    let policy =
        ["-n", "docs", "get", "retentionpolicy", "standard-lifecycle", "-o", "jsonpath={.status.conditions[*].type}"];
    let conditions = until(cluster, &policy, |c| c.contains("Ready")).await;
    assert!(conditions.contains("Ready"), "the operator did not reconcile: {conditions:?}");
    // kubectl's own table of it: every column readable (a future time in a date column
    // would print as <invalid>).
    let table = until(cluster, &["-n", "docs", "get", "retentionpolicies"], |t| t.contains("T03:00:00Z")).await;
    assert!(!table.contains("<invalid>") && table.contains("T03:00:00Z"), "{table}");

    // `kubectl logs`: the API server asks the node's kubelet API for the leader's output.
    let logs = ok(cluster, &["-n", "vellum-system", "logs", &holder]).await;
    assert!(logs.contains("leading: starting the controllers"), "{logs}");
    // And the node's Events appear where `kubectl describe` looks.
    let about = format!("involvedObject.name={holder}");
    let events = ok(
        cluster,
        &["-n", "vellum-system", "get", "events", "--field-selector", &about, "-o", "jsonpath={.items[*].reason}"],
    )
    .await;
    assert!(events.contains("Started"), "{events}");

    // A deleted pod is stopped and removed, and its replacement takes over.
    ok(cluster, &["-n", "vellum-system", "delete", "pod", &holder, "--timeout=60s"]).await;
    let next = until(cluster, &lease, |h| !h.is_empty() && h != holder).await;
    assert_ne!(next, holder, "no replica took the lead over");
}

/// One rule less in the operator's ClusterRole: the reconcile that needs it ends in a
/// `Forbidden` condition naming what was refused, and the operator keeps running.
async fn says_what_it_may_not_do(cluster: &Cluster) {
    let mut role: serde_json::Value =
        serde_json::from_str(&ok(cluster, &["get", "clusterrole", "vellum-operator", "-o", "json"]).await).unwrap();
    let mut cut = false;
    for rule in role["rules"].as_array_mut().unwrap() {
        if rule["resources"].as_array().is_some_and(|r| r.iter().any(|r| r == "cronjobs")) {
            rule["verbs"].as_array_mut().unwrap().retain(|v| v != "patch" && v != "create");
            cut = true;
        }
    }
    assert!(cut, "the operator's ClusterRole has a rule for CronJobs: {role}");
    let replaced = cluster.kubectl(&["replace", "-f", "-"], Some(&role.to_string())).await.unwrap();
    assert!(replaced.status.success(), "{}", String::from_utf8_lossy(&replaced.stderr));

    let policy = "apiVersion: vellum.dev/v1alpha1\nkind: RetentionPolicy\nmetadata: {name: refused}\nspec:\n  selector: {tags: [temporary]}\n  expiration: {afterDays: 30, action: DELETE}\n  schedule: '0 3 * * *'\n";
    let applied = cluster.kubectl(&["apply", "-n", "docs", "-f", "-"], Some(policy)).await.unwrap();
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let reason = [
        "-n",
        "docs",
        "get",
        "retentionpolicy",
        "refused",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
    ];
    let said = until(cluster, &reason, |r| r == "Forbidden").await;
    assert_eq!(said, "Forbidden");
    let message = ok(
        cluster,
        &[
            "-n",
            "docs",
            "get",
            "retentionpolicy",
            "refused",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
        ],
    )
    .await;
    assert!(message.contains("cronjobs") && message.contains("vellum-operator"), "{message}");
    let events = ok(
        cluster,
        &[
            "-n",
            "docs",
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=refused",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
    )
    .await;
    assert!(events.contains("Forbidden"), "{events}");
    // Not a crash: no operator container restarted.
    let restarts = ok(
        cluster,
        &[
            "-n",
            "vellum-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
        ],
    )
    .await;
    assert!(restarts.split_whitespace().all(|n| n == "0"), "operator restarts: {restarts}");
}
