//! Two gateway replicas sharing Postgres and a private NATS server: a client on one
//! replica sees what happens through the other, SSE resumes from the JetStream history on
//! either, and killing NATS mid-stream neither loses an event nor repeats one to a
//! WebSocket client.

use std::collections::HashSet;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};
use vellum_testkit::{NatsProcess, TestDatabase};

mod support;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Cluster {
    a: Running,
    b: Running,
    /// The relays and webhook delivery, which the replicas leave to it.
    _worker: support::Worker,
    nats: NatsProcess,
    client: reqwest::Client,
    db: TestDatabase,
    dir: tempfile::TempDir,
}

async fn replica(dir: &std::path::Path, database_url: &str, nats_url: &str) -> Running {
    // Boxed: the start's future is large, and each test holds two.
    Box::pin(vellum_gateway::replica::start(standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Shared, as a volume would be: the file tier holds the documents both serve.
        data_dir: dir.join("data"),
        config_dir: Some(dir.join("config")),
        secrets_dir: None,
        config_reload: std::time::Duration::from_secs(5),
        database_url: Some(database_url.to_owned()),
        auth: AuthSettings { secret: Some(b"cluster-secret".to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec![],
        nats_url: Some(nats_url.to_owned()),
        link_key: Some(b"a link key both replicas share, 32+ bytes".to_vec()),
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    }))
    .await
    .unwrap()
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/tiers.yaml"),
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 'file://tiers/hot'}}\n",
    )
    .unwrap();
    let db = TestDatabase::new().await.unwrap();
    let nats = NatsProcess::start().unwrap();
    let a = replica(dir.path(), &db.url, &nats.url()).await;
    let b = replica(dir.path(), &db.url, &nats.url()).await;
    // The replicas' events reach the stream through the worker's relay.
    let worker = support::Worker::start(&db.url, &nats.url(), &dir.path().join("config"));
    let cluster = Cluster { a, b, _worker: worker, nats, client: reqwest::Client::new(), db, dir };
    // The replicas follow the stream from when they started: wait until B sees A's events.
    let mut probe = cluster.ws(&cluster.b, "root", &["user", "admin"]).await;
    cluster.upload(&cluster.a, "root", "warm-up.txt").await;
    assert_eq!(next_json(&mut probe).await["data"]["filename"], "warm-up.txt");
    cluster
}

impl Cluster {
    fn token(&self, user: &str, roles: &[&str]) -> String {
        self.a.state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
    }

    async fn upload(&self, via: &Running, user: &str, filename: &str) -> Value {
        support::upload(&self.client, &via.url, &self.token(user, &["user"]), filename).await
    }

    async fn ws(&self, on: &Running, user: &str, roles: &[&str]) -> Ws {
        let url = format!("{}/ws?token={}", on.url.replace("http://", "ws://"), self.token(user, roles));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "connection_established");
        ws
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    try_next_json(ws, Duration::from_secs(15)).await.expect("a message within 15 s")
}

