//! Bulk operations: one operation (delete, tag, untag, move to a tier, archive, restore)
//! over a list of documents, or over the documents a search selects, run as a job.
//!
//! A job is stored (on the library's first shard) with the ids it covers, fixed when it is
//! created, and how far it got. Any gateway replica claims an unfinished job whose lease has
//! run out, and goes on from where the last one stopped: a job survives the replica that
//! started it. Each document is acted on as the user who started the job (an admin's job may
//! act on any document); a document that cannot be acted on is counted as failed, with the
//! reason, and the job goes on. Progress is recorded with each chunk of documents, with a
//! `BULK_OPERATION_PROGRESS` event at most once a second, and the end with
//! `BULK_OPERATION_COMPLETED`, both for the user who started the job (and webhooks).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;

use crate::crds::storage_tier::TierClass;
use crate::crds::webhook::EventType;
use crate::documents::{Actor, DocError, Documents, Grace, ListQuery, MetadataPatch};
use crate::events::Event;
use crate::store::{Metadata, StoreError};

/// The most documents one job covers.
pub const MAX_DOCUMENTS: usize = 10_000;
/// How long a replica's claim on a job lasts without a checkpoint.
pub const LEASE_MS: i64 = 30_000;
/// The failures a job keeps the reasons of (it counts them all).
const MAX_ERRORS: usize = 100;

/// How many times an export's ZIP may fail to be stored (each time by whichever replica
/// runs the job) before the job fails for good.
pub const MAX_EXPORT_FAILURES: i64 = 3;

/// The pause before an export whose ZIP could not be stored is tried again, times its
/// failures so far (a store that is back within seconds sees the export through).
pub const EXPORT_RETRY_MS: i64 = 3_000;

/// How long a finished job is kept: its status can be read, and an export's ZIP
/// downloaded, for a week after it ended ([`prune`]).
pub const KEPT_FOR_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// What a bulk job does to each document.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Deletes the document (as `DELETE /api/v1/documents/{id}` does).
    Delete,
    /// Adds `tags` to the document's tags.
    Tag,
    /// Removes `tags` from the document's tags.
    Untag,
    /// Moves the document's current version to the storage tier `tier`.
    Move,
    /// Moves every version to the platform's FROZEN tier and marks the document archived.
    Archive,
    /// Brings an archived document back to the default tier.
    Restore,
    /// Writes the current version of every document into one ZIP, downloaded from
    /// `GET /api/v1/documents/bulk/{job}/export` once the job has completed.
    Export,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Tag => "tag",
            Self::Untag => "untag",
            Self::Move => "move",
            Self::Archive => "archive",
            Self::Restore => "restore",
            Self::Export => "export",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Delete, Self::Tag, Self::Untag, Self::Move, Self::Archive, Self::Restore, Self::Export]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

/// The documents a search selects, as the document list filters them.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    pub tag: Option<String>,
    pub file_type: Option<String>,
    /// Admins only: the documents of this user.
    pub owner: Option<String>,
    /// Words that must appear in the file name or title.
    pub q: Option<String>,
    /// Created at or after, in ms.
    pub created_from: Option<i64>,
    /// Created before, in ms.
    pub created_to: Option<i64>,
}

impl Selector {
    /// The list query of this selector's first page.
    pub fn query(&self) -> ListQuery {
        ListQuery {
            tag: self.tag.clone(),
            file_type: self.file_type.clone(),
            owner: self.owner.clone(),
            created_from: self.created_from,
            created_to: self.created_to,
            q: self.q.clone(),
            limit: Some(crate::documents::MAX_PAGE),
            cursor: None,
        }
    }
}

/// A bulk operation asked for.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkRequest {
    pub operation: Operation,
    /// The documents, by id (at most 10000); or give `selector`.
    #[serde(default)]
    #[schema(max_items = 10000)]
    pub document_ids: Vec<i64>,
    /// The documents a search selects (at most 10000), fixed when the job is created.
    pub selector: Option<Selector>,
    /// For `tag` and `untag`: the tags.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub tags: Vec<String>,
    /// For `move`: the storage tier.
    pub tier: Option<String>,
}

