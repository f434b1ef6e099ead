//! Retention runs: one policy over every document, in bounded batches with a concurrency
//! limit, recorded in `retention_runs` (where the operator reads the policy's status from)
//! and resumed from its cursor when a run did not finish; progress goes out as
//! BULK_OPERATION_PROGRESS events and the end as BULK_OPERATION_COMPLETED. Also: draining
//! a tier, and the schedule of policies in standalone mode.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sqlx::Row;
use vellum_core::config::PlatformConfig;
use vellum_core::crds::webhook::EventType;
use vellum_core::documents::{Actor, DocError, Documents, Grace, StepHook};
use vellum_core::events::Event;
use vellum_core::retention::{Action, DocumentFacts, Policy, decide, selects};

/// How a run goes about its work.
#[derive(Clone, Copy, Debug)]
pub struct RunSettings {
    /// Documents read per batch.
    pub batch: i64,
    /// Blob moves and expirations in flight at once.
    pub concurrency: usize,
    pub grace: Grace,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self { batch: 500, concurrency: 8, grace: Grace::default() }
    }
}

/// What one run did (or, in a dry run, would have done).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub run_id: i64,
    pub policy: String,
    pub dry_run: bool,
    /// Whether the run took over an earlier run that had not finished.
    pub resumed: bool,
    pub started_at: i64,
    pub finished_at: i64,
    /// Documents the policy's selector matched.
    pub matched: i64,
    /// Versions moved to another tier.
    pub transitioned: i64,
    /// Documents deleted or archived, and noncurrent versions deleted.
    pub expired: i64,
    pub bytes_moved: i64,
    pub errors: i64,
    /// Expirations that were due and were not done (legal hold, an earlier failure).
    pub blocked: i64,
    /// Stored copies deleted once nothing referred to them.
    pub collected: u64,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("there is no retention policy {0:?} in the platform config")]
    UnknownPolicy(String),
    #[error(transparent)]
    Documents(#[from] DocError),
}

impl From<sqlx::Error> for RunError {
    fn from(e: sqlx::Error) -> Self {
        RunError::Documents(e.into())
    }
}

/// The run of `name`, resumed if one did not finish: `(id, cursor, counters, started_at)`.
async fn start(docs: &Documents, name: &str, dry_run: bool) -> Result<(RunReport, i64), RunError> {
    let pool = docs.meta().pool();
    let row = sqlx::query(
        "SELECT id, cursor, started_at, matched, transitioned, expired, bytes_moved, errors FROM retention_runs \
         WHERE policy = $1 AND dry_run = $2 AND finished_at IS NULL ORDER BY id DESC LIMIT 1",
    )
    .bind(name)
    .bind(i64::from(dry_run))
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        let report = RunReport {
            run_id: row.try_get("id")?,
            policy: name.to_owned(),
            dry_run,
            resumed: true,
            started_at: row.try_get("started_at")?,
            matched: row.try_get("matched")?,
            transitioned: row.try_get("transitioned")?,
            expired: row.try_get("expired")?,
            bytes_moved: row.try_get("bytes_moved")?,
            errors: row.try_get("errors")?,
            ..RunReport::default()
        };
        return Ok((report, row.try_get("cursor")?));
    }
    let now = docs.clock().now_ms();
    let id: i64 =
        sqlx::query_scalar("INSERT INTO retention_runs (policy, dry_run, started_at) VALUES ($1, $2, $3) RETURNING id")
            .bind(name)
            .bind(i64::from(dry_run))
            .bind(now)
            .fetch_one(pool)
            .await?;
    Ok((RunReport { run_id: id, policy: name.to_owned(), dry_run, started_at: now, ..RunReport::default() }, 0))
}

fn counters(report: &RunReport) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "operation": format!("retention:{}", report.policy),
        "policy": report.policy,
        "runId": report.run_id,
        "dryRun": report.dry_run,
        "matched": report.matched,
        "transitioned": report.transitioned,
        "expired": report.expired,
        "bytesMoved": report.bytes_moved,
        "errors": report.errors,
    }) else {
        unreachable!("a JSON object literal")
    };
    map
}

