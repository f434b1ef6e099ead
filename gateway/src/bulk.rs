//! Bulk operations over documents (`vellum_core::bulk`): `POST /api/v1/documents/bulk`
//! starts a job, `GET` and `DELETE /api/v1/documents/bulk/{job}` show and cancel it, and every
//! replica runs [`run`], which takes up jobs no replica holds, new ones and those of a
//! replica that stopped. The user who started a job is told of its progress (at most once a
//! second) as `BULK_OPERATION_PROGRESS` and `job_status_update`, and of its end as
//! `BULK_OPERATION_COMPLETED` (webhooks too) and `job_completed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::bulk::{self, BulkRequest, Job, JobStatus};
use vellum_core::crds::webhook::EventType;

use crate::AppState;
use crate::auth::User;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::JsonBody;
use crate::realtime::Notice;

const TAG: &str = "documents";
/// What a job's notices are to STOMP (`/topic/bulk`) and the JSON protocol.
pub const BULK_JOBS: &str = "bulk";
/// Documents acted on between two checkpoints.
const CHUNK: usize = 25;
/// How often a replica with nothing to do looks for jobs other replicas left.
const IDLE: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start)).routes(routes!(show, cancel))
}

#[utoipa::path(post, path = "/bulk", tag = TAG, summary = "Start a bulk operation",
    description = "One operation (`delete`, `tag`, `untag`, `move` to a `tier`, `archive`, `restore`) over \
        `documentIds` or the documents a `selector` finds (at most 10000, fixed now), run as a job: `202` with \
        the job and its `Location`. The job acts as its starter (an admin's on any document), goes on on \
        another replica if this one stops, and reports its progress to its starter as `BULK_OPERATION_PROGRESS` \
        and `job_status_update`, its end as `BULK_OPERATION_COMPLETED` and `job_completed`.",
    request_body = BulkRequest,
    responses((status = 202, description = "The job, queued", body = Job),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    User(actor): User,
    JsonBody(request): JsonBody<BulkRequest>,
) -> ApiResult<Response> {
    let docs = state.docs();
    let planned = bulk::plan(&request, &actor, docs.primary(), |query| {
        let (docs, actor) = (Arc::clone(&docs), actor.clone());
        async move { docs.list(&actor, &query).await }
    })
    .await?;
    let job = bulk::create(docs.primary().meta(), docs.clock().now_ms(), &actor, &request, planned).await?;
    tracing::info!(job = %job.id, operation = job.operation.name(), total = job.total, user = %actor.user, "bulk job started");
    state.bulk.notify_one();
    let location = format!("/api/v1/documents/bulk/{}", job.id);
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(job)).into_response())
}

#[utoipa::path(get, path = "/bulk/{job}", tag = TAG, summary = "A bulk job's progress",
    params(("job" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn show(State(state): State<AppState>, User(actor): User, Path(job): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(bulk::get(state.docs().primary().meta(), &actor, &job).await?))
}

#[utoipa::path(delete, path = "/bulk/{job}", tag = TAG, summary = "Cancel a bulk job",
    description = "Stops the job before its next documents; those it acted on stay so. 409 once it has finished.",
    params(("job" = String, Path)),
    responses((status = 200, description = "The job, cancelled", body = Job), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn cancel(State(state): State<AppState>, User(actor): User, Path(job): Path<String>) -> ApiResult<Json<Job>> {
    let docs = state.docs();
    Ok(Json(bulk::cancel(docs.primary().meta(), &actor, &job, docs.clock().now_ms()).await?))
}

/// Runs the jobs no replica holds, one at a time, until `stop` turns true.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let runner = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    loop {
        let docs = state.docs();
        match bulk::claim(docs.primary().meta(), docs.clock().now_ms(), &runner).await {
            Ok(Some(job)) => {
                drop(docs);
                run_job(&state, job, &runner, &stop).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "looking for bulk jobs"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = state.bulk.notified() => {}
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// Acts on `job`'s remaining documents a chunk at a time, recording each chunk; stops when
/// the job is cancelled or taken over, or the gateway stops (its lease then runs out and
/// another replica goes on).
async fn run_job(state: &AppState, mut job: Job, runner: &str, stop: &watch::Receiver<bool>) {
    tracing::info!(job = %job.id, operation = job.operation.name(), done = job.processed, total = job.total, "running a bulk job");
    let mut told: Option<Instant> = None;
    loop {
        let chunk: Vec<i64> = job.remaining().iter().take(CHUNK).copied().collect();
        if chunk.is_empty() || *stop.borrow() {
            break;
        }
        let docs = state.docs();
        for id in chunk {
            let job_now = &job;
            let mut outcome = docs.at(id, |shard| Box::pin(bulk::apply(shard, job_now, id))).await;
            // A document being handed over to another shard is there again in a moment.
            for _ in 0..40 {
                if !matches!(outcome, Err(vellum_core::documents::DocError::Unavailable(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                outcome = state.docs().at(id, |shard| Box::pin(bulk::apply(shard, job_now, id))).await;
            }
            job.record(id, outcome);
        }
        let due = told.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        let event = due.then(|| (EventType::BulkOperationProgress, job.progress_event()));
        match bulk::checkpoint(docs.primary(), &job, runner, event, None).await {
            Ok(true) if due => {
                told = Some(Instant::now());
                let data = serde_json::to_value(&job).unwrap_or_default();
                state.hub.publish(Notice::job_update(BULK_JOBS, &job.owner, &job.id, state.hub.now_ms(), &data));
            }
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job = %job.id, "the bulk job was cancelled or taken over; stopping");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "recording a bulk job's progress; another replica goes on");
                return;
            }
        }
    }
    if !job.remaining().is_empty() {
        return;
    }
    job.status = JobStatus::Completed;
    let event = (EventType::BulkOperationCompleted, job.completed_event());
    match bulk::checkpoint(state.docs().primary(), &job, runner, Some(event), Some(JobStatus::Completed)).await {
        Ok(true) => {
            tracing::info!(job = %job.id, succeeded = job.succeeded, failed = job.failed, "bulk job completed");
            let data = serde_json::to_value(&job).unwrap_or_default();
            state.hub.publish(Notice::job_completed(BULK_JOBS, &job.owner, &job.id, state.hub.now_ms(), &data));
        }
        Ok(false) => tracing::info!(job = %job.id, "the bulk job was cancelled before its end was recorded"),
        Err(e) => tracing::warn!(job = %job.id, error = %e, "recording a bulk job's end; another replica finishes it"),
    }
}