/// Where a job is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for a replica to run it.
    Queued,
    Running,
    /// Every document was acted on (some may have failed: see `failed`).
    Completed,
    /// Stopped by `DELETE` before the end: the documents acted on stay so.
    Cancelled,
    /// An export whose ZIP could not be stored, [`MAX_EXPORT_FAILURES`] times: `failure`
    /// says why.
    Failed,
}

impl JobStatus {
    fn name(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Running => "RUNNING",
            Self::Completed => "COMPLETED",
            Self::Cancelled => "CANCELLED",
            Self::Failed => "FAILED",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Completed, Self::Cancelled, Self::Failed]
            .into_iter()
            .find(|s| s.name() == name)
    }

    pub fn finished(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }
}

/// A document a job could not act on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DocFailure {
    pub document_id: i64,
    pub error: String,
}

/// A bulk job, as `GET /api/v1/documents/bulk/{id}` shows it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub operation: Operation,
    pub status: JobStatus,
    /// The user who started it.
    pub owner: String,
    pub total: i64,
    /// Documents acted on so far, succeeded or failed.
    pub processed: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Whole percent of `total` processed.
    pub progress: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The first failures, with their reasons.
    pub errors: Vec<DocFailure>,
    /// When, in ms since the epoch.
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// An export's ZIP, once written: where to download it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<String>,
    /// Why a failed job failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Where an export's ZIP is stored: its tier and object key.
    #[serde(skip)]
    pub result: Option<(String, String)>,
    /// The documents, in the order they are acted on.
    #[serde(skip)]
    pub ids: Vec<i64>,
    #[serde(skip)]
    pub admin: bool,
}

impl Job {
    /// Whom the job acts as.
    pub fn actor(&self) -> Actor {
        Actor { user: self.owner.clone(), admin: self.admin }
    }

    /// The documents left to act on.
    pub fn remaining(&self) -> &[i64] {
        let done = usize::try_from(self.processed).unwrap_or(0).min(self.ids.len());
        &self.ids[done..]
    }

    fn percent(&self) -> i64 {
        if self.total > 0 { self.processed.min(self.total) * 100 / self.total } else { 100 }
    }

    /// Counts what happened to a document.
    pub fn record(&mut self, id: i64, outcome: Result<(), DocError>) {
        self.processed += 1;
        match outcome {
            Ok(()) => self.succeeded += 1,
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < MAX_ERRORS {
                    self.errors.push(DocFailure { document_id: id, error: e.to_string() });
                }
            }
        }
        self.progress = self.percent();
    }

    /// The payload of this job's `BULK_OPERATION_PROGRESS` event (whole percents: the JSON
    /// reads back the same in JavaScript).
    pub fn progress_event(&self) -> Value {
        json!({"jobId": self.id, "operation": self.operation.name(), "total": self.total,
            "processed": self.processed, "progress": self.percent(), "requestedBy": self.owner})
    }

    /// The payload of its `BULK_OPERATION_COMPLETED` event.
    pub fn completed_event(&self) -> Value {
        json!({"jobId": self.id, "operation": self.operation.name(), "status": self.status.name(),
            "totalDocuments": self.total, "successCount": self.succeeded, "failureCount": self.failed,
            "requestedBy": self.owner})
    }
}