/// Saves the run's cursor and counters, and announces the progress, in one transaction.
async fn checkpoint(
    docs: &Documents,
    report: &RunReport,
    cursor: i64,
    event: EventType,
    extra: Value,
) -> Result<(), DocError> {
    let finished = matches!(event, EventType::BulkOperationCompleted).then(|| docs.clock().now_ms());
    docs.meta()
        .write(|mut tx| {
            let extra = extra.clone();
            Box::pin(async move {
                let r: Result<(), DocError> = async {
                    let now = docs.clock().now_ms();
                    sqlx::query(
                        "UPDATE retention_runs SET cursor = $1, matched = $2, transitioned = $3, expired = $4, \
                         bytes_moved = $5, errors = $6, finished_at = $7 WHERE id = $8",
                    )
                    .bind(cursor)
                    .bind(report.matched)
                    .bind(report.transitioned)
                    .bind(report.expired)
                    .bind(report.bytes_moved)
                    .bind(report.errors)
                    .bind(finished)
                    .bind(report.run_id)
                    .execute(&mut *tx)
                    .await?;
                    let mut fields = counters(report);
                    if let Value::Object(extra) = extra {
                        fields.extend(extra);
                    }
                    Event::new(event, now, fields).enqueue(&mut tx, now).await?;
                    Ok(())
                }
                .await;
                (tx, r)
            })
        })
        .await?;
    docs.wake_relay();
    Ok(())
}

/// The policies that decide together with `name`: every one that is not suspended and
/// not a dry run, and `name` itself.
fn deciding<'a>(config: &'a PlatformConfig, name: &str) -> Vec<Policy<'a>> {
    config
        .retention_policies
        .iter()
        .filter(|(n, p)| *n == name || (!p.suspend && !p.dry_run))
        .map(|(n, p)| Policy { name: n, config: p })
        .collect()
}

/// Runs the retention policy `name` over every document, or resumes its unfinished run.
pub async fn run_policy(
    docs: &Documents,
    config: &PlatformConfig,
    name: &str,
    settings: RunSettings,
    hook: StepHook<'_>,
) -> Result<RunReport, RunError> {
    let policy = config.retention_policies.get(name).ok_or_else(|| RunError::UnknownPolicy(name.to_owned()))?;
    let (mut report, mut cursor) = start(docs, name, policy.dry_run).await?;
    let policies = deciding(config, name);
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents WHERE deleted_at IS NULL")
        .fetch_one(docs.meta().pool())
        .await?;
    let mut processed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents WHERE deleted_at IS NULL AND id <= $1")
        .bind(cursor)
        .fetch_one(docs.meta().pool())
        .await?;
    tracing::info!(policy = name, run = report.run_id, resumed = report.resumed, cursor, "retention run starting");
    loop {
        let page = docs.lifecycle_page(cursor, settings.batch.max(1)).await?;
        let Some(last) = page.last().map(|d| d.id) else { break };
        processed += i64::try_from(page.len()).unwrap_or(i64::MAX);
        let now = docs.clock().now_ms();
        let selected: Vec<&DocumentFacts> =
            if policy.suspend { Vec::new() } else { page.iter().filter(|d| selects(&policy.selector, d)).collect() };
        report.matched += i64::try_from(selected.len()).unwrap_or(i64::MAX);
        let plans: Vec<(&DocumentFacts, Vec<Action>)> = selected
            .into_iter()
            .map(|doc| {
                // Every policy decides together (the most restrictive wins), and this
                // run carries out what falls to its own policy.
                let plan = decide(doc, &policies, &config.tiers, now);
                let blocked = plan.blocked.iter().filter(|(s, _)| s.action.policy() == name).count();
                report.blocked += i64::try_from(blocked).unwrap_or(i64::MAX);
                (doc, plan.due.into_iter().map(|s| s.action).filter(|a| a.policy() == name).collect())
            })
            .filter(|(_, actions): &(_, Vec<Action>)| !actions.is_empty())
            .collect();
        if policy.dry_run {
            for (_, actions) in &plans {
                for action in actions {
                    if action.expires() {
                        report.expired += 1;
                    } else {
                        report.transitioned += 1;
                    }
                }
            }
        } else {
            apply(docs, config, &plans, settings, hook, &mut report).await;
        }
        cursor = last;
        #[allow(clippy::cast_precision_loss)]
        let progress = if total > 0 { (processed.min(total) * 100) as f64 / total as f64 } else { 100.0 };
        checkpoint(
            docs,
            &report,
            cursor,
            EventType::BulkOperationProgress,
            json!({"total": total, "processed": processed, "progress": progress.round()}),
        )
        .await?;
    }
    if !policy.dry_run {
        report.collected = docs.collect_garbage().await?;
    }
    checkpoint(
        docs,
        &report,
        cursor,
        EventType::BulkOperationCompleted,
        json!({"totalDocuments": report.matched, "successCount": report.transitioned + report.expired}),
    )
    .await?;
    report.finished_at = docs.clock().now_ms();
    tracing::info!(
        policy = name,
        run = report.run_id,
        matched = report.matched,
        transitioned = report.transitioned,
        expired = report.expired,
        bytes_moved = report.bytes_moved,
        errors = report.errors,
        "retention run finished"
    );
    Ok(report)
}

