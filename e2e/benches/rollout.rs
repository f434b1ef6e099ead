//! How fast blue-green rollouts move traffic, on a local real control plane (built by
//! `scripts/cluster`) running the workspace's gateway, workers and operator against real
//! Postgres, NATS and S3, while a client keeps listing and downloading through the active
//! Service, each request on a new connection.
//!
//! Run with `cargo bench -p vellum-e2e --bench rollout`. It runs the debug binaries the
//! tests run (building them when missing): the times measured are Kubernetes' propagation
//! and the operator's steps, and the broken version's fault injection exists only in debug
//! builds. It prints, from one run:
//! - **switch**: from the switch decided (phase `Switching` recorded, the new color ready
//!   and smoke-checked) to every ready endpoint of the active Service being the new color's,
//!   beside the same move done bare (a Service's selector patched with kubectl, until its
//!   EndpointSlices list only the other color): the physical limit of the cluster. Goal under
//!   5 s; Flagger steps once a minute.
//! - the client's failed requests during the switch and during the whole rollout (goal 0);
//! - **rollback**: from the failed analysis (phase `RollingBack` recorded) to every active
//!   endpoint back on the old color (goal under 5 s);
//! - **plugin promote**: from `kubectl vellum promote` to every active endpoint on the new
//!   color (goal under 5 s).

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use tokio::time::Instant;
use vellum_e2e::Cluster;
use vellum_testkit::{TestBucket, TestDatabase};

#[path = "../tests/support/mod.rs"]
mod support;
use support::{
    Images, active_base, built, client, eventually, install_operator, kube_client, kubectl, phase_watch, platform,
    ready, receiver, token,
};

/// Flagger's default analysis interval: it moves traffic one step a minute.
const FLAGGER_STEP: Duration = Duration::from_secs(60);
const GOAL: Duration = Duration::from_secs(5);

/// Whether every ready endpoint of `service` is a gateway pod of `color` (and there is one).
async fn all_on(client: &kube::Client, service: &str, color: &str) -> bool {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "docs");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "docs");
    let by_service = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let of_color = ListParams::default().labels(&format!(
        "app.kubernetes.io/component=gateway,app.kubernetes.io/instance=docs,vellum.dev/color={color}"
    ));
    let (Ok(slices), Ok(pods)) = (slices.list(&by_service).await, pods.list(&of_color).await) else { return false };
    let ips: HashSet<String> = pods.items.into_iter().filter_map(|p| p.status?.pod_ip).collect();
    let ready: Vec<String> = slices
        .items
        .into_iter()
        .flat_map(|s| s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses)
        .collect();
    !ready.is_empty() && ready.iter().all(|a| ips.contains(a))
}

/// Polls every 20 ms until every ready endpoint of `service` is `color`'s: when that was.
async fn until_all_on(client: &kube::Client, service: &str, color: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !all_on(client, service, color).await {
        assert!(Instant::now() < deadline, "{service} never came to list only {color}'s pods");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Instant::now()
}

/// Waits for the watch to report `phase`: when it did.
async fn reached(watched: &mut tokio::sync::mpsc::UnboundedReceiver<String>, phase: &str) -> Instant {
    let wait = async {
        while let Some(seen) = watched.recv().await {
            if seen == phase {
                return Instant::now();
            }
        }
        panic!("the phase watch ended before {phase}");
    };
    tokio::time::timeout(Duration::from_secs(240), wait).await.unwrap_or_else(|_| panic!("no {phase} within 240 s"))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-3)
}

/// Failures of the client between `from` and `to`.
fn failed_between(failed: &[(Instant, String)], from: Instant, to: Instant) -> usize {
    failed.iter().filter(|(at, _)| *at >= from && *at <= to).count()
}

fn main() {
    // The debug binaries (as the tests run them), built when missing.
    let packages = ["vellum-operator", "vellum-gateway", "vellum-workers", "vellum-node", "kubectl-vellum"];
    vellum_e2e::use_binaries_from(built(false, &packages));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(Box::pin(run()));
}

