//! `vellum-workers run` reports on itself: `/healthz`, `/readyz` (its database and its NATS
//! connection) and `/metrics` (`vellum_worker_…`): deliveries by outcome and their
//! duration, the outbox's backlog and the relay's lag.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, json};
use vellum_core::clock::Clock;
use vellum_core::crds::webhook::EventType;
use vellum_core::events::Event;
use vellum_core::store::{Metadata, StoreError};
use vellum_testkit::{NatsProcess, TestDatabase};

async fn enqueue(meta: &Metadata, n: i64) {
    let now = Clock::system().now_ms();
    let mut fields = Map::new();
    fields.insert("documentId".into(), json!(n));
    fields.insert("filename".into(), json!(format!("d{n}.txt")));
    let event = Event::new(EventType::DocumentUploaded, now, fields);
    meta.write(|mut tx| {
        let event = event.clone();
        Box::pin(async move {
            let r: Result<(), StoreError> = event.enqueue(&mut tx, now).await;
            (tx, r)
        })
    })
    .await
    .unwrap();
}

/// A receiver answering `status` to every request.
async fn receiver(status: u16) -> String {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(move || async move { axum::http::StatusCode::from_u16(status).unwrap() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of the sample `name` (with its labels, as written) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reports_its_health_and_its_deliveries() {
    let (ok, failing) = (receiver(200).await, receiver(500).await);
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {hook: 'a-webhook-secret-for-hmac'}\n---\n\
         apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\n\
         spec: {class: HOT, default: true, backend: {url: 'memory://'}}\n---\n\
         apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs}\n\
         spec: {version: '1', gateway: {image: g}, workers: {image: w}, shardSetRef: shards, \
         nats: {url: 'nats://127.0.0.1:4222'}, jwt: {secretRef: {name: keys, key: hook}}, webhookAllowedCidrs: ['127.0.0.1']}\n",
    );
    for (name, url) in [("ok", &ok), ("failing", &failing)] {
        let _ = write!(
            yaml,
            "---\napiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}}}\n\
             spec: {{url: '{url}', secretRef: {{name: keys, key: hook}}, retry: {{maxRetries: 0}}, deactivation: {{enabled: false}}}}\n"
        );
    }
    std::fs::write(dir.path().join("platform.yaml"), yaml).unwrap();
    let db = TestDatabase::new().await.unwrap();
    let meta = Metadata::open(&db.url).await.unwrap();
    let mut nats = NatsProcess::start().unwrap();
    let port = free_port();
    let options = vellum_workers::run::Options {
        database_url: db.url.clone(),
        nats_url: nats.url(),
        config_dir: dir.path().to_owned(),
        secrets_dir: None,
        reload: Duration::from_secs(5),
        relay_poll: Duration::from_millis(50),
        log_retention: Duration::from_secs(3600),
        settings: vellum_workers::Settings::default(),
        metrics_listen: Some(([127, 0, 0, 1], port).into()),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(vellum_workers::run::run(options, stopped));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("{base}{path}"));
        async move { http.get(url).send().await }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while get("/readyz").await.map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(tokio::time::Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get("/healthz").await.unwrap().text().await.unwrap(), "ok");

    for n in 0..5 {
        enqueue(&meta, n).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = get("/metrics").await.unwrap().text().await.unwrap();
        let delivered = sample(&text, "vellum_worker_deliveries_total{outcome=\"delivered\"}").unwrap_or(0.0);
        let failed = sample(&text, "vellum_worker_deliveries_total{outcome=\"failed\"}").unwrap_or(0.0);
        let settled = sample(&text, "vellum_worker_outbox_pending") == Some(0.0);
        if delivered >= 5.0 && failed >= 5.0 && settled {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "the metrics never showed the deliveries:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sample(&text, "vellum_worker_deliveries_total{outcome=\"delivered\"}"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "vellum_worker_deliveries_total{outcome=\"failed\"}"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "vellum_worker_delivery_duration_seconds_count"), Some(10.0), "{text}");
    assert_eq!(sample(&text, "vellum_worker_relay_lag_seconds"), Some(0.0), "{text}");

    // NATS away: not ready, saying why; still alive.
    nats.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = get("/readyz").await.unwrap();
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            assert_eq!(body["database"], "ok", "{body}");
            assert_ne!(body["nats"], "ok", "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready without NATS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get("/healthz").await.unwrap().status(), reqwest::StatusCode::OK);
    // Events written meanwhile wait in the outbox, and the lag shows it.
    enqueue(&meta, 99).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = get("/metrics").await.unwrap().text().await.unwrap();
        if sample(&text, "vellum_worker_outbox_pending") == Some(1.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the backlog never showed:\n{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.send_replace(true);
    let _ = worker.await;
}
