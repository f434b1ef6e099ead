//! Live resharding on the cluster, under continuous traffic: a platform on one metadata
//! shard grows to three by a `kubectl apply` of its ShardSet, then shrinks to two. The
//! operator publishes each move, waits for the gateways to load it, runs the resharding Job
//! and flips the routing; clients uploading, downloading, adding versions, updating
//! metadata and listing through the active Service all the while see no failed request,
//! and afterwards every acknowledged document downloads byte-exact with its whole version
//! history, each shard holding exactly the documents the routing sends it. Chunked and tus
//! uploads open across both moves go on through them. The first move's Job pod is killed
//! mid-copy, and the operator's leader is killed while the second move's routing flips:
//! each move still completes, nothing moved twice and nothing lost.
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
    /// Answers of 429 (the user over the platform's rate limit), waited out and sent again
    /// as a client does: not failures, and counted apart.
    throttled: u64,
}

/// [`within_limits`], counting the 429s in `acknowledged`.
async fn send_within_limits(
    acknowledged: &Mutex<Acknowledged>,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Result<reqwest::Response> {
    let (answer, throttled) = within_limits(make).await;
    acknowledged.lock().unwrap().throttled += throttled;
    answer
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
        let form = || {
            reqwest::multipart::Form::new()
                .part("file", reqwest::multipart::Part::bytes(body.clone()).file_name(format!("r{n}.txt")))
        };
        match send_within_limits(&acknowledged, || {
            http.post(format!("{base}/api/v1/documents")).bearer_auth(&token).multipart(form())
        })
        .await
        {
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
        match send_within_limits(&acknowledged, || {
            http.get(format!("{base}/api/v1/documents/{id}/download")).bearer_auth(&token)
        })
        .await
        {
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
            let sent = send_within_limits(&acknowledged, || {
                http.post(format!("{base}/api/v1/documents/{id}/versions"))
                    .bearer_auth(&token)
                    .header("X-Filename", "next.txt")
                    .body(version.clone())
            })
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
            let sent = send_within_limits(&acknowledged, || {
                http.patch(format!("{base}/api/v1/documents/{id}"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"title": title}))
            })
            .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    acknowledged.lock().unwrap().titles.insert(id, title);
                }
                Ok(r) => fail(format!("update of {id}: {}", r.status())),
                Err(e) => fail(format!("update of {id}: {e}")),
            }
        }
        match send_within_limits(&acknowledged, || {
            http.get(format!("{base}/api/v1/documents?limit=20")).bearer_auth(&token)
        })
        .await
        {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => fail(format!("listing: {}", r.status())),
            Err(e) => fail(format!("listing: {e}")),
        }
        acknowledged.lock().unwrap().requests += 4;
    }
}

/// The ShardSet `metadata` over `shards` (each a key of the Secret `shard-urls`, but
/// `shard-a`, which is in `platform-secrets`), ConsistentHash with the default nodes, moving
/// documents at the `pace` given (`{batchSize: …, documentsPerSecond: …}`), if any.
fn shard_set(shards: &[&str], pace: Option<&str>) -> String {
    let mut yaml =
        "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: metadata}\nspec:\n  shards:\n".to_owned();
    for name in shards {
        let secret = if *name == "shard-a" { "platform-secrets" } else { "shard-urls" };
        writeln!(yaml, "    - name: {name}\n      urlSecretRef: {{name: {secret}, key: {name}}}").unwrap();
    }
    if let Some(pace) = pace {
        writeln!(yaml, "  resharding: {pace}").unwrap();
    }
    yaml
}

/// Chunked sessions and tus uploads open across the moves: each gets a third of its bytes
/// before the first move, between the moves and after the second, then becomes a document.
struct OpenUploads {
    chunked: Vec<String>,
    tus: Vec<String>,
}

/// The 12 bytes of open upload `i`, and its part `n` (of 3).
fn upload_bytes(i: usize) -> Vec<u8> {
    format!("upload {i:04}.").into_bytes()[..12].to_vec()
}