/// Checks a request against the platform's tiers (`docs`') and fixes the documents it
/// covers: its ids, or those its selector finds (through `list`, a page at a time, as
/// `actor` may see them).
pub async fn plan<F, Fut>(
    request: &BulkRequest,
    actor: &Actor,
    docs: &Documents,
    mut list: F,
) -> Result<Planned, DocError>
where
    F: FnMut(ListQuery) -> Fut,
    Fut: std::future::Future<Output = Result<crate::documents::Page, DocError>>,
{
    match request.operation {
        Operation::Tag | Operation::Untag if request.tags.is_empty() => {
            return Err(DocError::Invalid(format!("{} needs tags", request.operation.name())));
        }
        Operation::Move => {
            let tier = request.tier.as_deref().ok_or_else(|| DocError::Invalid("move needs a tier".into()))?;
            docs.tiers().get(tier).map_err(|_| DocError::Invalid(format!("no storage tier {tier:?}")))?;
        }
        Operation::Archive if archive_tier(docs).is_none() => {
            return Err(DocError::Invalid("the platform has no FROZEN storage tier to archive to".into()));
        }
        _ => {}
    }
    let tags = crate::documents::check_tags(&request.tags).map_err(DocError::Invalid)?;
    if !matches!(request.operation, Operation::Tag | Operation::Untag) && !tags.is_empty() {
        return Err(DocError::Invalid("tags are for tag and untag only".into()));
    }
    if request.operation != Operation::Move && request.tier.is_some() {
        return Err(DocError::Invalid("tier is for move only".into()));
    }
    let ids = match (&request.selector, request.document_ids.is_empty()) {
        (Some(_), false) => return Err(DocError::Invalid("give documentIds or a selector, not both".into())),
        (None, true) => return Err(DocError::Invalid("give documentIds or a selector".into())),
        (None, false) => {
            let mut seen = std::collections::HashSet::new();
            request.document_ids.iter().copied().filter(|id| seen.insert(*id)).collect::<Vec<_>>()
        }
        (Some(selector), true) => {
            if selector.owner.is_some() && !actor.admin {
                return Err(DocError::Forbidden("only admins select other users' documents".into()));
            }
            let mut query = selector.query();
            let mut ids = Vec::new();
            loop {
                let page = list(query.clone()).await?;
                ids.extend(page.items.iter().map(|d| d.id));
                if ids.len() > MAX_DOCUMENTS {
                    break;
                }
                match page.next_cursor {
                    Some(cursor) => query.cursor = Some(cursor),
                    None => break,
                }
            }
            ids
        }
    };
    if ids.len() > MAX_DOCUMENTS {
        return Err(DocError::Invalid(format!(
            "a job covers at most {MAX_DOCUMENTS} documents; narrow the selector or split the list"
        )));
    }
    if ids.is_empty() {
        return Err(DocError::Invalid("the selector finds no documents".into()));
    }
    Ok(Planned { ids, tags })
}

/// What a checked request covers: its documents, and its tags normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub ids: Vec<i64>,
    pub tags: Vec<String>,
}

/// The tier archived documents go to: the platform's first FROZEN tier.
fn archive_tier(docs: &Documents) -> Option<String> {
    docs.tiers().iter().find(|t| t.class == TierClass::Frozen).map(|t| t.name.clone())
}

/// Stores a new job of `actor`'s over what `planned` covers, queued.
pub async fn create(
    meta: &Metadata,
    now: i64,
    actor: &Actor,
    request: &BulkRequest,
    planned: Planned,
) -> Result<Job, DocError> {
    let Planned { ids, tags } = planned;
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        operation: request.operation,
        status: JobStatus::Queued,
        owner: actor.user.clone(),
        total: i64::try_from(ids.len()).unwrap_or(i64::MAX),
        processed: 0,
        succeeded: 0,
        failed: 0,
        progress: 0,
        tags,
        tier: request.tier.clone(),
        errors: Vec::new(),
        created_at: now,
        updated_at: now,
        finished_at: None,
        download: None,
        failure: None,
        result: None,
        ids,
        admin: actor.admin,
    };
    sqlx::query(
        "INSERT INTO bulk_jobs (id, owner, admin, operation, tags, tier, ids, status, total, processed, succeeded, \
         failed, errors, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, 0, '[]', $10, $10)",
    )
    .bind(&job.id)
    .bind(&job.owner)
    .bind(i64::from(job.admin))
    .bind(job.operation.name())
    .bind(json_text(&job.tags))
    .bind(&job.tier)
    .bind(json_text(&job.ids))
    .bind(job.status.name())
    .bind(job.total)
    .bind(now)
    .execute(meta.pool())
    .await?;
    Ok(job)
}

fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".to_owned())
}