/// Carries out the due actions of a batch: first every blob move (each blob once, to the
/// coldest tier any version sharing it is due for), then, for documents whose moves all
/// succeeded, the expirations.
async fn apply(
    docs: &Documents,
    config: &PlatformConfig,
    plans: &[(&DocumentFacts, Vec<Action>)],
    settings: RunSettings,
    hook: StepHook<'_>,
    report: &mut RunReport,
) {
    let class = |tier: &str| config.tiers.get(tier).map(|t| t.class);
    let mut moves: BTreeMap<&str, &str> = BTreeMap::new();
    for (doc, actions) in plans {
        for action in actions {
            if let Action::Transition { version, to_tier, .. } = action
                && let Some(v) = doc.versions.iter().find(|v| v.version == *version)
            {
                let entry = moves.entry(v.sha256.as_str()).or_insert(to_tier.as_str());
                if class(to_tier) > class(entry) {
                    *entry = to_tier.as_str();
                }
            }
        }
    }
    // Every blob of the batch at once: located, claimed and switched together.
    let moves: Vec<(String, String)> = moves.into_iter().map(|(sha, tier)| (sha.to_owned(), tier.to_owned())).collect();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    match docs.move_blobs(&moves, settings.grace, hook, settings.concurrency).await {
        Ok(outcomes) => {
            for ((sha, tier), outcome) in moves.iter().zip(outcomes) {
                match outcome {
                    Ok(bytes) => report.bytes_moved += i64::try_from(bytes).unwrap_or(i64::MAX),
                    Err(e) => {
                        tracing::warn!(error = %e, sha, tier, "moving a blob");
                        failed.insert(sha.clone(), e.to_string());
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, blobs = moves.len(), "moving a batch of blobs");
            failed.extend(moves.iter().map(|(sha, _)| (sha.clone(), e.to_string())));
        }
    }

    let failed = &failed;
    let action_futures: Vec<BoxFuture<'_, (i64, i64, i64)>> = plans
        .iter()
        .map(|(doc, actions)| {
            Box::pin(run_actions(docs, doc, actions, failed, settings.grace, hook)) as BoxFuture<'_, _>
        })
        .collect();
    let outcomes: Vec<(i64, i64, i64)> =
        futures::stream::iter(action_futures).buffer_unordered(settings.concurrency.max(1)).collect().await;
    for (transitioned, expired, errors) in outcomes {
        report.transitioned += transitioned;
        report.expired += expired;
        report.errors += errors;
    }
}

/// One document's actions after the moves: `(transitioned, expired, errors)`.
async fn run_actions(
    docs: &Documents,
    doc: &DocumentFacts,
    actions: &[Action],
    failed: &BTreeMap<String, String>,
    grace: Grace,
    hook: StepHook<'_>,
) -> (i64, i64, i64) {
    let sha_of = |version: i64| doc.versions.iter().find(|v| v.version == version).map(|v| v.sha256.as_str());
    let mut transitioned = 0;
    let mut errors: Vec<String> = Vec::new();
    for action in actions {
        if let Action::Transition { version, .. } = action {
            match sha_of(*version).and_then(|sha| failed.get(sha)) {
                Some(e) => errors.push(e.clone()),
                None => transitioned += 1,
            }
        }
    }
    let mut expired = 0;
    if errors.is_empty() {
        for action in actions.iter().filter(|a| a.expires()) {
            let result = match action {
                Action::Delete { policy } => {
                    docs.purge(&Actor { user: format!("policy:{policy}"), admin: true }, doc.id).await.map(|()| 0)
                }
                Action::Archive { tier, policy } => docs.archive(doc.id, tier, policy, grace, hook).await,
                Action::ExpireVersion { version, .. } => docs.expire_version(doc.id, *version, grace).await.map(|()| 0),
                Action::Transition { .. } => Ok(0),
            };
            match result {
                Ok(_) => expired += 1,
                Err(e) => {
                    tracing::warn!(error = %e, document = doc.id, action = action.kind(), "retention action");
                    errors.push(e.to_string());
                    break;
                }
            }
        }
    }
    let count = i64::try_from(errors.len()).unwrap_or(i64::MAX);
    let outcome = match errors.first() {
        Some(e) => docs.set_lifecycle_error(doc.id, Some(e)).await,
        None if doc.failed.is_some() && !actions.iter().any(|a| matches!(a, Action::Delete { .. })) => {
            docs.set_lifecycle_error(doc.id, None).await
        }
        None => Ok(()),
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, document = doc.id, "recording a lifecycle failure");
    }
    (transitioned, expired, count)
}

/// What draining a tier did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    pub moved: i64,
    pub bytes_moved: i64,
    pub errors: i64,
    /// Blobs still in the tier (0 when it may be removed).
    pub remaining: i64,
    pub collected: u64,
}