fn upload_part(i: usize, n: usize) -> Vec<u8> {
    upload_bytes(i)[n * 4..n * 4 + 4].to_vec()
}

impl OpenUploads {
    /// Opens `n` chunked sessions and `n` tus uploads, each with its first part.
    async fn open(base: &str, n: usize) -> Self {
        let http = reqwest::Client::new();
        let mut uploads = Self { chunked: Vec::new(), tus: Vec::new() };
        for i in 0..n {
            let session: Value = http
                .post(format!("{base}/api/v1/upload/initiate"))
                .bearer_auth(token())
                .json(&serde_json::json!({"filename": format!("open-{i}.bin"), "totalSize": 12, "chunkSize": 4}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            uploads.chunked.push(session["sessionId"].as_str().expect("a session id").to_owned());
            let created = http
                .post(format!("{base}/api/v1/tus"))
                .bearer_auth(token())
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Length", "12")
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            let location = created.headers()["location"].to_str().unwrap();
            uploads.tus.push(location.rsplit('/').next().unwrap().to_owned());
        }
        uploads.send(base, 0, &Mutex::default()).await;
        uploads
    }

    /// Sends part `n` of every upload; the last part completes them. The traffic's user
    /// sends them, so a 429 is waited out as the traffic's clients do.
    async fn send(&self, base: &str, n: usize, acknowledged: &Mutex<Acknowledged>) -> Vec<String> {
        let http = reqwest::Client::new();
        let mut failures = Vec::new();
        for (i, id) in self.chunked.iter().enumerate() {
            let r = send_within_limits(acknowledged, || {
                http.put(format!("{base}/api/v1/upload/{id}/chunk/{n}")).bearer_auth(token()).body(upload_part(i, n))
            })
            .await
            .unwrap();
            if r.status() != 200 {
                failures.push(format!("chunk {n} of session {id}: {} {}", r.status(), r.text().await.unwrap()));
            }
        }
        for (i, id) in self.tus.iter().enumerate() {
            let r = send_within_limits(acknowledged, || {
                http.patch(format!("{base}/api/v1/tus/{id}"))
                    .bearer_auth(token())
                    .header("Tus-Resumable", "1.0.0")
                    .header("Upload-Offset", (n * 4).to_string())
                    .header("Content-Type", "application/offset+octet-stream")
                    .body(upload_part(1000 + i, n))
            })
            .await
            .unwrap();
            if r.status() != 204 {
                failures.push(format!("part {n} of tus upload {id}: {} {}", r.status(), r.text().await.unwrap()));
            }
        }
        failures
    }

    /// Completes the chunked sessions; every upload's document downloads byte-exact.
    async fn check_completed(&self, base: &str, acknowledged: &Mutex<Acknowledged>) {
        let http = reqwest::Client::new();
        let mut documents = Vec::new();
        for (i, id) in self.chunked.iter().enumerate() {
            let done: Value = send_within_limits(acknowledged, || {
                http.post(format!("{base}/api/v1/upload/{id}/complete")).bearer_auth(token())
            })
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
            let document = done["documentId"].as_i64().or_else(|| done["id"].as_i64());
            documents.push((document.unwrap_or_else(|| panic!("session {id} completed: {done}")), upload_bytes(i)));
        }
        for (i, id) in self.tus.iter().enumerate() {
            let head = send_within_limits(acknowledged, || {
                http.head(format!("{base}/api/v1/tus/{id}")).bearer_auth(token()).header("Tus-Resumable", "1.0.0")
            })
            .await
            .unwrap();
            assert_eq!(head.headers()["upload-offset"], "12", "tus upload {id}");
            let document = head.headers()["vellum-document-id"].to_str().unwrap().parse().unwrap();
            documents.push((document, upload_bytes(1000 + i)));
        }
        for (id, bytes) in documents {
            let got = send_within_limits(acknowledged, || {
                http.get(format!("{base}/api/v1/documents/{id}/download")).bearer_auth(token())
            })
            .await
            .unwrap();
            assert_eq!(got.status(), 200, "document {id}");
            assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice(), "document {id}");
        }
    }
}

/// The names of the resharding Jobs' pods.
async fn resharding_pods(cluster: &Cluster) -> Vec<String> {
    let pods = get_json(cluster, &["-n", "docs", "get", "pods", "-l", "app.kubernetes.io/component=resharding"]).await;
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .map(str::to_owned)
        .collect()
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

/// What clients have done on the database `name` of `a`'s server: the sessions ever opened
/// to it, and each connected client's last change of state (with its pod and last query, to
/// say who it was). No new session and no client changing state means no client touched
/// the database in between;
/// autovacuum, which tidies a database a move emptied, is not a client.
async fn client_activity(a: &TestDatabase, name: &str) -> (i64, Vec<String>) {
    let pool = a.pool().await.unwrap();
    let sessions = sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
    let clients = sqlx::query_scalar(
        "SELECT format('%s %s %s %s: %s', pid, application_name, state, state_change, left(query, 120)) \
         FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' ORDER BY pid",
    )
    .bind(name)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    (sessions, clients)
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
    let open = OpenUploads::open(&base, 6).await;
    // An admin's WebSocket: the moves' progress arrives on it (the migrations channel,
    // seed 003's StatusUpdateEvent), sent by the resharding Jobs through NATS.
    let updates = Arc::new(Mutex::new(Vec::<Value>::new()));
    let watcher = {
        let (url, updates) =
            (format!("{}/ws?token={}", base.replace("http://", "ws://"), token()), Arc::clone(&updates));
        tokio::spawn(async move {
            use futures::StreamExt;
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            while let Some(Ok(message)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = message
                    && let Ok(json) = serde_json::from_str::<Value>(&text)
                    && json["type"] == "status_update"
                {
                    updates.lock().unwrap().push(json);
                }
            }
        })
    };

    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> =
        (0..2).map(|_| tokio::spawn(traffic(base.clone(), Arc::clone(&acknowledged), stopped.clone()))).collect();
    eventually(Duration::from_secs(60), "documents before the move", || {
        let n = acknowledged.lock().unwrap().versions.len();
        async move { if n >= 30 { Ok(()) } else { Err(format!("{n} documents")) } }
    })
    .await;

    // 1 -> 3, at a pace slow enough to kill the resharding Job's pod mid-copy: its
    // replacement goes on from where the documents are.
    let three = routing(&["shard-a", "shard-b", "shard-c"]);
    let started = tokio::time::Instant::now();
    let paced = shard_set(&["shard-a", "shard-b", "shard-c"], Some("{batchSize: 2, documentsPerSecond: 8}"));
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&paced)).await;
    let killed = eventually(Duration::from_secs(120), "the move under way", || async {
        let set = get_json(&cluster, &["-n", "docs", "get", "shardset/metadata"]).await;
        let rebalance = &set["status"]["rebalance"];
        let (moved, total) = (rebalance["movedDocuments"].as_i64(), rebalance["totalDocuments"].as_i64());
        let pods = resharding_pods(&cluster).await;
        match (moved, total, pods.as_slice()) {
            (Some(moved), Some(total), [pod]) if moved > 0 && moved < total => Ok((pod.clone(), moved, total)),
            _ => Err(format!("rebalance {rebalance}, pods {pods:?}")),
        }
    })
    .await;
    let (killed_pod, moved_when_killed, total_when_killed) = killed;
    kubectl(&cluster, &["-n", "docs", "delete", "pod", &killed_pod, "--grace-period=0", "--force"], None).await;
    eventually(Duration::from_secs(120), "another resharding pod", || async {
        let pods = resharding_pods(&cluster).await;
        if pods.iter().any(|p| *p != killed_pod) { Ok(()) } else { Err(format!("pods {pods:?}")) }
    })
    .await;
    let set = resharded(&cluster, &three).await;
    let grow = started.elapsed();
    eprintln!(
        "the resharding pod {killed_pod} was killed with {moved_when_killed} of {total_when_killed} documents moved"
    );
    let between = open.send(&base, 1, &acknowledged).await;
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