const COLUMNS: &str = "id, owner, admin, operation, tags, tier, ids, status, total, processed, succeeded, failed, \
     errors, created_at, updated_at, finished_at, result_tier, result_key, failure";

fn job_of(row: &sqlx::any::AnyRow) -> Result<Job, DocError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("bulk job {what}"));
    let text = |column: &str| row.try_get::<String, _>(column);
    let job = Job {
        id: text("id")?,
        owner: text("owner")?,
        admin: row.try_get::<i64, _>("admin")? != 0,
        operation: Operation::parse(&text("operation")?).ok_or_else(|| corrupt("operation"))?,
        tags: serde_json::from_str(&text("tags")?).map_err(|_| corrupt("tags"))?,
        tier: row.try_get("tier")?,
        ids: serde_json::from_str(&text("ids")?).map_err(|_| corrupt("ids"))?,
        status: JobStatus::parse(&text("status")?).ok_or_else(|| corrupt("status"))?,
        total: row.try_get("total")?,
        processed: row.try_get("processed")?,
        succeeded: row.try_get("succeeded")?,
        failed: row.try_get("failed")?,
        progress: 0,
        errors: serde_json::from_str(&text("errors")?).map_err(|_| corrupt("errors"))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        download: None,
        failure: row.try_get("failure")?,
        result: match (
            row.try_get::<Option<String>, _>("result_tier")?,
            row.try_get::<Option<String>, _>("result_key")?,
        ) {
            (Some(tier), Some(key)) => Some((tier, key)),
            _ => None,
        },
    };
    let download = job.result.as_ref().map(|_| format!("/api/v1/documents/bulk/{}/export", job.id));
    Ok(Job { progress: job.percent(), download, ..job })
}

/// The job `id`, if `actor` started it or is an admin.
pub async fn get(meta: &Metadata, actor: &Actor, id: &str) -> Result<Job, DocError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM bulk_jobs WHERE id = $1")))
        .bind(id)
        .fetch_optional(meta.pool())
        .await?;
    match row.as_ref().map(job_of).transpose()? {
        Some(job) if actor.admin || job.owner == actor.user => Ok(job),
        _ => Err(DocError::JobNotFound(id.to_owned())),
    }
}

/// Cancels the job `id` unless it has finished: the documents it acted on stay so, and
/// whichever replica runs it stops at its next checkpoint.
pub async fn cancel(meta: &Metadata, actor: &Actor, id: &str, now: i64) -> Result<Job, DocError> {
    let job = get(meta, actor, id).await?;
    if job.status.finished() {
        return Err(DocError::Conflict(format!("job {id} is {} already", job.status.name())));
    }
    sqlx::query(
        "UPDATE bulk_jobs SET status = 'CANCELLED', finished_at = $1, updated_at = $1, lease_owner = NULL \
         WHERE id = $2 AND status IN ('QUEUED', 'RUNNING')",
    )
    .bind(now)
    .bind(id)
    .execute(meta.pool())
    .await?;
    get(meta, actor, id).await
}

/// Claims for `runner` an unfinished job no replica holds (queued, or whose holder's
/// lease ran out), oldest first.
pub async fn claim(meta: &Metadata, now: i64, runner: &str) -> Result<Option<Job>, DocError> {
    let candidates: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM bulk_jobs WHERE status IN ('QUEUED', 'RUNNING') AND (lease_until IS NULL OR lease_until < $1) \
         ORDER BY created_at LIMIT 8",
    )
    .bind(now)
    .fetch_all(meta.pool())
    .await?;
    for id in candidates {
        let claimed = sqlx::query(
            "UPDATE bulk_jobs SET status = 'RUNNING', lease_owner = $1, lease_until = $2, updated_at = $3 \
             WHERE id = $4 AND status IN ('QUEUED', 'RUNNING') AND (lease_until IS NULL OR lease_until < $3)",
        )
        .bind(runner)
        .bind(now + LEASE_MS)
        .bind(now)
        .bind(&id)
        .execute(meta.pool())
        .await?
        .rows_affected();
        if claimed == 1 {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM bulk_jobs WHERE id = $1")))
                .bind(&id)
                .fetch_one(meta.pool())
                .await?;
            return Ok(Some(job_of(&row)?));
        }
    }
    Ok(None)
}

