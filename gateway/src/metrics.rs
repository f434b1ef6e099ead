//! `/metrics` in the Prometheus text format: requests by route and status, latency
//! histograms, bytes in and out, deduplicated bytes, the outbox depth, and per tier the
//! objects, bytes and monthly cost (refreshed at most once a minute).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    hash: String,
}

/// An outcome: `success` or `failure`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    outcome: String,
}

/// Counts by outcome (`success`, `failure`).
pub type Outcomes = Family<OutcomeLabels, Counter>;

/// A cache's level (`L1`: this process's memory) and what it holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    level: String,
    cache: String,
}

/// The metrics the seed's dashboards read (seed 004's Micrometer meters, under the names
/// Prometheus gives them, without the gateway's prefix): `websocket_connections_total`,
/// `websocket_disconnections_total`, `websocket_active_connections`,
/// `authentication_attempts_total`, `recovery_attempts_total`, and `cache_hits_total` and
/// `cache_misses_total` by `level` (`L1`) and `cache` (`documents`, `versions`).
#[derive(Clone, Debug, Default)]
pub struct SeedMetrics {
    /// WebSocket connections (JSON, STOMP, SockJS) opened or refused.
    pub websocket_connections: Outcomes,
    pub websocket_disconnections: Counter,
    pub websocket_active_connections: Gauge,
    /// Token checks, wherever a token is presented.
    pub authentication_attempts: Outcomes,
    /// Streams resumed from a `Last-Event-ID`.
    pub recovery_attempts: Outcomes,
    pub cache_hits: Family<CacheLabels, Counter>,
    pub cache_misses: Family<CacheLabels, Counter>,
}

