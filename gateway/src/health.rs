//! `/healthz` (the process serves) and `/readyz` (the database answers and the default
//! tier stores and returns a probe object).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", summary = "The process serves", security(()),
    responses((status = 200, body = Object)))]
async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    summary = "Every metadata shard answers and the default tier stores and returns a probe object",
    responses((status = 200, body = Object), (status = 503, description = "Not ready, with each check's message", body = Object)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let database = state.docs().ping().await.map_err(|(shard, e)| {
        if state.docs().shards().len() == 1 { e.to_string() } else { format!("shard {shard}: {e}") }
    });
    let tier = state.docs().tiers().default_tier().probe().await;
    let check = |r: &Result<(), String>| match r {
        Ok(()) => json!({"status": "ok"}),
        Err(e) => json!({"status": "failing", "message": e}),
    };
    let tier = tier.map_err(|e| e.to_string());
    if let Err(e) = &database {
        tracing::warn!(error = %e, "readiness: database");
    }
    if let Err(e) = &tier {
        tracing::warn!(error = %e, "readiness: default tier");
    }
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
