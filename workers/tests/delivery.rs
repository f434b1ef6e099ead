//! The delivery engine against real HTTP receivers that fail on purpose, on Postgres: the
//! retry schedule, Retry-After, redirects, 410 Gone, deactivation by failure rate,
//! isolation of a slow endpoint, and the destination policy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, json};
use vellum_core::clock::Clock;
use vellum_core::config::{SecretHandle, WebhookConfig};
use vellum_core::crds::webhook::{DeactivationRule, EventType, RetryPolicy};
use vellum_core::events::{Event, outbox};
use vellum_core::signing::{legacy_signature, standard_signature};
use vellum_core::store::Metadata;
use vellum_core::webhooks::{self, DestinationPolicy};
use vellum_testkit::TestDatabase;
use vellum_workers::{Configured, Engine, Sender, Settings};

const KEY: &[u8] = b"test-signing-key";

/// A request as the receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

type Answer = Arc<dyn Fn(usize) -> Response + Send + Sync>;

/// An HTTP receiver on loopback that records every request and answers the n-th (from 0)
/// with `answer(n)`.
struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(answer: impl Fn(usize) -> Response + Send + Sync + 'static) -> Self {
        Self::slow(Duration::ZERO, answer).await
    }

    /// A receiver that takes `delay` to answer each request.
    async fn slow(delay: Duration, answer: impl Fn(usize) -> Response + Send + Sync + 'static) -> Self {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answer: Answer = Arc::new(answer);
        let app = Router::new().fallback({
            let seen = Arc::clone(&seen);
            move |headers: HeaderMap, body: Bytes| {
                let (seen, answer) = (Arc::clone(&seen), Arc::clone(&answer));
                async move {
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Received { at: Instant::now(), headers, body });
                        seen.len() - 1
                    };
                    tokio::time::sleep(delay).await;
                    answer(n)
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.seen();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(url: &str, retry: RetryPolicy) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        signing_key: SecretHandle::new("s", "k"),
        event_types: vec![],
        filter: None,
        retry,
        timeout_seconds: 5,
        rate_limit: None,
        max_concurrency: 4,
        headers: vec![],
        paused: false,
        deactivation: DeactivationRule::default(),
    }
}

fn no_jitter(max_retries: u32, initial: u32) -> RetryPolicy {
    RetryPolicy { max_retries, initial_backoff_seconds: initial, max_backoff_seconds: 300, jitter: false }
}

struct Env {
    meta: Metadata,
    engine: Engine,
    _db: TestDatabase,
}

async fn env(endpoints: Vec<(&str, WebhookConfig)>, policy: DestinationPolicy) -> Env {
    let db = TestDatabase::new().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let settings = Settings { idle_poll: Duration::from_millis(500), ..Settings::default() };
    let engine = Engine::new(meta.clone(), Clock::system(), Sender::new(policy).unwrap(), settings);
    let configured = endpoints
        .into_iter()
        .map(|(name, config)| Configured { name: name.into(), config, key: KEY.to_vec() })
        .collect();
    engine.set_endpoints(configured).await.unwrap();
    Env { meta, engine, _db: db }
}

fn loopback() -> DestinationPolicy {
    DestinationPolicy::parse(["127.0.0.0/8"]).unwrap()
}

fn uploaded(n: i64) -> Event {
    let mut fields = Map::new();
    fields.insert("documentId".into(), json!(n));
    fields.insert("filename".into(), json!(format!("doc-{n}.pdf")));
    Event::new(EventType::DocumentUploaded, Clock::system().now_ms(), fields)
}

fn status(code: u16) -> Response {
    StatusCode::from_u16(code).unwrap().into_response()
}

/// Checks both signature schemes of one request against the key.
fn assert_signed(r: &Received) {
    let header = |name: &str| r.headers.get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap().to_owned();
    let id = header("webhook-id");
    let ts: i64 = header("webhook-timestamp").parse().unwrap();
    let expected = standard_signature(KEY, &id, ts, &r.body);
    assert!(header("webhook-signature").split(' ').any(|s| s == expected), "standard signature");
    assert_eq!(header("x-webhook-signature"), legacy_signature(KEY, &r.body));
    assert_eq!(header("content-type"), "application/json");
}

#[tokio::test]
async fn the_default_schedule_is_at_once_then_2_4_8_seconds_then_failed() {
    let receiver = Receiver::start(|_| status(500)).await;
    let env = env(vec![("failing", config(&receiver.url, no_jitter(3, 2)))], loopback()).await;
    let event = uploaded(1);
    env.engine.ingest(&event).await.unwrap();
    let seen = receiver.wait_for(4, Duration::from_secs(25)).await;
    assert_eq!(seen.len(), 4, "one attempt and three retries");
    let gaps: Vec<f64> = seen.windows(2).map(|w| (w[1].at - w[0].at).as_secs_f64()).collect();
    for (gap, expected) in gaps.iter().zip([2.0, 4.0, 8.0]) {
        assert!(*gap >= expected - 0.05 && *gap < expected + 1.5, "gaps {gaps:?}");
    }
    for r in &seen {
        assert_signed(r);
        assert_eq!(r.headers["webhook-id"], event.id.as_str(), "retries carry the same webhook-id");
        assert_eq!(r.body, event.payload.to_string(), "the same bytes every time");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (log, _) = webhooks::deliveries(&env.meta, "failing", 0, 10).await.unwrap();
    assert_eq!(log[0].status, "FAILED");
    assert_eq!(log[0].attempt_log.len(), 4);
    assert!(log[0].attempt_log.iter().all(|a| a.status_code == Some(500)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.seen().len(), 4, "nothing after FAILED");
    env.engine.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured_redirects_fail_and_gone_deactivates_at_once() {
    // 429 with Retry-After: 3 (longer than the 1 s backoff), then a redirect, then 410.
    let receiver = Receiver::start(|n| match n {
        0 => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")]).into_response(),
        1 => (StatusCode::FOUND, [("location", "http://169.254.169.254/")]).into_response(),
        _ => status(410),
    })
    .await;
    let env = env(vec![("moody", config(&receiver.url, no_jitter(5, 1)))], loopback()).await;
    env.engine.ingest(&uploaded(1)).await.unwrap();
    let seen = receiver.wait_for(3, Duration::from_secs(15)).await;
    assert_eq!(seen.len(), 3);
    let first_gap = (seen[1].at - seen[0].at).as_secs_f64();
    assert!((3.0..4.5).contains(&first_gap), "Retry-After honoured: {first_gap}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (log, _) = webhooks::deliveries(&env.meta, "moody", 0, 10).await.unwrap();
    let attempts = &log[0].attempt_log;
    assert!(attempts[1].error.as_deref().unwrap().contains("redirect"), "{attempts:?}");
    assert_eq!(log[0].status, "FAILED", "410 ends the delivery");
    let activation = webhooks::activation(&env.meta, "moody").await.unwrap();
    assert!(!activation.active);
    assert!(activation.deactivation_reason.unwrap().contains("410"));
    // Deactivated: a new event is not sent.
    env.engine.ingest(&uploaded(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.seen().len(), 3);
    env.engine.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_failing_over_80_percent_of_10_calls_is_deactivated_with_an_event() {
    let receiver = Receiver::start(|n| if n == 0 { status(200) } else { status(500) }).await;
    let env = env(vec![("flaky", config(&receiver.url, no_jitter(0, 1)))], loopback()).await;
    for n in 0..12 {
        env.engine.ingest(&uploaded(n)).await.unwrap();
        // One at a time, so the count at deactivation is exact.
        receiver.wait_for(usize::try_from(n).unwrap() + 1, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.seen().len(), 10, "the 11th and 12th events are not sent");
    let stats = webhooks::stats(&env.meta, "flaky").await.unwrap();
    assert_eq!((stats.total_calls, stats.success_count, stats.failure_count), (10, 1, 9));
    assert!(!stats.active);
    let events = outbox::pending(&env.meta, 100).await.unwrap();
    let deactivated: Vec<_> = events.iter().filter(|p| p.event.event_type == EventType::WebhookDeactivated).collect();
    assert_eq!(deactivated.len(), 1);
    assert_eq!(deactivated[0].event.payload["webhookId"], "flaky");

    // Reactivated, it receives again.
    webhooks::reactivate(&env.meta, "flaky", Clock::system().now_ms()).await.unwrap();
    env.engine.wake(&["flaky".to_owned()]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.engine.ingest(&uploaded(99)).await.unwrap();
    assert_eq!(receiver.wait_for(11, Duration::from_secs(5)).await.len(), 11);
    env.engine.shutdown().await;
}

#[tokio::test]
async fn a_slow_endpoint_never_delays_another() {
    let slow = Receiver::slow(Duration::from_millis(1500), |_| status(200)).await;
    let fast = Receiver::start(|_| status(200)).await;
    let mut slow_config = config(&slow.url, no_jitter(3, 1));
    slow_config.max_concurrency = 1;
    let env = env(vec![("slow", slow_config), ("fast", config(&fast.url, no_jitter(3, 1)))], loopback()).await;
    let started = Instant::now();
    for n in 0..5 {
        env.engine.ingest(&uploaded(n)).await.unwrap();
    }
    let fast_seen = fast.wait_for(5, Duration::from_secs(5)).await;
    assert_eq!(fast_seen.len(), 5);
    let fast_done = fast_seen[4].at - started;
    assert!(fast_done < Duration::from_secs(1), "fast endpoint waited {fast_done:?}");
    assert!(slow.seen().len() <= 1, "the slow endpoint takes one at a time");
    env.engine.shutdown().await;
}

#[tokio::test]
async fn forbidden_destinations_are_never_contacted() {
    let receiver = Receiver::start(|_| status(200)).await;
    // No allow-list: loopback is refused, through the URL's literal address and by name.
    let by_name = receiver.url.replace("127.0.0.1", "localhost");
    let env = env(
        vec![("literal", config(&receiver.url, no_jitter(0, 1))), ("named", config(&by_name, no_jitter(0, 1)))],
        DestinationPolicy::default(),
    )
    .await;
    env.engine.ingest(&uploaded(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(receiver.seen().is_empty());
    for name in ["literal", "named"] {
        let (log, _) = webhooks::deliveries(&env.meta, name, 0, 10).await.unwrap();
        assert_eq!(log[0].status, "FAILED", "{name}");
        let error = log[0].attempt_log[0].error.clone().unwrap();
        assert!(error.contains("destination refused") && error.contains("loopback"), "{name}: {error}");
    }
    env.engine.shutdown().await;
}

#[tokio::test]
async fn a_rotated_key_signs_beside_the_new_one() {
    let receiver = Receiver::start(|_| status(200)).await;
    let env = env(vec![("rotating", config(&receiver.url, no_jitter(0, 1)))], loopback()).await;
    env.engine
        .set_endpoints(vec![Configured {
            name: "rotating".into(),
            config: config(&receiver.url, no_jitter(0, 1)),
            key: b"new-key".to_vec(),
        }])
        .await
        .unwrap();
    env.engine.ingest(&uploaded(1)).await.unwrap();
    let seen = receiver.wait_for(1, Duration::from_secs(5)).await;
    let r = &seen[0];
    let id = r.headers["webhook-id"].to_str().unwrap();
    let ts: i64 = r.headers["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    let signatures: Vec<&str> = r.headers["webhook-signature"].to_str().unwrap().split(' ').collect();
    assert_eq!(
        signatures,
        [standard_signature(b"new-key", id, ts, &r.body).as_str(), standard_signature(KEY, id, ts, &r.body).as_str()]
    );
    assert_eq!(r.headers["x-webhook-signature"], legacy_signature(b"new-key", &r.body).as_str());
    env.engine.shutdown().await;
}

/// Runs one of the seed's receiver checks (`seed_verify.js` under Node.js, `seed_verify.py`
/// under Python) over `deliveries` (body, `X-Webhook-Signature`): how many verified, and
/// how many not.
fn seed_check(program: &std::path::Path, script: &str, deliveries: &[(String, String)]) -> (u64, u64) {
    use std::io::Write as _;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut child = std::process::Command::new(program)
        .arg(script)
        .arg(String::from_utf8(KEY.to_vec()).unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs it)", program.display()));
    {
        let mut stdin = child.stdin.take().unwrap();
        for (body, signature) in deliveries {
            writeln!(stdin, "{}", json!({"body": body, "signature": signature})).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (verdict["ok"].as_u64().unwrap(), verdict["bad"].as_u64().unwrap())
}

/// Every event type, with the values JavaScript writes otherwise than Rust (a whole-number
/// progress, tiny and huge numbers, keys that are array indices, escapes), verifies with
/// the seed's Node.js check, which signs `JSON.stringify(req.body)`, and with its Python
/// check, which signs the body as received.
#[tokio::test]
async fn every_event_type_verifies_with_the_seeds_node_and_python_receivers() {
    let receiver = Receiver::start(|_| status(200)).await;
    let env = env(vec![("all", config(&receiver.url, no_jitter(0, 1)))], loopback()).await;
    let types = [
        EventType::DocumentUploaded,
        EventType::DocumentUpdated,
        EventType::DocumentDeleted,
        EventType::DocumentArchived,
        EventType::DocumentRestored,
        EventType::DocumentVersionCreated,
        EventType::BulkOperationProgress,
        EventType::BulkOperationCompleted,
        EventType::WebhookDeactivated,
    ];
    for (n, event_type) in types.into_iter().enumerate() {
        let mut fields = Map::new();
        fields.insert("documentId".into(), json!(n));
        fields.insert("progress".into(), json!(50.0));
        fields.insert("ratio".into(), json!(0.000_001));
        fields.insert("huge".into(), json!(1e21));
        fields.insert("size".into(), json!(9_007_199_254_740_991_i64));
        fields.insert("filename".into(), json!("quarterly \"report\"\n\u{1}é.pdf"));
        fields.insert("metadata".into(), json!({"title": "Q4", "2024": {"10": true, "9": false}, "tags": ["a"]}));
        env.engine.ingest(&Event::new(event_type, Clock::system().now_ms(), fields)).await.unwrap();
    }
    let seen = receiver.wait_for(types.len(), Duration::from_secs(10)).await;
    assert_eq!(seen.len(), types.len());
    let deliveries: Vec<(String, String)> = seen
        .iter()
        .map(|r| {
            let body = String::from_utf8(r.body.to_vec()).unwrap();
            (body, r.headers["x-webhook-signature"].to_str().unwrap().to_owned())
        })
        .collect();
    let mut kinds: Vec<&str> = seen.iter().map(|r| r.headers["x-event-type"].to_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds.len(), types.len(), "one delivery of each type");
    assert!(deliveries.iter().all(|(body, _)| body.contains(r#""progress":50,"#)), "{deliveries:?}");
    let node = std::path::PathBuf::from("node");
    assert_eq!(seed_check(&node, "seed_verify.js", &deliveries), (types.len() as u64, 0), "Node.js");
    assert_eq!(seed_check(&vellum_testkit::python(), "seed_verify.py", &deliveries), (types.len() as u64, 0), "Python");
    env.engine.shutdown().await;
}