impl SeedMetrics {
    /// Counts one of `family` as a success or a failure.
    pub fn count(family: &Outcomes, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        family.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    /// The hit and miss counters of the in-process (`L1`) cache of `cache`.
    pub fn cache(&self, cache: &str) -> crate::cache::CacheMeters {
        let labels = CacheLabels { level: "L1".to_owned(), cache: cache.to_owned() };
        crate::cache::CacheMeters {
            hits: self.cache_hits.get_or_create(&labels).clone(),
            misses: self.cache_misses.get_or_create(&labels).clone(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "websocket_connections",
            "WebSocket connections (JSON, STOMP, SockJS) by outcome",
            self.websocket_connections.clone(),
        );
        registry.register(
            "websocket_disconnections",
            "WebSocket connections closed",
            self.websocket_disconnections.clone(),
        );
        registry.register(
            "websocket_active_connections",
            "WebSocket connections open now",
            self.websocket_active_connections.clone(),
        );
        registry.register(
            "authentication_attempts",
            "Token checks by outcome (HTTP, WebSocket, STOMP, SSE)",
            self.authentication_attempts.clone(),
        );
        registry.register(
            "recovery_attempts",
            "Event streams resumed from a Last-Event-ID, by outcome",
            self.recovery_attempts.clone(),
        );
        registry.register("cache_hits", "Reads answered from a cache, by level and cache", self.cache_hits.clone());
        registry.register(
            "cache_misses",
            "Reads a cache could not answer, by level and cache",
            self.cache_misses.clone(),
        );
    }
}

/// The gateway's metrics, registered under the `vellum_gateway` prefix, and those the
/// seed's dashboards read under their own names ([`SeedMetrics`]).
pub struct Metrics {
    registry: Registry,
    /// The seed's meters, for the parts of the gateway that count them.
    pub seed: SeedMetrics,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    bytes_in: Family<RouteLabels, Counter>,
    bytes_out: Family<RouteLabels, Counter>,
    /// Bytes of uploads that were already stored, and were not stored again.
    pub deduplicated_bytes: Counter,
    /// Uploads answered 503 because every upload place of the replica was taken.
    pub uploads_refused: Counter,
    outbox_depth: Gauge,
    /// 1 for the hash of the platform config in use, 0 for those used before.
    config: Family<ConfigLabels, Gauge>,
    config_hash: std::sync::Mutex<String>,
    tier_objects: Family<TierLabels, Gauge>,
    tier_bytes: Family<TierLabels, Gauge>,
    tier_cost: Family<TierLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    savings: Family<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// When the storage gauges were last computed (they cost a scan of the blobs).
    usage_at: std::sync::Mutex<Option<Instant>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let seed = SeedMetrics::default();
        seed.register(&mut root);
        let registry = root.sub_registry_with_prefix("vellum_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let bytes_in = Family::<RouteLabels, Counter>::default();
        let bytes_out = Family::<RouteLabels, Counter>::default();
        let deduplicated_bytes = Counter::default();
        let uploads_refused = Counter::default();
        registry.register(
            "uploads_refused",
            "Uploads answered 503 because the replica was taking as many as it may",
            uploads_refused.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register("http_requests", "HTTP requests by method, route and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time to the response head, by route", latency.clone());
        registry.register(
            "http_request_bytes",
            "Request body bytes announced by Content-Length, by route",
            bytes_in.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Response body bytes announced by Content-Length, by route",
            bytes_out.clone(),
        );
        registry.register("deduplicated_bytes", "Uploaded bytes that were already stored", deduplicated_bytes.clone());
        registry.register("outbox_depth", "Events written and not yet published", outbox_depth.clone());
        let config = Family::<ConfigLabels, Gauge>::default();
        registry.register("platform_config_info", "The platform config in use (1), by content hash", config.clone());
        let tier_objects = Family::<TierLabels, Gauge>::default();
        let tier_bytes = Family::<TierLabels, Gauge>::default();
        let tier_cost = Family::<TierLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let savings = Family::<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("storage_objects", "Stored blobs, by tier", tier_objects.clone());
        registry.register("storage_bytes", "Stored bytes (after compression), by tier", tier_bytes.clone());
        registry.register("storage_monthly_cost", "Estimated monthly cost, by tier", tier_cost.clone());
        registry.register(
            "storage_monthly_savings",
            "Estimated monthly savings, by kind (compression, deduplication, tiering)",
            savings.clone(),
        );
        Self {
            tier_objects,
            tier_bytes,
            tier_cost,
            savings,
            usage_at: std::sync::Mutex::new(None),
            registry: root,
            seed,
            requests,
            latency,
            bytes_in,
            bytes_out,
            deduplicated_bytes,
            uploads_refused,
            outbox_depth,
            config,
            config_hash: std::sync::Mutex::new(String::new()),
        }
    }

    /// Records the content hash of the platform config now in use.
    pub fn set_config_hash(&self, hash: &str) {
        let mut current = self.config_hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !current.is_empty() {
            self.config.get_or_create(&ConfigLabels { hash: current.clone() }).set(0);
        }
        self.config.get_or_create(&ConfigLabels { hash: hash.to_owned() }).set(1);
        hash.clone_into(&mut current);
    }

    /// Records what the tiers hold and cost.
    pub fn set_storage_usage(&self, usage: &vellum_core::documents::Usage) {
        for tier in &usage.tiers {
            let labels = TierLabels { tier: tier.tier.clone() };
            self.tier_objects.get_or_create(&labels).set(tier.objects);
            self.tier_bytes.get_or_create(&labels).set(tier.bytes);
            self.tier_cost.get_or_create(&labels).set(tier.estimated_monthly_cost);
        }
        let s = &usage.monthly_savings;
        for (kind, value) in
            [("compression", s.compression), ("deduplication", s.deduplication), ("tiering", s.tiering)]
        {
            self.savings.get_or_create(&KindLabels { kind: kind.to_owned() }).set(value);
        }
        *self.usage_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether the storage gauges are older than a minute.
    fn usage_stale(&self) -> bool {
        self.usage_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() > std::time::Duration::from_secs(60))
    }

    /// The content hash of the platform config in use.
    pub fn config_hash(&self) -> String {
        self.config_hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn content_length(headers: &axum::http::HeaderMap) -> u64 {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// One request being answered, as the metrics record it: started by [`Timing::start`]
/// before the request goes on, and recorded by [`Timing::finish`] with its answer.
#[derive(Debug)]
pub struct Timing {
    route: String,
    method: Method,
    bytes_in: u64,
    started: Instant,
}

impl Timing {
    pub fn start(request: &Request) -> Self {
        let route =
            request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
        Self {
            route,
            method: request.method().clone(),
            bytes_in: content_length(request.headers()),
            started: Instant::now(),
        }
    }

    pub fn finish(self, metrics: &Metrics, response: &Response) {
        let labels = RouteLabels { route: self.route };
        metrics.latency.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
        metrics.bytes_in.get_or_create(&labels).inc_by(self.bytes_in);
        metrics.bytes_out.get_or_create(&labels).inc_by(content_length(response.headers()));
        let RouteLabels { route } = labels;
        let method = self.method.to_string();
        metrics.requests.get_or_create(&RequestLabels { method, route, status: response.status().as_u16() }).inc();
    }
}

pub fn router() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(utoipa_axum::routes!(scrape))
        .routes(utoipa_axum::routes!(actuator_prometheus))
}

/// `/metrics` alone, for its own listen address.
pub fn own_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .route("/actuator/prometheus", axum::routing::get(scrape))
        .layer(axum::Extension(MetricsAddress))
        .with_state(state)
}

#[utoipa::path(get, path = "/actuator/prometheus", tag = "operations",
    summary = "Prometheus metrics under Spring Boot Actuator's name (as /metrics)",
    security(()), responses((status = 200, content_type = "application/openmetrics-text", body = String),
        (status = 404, description = "Served on the metrics address instead", body = crate::error::ErrorBody)))]
async fn actuator_prometheus(state: State<AppState>, own: Option<axum::Extension<MetricsAddress>>) -> Response {
    scrape(state, own).await
}

/// Marks requests that came to the metrics address.
#[derive(Clone, Copy, Debug)]
struct MetricsAddress;

#[utoipa::path(get, path = "/metrics", tag = "operations", summary = "Prometheus metrics (OpenMetrics text)",
    description = "Open to anyone who reaches this address, as usual inside a cluster; with \
        `--metrics-listen` they are served only on that address, and here the answer is 404.",
    security(()), responses((status = 200, content_type = "application/openmetrics-text", body = String),
        (status = 404, description = "Served on the metrics address instead", body = crate::error::ErrorBody)))]
async fn scrape(State(state): State<AppState>, own: Option<axum::Extension<MetricsAddress>>) -> Response {
    if state.metrics_elsewhere && own.is_none() {
        return crate::error::ApiError::not_found("metrics are served on the gateway's metrics address")
            .into_response();
    }
    let docs = state.docs();
    let depths = docs.shards().iter().map(|shard| vellum_core::events::outbox::depth(shard.meta()));
    if let Ok(depths) = futures::future::try_join_all(depths).await {
        state.metrics.outbox_depth.set(depths.into_iter().sum());
    }
    if state.metrics.usage_stale() {
        match state.docs().usage(&state.platform()).await {
            Ok(usage) => state.metrics.set_storage_usage(&usage),
            Err(e) => tracing::warn!(error = %e, "computing storage usage"),
        }
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
