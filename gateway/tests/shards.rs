//! A gateway over a ShardSet of real Postgres databases: every document lands on the shard
//! its id routes to and is served from there without a lookup, chunked uploads complete on
//! their session's shard, listings gather every shard in one order across pages, usage
//! adds the shards up, and every shard's events reach the stream. One shard works like a
//! plain database; several without NATS are refused with a clear message.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Row;
use vellum_core::config::compile_dir;
use vellum_core::routing::RoutingTable;
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};
use vellum_testkit::{NatsProcess, TestDatabase};

mod support;

fn options(dir: &std::path::Path, nats_url: Option<String>) -> standalone::Options {
    standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        config_dir: Some(dir.join("config")),
        secrets_dir: None,
        config_reload: Duration::from_secs(5),
        database_url: None,
        auth: AuthSettings { secret: Some(b"shard-secret".to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec![],
        nats_url,
        link_key: None,
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    }
}

/// Writes a tier, a ShardSet of `dbs` under `routing` (YAML of `spec.routing`) and the
/// Secret with their URLs; `starts` gives Range routing's `rangeStart`s.
fn write_config(dir: &std::path::Path, dbs: &[TestDatabase], routing: &str, starts: Option<&[&str]>) {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("tiers.yaml"),
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 'file://tiers/hot'}}\n",
    )
    .unwrap();
    let mut shards = String::new();
    let mut urls = String::new();
    for (i, db) in dbs.iter().enumerate() {
        let start = starts.map(|s| format!(", rangeStart: '{}'", s[i])).unwrap_or_default();
        writeln!(shards, "  - {{name: s{i}, urlSecretRef: {{name: shard-urls, key: s{i}}}{start}}}").unwrap();
        writeln!(urls, "  s{i}: '{}'", db.url).unwrap();
    }
    std::fs::write(
        config.join("shards.yaml"),
        format!(
            "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {{name: docs}}\nspec:\n  routing: {routing}\n  shards:\n{shards}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: shard-urls}}\nstringData:\n{urls}"
        ),
    )
    .unwrap();
}

async fn databases(n: usize) -> Vec<TestDatabase> {
    futures::future::try_join_all((0..n).map(|_| TestDatabase::new())).await.unwrap()
}

/// A gateway over `n` fresh Postgres shards under ConsistentHash routing, with a private
/// nats-server: the databases, the routing table the gateway uses, and what must live as
/// long as the test.
struct Ring {
    dbs: Vec<TestDatabase>,
    table: RoutingTable,
    nats: NatsProcess,
    gw: Running,
    /// The cluster's relays and webhook delivery.
    worker: support::Worker,
    _dir: tempfile::TempDir,
}

async fn ring(n: usize) -> Ring {
    let dir = tempfile::tempdir().unwrap();
    let dbs = databases(n).await;
    write_config(dir.path(), &dbs, "{strategy: ConsistentHash, virtualNodes: 64}", None);
    let (_, config, _) = compile_dir(&dir.path().join("config")).unwrap();
    let table = RoutingTable::build(config.shards.as_ref().unwrap()).unwrap();
    let nats = NatsProcess::start().unwrap();
    let gw = vellum_gateway::replica::start(options(dir.path(), Some(nats.url()))).await.unwrap();
    let worker = support::Worker::start(&dbs[0].url, &nats.url(), &dir.path().join("config"));
    Ring { dbs, table, nats, gw, worker, _dir: dir }
}

/// The document ids each database holds.
async fn ids_by_shard(dbs: &[TestDatabase]) -> Vec<HashSet<i64>> {
    let mut all = Vec::new();
    for db in dbs {
        let pool = db.pool().await.unwrap();
        let rows = sqlx::query("SELECT id FROM documents").fetch_all(&pool).await.unwrap();
        all.push(rows.iter().map(|r| r.get::<i64, _>("id")).collect());
        pool.close().await;
    }
    all
}

/// An RFC 3339 time with its milliseconds written out, so that times compare as text.
fn millis(time: &str) -> String {
    let bare = time.trim_end_matches('Z');
    let (whole, fraction) = bare.split_once('.').unwrap_or((bare, ""));
    format!("{whole}.{fraction:0<3}Z")
}

