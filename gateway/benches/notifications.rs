//! Notification benchmark, measured side by side in one run (the machine is shared and
//! noisy: ratios count, absolute numbers much less):
//!
//! 1. Webhook deliveries per second from the delivery engine (the one `vellum-workers run`
//!    and standalone mode use: leased from the Postgres delivery log, signed twice, sent,
//!    every attempt recorded) to a local receiver, against a bare HTTP client (`reqwest`, the
//!    same concurrency) sending the same bodies and headers to the same receiver; then the
//!    same against a receiver that takes 20 ms to answer, as one doing real work does.
//! 2. Upload → webhook and upload → WebSocket latency, p50 and p99, through the release
//!    `vellum-gateway standalone` binary in its own process on Postgres: from the start of
//!    each upload request to the arrival of its event (goal: p99 under 100 ms).
//! 3. Memory per idle WebSocket connection: the gateway process's RSS before and after
//!    opening many connections (10,000 by default).
//!
//! ```sh
//! scripts/test --services-only        # Postgres if missing
//! cargo bench -p vellum-gateway --bench notifications
//! ```
//!
//! Knobs: `VELLUM_BENCH_DELIVERIES` (default 3000), `VELLUM_BENCH_CONCURRENCY` (per
//! endpoint, default 8), `VELLUM_BENCH_UPLOADS` (default 300), `VELLUM_BENCH_CONNECTIONS`
//! (default 10000; needs twice as many file descriptors as `ulimit -n` gives one process).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use vellum_core::clock::Clock;
use vellum_core::config::{SecretHandle, WebhookConfig};
use vellum_core::crds::webhook::{DeactivationRule, EventType, RetryPolicy};
use vellum_core::events::Event;
use vellum_core::signing::{legacy_signature, standard_signature};
use vellum_core::store::Metadata;
use vellum_core::webhooks::DestinationPolicy;
use vellum_testkit::TestDatabase;
use vellum_workers::{Configured, Engine, Sender, Settings};

mod support;

use support::{Gateway, knob, memory, mib, percentile};

const KEY: &[u8] = b"benchmark-signing-key";