/// Records `job`'s progress (and renews `runner`'s lease), with `event` in the same
/// transaction; with `finish`, the job ends so. `false` when the job is no longer
/// `runner`'s to run (cancelled, or another replica took it over): nothing is recorded.
pub async fn checkpoint(
    docs: &Documents,
    job: &Job,
    runner: &str,
    event: Option<(EventType, Value)>,
    finish: Option<JobStatus>,
) -> Result<bool, DocError> {
    let recorded = docs
        .meta()
        .write(|mut tx| {
            let event = event.clone();
            Box::pin(async move {
                let r: Result<bool, DocError> = async {
                    let now = docs.clock().now_ms();
                    let status = finish.unwrap_or(JobStatus::Running);
                    let changed = sqlx::query(
                        "UPDATE bulk_jobs SET processed = $1, succeeded = $2, failed = $3, errors = $4, status = $5, \
                         updated_at = $6, lease_until = $7, finished_at = $8, result_tier = $11, result_key = $12 \
                         WHERE id = $9 AND lease_owner = $10 AND status = 'RUNNING'",
                    )
                    .bind(job.processed)
                    .bind(job.succeeded)
                    .bind(job.failed)
                    .bind(json_text(&job.errors))
                    .bind(status.name())
                    .bind(now)
                    .bind(now + LEASE_MS)
                    .bind(finish.map(|_| now))
                    .bind(&job.id)
                    .bind(runner)
                    .bind(job.result.as_ref().map(|(tier, _)| tier.as_str()))
                    .bind(job.result.as_ref().map(|(_, key)| key.as_str()))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if changed == 0 {
                        return Ok(false);
                    }
                    if let Some((event_type, Value::Object(fields))) = event {
                        Event::new(event_type, now, fields).enqueue(&mut tx, now).await?;
                    }
                    Ok(true)
                }
                .await;
                (tx, r)
            })
        })
        .await?;
    docs.wake_relay();
    Ok(recorded)
}

/// Records that `job`'s ZIP could not be stored (`why`), as `runner` ran it.
///
/// Under [`MAX_EXPORT_FAILURES`], the job is let go for any replica to start over after a
/// pause ([`EXPORT_RETRY_MS`] times its failures so far): `Ok(false)`. At it, the job fails
/// for good, its `BULK_OPERATION_COMPLETED` event (status `FAILED`) enqueued in the same
/// transaction, and `job` is updated so: `Ok(true)`. `Ok(false)` too when the job is no
/// longer `runner`'s (cancelled, or taken over).
pub async fn export_failed(docs: &Documents, job: &mut Job, runner: &str, why: &str) -> Result<bool, DocError> {
    let failure = format!("the export's ZIP could not be stored: {why}");
    let id = job.id.clone();
    let outcome = docs
        .meta()
        .write(|mut tx| {
            let (failure, id) = (failure.clone(), id.clone());
            let mut ended = job.clone();
            Box::pin(async move {
                let r: Result<Option<Job>, DocError> = async {
                    let now = docs.clock().now_ms();
                    let failures: Option<i64> = sqlx::query_scalar(
                        "UPDATE bulk_jobs SET export_failures = export_failures + 1, lease_owner = NULL, \
                         lease_until = $1 + $4 * (export_failures + 1), updated_at = $1 \
                         WHERE id = $2 AND lease_owner = $3 AND status = 'RUNNING' RETURNING export_failures",
                    )
                    .bind(now)
                    .bind(&id)
                    .bind(runner)
                    .bind(EXPORT_RETRY_MS)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if failures.is_none_or(|f| f < MAX_EXPORT_FAILURES) {
                        return Ok(None);
                    }
                    sqlx::query(
                        "UPDATE bulk_jobs SET status = 'FAILED', failure = $1, finished_at = $2, updated_at = $2 \
                         WHERE id = $3",
                    )
                    .bind(&failure)
                    .bind(now)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                    ended.status = JobStatus::Failed;
                    ended.failure = Some(failure);
                    ended.finished_at = Some(now);
                    ended.updated_at = now;
                    ended.result = None;
                    ended.download = None;
                    if let Value::Object(fields) = ended.completed_event() {
                        Event::new(EventType::BulkOperationCompleted, now, fields).enqueue(&mut tx, now).await?;
                    }
                    Ok(Some(ended))
                }
                .await;
                (tx, r)
            })
        })
        .await?;
    docs.wake_relay();
    Ok(match outcome {
        Some(ended) => {
            *job = ended;
            true
        }
        None => false,
    })
}