fn token(gw: &Running, user: &str, roles: &[&str]) -> String {
    gw.state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
}

/// Every page of `/api/v1/documents?limit=<limit>` as `token` sees it.
async fn list_all(client: &reqwest::Client, gw: &Running, token: &str, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/api/v1/documents?limit={limit}", gw.url);
        if let Some(c) = &cursor {
            write!(url, "&cursor={c}").unwrap();
        }
        let page: Value = support::json_of(client.get(url).bearer_auth(token)).await;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize);
        items.extend(got.iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one walk through a sharded platform, step by step
async fn eight_shards_route_serve_and_list_every_document() {
    let Ring { dbs, table, nats, gw, worker: _worker, _dir } = ring(8).await;
    let client = reqwest::Client::new();
    let (alice, bob) = (token(&gw, "alice", &["user"]), token(&gw, "bob", &["user"]));
    let admin = token(&gw, "root", &["admin", "user"]);

    let mut uploaded = BTreeMap::new();
    for i in 0..48 {
        let (user, tok) = if i % 3 == 0 { ("bob", &bob) } else { ("alice", &alice) };
        let name = format!("doc-{i:02}.txt");
        let doc = support::upload(&client, &gw.url, tok, &name).await;
        uploaded.insert(doc["id"].as_i64().unwrap(), (user, name));
    }
    // A chunked upload: its session and its document live on the session's shard.
    let session = support::initiate(&client, &gw.url, &alice, 10, 4).await;
    for (n, chunk) in [b"0123".to_vec(), b"4567".to_vec(), b"89".to_vec()].into_iter().enumerate() {
        support::put_chunk(&client, &gw.url, &alice, &session, n as u64, chunk).await;
    }
    let done: Value =
        support::json_of(client.post(format!("{}/api/v1/upload/{session}/complete", gw.url)).bearer_auth(&alice)).await;
    let chunked = done["documentId"].as_i64().or_else(|| done["id"].as_i64()).expect("the completed document's id");
    assert_eq!(table.shard_of_id(chunked), table.shard_of_key(&session), "the document joins its session's shard");
    uploaded.insert(chunked, ("alice", "big.bin".to_owned()));

    // Each document is on exactly the shard its id routes to, and the shards share them.
    let held = ids_by_shard(&dbs).await;
    for id in uploaded.keys() {
        let on: Vec<usize> = (0..8).filter(|s| held[*s].contains(id)).collect();
        assert_eq!(on, vec![table.shard_of_id(*id)], "document {id}");
    }
    assert_eq!(held.iter().map(HashSet::len).sum::<usize>(), uploaded.len());
    let used = held.iter().filter(|ids| !ids.is_empty()).count();
    assert!(used >= 5, "49 documents over 8 shards landed on only {used}");

    // Served from their shards: metadata, bytes, versions, delete.
    for (id, (user, name)) in &uploaded {
        let tok = if *user == "bob" { &bob } else { &alice };
        let doc: Value =
            support::json_of(client.get(format!("{}/api/v1/documents/{id}", gw.url)).bearer_auth(tok)).await;
        assert_eq!(doc["filename"], name.as_str());
        let bytes = client
            .get(format!("{}/api/v1/documents/{id}/download", gw.url))
            .bearer_auth(tok)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let expected = if name == "big.bin" { b"0123456789".to_vec() } else { name.as_bytes().to_vec() };
        assert_eq!(bytes.as_ref(), expected.as_slice(), "document {id}");
    }
    let (&first, _) = uploaded.iter().find(|(_, (user, _))| *user == "alice").unwrap();
    let version = client
        .post(format!("{}/api/v1/documents/{first}/versions", gw.url))
        .bearer_auth(&alice)
        .body("second version")
        .header("X-Filename", "v2.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(version.status(), StatusCode::CREATED, "{:?}", version.text().await);
    let history: Value =
        support::json_of(client.get(format!("{}/api/v1/documents/{first}/versions", gw.url)).bearer_auth(&alice)).await;
    assert_eq!(history["versions"].as_array().map(Vec::len), Some(2), "{history}");
    let gone = *uploaded.keys().last().unwrap();
    let owner = if uploaded[&gone].0 == "bob" { &bob } else { &alice };
    let deleted = client.delete(format!("{}/api/v1/documents/{gone}", gw.url)).bearer_auth(owner).send().await.unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    uploaded.remove(&gone);
    let missing = client.get(format!("{}/api/v1/documents/{gone}", gw.url)).bearer_auth(owner).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // Listings gather every shard, newest first, across pages, each document once.
    let listed = list_all(&client, &gw, &admin, 7).await;
    let keys: Vec<(String, i64)> =
        listed.iter().map(|d| (millis(d["createdAt"].as_str().unwrap()), d["id"].as_i64().unwrap())).collect();
    let ids: Vec<i64> = keys.iter().map(|k| k.1).collect();
    assert_eq!(ids.iter().copied().collect::<HashSet<_>>(), uploaded.keys().copied().collect::<HashSet<_>>());
    assert_eq!(ids.len(), uploaded.len(), "a document listed twice");
    let mut ordered = keys.clone();
    ordered.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, ordered, "the listing is not newest first");
    let bobs = list_all(&client, &gw, &bob, 5).await;
    let expected_bobs = uploaded.values().filter(|(user, _)| *user == "bob").count();
    assert_eq!(bobs.len(), expected_bobs);
    assert!(bobs.iter().all(|d| uploaded[&d["id"].as_i64().unwrap()].0 == "bob"));

    // Usage adds the shards up; readiness checks them all and names the routing.
    let usage: Value =
        support::json_of(client.get(format!("{}/api/v1/storage/usage", gw.url)).bearer_auth(&admin)).await;
    // Every listed document's blob, the second version's, and the soft-deleted one's.
    assert_eq!(usage["objects"].as_i64(), Some(i64::try_from(uploaded.len()).unwrap() + 2), "{usage}");
    let ready: Value = support::json_of(client.get(format!("{}/readyz", gw.url))).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["routingVersion"], table.version());

    // Every shard's outbox reaches the stream: one upload event per document, at least.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut stream = js.get_stream(vellum_jetstream::STREAM).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        if messages >= 49 + 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {messages} events reached the stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn range_routing_and_a_single_shard_work_and_several_shards_need_nats() {
    // Two shards split at the middle of the hash space.
    let dir = tempfile::tempdir().unwrap();
    let dbs = databases(2).await;
    write_config(dir.path(), &dbs, "{strategy: Range}", Some(&["", "8"]));
    let err = standalone::start(options(dir.path(), None)).await.unwrap_err();
    assert!(format!("{err:#}").contains("need the NATS event stream"), "{err:#}");
    let nats = NatsProcess::start().unwrap();
    let gw = vellum_gateway::replica::start(options(dir.path(), Some(nats.url()))).await.unwrap();
    let client = reqwest::Client::new();
    let alice = token(&gw, "alice", &["user"]);
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(support::upload(&client, &gw.url, &alice, &format!("r{i}.txt")).await["id"].as_i64().unwrap());
    }
    let held = ids_by_shard(&dbs).await;
    for id in &ids {
        let high = vellum_core::routing::id_hash(*id) >= 1 << 63;
        assert!(held[usize::from(high)].contains(id), "document {id} is not in its half");
    }
    assert_eq!(list_all(&client, &gw, &alice, 3).await.len(), 16);
    gw.shutdown().await.unwrap();

    // One shard: no NATS needed, everything on it.
    let dir = tempfile::tempdir().unwrap();
    let one = databases(1).await;
    write_config(dir.path(), &one, "{strategy: ConsistentHash}", None);
    let gw = standalone::start(options(dir.path(), None)).await.unwrap();
    let alice = token(&gw, "alice", &["user"]);
    let doc = support::upload(&client, &gw.url, &alice, "only.txt").await;
    assert_eq!(ids_by_shard(&one).await[0], HashSet::from([doc["id"].as_i64().unwrap()]));
    assert_eq!(list_all(&client, &gw, &alice, 10).await.len(), 1);
    gw.shutdown().await.unwrap();
}

