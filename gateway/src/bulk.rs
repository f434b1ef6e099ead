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
use vellum_core::bulk::{self, BulkRequest, Export, Job, JobStatus, Operation};
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

/// How often a replica forgets the jobs finished more than a week ago and deletes their
/// exports ([`bulk::prune`]).
const PRUNE_EVERY: Duration = Duration::from_secs(60 * 60);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start)).routes(routes!(show, cancel)).routes(routes!(download))
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

#[utoipa::path(get, path = "/bulk/{job}/export", tag = TAG, summary = "Download an export job's ZIP",
    description = "The current version of every document the job exported, as `<id>-<filename>`, once the \
        job has completed (409 before).",
    params(("job" = String, Path)),
    responses((status = 200, description = "The ZIP", content_type = "application/zip", body = [u8]),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn download(State(state): State<AppState>, User(actor): User, Path(job): Path<String>) -> ApiResult<Response> {
    use vellum_core::documents::DocError;
    let docs = state.docs();
    let job = bulk::get(docs.primary().meta(), &actor, &job).await?;
    let Some((tier, key)) = job.result.clone().filter(|_| job.status == JobStatus::Completed) else {
        let why = if job.operation == Operation::Export {
            format!("the export is {:?}; its ZIP can be downloaded once the job has completed", job.status)
        } else {
            format!("job {} is a {}, not an export", job.id, job.operation.name())
        };
        return Err(DocError::Conflict(why).into());
    };
    let tier = docs.tiers().get(&tier).map_err(DocError::Storage)?;
    let bytes = tier.read(&key, vellum_core::blob::Codec::None, None).await.map_err(DocError::Storage)?;
    let disposition = format!("attachment; filename=\"export-{}.zip\"", job.id);
    Ok((
        [(header::CONTENT_TYPE, "application/zip".to_owned()), (header::CONTENT_DISPOSITION, disposition)],
        axum::body::Body::from_stream(bytes),
    )
        .into_response())
}

/// Runs the jobs no replica holds, one at a time, until `stop` turns true; and, once an
/// hour (the first time at once), forgets the jobs finished a week ago.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let runner = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    let mut pruned: Option<Instant> = None;
    loop {
        let docs = state.docs();
        if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            pruned = Some(Instant::now());
            match bulk::prune(docs.primary()).await {
                Ok(0) => {}
                Ok(jobs) => tracing::info!(jobs, "forgot the bulk jobs finished over a week ago"),
                Err(e) => tracing::warn!(error = %e, "forgetting the bulk jobs finished over a week ago"),
            }
        }
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
    let mut export = (job.operation == Operation::Export).then(|| {
        // A ZIP another replica half wrote cannot be continued: the export starts over.
        job.processed = 0;
        job.succeeded = 0;
        job.failed = 0;
        job.errors.clear();
        Export::start(state.docs().primary(), &job)
    });
    let mut told: Option<Instant> = None;
    loop {
        let chunk: Vec<i64> = job.remaining().iter().take(CHUNK).copied().collect();
        if chunk.is_empty() || *stop.borrow() {
            break;
        }
        let docs = state.docs();
        for id in chunk {
            let outcome = match export.as_mut() {
                Some(export) => {
                    match act(state, &job, id, |shard, job, id| Box::pin(Export::open(shard, job, id))).await {
                        Ok((filename, bytes)) => export.add(id, &filename, bytes).await,
                        Err(e) => Err(e),
                    }
                }
                None => act(state, &job, id, |shard, job, id| Box::pin(bulk::apply(shard, job, id))).await,
            };
            // Announced by the document's own event too; this replica's reads see it at once.
            state.cache.forget(id);
            job.record(id, outcome);
        }
        let due = told.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        let event = due.then(|| (EventType::BulkOperationProgress, job.progress_event()));
        match bulk::checkpoint(docs.primary(), &job, runner, event, None).await {
            Ok(true) if due => {
                told = Some(Instant::now());
                let data = serde_json::to_value(&job).unwrap_or_default();
                state.hub.publish(Notice::job_update(BULK_JOBS, &job.owner, &job.id, state.hub.now_ms(), &data));
                if export.is_some() {
                    extraction(state, &job, "progress_updated", "RUNNING");
                }
            }
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job = %job.id, "the bulk job was cancelled or taken over; stopping");
                if let Some(export) = export {
                    export.abandon().await;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "recording a bulk job's progress; another replica goes on");
                if let Some(export) = export {
                    export.abandon().await;
                }
                return;
            }
        }
    }
    if !job.remaining().is_empty() {
        if let Some(export) = export {
            export.abandon().await;
        }
        return;
    }
    if let Some(export) = export {
        match export.finish().await {
            Ok(stored) => job.result = Some(stored),
            Err(e) => {
                match bulk::export_failed(state.docs().primary(), &mut job, runner, &e.to_string()).await {
                    Ok(true) => {
                        tracing::warn!(job = %job.id, error = %e, "the export's ZIP could not be stored; the job failed");
                        ended(state, &job, "failed", "FAILED");
                    }
                    Ok(false) => {
                        tracing::warn!(job = %job.id, error = %e, "the export's ZIP was not stored; it starts over");
                    }
                    Err(recording) => tracing::warn!(job = %job.id, error = %e, %recording,
                        "the export's ZIP was not stored, nor the failure recorded; another replica starts it over"),
                }
                return;
            }
        }
    }
    job.status = JobStatus::Completed;
    let event = (EventType::BulkOperationCompleted, job.completed_event());
    match bulk::checkpoint(state.docs().primary(), &job, runner, Some(event), Some(JobStatus::Completed)).await {
        Ok(true) => {
            tracing::info!(job = %job.id, succeeded = job.succeeded, failed = job.failed, "bulk job completed");
            ended(state, &job, "completed", "COMPLETED");
        }
        Ok(false) => tracing::info!(job = %job.id, "the bulk job was cancelled before its end was recorded"),
        Err(e) => tracing::warn!(job = %job.id, error = %e, "recording a bulk job's end; another replica finishes it"),
    }
}

