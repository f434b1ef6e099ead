//! Live resharding on the cluster, under continuous traffic: a platform on one metadata
//! shard grows to three by a `kubectl apply` of its ShardSet, then shrinks to two. The
//! operator publishes each move, waits for the gateways to load it, runs the resharding Job
//! and flips the routing; clients uploading, downloading, adding versions, updating
//! metadata and listing through the active Service all the while see no failed request,
//! and afterwards every acknowledged document downloads byte-exact with its whole version
//! history, each shard holding exactly the documents the routing sends it.
//!
//! The local cluster's node runs the workspace's own binaries as the images: build them
//! first (`cargo test --workspace` does).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vellum_core::config::{SecretHandle, ShardConfig, ShardsConfig};
use vellum_core::routing::RoutingTable;
use vellum_e2e::Cluster;
use vellum_testkit::{TestBucket, TestDatabase};

mod support;
use support::*;

/// What the clients were told: every version's bytes, by document, and the last title.
#[derive(Default)]
struct Acknowledged {
    versions: BTreeMap<i64, Vec<Vec<u8>>>,
    titles: BTreeMap<i64, String>,
    requests: u64,
    failures: Vec<String>,
}

/// One client's loop until `stopped`: an upload, a download of an earlier document, a new
/// version or a metadata update of one, and a listing, over and over.
async fn traffic(base: String, acknowledged: Arc<Mutex<Acknowledged>>, stopped: tokio::sync::watch::Receiver<bool>) {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let token = token();
    let mut n = 0u64;
    // This client's own documents: only it changes them, so the order it was answered in is
    // the order the changes were made in.
    let mut mine: Vec<i64> = Vec::new();
    while !*stopped.borrow() {
        n += 1;
        let fail = |what: String| {
            let mut ack = acknowledged.lock().unwrap();
            ack.failures.push(what);
        };
        let body = format!("document {n} of the resharding client").into_bytes();
        let form = reqwest::multipart::Form::new()
            .part("file", reqwest::multipart::Part::bytes(body.clone()).file_name(format!("r{n}.txt")));
        match http.post(format!("{base}/api/v1/documents")).bearer_auth(&token).multipart(form).send().await {
            Ok(r) if r.status() == 201 => {
                let doc: Value = r.json().await.unwrap_or_default();
                if let Some(id) = doc["id"].as_i64() {
                    acknowledged.lock().unwrap().versions.insert(id, vec![body]);
                    mine.push(id);
                }
            }
            Ok(r) => fail(format!("upload: {} {}", r.status(), r.text().await.unwrap_or_default())),
            Err(e) => fail(format!("upload: {e}")),
        }
        if mine.is_empty() {
            continue;
        }
        let id = mine[usize::try_from(n * 7).unwrap() % mine.len()];
        let expected = acknowledged.lock().unwrap().versions[&id].last().cloned().unwrap();
        match http.get(format!("{base}/api/v1/documents/{id}/download")).bearer_auth(&token).send().await {
            Ok(r) if r.status().is_success() => {
                let bytes = r.bytes().await.unwrap_or_default();
                if bytes.as_ref() != expected.as_slice() {
                    fail(format!("download of {id}: other bytes"));
                }
            }
            Ok(r) => fail(format!("download of {id}: {}", r.status())),
            Err(e) => fail(format!("download of {id}: {e}")),
        }
        if n.is_multiple_of(2) {
            let version = format!("version {n} of {id}").into_bytes();
            let sent = http
                .post(format!("{base}/api/v1/documents/{id}/versions"))
                .bearer_auth(&token)
                .header("X-Filename", "next.txt")
                .body(version.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    acknowledged.lock().unwrap().versions.get_mut(&id).unwrap().push(version);
                }
                Ok(r) => fail(format!("new version of {id}: {}", r.status())),
                Err(e) => fail(format!("new version of {id}: {e}")),
            }
        } else {
            let title = format!("title {n}");
            let sent = http
                .patch(format!("{base}/api/v1/documents/{id}"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"title": title}))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    acknowledged.lock().unwrap().titles.insert(id, title);
                }
                Ok(r) => fail(format!("update of {id}: {}", r.status())),
                Err(e) => fail(format!("update of {id}: {e}")),
            }
        }
        match http.get(format!("{base}/api/v1/documents?limit=20")).bearer_auth(&token).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => fail(format!("listing: {}", r.status())),
            Err(e) => fail(format!("listing: {e}")),
        }
        acknowledged.lock().unwrap().requests += 4;
    }
}

