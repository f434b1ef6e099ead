//! Storage on the API: a document's tier, its next lifecycle action and its date, moving a
//! document to another tier on request, restoring an archived document, and what the tiers
//! hold and cost (`/api/v1/storage/usage`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::clock::rfc3339;
use vellum_core::documents::{Document, Grace, Usage};
use vellum_core::retention::{Action, Policy, Scheduled, decide};

use crate::AppState;
use crate::auth::User;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{DocId, JsonBody};

const TAG: &str = "lifecycle";

/// Routes under a document: `/{id}/lifecycle`, `/{id}/tier`, `/{id}/restore`.
pub fn document_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(lifecycle)).routes(routes!(move_tier)).routes(routes!(restore_archived))
}

/// `/api/v1/storage`: usage and cost.
pub fn storage_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(usage))
}

/// One lifecycle action and when it is due.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleAction {
    /// `TRANSITION`, `DELETE`, `ARCHIVE` or `EXPIRE_VERSION`.
    pub action: &'static str,
    /// The tier a transition or archive moves to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The version a transition or version expiry concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    pub policy: String,
    /// When it is (or was) due, RFC 3339.
    pub due_at: String,
    /// Why a due action is not carried out (legal hold, an earlier failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
}

fn described(s: &Scheduled, blocked_by: Option<String>) -> LifecycleAction {
    let (tier, version) = match &s.action {
        Action::Transition { version, to_tier, .. } => (Some(to_tier.clone()), Some(*version)),
        Action::Archive { tier, .. } => (Some(tier.clone()), None),
        Action::ExpireVersion { version, .. } => (None, Some(*version)),
        Action::Delete { .. } => (None, None),
    };
    LifecycleAction {
        action: s.action.kind(),
        tier,
        version,
        policy: s.action.policy().to_owned(),
        due_at: rfc3339(s.at_ms),
        blocked_by,
    }
}

/// Where a document is in its lifecycle.
#[derive(Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub document_id: i64,
    pub storage_tier: String,
    pub legal_hold: bool,
    pub archived: bool,
    /// A lifecycle action that failed on the document and has not succeeded since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Due now: the next retention run carries them out.
    pub due: Vec<LifecycleAction>,
    /// Due but held back.
    pub blocked: Vec<LifecycleAction>,
    /// The next action not yet due, if any policy has one.
    pub next_action: Option<LifecycleAction>,
}

#[utoipa::path(get, path = "/{id}/lifecycle", tag = TAG,
    summary = "A document's tier, and its next lifecycle action and date under the retention policies",
    params(("id" = i64, Path)),
    responses((status = 200, body = Lifecycle), (status = 404, body = ErrorBody)))]
async fn lifecycle(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
) -> ApiResult<axum::Json<Lifecycle>> {
    let facts = state.docs().at(id, |shard| Box::pin(shard.lifecycle_facts(&actor, id))).await?;
    let config = state.platform();
    // Dry-run and suspended policies act on nothing, so they schedule nothing.
    let policies: Vec<Policy<'_>> = config
        .retention_policies
        .iter()
        .filter(|(_, p)| !p.dry_run)
        .map(|(name, config)| Policy { name, config })
        .collect();
    let plan = decide(&facts, &policies, &config.tiers, state.docs().clock().now_ms());
    Ok(axum::Json(Lifecycle {
        document_id: id,
        storage_tier: facts.versions.first().map(|v| v.tier.clone()).unwrap_or_default(),
        legal_hold: facts.legal_hold,
        archived: facts.archived,
        last_error: facts.failed.clone(),
        due: plan.due.iter().map(|s| described(s, None)).collect(),
        blocked: plan.blocked.iter().map(|(s, why)| described(s, Some(why.clone()))).collect(),
        next_action: plan.next.as_ref().map(|s| described(s, None)),
    }))
}

/// Where to move a document.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The name of the StorageTier.
    pub tier: String,
}

#[utoipa::path(post, path = "/{id}/tier", tag = TAG,
    summary = "Move a document to another storage tier now (promote it back to a hot tier, say)",
    params(("id" = i64, Path)), request_body = MoveRequest,
    responses((status = 200, body = Document), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn move_tier(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    JsonBody(request): JsonBody<MoveRequest>,
) -> ApiResult<axum::Json<Document>> {
    Ok(axum::Json(
        state.docs().at(id, |shard| Box::pin(shard.move_document(&actor, id, &request.tier, Grace::default()))).await?,
    ))
}

#[utoipa::path(post, path = "/{id}/restore", tag = TAG,
    summary = "Bring an archived document back to the default tier (announces DOCUMENT_RESTORED)",
    params(("id" = i64, Path)),
    responses((status = 200, body = Document), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn restore_archived(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
) -> ApiResult<axum::Json<Document>> {
    Ok(axum::Json(state.docs().at(id, |shard| Box::pin(shard.restore_archived(&actor, id, Grace::default()))).await?))
}

#[utoipa::path(get, path = "/usage", tag = TAG,
    summary = "Bytes and objects per tier, the monthly cost, and the savings of compression, deduplication and tiering (admins)",
    responses((status = 200, body = Usage), (status = 403, body = ErrorBody)))]
async fn usage(State(state): State<AppState>, User(actor): User) -> ApiResult<axum::Json<Usage>> {
    if !actor.admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "storage usage needs the admin role"));
    }
    let usage = state.docs().usage(&state.platform()).await?;
    state.metrics.set_storage_usage(&usage);
    Ok(axum::Json(usage))
}