/// Forgets the jobs on `docs` (the primary shard, which holds them) that finished more
/// than [`KEPT_FOR_MS`] ago, and deletes their exports' ZIPs: each job's row goes in the
/// same transaction that hands its ZIP to the garbage collector (`blob_garbage`, due at
/// once), which then deletes it from its tier. A crash in between leaves the ZIP for the
/// next collection. How many jobs went.
pub async fn prune(docs: &Documents) -> Result<u64, DocError> {
    const BATCH: i64 = 256;
    let mut pruned = 0;
    loop {
        let now = docs.clock().now_ms();
        let gone = docs
            .meta()
            .write(|mut tx| {
                Box::pin(async move {
                    let r: Result<u64, DocError> = async {
                        // Only a finished job has a `finished_at` (completed, cancelled or failed).
                        let rows = sqlx::query(
                            "SELECT id, result_tier, result_key FROM bulk_jobs WHERE finished_at < $1 \
                             ORDER BY finished_at LIMIT $2",
                        )
                        .bind(now - KEPT_FOR_MS)
                        .bind(BATCH)
                        .fetch_all(&mut *tx)
                        .await?;
                        for row in &rows {
                            let id: String = row.try_get("id")?;
                            let zip: (Option<String>, Option<String>) =
                                (row.try_get("result_tier")?, row.try_get("result_key")?);
                            if let (Some(tier), Some(key)) = zip {
                                sqlx::query(
                                    "INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3) \
                                     ON CONFLICT (tier, object_key) DO NOTHING",
                                )
                                .bind(tier)
                                .bind(key)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            }
                            sqlx::query("DELETE FROM bulk_jobs WHERE id = $1").bind(id).execute(&mut *tx).await?;
                        }
                        Ok(u64::try_from(rows.len()).unwrap_or(u64::MAX))
                    }
                    .await;
                    (tx, r)
                })
            })
            .await?;
        pruned += gone;
        if gone < BATCH.unsigned_abs() {
            break;
        }
    }
    if pruned > 0 {
        docs.collect_garbage().await?;
    }
    Ok(pruned)
}

/// Does `job`'s operation to the document `id` on its shard `shard`, as the job's owner.
pub async fn apply(shard: &Documents, job: &Job, id: i64) -> Result<(), DocError> {
    let actor = job.actor();
    match job.operation {
        Operation::Delete => shard.delete(&actor, id).await,
        Operation::Tag | Operation::Untag => {
            let doc = shard.get(&actor, id).await?;
            let mut tags = doc.tags.clone();
            if job.operation == Operation::Tag {
                tags.extend(job.tags.iter().filter(|t| !doc.tags.contains(t)).cloned());
            } else {
                tags.retain(|t| !job.tags.contains(t));
            }
            if tags == doc.tags {
                return Ok(());
            }
            shard.update(&actor, id, MetadataPatch { tags: Some(tags), ..MetadataPatch::default() }).await.map(drop)
        }
        Operation::Move => {
            let tier = job.tier.as_deref().ok_or_else(|| DocError::Invalid("move needs a tier".into()))?;
            shard.move_document(&actor, id, tier, Grace::default()).await.map(drop)
        }
        Operation::Archive => {
            let doc = shard.get(&actor, id).await?;
            if doc.archive_id.is_some() {
                return Ok(());
            }
            let tier = archive_tier(shard)
                .ok_or_else(|| DocError::Invalid("the platform has no FROZEN storage tier to archive to".into()))?;
            let by = format!("bulk:{}", job.id);
            shard.archive(id, &tier, &by, Grace::default(), &|_| {}).await.map(drop)
        }
        Operation::Restore => shard.restore_archived(&actor, id, Grace::default()).await.map(drop),
        Operation::Export => Err(DocError::Invalid("an export writes its documents through an Export".into())),
    }
}