/// The ShardSet `metadata` over `shards` (each a key of the Secret `shard-urls`, but
/// `shard-a`, which is in `platform-secrets`), ConsistentHash with the default nodes.
fn shard_set(shards: &[&str]) -> String {
    let mut yaml =
        "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: metadata}\nspec:\n  shards:\n".to_owned();
    for name in shards {
        let secret = if *name == "shard-a" { "platform-secrets" } else { "shard-urls" };
        writeln!(yaml, "    - name: {name}\n      urlSecretRef: {{name: {secret}, key: {name}}}").unwrap();
    }
    yaml
}

/// The routing of [`shard_set`].
fn routing(shards: &[&str]) -> RoutingTable {
    RoutingTable::build(&ShardsConfig {
        shard_set: "metadata".into(),
        shards: shards
            .iter()
            .map(|n| ShardConfig { name: (*n).into(), url: SecretHandle::new("x", n), weight: 1, range_start: None })
            .collect(),
        routing: vellum_crds::shard_set::Routing::default(),
        resharding: vellum_crds::shard_set::ReshardingPace::default(),
    })
    .unwrap()
}

/// Waits until the published config routes by `table` alone and the ShardSet reports the
/// move complete; returns the ShardSet.
async fn resharded(cluster: &Cluster, table: &RoutingTable) -> Value {
    eventually(Duration::from_secs(240), "the move complete", || async {
        let set = get_json(cluster, &["-n", "docs", "get", "shardset/metadata"]).await;
        let cm = get_json(cluster, &["-n", "docs", "get", "configmap/docs-platform"]).await;
        let config: Value =
            serde_json::from_str(cm["data"]["platform.json"].as_str().unwrap_or("{}")).unwrap_or_default();
        let names: Vec<&str> =
            config["shards"]["shards"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
        let in_force = names == table.names().iter().map(String::as_str).collect::<Vec<_>>();
        if in_force && config.get("shardMove").is_none() && set["status"]["rebalance"]["phase"] == "Complete" {
            Ok(set)
        } else {
            Err(format!(
                "config shards {names:?}, move {}, rebalance {}",
                config["shardMove"], set["status"]["rebalance"]
            ))
        }
    })
    .await
}

/// The document ids each database holds.
async fn held(databases: &[&TestDatabase]) -> Vec<Vec<i64>> {
    let mut all = Vec::new();
    for db in databases {
        let pool = db.pool().await.unwrap();
        all.push(sqlx::query_scalar("SELECT id FROM documents").fetch_all(&pool).await.unwrap());
        pool.close().await;
    }
    all
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one platform's resharding, in order
async fn a_live_platform_grows_to_three_shards_and_shrinks_to_two_without_a_failed_request() {
    let images = Images::new();
    let cluster = Cluster::start(&images.as_slice()).await.unwrap();
    let (a, b, c) =
        (TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap());
    let bucket = TestBucket::new().await.unwrap();
    let (hook, _deliveries) = receiver(&cluster).await;
    install_operator(&cluster).await;
    kubectl(&cluster, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: docs}\n")).await;
    let urls = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shard-urls}}\nstringData:\n  shard-b: '{}'\n  shard-c: '{}'\n",
        b.url, c.url
    );
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&urls)).await;
    let yaml = platform(&a.url, &bucket, &hook, "0.023");
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&yaml)).await;
    for resource in ["shardset/metadata", "bluegreenrelease/docs"] {
        eventually(Duration::from_secs(120), resource, || ready(&cluster, resource, "docs")).await;
    }
    let base = active_base(&cluster).await;

    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> =
        (0..2).map(|_| tokio::spawn(traffic(base.clone(), Arc::clone(&acknowledged), stopped.clone()))).collect();
    eventually(Duration::from_secs(60), "documents before the move", || {
        let n = acknowledged.lock().unwrap().versions.len();
        async move { if n >= 30 { Ok(()) } else { Err(format!("{n} documents")) } }
    })
    .await;

    // 1 -> 3.
    let three = routing(&["shard-a", "shard-b", "shard-c"]);
    let started = tokio::time::Instant::now();
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&shard_set(&["shard-a", "shard-b", "shard-c"]))).await;
    let set = resharded(&cluster, &three).await;
    let grow = started.elapsed();
    let rebalance = &set["status"]["rebalance"];
    assert_eq!(rebalance["percent"], 100.0, "{rebalance}");
    let table = kubectl(&cluster, &["-n", "docs", "get", "shardset/metadata"], None).await;
    assert!(table.contains("Complete"), "kubectl get prints the rebalance phase:\n{table}");
    let events =
        kubectl(&cluster, &["-n", "docs", "get", "events", "--field-selector", "involvedObject.name=metadata"], None)
            .await;
    for reason in ["ReshardingAnnouncing", "ReshardingMoving", "ReshardingComplete"] {
        assert!(events.contains(reason), "an Event {reason} on the ShardSet:\n{events}");
    }

    // 3 -> 2: shard-c leaves.
    let two = routing(&["shard-a", "shard-b"]);
    let started = tokio::time::Instant::now();
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&shard_set(&["shard-a", "shard-b"]))).await;
    resharded(&cluster, &two).await;
    let shrink = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send_replace(true);
    for client in clients {
        client.await.unwrap();
    }

    let ack = std::mem::take(&mut *acknowledged.lock().unwrap());
    eprintln!(
        "1 -> 3 shards in {:.1} s, 3 -> 2 in {:.1} s; {} requests, {} failed; {} documents",
        grow.as_secs_f64(),
        shrink.as_secs_f64(),
        ack.requests,
        ack.failures.len(),
        ack.versions.len()
    );
    if !ack.failures.is_empty() {
        // What the gateways said about it.
        let logs = kubectl(
            &cluster,
            &["-n", "docs", "logs", "-l", "app.kubernetes.io/component=gateway", "--tail=-1", "--prefix"],
            None,
        )
        .await;
        for line in logs.lines().filter(|l| l.contains("ERROR") || l.contains("WARN")) {
            eprintln!("{line}");
        }
    }
    assert!(ack.failures.is_empty(), "{} of {} requests failed: {:#?}", ack.failures.len(), ack.requests, ack.failures);
    // Each shard holds exactly what the routing sends it; shard-c holds nothing.
    let on = held(&[&a, &b, &c]).await;
    assert!(on[2].is_empty(), "shard-c left with documents: {:?}", on[2]);
    for (index, ids) in on[..2].iter().enumerate() {
        for id in ids {
            assert_eq!(two.shard_of_id(*id), index, "document {id} is on {}", two.names()[index]);
        }
    }
    assert!(!on[1].is_empty(), "shard-b holds documents");
    // Every acknowledged document, with its whole history, byte-exact.
    let http = reqwest::Client::new();
    for (id, versions) in &ack.versions {
        let history: Value = http
            .get(format!("{base}/api/v1/documents/{id}/versions"))
            .bearer_auth(token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let listed = history["versions"].as_array().map_or(0, Vec::len);
        assert_eq!(listed, versions.len(), "document {id}'s versions: {history}");
        for (n, bytes) in versions.iter().enumerate() {
            let got = http
                .get(format!("{base}/api/v1/documents/{id}/versions/{}/content", n + 1))
                .bearer_auth(token())
                .send()
                .await
                .unwrap();
            assert_eq!(got.status(), 200, "document {id} version {}", n + 1);
            assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice(), "document {id} version {}", n + 1);
        }
        if let Some(title) = ack.titles.get(id) {
            let doc: Value = http
                .get(format!("{base}/api/v1/documents/{id}"))
                .bearer_auth(token())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(doc["title"], title.as_str(), "document {id}'s last title");
        }
    }
}
