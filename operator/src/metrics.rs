//! The operator's Prometheus metrics and its `/healthz`, `/readyz` and `/metrics` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    reason: String,
}

/// Reconciles, failures and their durations by controller, and whether this replica leads.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    phases: Family<PhaseLabels, Histogram>,
    rollouts: Family<OutcomeLabels, Histogram>,
    leader: Gauge,
    /// The replica takes part in the leader election.
    ready: AtomicBool,
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
        let mut registry = Registry::with_prefix("vellum_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        // Rollout phases and whole rollouts: from a second to hours.
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 16))
        });
        let rollouts = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        registry.register(
            "rollout_phase_duration_seconds",
            "Time a blue-green rollout spent in each phase",
            phases.clone(),
        );
        registry.register(
            "rollout_duration_seconds",
            "Time from the start of a blue-green rollout to its end, by outcome",
            rollouts.clone(),
        );
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles by controller", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by controller and error kind", failures.clone());
        registry.register("reconcile_duration_seconds", "Time one reconcile took, by controller", duration.clone());
        registry.register("leader", "1 while this replica holds the leader-election Lease", leader.clone());
        Self { registry, reconciles, failures, duration, phases, rollouts, leader, ready: AtomicBool::new(false) }
    }

    /// Records one reconcile of `controller` that took `took`.
    pub fn reconciled(&self, controller: &str, took: Duration) {
        let labels = ControllerLabels { controller: controller.to_owned() };
        self.reconciles.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// Records that a rollout left `phase` after `took`.
    pub fn phase_ended(&self, phase: &str, took: Duration) {
        self.phases.get_or_create(&PhaseLabels { phase: phase.to_owned() }).observe(took.as_secs_f64());
    }

    /// Records a rollout that ended with `outcome` after `took`.
    pub fn rollout_ended(&self, outcome: &str, took: Duration) {
        self.rollouts.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).observe(took.as_secs_f64());
    }

    /// Records a failed reconcile.
    pub fn failed(&self, controller: &str, reason: &str) {
        self.failures
            .get_or_create(&ErrorLabels { controller: controller.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        text
    }
}

/// Serves `/healthz` (the process runs), `/readyz` (it takes part in the leader election,
/// leading or standing by) and `/metrics`
/// until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics and health endpoints serving");
    axum::serve(listener, router).await
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "joining the leader election").into_response()
    }
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}