/// Every claim on a stored copy is held by the shard whose rows record it: on a two-shard
/// platform, documents uploaded every way (multipart, raw body, a new version, a chunked
/// session, tus) survive garbage collection on every shard after their claims ran out, and
/// download byte-exact, every version of them.
#[tokio::test]
#[allow(clippy::too_many_lines)] // one walk through every upload path, then the collector
async fn uploads_survive_garbage_collection_on_every_shard() {
    let Ring { dbs, table, nats: _nats, gw, worker: _worker, _dir } = ring(2).await;
    let client = reqwest::Client::new();
    let alice = token(&gw, "alice", &["user"]);
    // (document id, version) → the bytes it was given.
    let mut expected: BTreeMap<(i64, i64), Vec<u8>> = BTreeMap::new();

    // Multipart and raw-body uploads, until both shards hold several documents.
    let mut i = 0;
    while (0..2).any(|s| expected.keys().filter(|(id, _)| table.shard_of_id(*id) == s).count() < 4) {
        assert!(i < 200, "40 uploads did not reach both shards");
        let name = format!("gc-{i:03}.txt");
        let doc = if i % 2 == 0 {
            support::upload(&client, &gw.url, &alice, &name).await
        } else {
            support::json_of(
                client
                    .post(format!("{}/api/v1/documents?filename={name}", gw.url))
                    .bearer_auth(&alice)
                    .body(name.clone()),
            )
            .await
        };
        expected.insert((doc["id"].as_i64().expect("an uploaded document"), 1), name.into_bytes());
        i += 1;
    }
    // A new version of a document on each shard, multipart and raw.
    for shard in 0..2 {
        let (&(id, _), _) = expected.iter().find(|((id, _), _)| table.shard_of_id(*id) == shard).unwrap();
        let bytes = format!("version two of {id}").into_bytes();
        let request = client.post(format!("{}/api/v1/documents/{id}/versions", gw.url)).bearer_auth(&alice);
        let request = if shard == 0 {
            request.body(bytes.clone()).header("X-Filename", "v2.txt")
        } else {
            let part = reqwest::multipart::Part::bytes(bytes.clone()).file_name("v2.txt");
            request.multipart(reqwest::multipart::Form::new().part("file", part))
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{:?}", response.text().await);
        expected.insert((id, 2), bytes);
    }
    // Chunked sessions and tus uploads until each protocol completed a document on each shard.
    let mut done = [[false; 2]; 2];
    let mut n = 0;
    while done.iter().flatten().any(|d| !d) {
        assert!(n < 100, "100 sessions did not reach both shards");
        n += 1;
        let bytes = format!("chunked body {n:04}").into_bytes();
        let session = support::initiate(&client, &gw.url, &alice, bytes.len() as u64, 8).await;
        for (c, chunk) in bytes.chunks(8).enumerate() {
            support::put_chunk(&client, &gw.url, &alice, &session, c as u64, chunk.to_vec()).await;
        }
        let completed: Value =
            support::json_of(client.post(format!("{}/api/v1/upload/{session}/complete", gw.url)).bearer_auth(&alice))
                .await;
        let id = completed["documentId"].as_i64().or_else(|| completed["id"].as_i64()).expect("a document id");
        done[0][table.shard_of_id(id)] = true;
        expected.insert((id, 1), bytes);

        let bytes = format!("tus body {n:04}").into_bytes();
        let created = client
            .post(format!("{}/api/v1/tus", gw.url))
            .bearer_auth(&alice)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", bytes.len().to_string())
            .header("Upload-Metadata", "filename dHVzLnR4dA==")
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED, "{:?}", created.text().await);
        let location = created.headers()["location"].to_str().unwrap().to_owned();
        let url = if location.starts_with("http") { location } else { format!("{}{location}", gw.url) };
        let appended = client
            .patch(url)
            .bearer_auth(&alice)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(appended.status(), StatusCode::NO_CONTENT, "{:?}", appended.text().await);
        let id: i64 = appended.headers()["vellum-document-id"].to_str().unwrap().parse().unwrap();
        done[1][table.shard_of_id(id)] = true;
        expected.insert((id, 1), bytes);
    }

    // Nothing recorded is still claimed as garbage, on any shard.
    for (s, db) in dbs.iter().enumerate() {
        let pool = db.pool().await.unwrap();
        let claimed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM blob_garbage g WHERE EXISTS \
             (SELECT 1 FROM blobs b WHERE b.tier = g.tier AND b.object_key = g.object_key)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(claimed, 0, "shard {s} claims blobs it records");
        // Every claim runs out, as it would a day later.
        sqlx::query("UPDATE blob_garbage SET not_before = 0").execute(&pool).await.unwrap();
        pool.close().await;
    }
    for shard in gw.state.docs().shards() {
        shard.collect_garbage().await.unwrap();
    }

    for ((id, version), bytes) in &expected {
        let response = client
            .get(format!("{}/api/v1/documents/{id}/versions/{version}/content", gw.url))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "document {id} version {version}");
        assert_eq!(response.bytes().await.unwrap().as_ref(), bytes.as_slice(), "document {id} version {version}");
    }
    gw.shutdown().await.unwrap();
}