async fn try_next_json(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next()).await.ok()?.unwrap().unwrap();
        match message {
            Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// SSE events (id, data) from a streaming response until `n` have arrived.
async fn read_events(response: &mut reqwest::Response, buffer: &mut String, n: usize) -> Vec<(i64, Value)> {
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let id = block.lines().find_map(|l| l.strip_prefix("id:")).map(|v| v.trim().parse().unwrap());
            let data = block.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim);
            if let (Some(id), Some(data)) = (id, data) {
                events.push((id, serde_json::from_str(data).unwrap()));
            }
        }
        if events.len() >= n {
            return events;
        }
        let chunk =
            tokio::time::timeout(Duration::from_secs(15), response.chunk()).await.expect("SSE data").unwrap().unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn clients_of_one_replica_see_uploads_progress_and_broadcasts_made_through_the_other() {
    let c = cluster().await;
    let mut alice_on_b = c.ws(&c.b, "alice", &["user"]).await;

    let doc = c.upload(&c.a, "alice", "through-a.txt").await;
    let event = next_json(&mut alice_on_b).await;
    assert_eq!(event["type"], "DOCUMENT_UPLOADED");
    assert_eq!(event["data"]["documentId"], doc["id"]);
    // The document itself is there on B too.
    let token = c.token("alice", &["user"]);
    let got = c.client.get(format!("{}/api/v1/documents/{}", c.b.url, doc["id"]));
    assert_eq!(got.bearer_auth(&token).send().await.unwrap().status(), StatusCode::OK);

    // Progress of a chunked upload made through A, watched on B.
    let id = support::initiate(&c.client, &c.a.url, &token, 10, 10).await;
    let id = id.as_str();
    alice_on_b.send(Message::Text(json!({"type": "subscribe_job", "jobId": id}).to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut alice_on_b).await["type"], "subscribed");
    support::put_chunk(&c.client, &c.a.url, &token, id, 0, vec![1u8; 10]).await;
    let update = next_json(&mut alice_on_b).await;
    assert_eq!(update["type"], "job_status_update");
    assert_eq!(update["jobId"], id);

    // An admin broadcast sent to A.
    let sent = c
        .client
        .post(format!("{}/api/v1/websocket/broadcast/system", c.a.url))
        .bearer_auth(c.token("root", &["user", "admin"]))
        .json(&json!({"message": "hello from A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    let notice = next_json(&mut alice_on_b).await;
    assert_eq!(
        (notice["type"].as_str(), notice["message"].as_str()),
        (Some("system_notification"), Some("hello from A"))
    );

    // A resharding's progress, sent to the notices subject by the mover (not a gateway):
    // admins get it, as seed 003's StatusUpdateEvent; others do not.
    let mut root_on_b = c.ws(&c.b, "root", &["user", "admin"]).await;
    let update = json!({"type": "status_update", "eventType": "progress_updated", "entityType": "migration",
        "entityId": "shard-move/v2", "status": "RUNNING", "progress": 50.0, "recordsProcessed": 5, "totalRecords": 10,
        "phase": "Moving", "message": "5 of 10 documents moved", "timestamp": "2026-12-05T00:00:00Z"});
    let notice = vellum_jetstream::notices::WireNotice {
        origin: "workers-reshard-test".into(),
        audience: vellum_jetstream::notices::WireAudience::Admins,
        channel: "migrations".into(),
        job_id: None,
        job_kind: None,
        kind: "status_update".into(),
        message: update.clone(),
        data: update.clone(),
    };
    let nats = async_nats::connect(c.nats.url()).await.unwrap();
    vellum_jetstream::notices::send(&nats, &notice).await.unwrap();
    nats.flush().await.unwrap();
    assert_eq!(next_json(&mut root_on_b).await, update, "the admin is told");
    let sent = c
        .client
        .post(format!("{}/api/v1/websocket/broadcast/system", c.a.url))
        .bearer_auth(c.token("root", &["user", "admin"]))
        .json(&json!({"message": "after the move's progress"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    assert_eq!(next_json(&mut alice_on_b).await["message"], "after the move's progress", "alice is not told");

    // SSE on B; then, away, two uploads through A; back on A with Last-Event-ID: exactly those.
    let stream_url = |on: &Running| format!("{}/api/v1/events/stream", on.url);
    let mut sse = c.client.get(stream_url(&c.b)).bearer_auth(&token).send().await.unwrap();
    let mut buffer = String::new();
    c.upload(&c.a, "alice", "seen.txt").await;
    let seen = read_events(&mut sse, &mut buffer, 1).await;
    assert_eq!(seen[0].1["filename"], "seen.txt");
    drop(sse);
    c.upload(&c.a, "alice", "missed-1.txt").await;
    c.upload(&c.a, "bob", "not-alices.txt").await;
    c.upload(&c.b, "alice", "missed-2.txt").await;
    // They reached the stream (B's client sees them) before resuming.
    for name in ["seen.txt", "missed-1.txt", "missed-2.txt"] {
        assert_eq!(next_json(&mut alice_on_b).await["data"]["filename"], name);
    }
    let mut resumed = c
        .client
        .get(stream_url(&c.a))
        .bearer_auth(&token)
        .header("Last-Event-ID", seen[0].0.to_string())
        .send()
        .await
        .unwrap();
    let mut buffer = String::new();
    let missed = read_events(&mut resumed, &mut buffer, 2).await;
    let names: Vec<&str> = missed.iter().map(|e| e.1["filename"].as_str().unwrap()).collect();
    assert_eq!(names, ["missed-1.txt", "missed-2.txt"]);
    c.upload(&c.b, "alice", "live.txt").await;
    let live = read_events(&mut resumed, &mut buffer, 1).await;
    assert_eq!(live[0].1["filename"], "live.txt", "then live, with nothing repeated");
    assert!(live[0].0 > missed[1].0);
}

/// Each replica answers a document's metadata and versions from its own cache; a change
/// made through the other replica drops the cached copy when its event arrives, well
/// within the cache's time to live (60 s), so the change shows on both.
#[tokio::test]
async fn a_change_through_one_replica_drops_the_other_replicas_cached_copy() {
    let c = cluster().await;
    let token = c.token("carol", &["user"]);
    let mut doc = c.upload(&c.a, "carol", "cached-on-b.txt").await;
    // The upload's answer says besides what the document is how it was stored.
    for key in ["deduplicated", "versionNumber"] {
        doc.as_object_mut().unwrap().remove(key);
    }
    let url = |via: &Running, path: &str| format!("{}/api/v1/documents/{}{path}", via.url, doc["id"]);
    let read = |path: &str| {
        let request = c.client.get(url(&c.b, path)).bearer_auth(&token);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let (documents, versions) = (c.b.state.metrics.seed.cache("documents"), c.b.state.metrics.seed.cache("versions"));
    // The upload's own event drops what B stored before it arrived: read until B answers
    // both from its cache (a version list read checks the document's entry too).
    for attempt in 0.. {
        let hits = (documents.hits.get(), versions.hits.get());
        assert_eq!(read("").await, doc);
        assert_eq!(read("/versions").await["versions"].as_array().unwrap().len(), 1);
        if (documents.hits.get(), versions.hits.get()) == (hits.0 + 2, hits.1 + 1) {
            break;
        }
        assert!(attempt < 100, "B answered nothing from its cache");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Through A: a new title, then a new version.
    let patched = c.client.patch(url(&c.a, "")).bearer_auth(&token).json(&json!({"title": "set on A"})).send().await;
    assert_eq!(patched.unwrap().status(), StatusCode::OK);
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(b"v2".as_slice()).file_name("cached-on-b.txt"));
    let v2 = c.client.post(url(&c.a, "/versions")).bearer_auth(&token).multipart(form).send().await.unwrap();
    assert_eq!(v2.status(), StatusCode::CREATED);

    let started = std::time::Instant::now();
    loop {
        let (now, history) = (read("").await, read("/versions").await);
        if now["title"] == "set on A"
            && now["currentVersion"] == 2
            && history["versions"].as_array().unwrap().len() == 2
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "B still answers {now} and {history}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("B saw A's changes {:?} after they were made", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_nats_mid_stream_neither_loses_nor_repeats_an_event_to_a_websocket_client() {
    const UPLOADS: usize = 24;
    let mut c = cluster().await;
    let mut watcher = c.ws(&c.b, "carol", &["user"]).await;
    let mut expected = HashSet::new();
    for n in 0..UPLOADS {
        if n == UPLOADS / 3 {
            c.nats.kill();
        }
        if n == 2 * UPLOADS / 3 {
            c.nats.restart().unwrap();
        }
        // Uploads go on while NATS is down: events wait in the outbox.
        let via = if n % 2 == 0 { &c.a } else { &c.b };
        let doc = c.upload(via, "carol", &format!("doc-{n}.txt")).await;
        expected.insert(doc["id"].to_string());
    }
    let mut received = Vec::new();
    while received.len() < UPLOADS {
        let event = try_next_json(&mut watcher, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("only {} of {UPLOADS} events arrived", received.len()));
        received.push(event["data"]["documentId"].to_string());
    }
    // Anything repeated would arrive now.
    if let Some(extra) = try_next_json(&mut watcher, Duration::from_secs(2)).await {
        panic!("an event beyond the {UPLOADS} uploads: {extra}");
    }
    let distinct: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(distinct.len(), UPLOADS, "no event twice");
    assert_eq!(distinct, expected, "every upload's event");
}

/// A receiver that takes `delay` over each request and records the most requests it had
/// in flight at once, and every event id it was sent (with its type).
struct SlowReceiver {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn slow_receiver(delay: Duration) -> SlowReceiver {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = std::sync::Arc::default();
    let (peak, now) = (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let (seen, peak, now) = (seen.clone(), peak.clone(), now.clone());
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                let inside = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(inside, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                seen.lock().unwrap().push((id, event["eventType"].as_str().unwrap_or_default().to_owned()));
                now.fetch_sub(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    SlowReceiver { url, seen, peak }
}

/// The replicas serve; the one worker relays and delivers: with two replicas each event is
/// delivered once per endpoint, and the endpoint's `maxConcurrency` holds across the
/// platform (replicas running dispatchers of their own would multiply it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_one_worker_deliver_each_event_once_within_the_endpoints_concurrency() {
    // Long enough that an idle dispatcher elsewhere (it looks every 5 s) would find work.
    let receiver = slow_receiver(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    let yaml = format!(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: hot}}\n\
         spec: {{class: HOT, default: true, backend: {{url: 'file://tiers/hot'}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{hook: 'a-webhook-secret-for-hmac'}}\n---\n\
         apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: slow}}\n\
         spec: {{url: '{}', secretRef: {{name: keys, key: hook}}, maxConcurrency: 2, eventTypes: [DOCUMENT_UPLOADED]}}\n---\n\
         apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {{name: docs}}\n\
         spec: {{version: '1', gateway: {{image: g}}, workers: {{image: w}}, shardSetRef: shards, \
         nats: {{url: 'nats://127.0.0.1:4222'}}, jwt: {{secretRef: {{name: keys, key: hook}}}}, webhookAllowedCidrs: ['127.0.0.1']}}\n",
        receiver.url
    );
    std::fs::write(config.join("platform.yaml"), yaml).unwrap();
    let db = TestDatabase::new().await.unwrap();
    let nats = NatsProcess::start().unwrap();
    let a = replica(dir.path(), &db.url, &nats.url()).await;
    let b = replica(dir.path(), &db.url, &nats.url()).await;
    let worker = support::Worker::start(&db.url, &nats.url(), &config);
    let client = reqwest::Client::new();
    let token = a.state.auth.mint("root", &["user"], Duration::from_secs(600)).unwrap();
    let mut ids = HashSet::new();
    for i in 0..60 {
        let via = if i % 2 == 0 { &a } else { &b };
        let doc = support::upload(&client, &via.url, &token, &format!("d{i}.txt")).await;
        ids.insert(doc["id"].as_i64().unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = receiver.seen.lock().unwrap().len();
        if seen >= ids.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen} of {} deliveries", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything a second dispatcher would send arrives within a few delays more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = receiver.seen.lock().unwrap().clone();
    let unique: HashSet<&String> = seen.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice: {seen:?}");
    assert_eq!(seen.len(), ids.len(), "{seen:?}");
    assert!(seen.iter().all(|(_, t)| t == "DOCUMENT_UPLOADED"), "{seen:?}");
    let peak = receiver.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 2, "{peak} deliveries in flight at once; the endpoint allows 2");
    assert_eq!(peak, 2, "the worker used the concurrency it has");
    worker.stop().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// `vellum-gateway serve` as a process of its own, so that it can be killed outright.
struct ReplicaProcess {
    child: std::process::Child,
    url: String,
}

impl ReplicaProcess {
    async fn start(dir: &std::path::Path, database_url: &str, nats_url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--config-dir")
            .arg(dir.join("config"))
            .args(["--database-url", database_url, "--nats-url", nats_url])
            .args(["--jwt-secret", "cluster-secret", "--link-key", "a link key both replicas share, 32+ bytes"])
            .env_remove("VELLUM_CORS_ORIGINS")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        // Killed when dropped, also when it never becomes ready.
        let replica = Self { child, url: format!("http://127.0.0.1:{port}") };
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if client.get(format!("{}/readyz", replica.url)).send().await.is_ok_and(|r| r.status().is_success()) {
                return replica;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the replica process did not become ready within 30 s");
    }

    /// SIGKILL: nothing is closed cleanly.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `gateway/tests/js/resuming_client.js`: a client that reconnects to the next URL and
/// resumes from the last sequence it received.
struct ResumingClient {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// (sequence, filename) of every document event, in the order received.
    events: Vec<(i64, String)>,
    connections: Vec<String>,
}

impl ResumingClient {
    fn start(mode: &str, token: &str, urls: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/resuming_client.js");
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .args([mode, token])
            .args(urls.iter().map(|u| u.replace("http://", "ws://")))
            .env("NODE_PATH", vellum_testkit::node_modules())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (scripts/test installs it)");
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self { _child: child, lines, events: Vec::new(), connections: Vec::new() }
    }

    /// Reads what the client printed until `done` holds of it; panics after 30 s of silence.
    async fn read_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        while !done(self) {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("waiting for {what}: nothing for 30 s; events {:?}", self.events))
                .unwrap()
                .expect("the client exited");
            let line: Value = serde_json::from_str(&line).unwrap();
            if let Some(url) = line["connected"].as_str() {
                self.connections.push(url.to_owned());
            }
            if let Some(event) = line.get("event") {
                let filename = event["filename"].as_str().unwrap_or_default().to_owned();
                self.events.push((event["sequence"].as_i64().unwrap(), filename));
            }
        }
    }

    fn received(&self, prefix: &str) -> usize {
        self.events.iter().filter(|(_, f)| f.starts_with(prefix)).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_stomp_clients_whose_replica_is_killed_resume_on_another_without_a_gap_or_a_repeat() {
    const UPLOADS: usize = 30;
    let c = cluster().await;
    let mut doomed = ReplicaProcess::start(c.dir.path(), &c.db.url, &c.nats.url()).await;
    let token = c.token("alice", &["user"]);
    let urls = [doomed.url.as_str(), c.b.url.as_str()];
    let mut clients = [ResumingClient::start("json", &token, &urls), ResumingClient::start("stomp", &token, &urls)];
    for client in &mut clients {
        client.read_until("connected", |c| !c.connections.is_empty()).await;
    }
    // The new replica follows the stream from when it started: both clients see this.
    c.upload(&c.a, "alice", "warm-up.txt").await;
    for client in &mut clients {
        client.read_until("the warm-up", |c| c.received("warm-up") == 1).await;
    }
    let mut expected = Vec::new();
    for n in 0..UPLOADS {
        if n == UPLOADS / 3 {
            // Mid-stream: the clients have some of the events, the rest come while they
            // reconnect and after.
            for client in &mut clients {
                client.read_until("events before the kill", |c| c.received("doc-") >= 3).await;
            }
            doomed.kill();
        }
        // Paced, so that events are published while the clients reconnect (replayed) and
        // after (live).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let via = if n % 2 == 0 { &c.a } else { &c.b };
        expected
            .push(c.upload(via, "alice", &format!("doc-{n:02}.txt")).await["filename"].as_str().unwrap().to_owned());
    }
    for client in &mut clients {
        client.read_until("every upload's event", |c| c.received("doc-") >= UPLOADS).await;
    }
    // Anything repeated would arrive now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.upload(&c.b, "alice", "last.txt").await;
    for (client, mode) in clients.iter_mut().zip(["json", "stomp"]) {
        client.read_until("the last upload", |c| c.received("last") == 1).await;
        assert_eq!(client.connections.len(), 2, "{mode}: connected to the killed replica, then to B");
        assert_eq!(client.connections[1], c.b.url.replace("http://", "ws://"), "{mode}");
        let docs: Vec<&str> =
            client.events.iter().filter(|(_, f)| f.starts_with("doc-")).map(|(_, f)| f.as_str()).collect();
        assert_eq!(docs, expected, "{mode}: every event once, in upload order");
        let sequences: Vec<i64> = client.events.iter().map(|(s, _)| *s).collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{mode}: sequences only go up: {sequences:?}");
        assert_eq!(client.events.len(), UPLOADS + 2, "{mode}: nothing else, nothing twice: {:?}", client.events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_job_whose_replica_is_killed_is_finished_by_another() {
    const DOCUMENTS: usize = 400;
    let c = cluster().await;
    let mut doomed = ReplicaProcess::start(c.dir.path(), &c.db.url, &c.nats.url()).await;
    let token = c.token("alice", &["user"]);
    let mut ids = Vec::new();
    for n in 0..DOCUMENTS {
        let via = if n % 2 == 0 { &c.a } else { &c.b };
        ids.push(c.upload(via, "alice", &format!("bulk-{n}.txt")).await["id"].as_i64().unwrap());
    }
    let started = c
        .client
        .post(format!("{}/api/v1/documents/bulk", doomed.url))
        .bearer_auth(&token)
        .json(&json!({"operation": "tag", "documentIds": ids, "tags": ["reviewed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    let on_b = format!("{}{location}", c.b.url);
    // Killed once it is under way (the replica that took it is the one woken by the request,
    // or another that looked first: either way the job is mid-way when one replica dies).
    let mut seen = Value::Null;
    for _ in 0..400 {
        seen = support::json_of(c.client.get(&on_b).bearer_auth(&token)).await;
        if seen["processed"].as_i64() > Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["status"], "RUNNING", "mid-way: {seen}");
    doomed.kill();
    let mut done = Value::Null;
    for _ in 0..900 {
        done = support::json_of(c.client.get(&on_b).bearer_auth(&token)).await;
        if done["status"] == "COMPLETED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = i64::try_from(DOCUMENTS).unwrap();
    assert_eq!(
        (done["status"].as_str(), done["processed"].as_i64(), done["succeeded"].as_i64(), done["failed"].as_i64()),
        (Some("COMPLETED"), Some(total), Some(total), Some(0)),
        "{done}"
    );
    for id in ids.iter().step_by(37) {
        let doc =
            support::json_of(c.client.get(format!("{}/api/v1/documents/{id}", c.a.url)).bearer_auth(&token)).await;
        assert_eq!(doc["tags"], json!(["reviewed"]), "{doc}");
    }
}