/// Moves every blob out of tier `from` into `to`, so that `from` can be removed, telling
/// `progress` the blobs moved so far after each batch.
pub async fn drain_tier(
    docs: &Documents,
    from: &str,
    to: &str,
    settings: RunSettings,
    progress: &(dyn Fn(i64) + Sync),
) -> Result<DrainReport, RunError> {
    docs.tiers().get(to).map_err(DocError::from)?;
    let mut report = DrainReport::default();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut after = String::new();
    loop {
        let shas: Vec<String> =
            sqlx::query_scalar("SELECT sha256 FROM blobs WHERE tier = $1 AND sha256 > $2 ORDER BY sha256 LIMIT $3")
                .bind(from)
                .bind(&after)
                .bind(settings.batch.max(1))
                .fetch_all(docs.meta().pool())
                .await?;
        let Some(last) = shas.last().cloned() else { break };
        let moves: Vec<(String, String)> = shas.into_iter().map(|sha| (sha, to.to_owned())).collect();
        let results: Vec<Result<u64, DocError>> =
            match docs.move_blobs(&moves, settings.grace, &|_| {}, settings.concurrency).await {
                Ok(outcomes) => outcomes,
                Err(e) => moves.iter().map(|_| Err(DocError::Conflict(format!("the batch failed: {e}")))).collect(),
            };
        for ((sha, _), result) in moves.into_iter().zip(results) {
            match result {
                Ok(bytes) => {
                    report.moved += 1;
                    report.bytes_moved += i64::try_from(bytes).unwrap_or(i64::MAX);
                }
                Err(e) => {
                    tracing::warn!(error = %e, sha, "draining a blob");
                    report.errors += 1;
                    failed.insert(sha);
                }
            }
        }
        after = last;
        progress(report.moved);
    }
    report.collected = docs.collect_garbage().await?;
    report.remaining = sqlx::query_scalar("SELECT COUNT(*) FROM blobs WHERE tier = $1")
        .bind(from)
        .fetch_one(docs.meta().pool())
        .await?;
    Ok(report)
}