    // 3 -> 2: shard-c leaves; the operator's leader is killed once the Job has moved every
    // document, while the routing flips, and the next leader finishes the move.
    let two = routing(&["shard-a", "shard-b"]);
    let started = tokio::time::Instant::now();
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&shard_set(&["shard-a", "shard-b"], None))).await;
    let phase = eventually(Duration::from_secs(120), "the resharding Job done", || async {
        let jobs =
            get_json(&cluster, &["-n", "docs", "get", "jobs", "-l", "app.kubernetes.io/component=resharding"]).await;
        let done = jobs["items"].as_array().into_iter().flatten().any(|j| j["status"]["succeeded"].as_i64() > Some(0));
        let set = get_json(&cluster, &["-n", "docs", "get", "shardset/metadata"]).await;
        let phase = set["status"]["rebalance"]["phase"].as_str().unwrap_or_default().to_owned();
        if done || phase == "Flipping" { Ok(phase) } else { Err(format!("phase {phase}, jobs {jobs}")) }
    })
    .await;
    let (leader, next_leader, _) = kill_leader(&cluster).await;
    assert_ne!(phase, "Complete", "the leader was killed before the move was complete");
    eprintln!("the operator leader {leader} was killed in phase {phase}; {next_leader} finished the move");
    resharded(&cluster, &two).await;
    let shrink = started.elapsed();
    let after = open.send(&base, 2, &acknowledged).await;
    assert!(between.is_empty() && after.is_empty(), "open uploads failed: {between:?} {after:?}");
    open.check_completed(&base, &acknowledged).await;
    // shard-c left the routing: under the same traffic, nothing touches its database.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet_from = client_activity(&a, &c.name).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet_to = client_activity(&a, &c.name).await;
    // A connection closing (a pool letting an idle one go) touches nothing.
    assert!(
        quiet_to.0 == quiet_from.0 && quiet_to.1.iter().all(|c| quiet_from.1.contains(c)),
        "clients on shard-c's database after it left the routing: {quiet_from:?} then {quiet_to:?}"
    );
    stop.send_replace(true);
    for client in clients {
        client.await.unwrap();
    }

    watcher.abort();
    let updates = std::mem::take(&mut *updates.lock().unwrap());
    for table in [&three, &two] {
        let entity = format!("shard-move/{}", table.version());
        let of_move: Vec<&Value> = updates.iter().filter(|u| u["entityId"] == entity.as_str()).collect();
        assert!(
            of_move.iter().any(|u| u["eventType"] == "completed" && u["progress"] == 100),
            "the move to {entity} announced complete on the admin's WebSocket: {of_move:?}"
        );
    }
    eprintln!("{} status updates of the moves reached the admin's WebSocket", updates.len());
    let ack = std::mem::take(&mut *acknowledged.lock().unwrap());
    eprintln!(
        "1 -> 3 shards in {:.1} s, 3 -> 2 in {:.1} s; {} requests, {} failed ({} answers of 429 waited out and sent again); {} documents",
        grow.as_secs_f64(),
        shrink.as_secs_f64(),
        ack.requests,
        ack.failures.len(),
        ack.throttled,
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
        let history = get_api(&http, &format!("{base}/api/v1/documents/{id}/versions")).await;
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
            let doc = get_api(&http, &format!("{base}/api/v1/documents/{id}")).await;
            assert_eq!(doc["title"], title.as_str(), "document {id}'s last title");
        }
    }
    // The ShardSet routes the running release's documents: deleting it waits for the
    // release to go, and says so.
    kubectl(&cluster, &["-n", "docs", "delete", "shardset", "metadata", "--wait=false"], None).await;
    eventually(Duration::from_secs(60), "the ShardSet held by its finalizer", || async {
        let set = get_json(&cluster, &["-n", "docs", "get", "shardset/metadata"]).await;
        let held = set["metadata"]["deletionTimestamp"].is_string()
            && condition(&set, "Ready").is_some_and(|c| c["reason"] == "RoutingInUse");
        if held { Ok(()) } else { Err(set["status"].to_string()) }
    })
    .await;
}
