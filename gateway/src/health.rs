//! `/healthz` (the process serves) and `/readyz` (the database answers and the default
//! tier stores and returns a probe object), and the same under the Spring Boot Actuator
//! names the seeds' probes and dashboards use: `/actuator/health`,
//! `/actuator/health/liveness` and `/actuator/health/readiness`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(actuator_health))
        .routes(routes!(actuator_liveness))
        .routes(routes!(actuator_readiness))
}

/// The probes, which a client address over its budget of failed token checks still reaches.
pub const PROBES: [&str; 5] =
    ["/healthz", "/readyz", "/actuator/health", "/actuator/health/liveness", "/actuator/health/readiness"];

#[utoipa::path(get, path = "/healthz", tag = "operations", summary = "The process serves", security(()),
    responses((status = 200, body = Object)))]
async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    summary = "Every metadata shard answers and the default tier stores and returns a probe object",
    responses((status = 200, body = Object), (status = 503, description = "Not ready, with each check's message", body = Object)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let (database, tier) = checks(&state).await;
    let check = |r: &Result<(), String>| match r {
        Ok(()) => json!({"status": "ok"}),
        Err(e) => json!({"status": "failing", "message": e}),
    };
    let ready = database.is_ok() && tier.is_ok();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {"database": check(&database), "defaultTier": check(&tier)},
        "configHash": state.metrics.config_hash(),
        "routingVersion": state.docs().table().version(),
        // The routing documents are moving to, while they are: the operator waits for
        // every gateway to report it before documents move.
        "movingTo": state.docs().next().map(|t| t.version().to_owned()),
    });
    (status, axum::Json(body)).into_response()
}

/// Whether every metadata shard answers, and whether the default tier stores and returns a
/// probe object: each failure's message.
async fn checks(state: &AppState) -> (Result<(), String>, Result<(), String>) {
    let database = state.docs().ping().await.map_err(|(shard, e)| {
        if state.docs().shards().len() == 1 { e.to_string() } else { format!("shard {shard}: {e}") }
    });
    let tier = state.docs().tiers().default_tier().probe().await.map_err(|e| e.to_string());
    if let Err(e) = &database {
        tracing::warn!(error = %e, "readiness: database");
    }
    if let Err(e) = &tier {
        tracing::warn!(error = %e, "readiness: default tier");
    }
    (database, tier)
}

/// The checks as Spring Boot Actuator shows them: `UP` or `down` (what failing ones read)
/// overall and per component, 503 unless all are up.
async fn actuator(state: &AppState, down: &str) -> Response {
    let (database, tier) = checks(state).await;
    let component = |r: &Result<(), String>| match r {
        Ok(()) => json!({"status": "UP"}),
        Err(e) => json!({"status": "DOWN", "details": {"error": e}}),
    };
    let up = database.is_ok() && tier.is_ok();
    let status = if up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if up { "UP" } else { down },
        "components": {"db": component(&database), "defaultTier": component(&tier)},
    });
    (status, axum::Json(body)).into_response()
}

#[utoipa::path(get, path = "/actuator/health", tag = "operations", security(()),
    summary = "Overall health, as Spring Boot Actuator shows it (the checks of /readyz)",
    responses((status = 200, body = Object), (status = 503, description = "A component is DOWN", body = Object)))]
async fn actuator_health(State(state): State<AppState>) -> Response {
    actuator(&state, "DOWN").await
}

#[utoipa::path(get, path = "/actuator/health/liveness", tag = "operations", security(()),
    summary = "The process serves (Actuator's liveness group, as /healthz)", responses((status = 200, body = Object)))]
async fn actuator_liveness() -> Response {
    axum::Json(json!({"status": "UP"})).into_response()
}

#[utoipa::path(get, path = "/actuator/health/readiness", tag = "operations", security(()),
    summary = "Ready for traffic (Actuator's readiness group, the checks of /readyz)",
    responses((status = 200, body = Object), (status = 503, description = "OUT_OF_SERVICE", body = Object)))]
async fn actuator_readiness(State(state): State<AppState>) -> Response {
    actuator(&state, "OUT_OF_SERVICE").await
}