/// Does `op` to document `id` on its shard; a document being handed over to another shard
/// is waited for (it is there again in a moment).
async fn act<T, F>(state: &AppState, job: &Job, id: i64, op: F) -> Result<T, vellum_core::documents::DocError>
where
    F: for<'s> Fn(
        &'s vellum_core::documents::Documents,
        &'s Job,
        i64,
    ) -> futures::future::BoxFuture<'s, Result<T, vellum_core::documents::DocError>>,
{
    let mut tries = 0;
    loop {
        let docs = state.docs();
        let outcome = docs.at(id, |shard| op(shard, job, id)).await;
        if tries >= 40 || !matches!(outcome, Err(vellum_core::documents::DocError::Unavailable(_))) {
            return outcome;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Tells the user who started `job` that it ended: `job_completed`, and for an export its
/// `event_type` update (with `status`) on `/topic/extractions`.
fn ended(state: &AppState, job: &Job, event_type: &str, status: &str) {
    let data = serde_json::to_value(job).unwrap_or_default();
    state.hub.publish(Notice::job_completed(BULK_JOBS, &job.owner, &job.id, state.hub.now_ms(), &data));
    if job.operation == Operation::Export {
        extraction(state, job, event_type, status);
    }
}

/// An export's progress on `/topic/extractions` (seed 003's `StatusUpdateEvent`), for the
/// user who started it.
fn extraction(state: &AppState, job: &Job, event_type: &str, status: &str) {
    use vellum_workers::announce::{Entity, status_update};
    let entity_id = format!("export/{}", job.id);
    let entity = Entity { kind: "export", id: &entity_id, phase: "Extracting" };
    let message = format!("{} of {} documents exported", job.processed, job.total);
    let update = status_update(event_type, status, entity, (job.processed, job.total), &message, state.hub.now_ms());
    state.hub.publish(Notice {
        seq: None,
        audience: crate::realtime::Audience::User(job.owner.clone()),
        channel: "extractions",
        job_id: None,
        job_kind: None,
        kind: "status_update".to_owned(),
        data: update.clone(),
        message: update,
    });
}