/// Writes `config` and `secrets` as the operator's compiled files into `dir`.
fn write_compiled(
    dir: &std::path::Path,
    config: &vellum_core::config::PlatformConfig,
    secrets: &vellum_core::config::SecretBundle,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("secrets.json"), secrets.to_json()).unwrap();
    // Written whole, then renamed: a reload never reads half a file.
    std::fs::write(dir.join("platform.json.new"), serde_json::to_vec(config).unwrap()).unwrap();
    std::fs::rename(dir.join("platform.json.new"), dir.join("platform.json")).unwrap();
}

/// Waits until `check` holds of the gateway's library (its config reloads every second).
async fn until_routed(gw: &Running, what: &str, check: impl Fn(&vellum_core::documents::Library) -> bool) {
    for _ in 0..100 {
        if check(&gw.state.docs()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway never {what}");
}

/// A running gateway and worker follow a resharding through their config reloads: the move
/// is loaded (new documents get ids that stay), every document is served while the mover
/// hands half of them to a new shard, and after the flip the new routing serves and fills
/// both shards, and the new shard's events are relayed.
#[tokio::test]
#[allow(clippy::too_many_lines)]
async fn a_running_gateway_and_worker_follow_a_resharding_through_their_config() {
    use vellum_core::config::ShardMove;
    use vellum_core::documents::{Documents, library_of, open_shards};
    let dir = tempfile::tempdir().unwrap();
    let dbs = databases(2).await;
    write_config(dir.path(), &dbs, "{strategy: ConsistentHash, virtualNodes: 64}", None);
    let (_, two, secrets) = compile_dir(&dir.path().join("config")).unwrap();
    let mut one = two.clone();
    one.shards.as_mut().unwrap().shards.truncate(1);
    let compiled = dir.path().join("compiled");
    write_compiled(&compiled, &one, &secrets);
    let nats = NatsProcess::start().unwrap();
    let mut opts = options(dir.path(), Some(nats.url()));
    opts.config_dir = Some(compiled.clone());
    opts.secrets_dir = Some(compiled.clone());
    opts.config_reload = Duration::from_secs(1);
    let gw = vellum_gateway::replica::start(opts).await.unwrap();
    let worker_at = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let worker = support::Worker::serving(&dbs[0].url, &nats.url(), &compiled, Some(worker_at));
    let client = reqwest::Client::new();
    // What the worker's /readyz reports of the routing, once it reports `want`.
    let worker_routes = |want: (Option<String>, Option<String>)| {
        let (client, want) = (client.clone(), want);
        async move {
            let mut seen = Value::Null;
            for _ in 0..100 {
                if let Ok(r) = client.get(format!("http://{worker_at}/readyz")).send().await {
                    seen = r.json().await.unwrap_or_default();
                    let now = (
                        seen["routingVersion"].as_str().map(str::to_owned),
                        seen["movingTo"].as_str().map(str::to_owned),
                    );
                    if now == want {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the worker's /readyz reports {seen}, not {want:?}");
        }
    };
    let from = RoutingTable::build(one.shards.as_ref().unwrap()).unwrap();
    worker_routes((Some(from.version().to_owned()), None)).await;
    let alice = token(&gw, "alice", &["user"]);
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(support::upload(&client, &gw.url, &alice, &format!("before-{i}.txt")).await["id"].as_i64().unwrap());
    }
    // The most connections each shard's pool opens: twice a replica's budget, shared, at
    // most the budget each.
    let pools = |docs: &vellum_core::documents::Library| -> Vec<u32> {
        docs.shards().iter().map(|d| d.meta().max_connections()).collect()
    };
    assert_eq!(pools(&gw.state.docs()), [16], "one shard has the replica's whole budget");

    // The move is published; the gateway loads it.
    let mut moving = one.clone();
    moving.shard_move = Some(ShardMove { to: two.shards.clone().unwrap(), draining: Vec::new() });
    write_compiled(&compiled, &moving, &secrets);
    let to = RoutingTable::build(two.shards.as_ref().unwrap()).unwrap();
    until_routed(&gw, "loaded the move", |docs| docs.next().is_some_and(|n| n.version() == to.version())).await;
    assert_eq!(pools(&gw.state.docs()), [16, 16], "two shards, the one kept included, each up to the budget");
    // The worker relays the new shard too, and says so: what the operator waits for.
    worker_routes((Some(from.version().to_owned()), Some(to.version().to_owned()))).await;
    for i in 0..10 {
        let id = support::upload(&client, &gw.url, &alice, &format!("during-{i}.txt")).await["id"].as_i64().unwrap();
        assert_eq!(to.shard_of_id(id), 0, "a new document gets an id the move leaves on s0");
        ids.push(id);
    }

    // The mover (what the resharding Job runs), while the gateway serves.
    let tiers = vellum_core::blob::Tiers::open(&moving, &secrets, &dir.path().join("data")).unwrap();
    let shards = open_shards(&moving, &secrets, &dbs[0].url).await.unwrap();
    let library = library_of(
        &moving,
        shards
            .into_iter()
            .map(|m| Documents::new(m, tiers.clone(), vellum_core::clock::Clock::system(), None, 1 << 20))
            .collect(),
    )
    .unwrap();
    let handing = vellum_core::resharding::run_move(&library, 4, 300_000, &|_| {});
    let reader = async {
        let mut answered = 0;
        for round in 0..4 {
            for id in &ids {
                let response =
                    client.get(format!("{}/api/v1/documents/{id}", gw.url)).bearer_auth(&alice).send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "document {id}, round {round}");
                answered += 1;
            }
        }
        answered
    };
    let (progress, answered) = tokio::join!(handing, reader);
    let progress = progress.unwrap();
    assert!(progress[0].1.moved_documents > 0, "{progress:?}");
    assert_eq!(answered, 4 * ids.len());
    let held = ids_by_shard(&dbs).await;
    for id in &ids {
        assert!(held[to.shard_of_id(*id)].contains(id), "document {id} is on its new shard");
    }
    // Read through the markers the move left, and listed once each.
    let listed: Vec<i64> = list_all(&client, &gw, &alice, 7).await.iter().map(|d| d["id"].as_i64().unwrap()).collect();
    assert_eq!(listed.len(), ids.len(), "{listed:?}");

    // The flip: the new routing alone. Both shards fill; the new one's events are relayed.
    write_compiled(&compiled, &two, &secrets);
    until_routed(&gw, "flipped", |docs| docs.next().is_none() && docs.table().version() == to.version()).await;
    worker_routes((Some(to.version().to_owned()), None)).await;
    let mut landed = [0, 0];
    for i in 0..20 {
        let id = support::upload(&client, &gw.url, &alice, &format!("after-{i}.txt")).await["id"].as_i64().unwrap();
        landed[to.shard_of_id(id)] += 1;
    }
    assert!(landed[0] > 0 && landed[1] > 0, "new documents fill both shards: {landed:?}");
    let on_s1 = ids.iter().copied().find(|id| to.shard_of_id(*id) == 1).unwrap();
    let patched = client
        .patch(format!("{}/api/v1/documents/{on_s1}", gw.url))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"title": "after the flip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    let s1 = dbs[1].pool().await.unwrap();
    let mut pending = i64::MAX;
    for _ in 0..100 {
        pending =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL").fetch_one(&s1).await.unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, 0, "the worker relays the new shard's outbox");
    worker.stop().await;
    gw.shutdown().await.unwrap();
    drop(nats);
}
