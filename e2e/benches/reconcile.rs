//! Reconcile throughput and latency of the operator at scale: 1,000 Webhooks and 100
//! BlueGreenReleases applied to one namespace of a local real control plane (built by
//! `scripts/cluster`), whose node marks pods ready (and Jobs' pods complete) without running
//! anything, against a real Postgres shard.
//!
//! Run with `cargo bench -p vellum-e2e --bench reconcile`. It runs the release build of
//! `vellum-operator` (building it first when it is missing) as its own process, and
//! prints, from one run:
//! - apply → `Ready` per resource (from a watch: when the object appeared,
//!   when its Ready condition first turned True), p50 and p99, and the time until all were
//!   Ready beside the time the API took to accept them (the ratio is the operator's cost
//!   over the bare writes);
//! - the operator's API requests (counted from the API server's audit log, by user: the
//!   operator runs with a client certificate of its own) per reconcile
//!   (counted by the operator's own metrics), and its requests per second once idle;
//! - the operator's resident memory, now and at its peak.
//!
//! `VELLUM_BENCH_WEBHOOKS` and `VELLUM_BENCH_RELEASES` change the counts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher;
use serde_json::Value;
use vellum_e2e::Cluster;
use vellum_testkit::TestDatabase;

#[path = "../tests/support/mod.rs"]
mod support;
use support::{built, kube_client, kubectl, repo};

const NAMESPACE: &str = "bench";
/// The operator's user, as the API server's audit log names it.
const OPERATOR_USER: &str = "vellum-bench-operator";

/// The release build of the operator beside this benchmark, built when missing (with the
/// local cluster's node, which `vellum_e2e::Cluster` finds beside it too).
fn operator_binary() -> PathBuf {
    built(true, &["vellum-operator", "vellum-node"]).join("vellum-operator")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// When each object of `plural` appeared and when its Ready condition first turned True,
/// from a watch that runs until the returned task is aborted.
type Times = std::sync::Arc<std::sync::Mutex<HashMap<String, (Instant, Option<Instant>)>>>;

fn watch(client: &kube::Client, kind: &str, plural: &str) -> (Times, tokio::task::JoinHandle<()>) {
    let times: Times = Times::default();
    let gvk = kube::api::GroupVersionKind::gvk("vellum.dev", "v1alpha1", kind);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &ApiResource::from_gvk_with_plural(&gvk, plural));
    let task = tokio::spawn({
        let times = times.clone();
        async move {
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) = event else { continue };
                let object = serde_json::to_value(&object).unwrap_or_default();
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let ready = object["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
                let mut times = times.lock().expect("the times");
                let entry = times.entry(name).or_insert((now, None));
                if ready && entry.1.is_none() {
                    entry.1 = Some(now);
                }
            }
        }
    });
    (times, task)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