type ZipWriter = async_zip::tokio::write::ZipFileWriter<object_store::buffered::BufWriter>;

/// An export job's ZIP, written into the default tier's store as the documents are read.
pub struct Export {
    zip: ZipWriter,
    tier: String,
    key: String,
    names: std::collections::HashSet<String>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("tier", &self.tier).field("key", &self.key).finish_non_exhaustive()
    }
}

impl Export {
    /// Starts `job`'s ZIP (from the beginning: a ZIP half written by a replica that stopped
    /// cannot be continued) in `docs`' default tier.
    pub fn start(docs: &Documents, job: &Job) -> Self {
        let tier = docs.tiers().default_tier();
        let key = format!("exports/{}.zip", job.id);
        let writer = object_store::buffered::BufWriter::new(
            std::sync::Arc::clone(tier.store()),
            object_store::path::Path::from(key.as_str()),
        );
        Self {
            zip: async_zip::tokio::write::ZipFileWriter::with_tokio(writer),
            tier: tier.name.clone(),
            key,
            names: std::collections::HashSet::new(),
        }
    }

    /// The file name and bytes of document `id`'s current version, read from its shard
    /// `shard` as the job's owner.
    pub async fn open(shard: &Documents, job: &Job, id: i64) -> Result<(String, crate::blob::ByteStream), DocError> {
        let content = shard.content(&job.actor(), id, None).await?;
        let bytes = shard.read(&content, None).await?;
        Ok((content.filename, bytes))
    }

    /// Adds document `id`'s `bytes` as `<id>-<filename>`.
    pub async fn add(&mut self, id: i64, filename: &str, mut bytes: crate::blob::ByteStream) -> Result<(), DocError> {
        use futures::{AsyncWriteExt as _, TryStreamExt as _};
        let safe: String =
            filename.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
        let mut name = format!("{id}-{safe}");
        while !self.names.insert(name.clone()) {
            name.insert(0, '_');
        }
        let entry = async_zip::ZipEntryBuilder::new(name.into(), async_zip::Compression::Stored);
        let broken = |e: &dyn std::fmt::Display| DocError::Invalid(format!("writing the export: {e}"));
        let mut writer = self.zip.write_entry_stream(entry).await.map_err(|e| broken(&e))?;
        let mut copied = Ok(());
        while let Some(chunk) = bytes.try_next().await.transpose() {
            match chunk {
                Ok(chunk) => writer.write_all(&chunk).await.map_err(|e| broken(&e))?,
                Err(e) => {
                    // The entry is closed as it is: the archive stays readable, and the
                    // document counts as failed.
                    copied = Err(DocError::Invalid(format!("document {id} was cut short in the export: {e}")));
                    break;
                }
            }
        }
        writer.close().await.map_err(|e| broken(&e))?;
        copied
    }

    /// Finishes the ZIP and stores it; its tier and key.
    pub async fn finish(self) -> Result<(String, String), DocError> {
        use tokio::io::AsyncWriteExt as _;
        let broken = |e: &dyn std::fmt::Display| DocError::Invalid(format!("finishing the export: {e}"));
        let mut writer = self.zip.close().await.map_err(|e| broken(&e))?.into_inner();
        writer.shutdown().await.map_err(|e| broken(&e))?;
        Ok((self.tier, self.key))
    }

    /// Gives up the ZIP (a cancelled job, a replica stopping): nothing is left stored.
    pub async fn abandon(self) {
        if let Ok(writer) = self.zip.close().await {
            let _ = writer.into_inner().abort().await;
        }
    }
}