#[allow(clippy::too_many_lines)] // the rollouts, in order
async fn run() {
    let images = Images::new();
    let cluster = Cluster::start(&images.as_slice()).await.expect("the local cluster");
    let database = TestDatabase::new().await.expect("a database");
    let bucket = TestBucket::new().await.expect("a bucket");
    let (hook, _deliveries) = receiver(&cluster).await;
    install_operator(&cluster).await;
    kubectl(&cluster, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: docs}\n")).await;
    // The old color is kept ten minutes after each promotion: the bare switch below moves a
    // Service between two colors that both run.
    let version = |v: &str, mode: &str, window: u32| {
        platform(&database.url, &bucket, &hook, "0.023")
            .replace(
                "version: 1.0.0",
                &format!(
                    "version: {v}\n  analysis: {{windowSeconds: {window}}}\n  promotion: {{mode: {mode}, scaleDownDelaySeconds: 600}}"
                ),
            )
            .replace(":1.0.0'", &format!(":{v}'"))
    };
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.0.0", "Auto", 5))).await;
    eventually(Duration::from_secs(180), "the platform ready", || ready(&cluster, "bgr/docs", "docs")).await;
    let base = active_base(&cluster).await;
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(b"benchmark".to_vec()).file_name("bench.txt"));
    let uploaded = reqwest::Client::new()
        .post(format!("{base}/api/v1/documents"))
        .bearer_auth(token())
        .multipart(form)
        .send()
        .await
        .expect("an upload");
    let document_id = uploaded.json::<serde_json::Value>().await.expect("the document")["id"].as_i64().expect("its id");
    let api = kube_client(&cluster).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(client(base.clone(), token(), document_id, stopped));

    // 1. A rollout promoted automatically: 1.1.0 as green.
    let mut watched = phase_watch(&cluster).await;
    let began = Instant::now();
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.1.0", "Auto", 5))).await;
    let decided = reached(&mut watched, "Switching").await;
    let switched = until_all_on(&api, "docs", "green").await;
    let analyzing = reached(&mut watched, "Analyzing").await;
    let promoted = reached(&mut watched, "Stable").await;
    let switch = switched - decided;

    // 2. A broken version (30 % of its API answers 500) rolled back by its analysis.
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.2.0-broken", "Auto", 120))).await;
    let broken_serving = reached(&mut watched, "Analyzing").await;
    let failed_analysis = reached(&mut watched, "RollingBack").await;
    let back = until_all_on(&api, "docs", "green").await;
    let rolled_back = reached(&mut watched, "Stable").await;
    let rollback = back - failed_analysis;

    // 3. A manual rollout promoted with the kubectl plugin: 1.3.0 as blue.
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.3.0", "Manual", 5))).await;
    reached(&mut watched, "AwaitingPromotion").await;
    let asked = Instant::now();
    kubectl(&cluster, &["vellum", "-n", "docs", "promote", "bgr/docs"], None).await;
    let on_blue = until_all_on(&api, "docs", "blue").await;
    let manual_done = reached(&mut watched, "Stable").await;
    let promote = on_blue - asked;
    stop.send_replace(true);
    let (sent, failed) = traffic.await.expect("the client");

    // 4. The same move done bare: a Service of both colors' gateway pods, its selector
    // patched from one color to the other (green, kept after the promotion, and blue).
    let bare_service = |color: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bare}}\nspec:\n  ports: [{{port: 80, targetPort: 8080}}]\n  selector:\n    \
             app.kubernetes.io/component: gateway\n    app.kubernetes.io/instance: docs\n    vellum.dev/color: {color}\n"
        )
    };
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&bare_service("green"))).await;
    until_all_on(&api, "bare", "green").await;
    let mut bare_times = Vec::new();
    for color in ["blue", "green", "blue", "green", "blue"] {
        let patched = Instant::now();
        let patch = format!("{{\"spec\":{{\"selector\":{{\"vellum.dev/color\":\"{color}\"}}}}}}");
        kubectl(&cluster, &["-n", "docs", "patch", "service/bare", "-p", &patch], None).await;
        bare_times.push(until_all_on(&api, "bare", color).await - patched);
    }
    bare_times.sort_unstable();
    let bare_switch = bare_times[bare_times.len() / 2];

    println!("blue-green rollouts on a local control plane, one client throughout ({sent} requests):");
    println!(
        "  switch, decided -> every active endpoint on green: {} | bare selector patch -> endpoints (median of {}): {} | ratio {:.2} | goal {} ({:.2} of it) | Flagger's step {} ({:.3} of it)",
        secs(switch),
        bare_times.len(),
        secs(bare_switch),
        ratio(switch, bare_switch),
        secs(GOAL),
        ratio(switch, GOAL),
        secs(FLAGGER_STEP),
        ratio(switch, FLAGGER_STEP),
    );
    println!(
        "  failed requests: {} during the switch, {} during the whole rollout of 1.1.0 ({} from apply to Stable) (goal 0)",
        failed_between(&failed, decided, analyzing),
        failed_between(&failed, began, promoted),
        secs(promoted - began),
    );
    println!(
        "  rollback, failed analysis -> every active endpoint back on green: {} | ratio to the bare switch {:.2} | goal {} ({:.2} of it); the broken version served {} before its analysis failed, and {} requests failed in all (its 500s)",
        secs(rollback),
        ratio(rollback, bare_switch),
        secs(GOAL),
        ratio(rollback, GOAL),
        secs(failed_analysis - broken_serving),
        failed_between(&failed, broken_serving, rolled_back),
    );
    println!(
        "  kubectl vellum promote -> every active endpoint on blue: {} | ratio to the bare switch {:.2} | goal {} ({:.2} of it); {} requests failed from the promote to Stable",
        secs(promote),
        ratio(promote, bare_switch),
        secs(GOAL),
        ratio(promote, GOAL),
        failed_between(&failed, asked, manual_done),
    );
}