/// Apply → Ready of every object, once all are Ready (or `limit` passed).
async fn ready_times(times: &Times, expected: usize, limit: Duration) -> (Vec<Duration>, Option<Instant>) {
    let deadline = Instant::now() + limit;
    loop {
        {
            let times = times.lock().expect("the times");
            let ready: Vec<(Instant, Instant)> =
                times.values().filter_map(|(seen, ready)| ready.map(|r| (*seen, r))).collect();
            if ready.len() >= expected || Instant::now() > deadline {
                let mut latencies: Vec<Duration> = ready.iter().map(|(s, r)| r.duration_since(*s)).collect();
                latencies.sort();
                let last = ready.iter().map(|(_, r)| *r).max();
                if ready.len() < expected {
                    println!("  only {} of {expected} were Ready within {limit:?}", ready.len());
                }
                return (latencies, last);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's reconciles so far, summed over its controllers.
async fn reconciles(metrics: &str) -> u64 {
    let Ok(response) = reqwest::get(metrics).await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("vellum_operator_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = v as u64;
            n
        })
        .sum()
}

/// Requests to the API server so far, by user, from its audit log (each request once).
fn requests_by_user(audit: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut by_user = HashMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
        let id = event["auditID"].as_str().unwrap_or_default().to_owned();
        if seen.insert(id) {
            *by_user.entry(event["user"]["username"].as_str().unwrap_or_default().to_owned()).or_insert(0) += 1;
        }
    }
    by_user
}

fn operator_requests(audit: &Path) -> u64 {
    requests_by_user(audit).get(OPERATOR_USER).copied().unwrap_or(0)
}

/// Resident and peak resident memory of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn platform(database_url: &str) -> String {
    format!(
        r"
apiVersion: v1
kind: Secret
metadata: {{name: platform-secrets}}
stringData:
  shard-a: '{database_url}'
  hs256: 'a-benchmark-hs256-secret-of-at-least-32-bytes'
  hook: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {{name: hot}}
spec: {{class: HOT, default: true, backend: {{url: 'memory://'}}}}
---
apiVersion: vellum.dev/v1alpha1
kind: ShardSet
metadata: {{name: metadata}}
spec:
  shards:
    - name: shard-a
      urlSecretRef: {{name: platform-secrets, key: shard-a}}
"
    )
}

fn webhooks(n: usize) -> String {
    use std::fmt::Write as _;
    (0..n).fold(String::new(), |mut yaml, i| {
        let _ = write!(
            yaml,
            "apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: hook-{i:04}}}\n\
             spec: {{url: 'https://93.184.215.14/hooks/{i}', secretRef: {{name: platform-secrets, key: hook}}}}\n---\n"
        );
        yaml
    })
}

fn releases(n: usize) -> String {
    use std::fmt::Write as _;
    (0..n).fold(String::new(), |mut yaml, i| {
        let _ = write!(
            yaml,
            "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {{name: release-{i:03}}}\nspec:\n  \
             version: 1.0.0\n  gateway: {{image: 'vellum/gateway:1.0.0', replicas: 1}}\n  \
             workers: {{image: 'vellum/workers:1.0.0', replicas: 1}}\n  shardSetRef: metadata\n  \
             nats: {{url: 'nats://127.0.0.1:4222'}}\n  jwt: {{secretRef: {{name: platform-secrets, key: hs256}}}}\n---\n"
        );
        yaml
    })
}

fn report(what: &str, latencies: &[Duration]) {
    println!(
        "  {what:<22} {:>5} Ready   apply→Ready p50 {:>8.1} ms   p99 {:>8.1} ms",
        latencies.len(),
        percentile(latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(latencies, 0.99).as_secs_f64() * 1000.0,
    );
}

#[allow(clippy::too_many_lines)] // one run, in order
#[allow(clippy::cast_precision_loss)]
async fn bench() {
    let (n_hooks, n_releases) = (count("VELLUM_BENCH_WEBHOOKS", 1000), count("VELLUM_BENCH_RELEASES", 100));
    let operator = operator_binary();
    let database = TestDatabase::new().await.expect("a Postgres database");
    // The schema the releases' migration Jobs would create, were they running anything.
    vellum_core::store::Metadata::open(&database.url).await.expect("the schema");
    let cluster = Cluster::start_with(&[], &[("VELLUM_NODE_KWOK", "1"), ("VELLUM_CLUSTER_AUDIT", "1")])
        .await
        .expect("a local cluster (scripts/cluster)");
    let audit = cluster.dir().expect("a local cluster").join("audit.log");
    let client = kube_client(&cluster).await;
    let operator_kubeconfig = cluster.user(OPERATOR_USER, Some("system:masters")).await.expect("the operator's user");
    let crds = repo().join("manifests/crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().expect("a UTF-8 path")], None).await;
    kubectl(&cluster, &["wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"], None).await;
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n");
    kubectl(&cluster, &["apply", "-f", "-"], Some(&namespace)).await;
    kubectl(&cluster, &["apply", "-n", NAMESPACE, "-f", "-"], Some(&platform(&database.url))).await;

    let port = free_port();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let mut child = tokio::process::Command::new(&operator)
        .args(["run", "--metrics-listen", &format!("127.0.0.1:{port}"), "--lease-namespace", NAMESPACE])
        .env("KUBECONFIG", &operator_kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the operator starts");
    let pid = child.id().expect("the operator's pid");
    let (tiers, _tiers_watch) = watch(&client, "StorageTier", "storagetiers");
    let (sets, _sets_watch) = watch(&client, "ShardSet", "shardsets");
    let _ = ready_times(&tiers, 1, Duration::from_secs(60)).await;
    let _ = ready_times(&sets, 1, Duration::from_secs(60)).await;
    let (rss_idle, _) = memory(pid);

    println!(
        "reconcile: {n_hooks} Webhooks and {n_releases} BlueGreenReleases in one namespace, pods kwok-ready, one Postgres shard"
    );
    let (hook_times, _hook_watch) = watch(&client, "Webhook", "webhooks");
    let (release_times, _release_watch) = watch(&client, "BlueGreenRelease", "bluegreenreleases");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (requests_before, reconciles_before) = (operator_requests(&audit), reconciles(&metrics).await);
    let started = Instant::now();
    kubectl(&cluster, &["apply", "-n", NAMESPACE, "-f", "-"], Some(&webhooks(n_hooks))).await;
    let hooks_written = started.elapsed();
    kubectl(&cluster, &["apply", "-n", NAMESPACE, "-f", "-"], Some(&releases(n_releases))).await;
    let all_written = started.elapsed();
    let limit = Duration::from_secs(900);
    let (hook_latencies, hooks_done) = ready_times(&hook_times, n_hooks, limit).await;
    let (release_latencies, releases_done) = ready_times(&release_times, n_releases, limit).await;
    let all_ready = hooks_done.into_iter().chain(releases_done).max().map_or(limit, |t| t.duration_since(started));
    let (requests, reconciled) =
        (operator_requests(&audit) - requests_before, reconciles(&metrics).await - reconciles_before);
    let (rss, peak) = memory(pid);

    report("Webhook", &hook_latencies);
    report("BlueGreenRelease", &release_latencies);
    println!(
        "  all Ready after {:.2} s; the API accepted them in {:.2} s (Webhooks alone {:.2} s): ratio {:.2}",
        all_ready.as_secs_f64(),
        all_written.as_secs_f64(),
        hooks_written.as_secs_f64(),
        all_ready.as_secs_f64() / all_written.as_secs_f64(),
    );
    println!(
        "  throughput {:.1} resources/s to Ready",
        (hook_latencies.len() + release_latencies.len()) as f64 / all_ready.as_secs_f64()
    );
    println!(
        "  operator API requests {requests} over {reconciled} reconciles: {:.2} requests per reconcile",
        requests as f64 / reconciled.max(1) as f64
    );
    let (idle_before, idle_reconciles) = (operator_requests(&audit), reconciles(&metrics).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = operator_requests(&audit) - idle_before;
    let idle_reconciles = reconciles(&metrics).await - idle_reconciles;
    println!(
        "  once settled: {:.1} requests/s, {:.1} reconciles/s (resyncs, no hot loop)",
        idle as f64 / 10.0,
        idle_reconciles as f64 / 10.0
    );
    if std::env::var("VELLUM_BENCH_DEBUG").is_ok() {
        let text = reqwest::get(&metrics).await.expect("metrics").text().await.unwrap_or_default();
        text.lines().filter(|l| l.starts_with("vellum_operator_reconcile")).for_each(|l| println!("    {l}"));
    }
    println!("  operator memory: {rss:.1} MiB resident ({rss_idle:.1} MiB before the resources), peak {peak:.1} MiB");
    let mut users: Vec<(String, u64)> = requests_by_user(&audit).into_iter().collect();
    users.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    println!("  API requests by user: {users:?}");
    let _ = child.kill().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(bench());
}
