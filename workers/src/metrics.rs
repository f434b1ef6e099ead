//! What a worker reports about itself: `/healthz` (the process answers), `/readyz` (its
//! metadata database answers and its NATS connection is up) and `/metrics` in the
//! Prometheus text format, every name prefixed `vellum_worker_`:
//!
//! - `vellum_worker_deliveries_total{outcome}`: webhook attempts by what followed them
//!   (`delivered`, `retry`, `failed`, `gone`);
//! - `vellum_worker_delivery_duration_seconds`: how long each attempt took;
//! - `vellum_worker_outbox_pending`: events written and not yet relayed, over every shard;
//! - `vellum_worker_relay_lag_seconds`: the age of the oldest of them (0 when none waits).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use vellum_core::store::Metadata;
use vellum_core::webhooks::Next;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// The worker's metrics; cheap to share.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    deliveries: Family<Outcome, Counter>,
    duration: Histogram,
    outbox_pending: Gauge,
    relay_lag: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vellum_worker");
        let deliveries = Family::<Outcome, Counter>::default();
        registry.register("deliveries", "Webhook attempts by what followed them", deliveries.clone());
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register("delivery_duration_seconds", "How long each webhook attempt took", duration.clone());
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending",
            "Events written and not yet relayed, over every shard",
            outbox_pending.clone(),
        );
        let relay_lag = Gauge::<f64, AtomicU64>::default();
        registry.register("relay_lag_seconds", "Age of the oldest event not yet relayed", relay_lag.clone());
        Self { registry, deliveries, duration, outbox_pending, relay_lag }
    }

    /// One webhook attempt that took `seconds` and was followed by `next` (`gone`: the
    /// endpoint answered 410).
    pub fn attempt(&self, next: &Next, gone: bool, seconds: f64) {
        let outcome = match next {
            _ if gone => "gone",
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "retry",
            Next::Failed => "failed",
        };
        self.deliveries.get_or_create(&Outcome { outcome }).inc();
        self.duration.observe(seconds);
    }

    /// The outbox as the last look found it: `pending` events, the oldest written
    /// `lag_seconds` ago.
    pub fn outbox(&self, pending: i64, lag_seconds: f64) {
        self.outbox_pending.set(pending);
        self.relay_lag.set(lag_seconds);
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Every `every`, reads how many events wait in the outboxes of `shards` and how old the
/// oldest is.
pub async fn watch_outbox(
    metrics: Arc<Metrics>,
    shards: Vec<Metadata>,
    clock: vellum_core::clock::Clock,
    every: std::time::Duration,
) {
    loop {
        let (mut pending, mut oldest) = (0, None::<i64>);
        for meta in &shards {
            match vellum_core::events::outbox::backlog(meta).await {
                Ok((n, first)) => {
                    pending += n;
                    if let Some(at) = first {
                        oldest = Some(oldest.map_or(at, |o: i64| o.min(at)));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "reading the outbox backlog"),
            }
        }
        #[allow(clippy::cast_precision_loss)] // milliseconds of lag, well within f64
        let lag = oldest.map_or(0.0, |at| (clock.now_ms() - at).max(0) as f64 / 1000.0);
        metrics.outbox(pending, lag);
        tokio::time::sleep(every).await;
    }
}

/// The routing a worker relays the shards of: the routing version in force and the one
/// documents move to, as `/readyz` reports them (the operator waits for every worker to
/// report a move before documents move, and the flip before a leaving shard is let go).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub version: Option<String>,
    pub moving_to: Option<String>,
}

impl Routing {
    /// The routing of `config` (none without a ShardSet).
    pub fn of(config: &vellum_core::config::PlatformConfig) -> Self {
        let version = |set| vellum_core::routing::RoutingTable::build(set).ok().map(|t| t.version().to_owned());
        Self {
            version: config.shards.as_ref().and_then(version),
            moving_to: config.shard_move.as_ref().and_then(|m| version(&m.to)),
        }
    }
}

/// What `/readyz` checks.
#[derive(Clone)]
struct Probe {
    metrics: Arc<Metrics>,
    meta: Metadata,
    nats: async_nats::Client,
    routing: Arc<std::sync::RwLock<Routing>>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(probe): State<Probe>) -> impl IntoResponse {
    let database = probe.meta.schema_version().await.map(|_| ()).map_err(|e| e.to_string());
    let nats = match probe.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        state => Err(format!("{state:?}").to_lowercase()),
    };
    let routing = probe.routing.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let body = serde_json::json!({
        "status": if database.is_ok() && nats.is_ok() { "ready" } else { "not ready" },
        "database": database.as_ref().err().map_or("ok", String::as_str),
        "nats": nats.as_ref().err().map_or("ok", String::as_str),
        "routingVersion": routing.version,
        "movingTo": routing.moving_to,
    });
    let code = if database.is_ok() && nats.is_ok() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body))
}

async fn metrics(State(probe): State<Probe>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], probe.metrics.encode())
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `at` until the process ends; returns the
/// bound address. `/readyz` reports `routing` as it is when asked.
pub async fn serve(
    at: SocketAddr,
    metrics_: Arc<Metrics>,
    meta: Metadata,
    nats: async_nats::Client,
    routing: Arc<std::sync::RwLock<Routing>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(at).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Probe { metrics: metrics_, meta, nats, routing });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "serving health and metrics");
        }
    });
    Ok((bound, task))
}