/// How long the receiver's `/slow` path takes to answer: a receiver doing real work.
const SLOW_RECEIVER: Duration = Duration::from_millis(20);

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[allow(clippy::cast_precision_loss)]
fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// A local webhook receiver: counts requests and notes when each document's event arrived.
#[derive(Clone, Default)]
struct Receiver {
    count: Arc<AtomicUsize>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: Bytes| {
            let me = me.clone();
            async move {
                if uri.path() == "/slow" {
                    tokio::time::sleep(SLOW_RECEIVER).await;
                }
                let now = Instant::now();
                if let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(&body)
                    && let Some(id) = event.get("documentId")
                {
                    me.arrivals.lock().unwrap().insert(id.to_string(), now);
                }
                me.count.fetch_add(1, Ordering::Relaxed);
                StatusCode::NO_CONTENT
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn wait_for(&self, n: usize) {
        while self.count.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

fn event(n: usize) -> Event {
    let mut fields = Map::new();
    fields.insert("documentId".into(), json!(n));
    fields.insert("filename".into(), json!(format!("report-{n}.pdf")));
    fields.insert("uploadedBy".into(), json!("bench"));
    fields.insert("size".into(), json!(48_213));
    Event::new(EventType::DocumentUploaded, Clock::system().now_ms(), fields)
}

/// The bare peer: the same requests (body and both signatures) from a plain client.
async fn bare_client(url: &str, events: &[Event], concurrency: usize, receiver: &Receiver) -> Duration {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let now_s = Clock::system().now_ms() / 1000;
    let requests: Arc<Vec<(String, String, String, String)>> = Arc::new(
        events
            .iter()
            .map(|e| {
                let body = e.payload.to_string();
                let standard = standard_signature(KEY, &e.id, now_s, body.as_bytes());
                let legacy = legacy_signature(KEY, body.as_bytes());
                (e.id.clone(), body, standard, legacy)
            })
            .collect(),
    );
    let base = receiver.count.load(Ordering::Relaxed);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, requests, next, url) = (client.clone(), Arc::clone(&requests), Arc::clone(&next), url.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, body, standard, legacy)) = requests.get(i) else { return };
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", now_s.to_string())
                    .header("webhook-signature", standard)
                    .header("x-webhook-signature", legacy)
                    .header("x-event-type", "DOCUMENT_UPLOADED")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(receiver.count.load(Ordering::Relaxed) - base, events.len());
    elapsed
}

fn endpoint(url: &str, concurrency: usize, paused: bool) -> Configured {
    let config = WebhookConfig {
        url: url.to_owned(),
        signing_key: SecretHandle::new("bench", "key"),
        event_types: vec![],
        filter: None,
        retry: RetryPolicy::default(),
        timeout_seconds: 10,
        rate_limit: None,
        max_concurrency: u32::try_from(concurrency).unwrap(),
        headers: vec![],
        paused,
        deactivation: DeactivationRule::default(),
    };
    Configured { name: "bench".into(), config, key: KEY.to_vec() }
}

/// The engine: events queued while the endpoint is paused, then timed from its resumption
/// to the last delivery recorded by the receiver.
async fn engine_deliveries(url: &str, events: &[Event], concurrency: usize, receiver: &Receiver) -> Duration {
    let db = TestDatabase::new().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let sender = Sender::new(DestinationPolicy::parse(["127.0.0.0/8"]).unwrap()).unwrap();
    let engine = Engine::new(meta, Clock::system(), sender, Settings::default());
    engine.set_endpoints(vec![endpoint(url, concurrency, true)]).await.unwrap();
    for event in events {
        engine.ingest(event).await.unwrap();
    }
    let base = receiver.count.load(Ordering::Relaxed);
    let start = Instant::now();
    engine.set_endpoints(vec![endpoint(url, concurrency, false)]).await.unwrap();
    engine.wake(&["bench".to_owned()]);
    receiver.wait_for(base + events.len()).await;
    let elapsed = start.elapsed();
    engine.shutdown().await;
    elapsed
}

fn start_gateway(work: &std::path::Path, database_url: &str, hook_url: &str, concurrency: usize) -> Gateway {
    let config = work.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("platform.yaml"),
        format!(
            "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: hot}}\n\
             spec: {{class: HOT, default: true, backend: {{url: 'file://tiers/hot'}}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: hook}}\nstringData: {{key: benchmark-signing-key}}\n---\n\
             apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: bench}}\n\
             spec: {{url: '{hook_url}', secretRef: {{name: hook, key: key}}, maxConcurrency: {concurrency}}}\n"
        ),
    )
    .unwrap();
    // The idle-WebSocket phase opens more sockets than the default connection cap allows.
    Gateway::start(
        work,
        database_url,
        &["--allow-webhook-cidr", "127.0.0.1", "--log", "warn", "--max-connections", "1000000"],
    )
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(gateway: &Gateway) -> Ws {
    let url = format!("{}/ws?token={}", gateway.url.replace("http://", "ws://"), gateway.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("connection_established"));
    ws
}

/// Uploads `n` small documents one after another; returns each one's start by document id
/// and the request durations.
async fn uploads(gateway: &Gateway, n: usize, tag: &str) -> (HashMap<String, Instant>, Vec<Duration>) {
    let client = reqwest::Client::new();
    let (mut started, mut durations) = (HashMap::new(), Vec::new());
    for i in 0..n {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(format!("document {tag} {i}").into_bytes())
                .file_name(format!("{tag}-{i}.txt")),
        );
        let start = Instant::now();
        let response = client
            .post(format!("{}/api/v1/documents", gateway.url))
            .bearer_auth(&gateway.token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let doc: Value = response.json().await.unwrap();
        durations.push(start.elapsed());
        started.insert(doc["id"].to_string(), start);
        // A steady trickle, not a flood: latency, not throughput.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (started, durations)
}

fn latencies(started: &HashMap<String, Instant>, arrivals: &HashMap<String, Instant>) -> Vec<Duration> {
    let mut all: Vec<Duration> =
        started.iter().map(|(id, t0)| arrivals.get(id).expect("every event arrived").duration_since(*t0)).collect();
    all.sort();
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
async fn main() {
    let deliveries = knob("VELLUM_BENCH_DELIVERIES", 3000);
    let concurrency = knob("VELLUM_BENCH_CONCURRENCY", 8);
    let n_uploads = knob("VELLUM_BENCH_UPLOADS", 300);
    let connections = knob("VELLUM_BENCH_CONNECTIONS", 10_000);

    let receiver = Receiver::default();
    let hook = receiver.start().await;

    // 1. Deliveries per second, engine and bare client alternating twice.
    let events: Vec<Event> = (0..deliveries).map(event).collect();
    bare_client(&hook, &events[..100.min(events.len())], concurrency, &receiver).await; // warm-up
    let (mut bare, mut engine) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        bare.push(bare_client(&hook, &events, concurrency, &receiver).await);
        let fresh: Vec<Event> = (0..deliveries).map(event).collect();
        engine.push(engine_deliveries(&hook, &fresh, concurrency, &receiver).await);
    }
    let bare_best = *bare.iter().min().unwrap();
    let engine_best = *engine.iter().min().unwrap();
    // The same against a receiver taking 20 ms per request, with a fifth of the events.
    let slow_hook = hook.replace("/hook", "/slow");
    let slow_n = (deliveries / 5).max(1);
    let (mut slow_bare, mut slow_engine) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let fresh: Vec<Event> = (0..slow_n).map(event).collect();
        slow_bare.push(bare_client(&slow_hook, &fresh, concurrency, &receiver).await);
        let fresh: Vec<Event> = (0..slow_n).map(event).collect();
        slow_engine.push(engine_deliveries(&slow_hook, &fresh, concurrency, &receiver).await);
    }
    let slow_bare_best = *slow_bare.iter().min().unwrap();
    let slow_engine_best = *slow_engine.iter().min().unwrap();

    // 2. Latency through the gateway process.
    let work = tempfile::tempdir().unwrap();
    let db = TestDatabase::new().await.unwrap();
    let gateway = start_gateway(work.path(), &db.url, &hook.replace("/hook", "/latency"), concurrency);
    let mut ws = connect(&gateway).await;
    let ws_arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = tokio::spawn({
        let arrivals = Arc::clone(&ws_arrivals);
        async move {
            while let Some(Ok(message)) = ws.next().await {
                let now = Instant::now();
                if let Ok(text) = message.to_text()
                    && let Ok(value) = serde_json::from_str::<Value>(text)
                    && value["type"] == "DOCUMENT_UPLOADED"
                {
                    arrivals.lock().unwrap().insert(value["data"]["documentId"].to_string(), now);
                }
            }
        }
    });
    uploads(&gateway, 20, "warm-up").await;
    let (started, upload_times) = uploads(&gateway, n_uploads, "timed").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let to_webhook = latencies(&started, &receiver.arrivals.lock().unwrap());
    let to_ws = latencies(&started, &ws_arrivals.lock().unwrap());
    reader.abort();
    let mut upload_times = upload_times;
    upload_times.sort();

    // 3. Idle WebSocket connections.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = gateway.child.id();
    let before = memory(pid, "VmRSS:");
    let open = Arc::new(Mutex::new(Vec::with_capacity(connections)));
    let next = Arc::new(AtomicUsize::new(0));
    let gateway = Arc::new(gateway);
    let mut openers = Vec::new();
    for _ in 0..32 {
        let (open, next, gateway) = (Arc::clone(&open), Arc::clone(&next), Arc::clone(&gateway));
        openers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < connections {
                let ws = connect(&gateway).await;
                open.lock().unwrap().push(ws);
            }
        }));
    }
    for opener in openers {
        opener.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = memory(pid, "VmRSS:");
    let held = open.lock().unwrap().len();

    println!("notifications benchmark (one run, side by side)");
    println!(
        "  webhook deliveries/s, {deliveries} events, concurrency {concurrency}: engine {:.0}/s, bare client {:.0}/s, \
         ratio {:.2} (runs: engine {:?}, bare {:?})",
        per_second(deliveries, engine_best),
        per_second(deliveries, bare_best),
        bare_best.as_secs_f64() / engine_best.as_secs_f64(),
        engine.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        bare.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    );
    println!(
        "  the same to a receiver taking {} per request, {slow_n} events: engine {:.0}/s, bare client {:.0}/s, \
         ratio {:.2} (best of two each)",
        ms(SLOW_RECEIVER),
        per_second(slow_n, slow_engine_best),
        per_second(slow_n, slow_bare_best),
        slow_bare_best.as_secs_f64() / slow_engine_best.as_secs_f64(),
    );
    println!(
        "  upload request ({n_uploads} uploads): p50 {}, p99 {}",
        ms(percentile(&upload_times, 0.5)),
        ms(percentile(&upload_times, 0.99))
    );
    println!(
        "  upload -> webhook: p50 {}, p99 {}   (goal p99 < 100 ms)",
        ms(percentile(&to_webhook, 0.5)),
        ms(percentile(&to_webhook, 0.99))
    );
    println!(
        "  upload -> WebSocket: p50 {}, p99 {}   (goal p99 < 100 ms)",
        ms(percentile(&to_ws, 0.5)),
        ms(percentile(&to_ws, 0.99))
    );
    let per = (after.saturating_sub(before)) as f64 / held as f64;
    println!(
        "  idle WebSockets: {held} open, gateway RSS {:.1} MiB -> {:.1} MiB, {:.1} KiB per connection",
        mib(before),
        mib(after),
        per / 1024.0
    );
}
