//! The whole webhook path with real processes: events written to the outbox of a Postgres
//! database are relayed by `vellum-workers run` to a private NATS JetStream server,
//! consumed into the delivery log and delivered to a Python receiver that verifies every
//! request with the `standardwebhooks` library and the seed's snippets. NATS is killed and
//! restarted mid-stream, and the worker is killed (SIGKILL) mid-delivery and restarted:
//! every event still reaches every endpoint, signed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Map, Value, json};
use vellum_core::clock::Clock;
use vellum_core::crds::webhook::EventType;
use vellum_core::events::{Event, outbox};
use vellum_core::store::{Metadata, StoreError};
use vellum_core::webhooks;
use vellum_testkit::{NatsProcess, TestDatabase, python};

const PLAIN_SECRET: &str = "seed-style-secret-for-hmac";

struct ReceiverProcess {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ReceiverProcess {
    fn start(whsec: &str, slow_file: &std::path::Path) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--plain-secret", PLAIN_SECRET, "--whsec-secret", whsec, "--fail-first", "--slow-file"])
            .arg(slow_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the receiver");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let port = first.trim().parse().expect("the receiver prints its port");
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        });
        Self { child, port, lines }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Event ids answered 200 on each path.
    fn delivered(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in self.lines().iter().filter(|l| l["status"] == 200) {
            out.entry(line["path"].as_str().unwrap().to_owned())
                .or_default()
                .insert(line["id"].as_str().unwrap().into());
        }
        out
    }

    async fn wait_delivered(&self, ids: &[String], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let delivered = self.delivered();
            let done = ["/plain", "/whsec"]
                .iter()
                .all(|p| delivered.get(*p).is_some_and(|got| ids.iter().all(|id| got.contains(id))));
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not all of {} events delivered to both endpoints: {delivered:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Worker {
    child: Child,
}

impl Worker {
    fn start(database_url: &str, nats_url: &str, config_dir: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vellum-workers"))
            .args(["--log", "info", "run", "--database-url", database_url, "--nats-url", nats_url])
            .arg("--config-dir")
            .arg(config_dir)
            .args(["--relay-poll-ms", "50", "--lease-margin-seconds", "1"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting vellum-workers");
        Self { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn enqueue(meta: &Metadata, n: i64) -> String {
    let now = Clock::system().now_ms();
    let mut fields = Map::new();
    fields.insert("documentId".into(), json!(n));
    fields.insert("filename".into(), json!(format!("contract-{n}.pdf")));
    fields.insert("uploadedBy".into(), json!("ann@example.com"));
    fields.insert("metadata".into(), json!({"title": "Q4 Contract – überprüft", "tags": ["legal", "contracts"]}));
    let event = Event::new(EventType::DocumentUploaded, now, fields);
    let id = event.id.clone();
    meta.write(|mut tx| {
        let event = event.clone();
        Box::pin(async move {
            let r: Result<(), StoreError> = event.enqueue(&mut tx, now).await;
            (tx, r)
        })
    })
    .await
    .unwrap();
    id
}

fn config_dir(dir: &std::path::Path, port: u16, whsec: &str) {
    let mut yaml = format!(
        r"
apiVersion: v1
kind: Secret
metadata: {{name: hook-keys}}
stringData: {{plain: '{PLAIN_SECRET}', whsec: '{whsec}'}}
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {{name: hot}}
spec: {{class: HOT, default: true, backend: {{url: 'memory://'}}}}
---
apiVersion: vellum.dev/v1alpha1
kind: BlueGreenRelease
metadata: {{name: docs}}
spec:
  version: '1'
  gateway: {{image: 'vellum/gateway:1'}}
  workers: {{image: 'vellum/workers:1'}}
  shardSetRef: shards
  nats: {{url: 'nats://127.0.0.1:4222'}}
  jwt: {{algorithm: HS256, secretRef: {{name: jwt, key: secret}}}}
  webhookAllowedCidrs: ['127.0.0.1']
"
    );
    // One endpoint per secret form, each signed with its own key of the Secret.
    for name in ["plain", "whsec"] {
        writeln!(
            yaml,
            r"---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: {name}}}
spec:
  url: http://127.0.0.1:{port}/{name}
  secretRef: {{name: hook-keys, key: {name}}}
  retry: {{maxRetries: 10, initialBackoffSeconds: 1, maxBackoffSeconds: 2, jitter: false}}
  timeoutSeconds: 2
  # Every first attempt fails on purpose here; that must not deactivate the endpoint.
  deactivation: {{enabled: false}}"
        )
        .unwrap();
    }
    std::fs::File::create(dir.join("platform.yaml")).unwrap().write_all(yaml.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_every_endpoint_signed_across_nats_and_worker_crashes() {
    let mut nats = NatsProcess::start().unwrap();
    let db = TestDatabase::new().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow");
    let whsec = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>()));
    let receiver = ReceiverProcess::start(&whsec, &slow);
    config_dir(dir.path(), receiver.port, &whsec);
    let mut worker = Worker::start(&db.url, &nats.url(), dir.path());

    // Steady state; every first attempt is answered 503 and retried.
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(enqueue(&meta, n).await);
    }
    receiver.wait_delivered(&ids, Duration::from_secs(30)).await;

    // NATS goes away: events wait in the outbox, then flow when it is back.
    nats.kill();
    for n in 10..20 {
        ids.push(enqueue(&meta, n).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(outbox::depth(&meta).await.unwrap() > 0, "unpublished while NATS is down");
    nats.restart().unwrap();
    receiver.wait_delivered(&ids, Duration::from_secs(60)).await;

    // The worker dies mid-delivery; its replacement sends the delivery again.
    std::fs::write(&slow, b"").unwrap();
    let crash_id = enqueue(&meta, 20).await;
    ids.push(crash_id.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !receiver.lines().iter().any(|l| l["id"] == crash_id.as_str()) {
        assert!(Instant::now() < deadline, "the delivery never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill();
    std::fs::remove_file(&slow).unwrap();
    let _worker = Worker::start(&db.url, &nats.url(), dir.path());
    receiver.wait_delivered(&ids, Duration::from_secs(60)).await;

    // Every request was signed, both ways, and verifies with the independent library and
    // with the seed's Python snippet.
    let lines = receiver.lines();
    assert!(lines.len() >= 2 * ids.len());
    for line in &lines {
        assert_eq!(line["standard"], true, "standardwebhooks rejected {line}");
        if line["path"] == "/plain" {
            assert_eq!(line["seed"], true, "the seed's Python snippet rejected {line}");
        }
        assert_eq!(line["eventType"], "DOCUMENT_UPLOADED");
    }
    // And with the seed's Node.js snippet, which verifies the body parsed and serialised again.
    let mut node = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/seed_verify.js"))
        .arg(PLAIN_SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node");
    {
        let mut stdin = node.stdin.take().unwrap();
        for line in lines.iter().filter(|l| l["path"] == "/plain") {
            writeln!(stdin, "{}", json!({"body": line["body"], "signature": line["legacy"]})).unwrap();
        }
    }
    let out = node.wait_with_output().unwrap();
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["bad"], 0, "{verdict}");
    assert!(verdict["ok"].as_u64().unwrap() >= ids.len() as u64);

    // The log agrees: each delivery succeeded, none is pending, none was made twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["plain", "whsec"] {
        let (log, total) = webhooks::deliveries(&meta, name, 0, 100).await.unwrap();
        assert_eq!(total, i64::try_from(ids.len()).unwrap(), "{name}: one delivery per event");
        assert!(log.iter().all(|d| d.status == "SUCCESS"), "{name}: {log:?}");
    }
}
