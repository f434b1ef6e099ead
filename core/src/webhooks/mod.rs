//! Webhook endpoints and their delivery log.
//!
//! The delivery log is also the queue: an event becomes one `PENDING` delivery per endpoint
//! that wants it ([`ingest`], idempotent per event and endpoint), a dispatcher leases due
//! deliveries ([`claim_due`]), sends them and records finished attempts in batches
//! ([`record_attempts`]): each batch writes the attempts, schedules the retries, ends the
//! deliveries and deactivates the endpoint when its rule says so, all in one transaction.
//! A dispatcher that dies mid-delivery loses its lease and another takes the delivery
//! over: at least once, never lost.

pub mod destination;
pub mod rules;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::config::WebhookConfig;
use crate::crds::webhook::{DeactivationRule, EventType};
use crate::events::{Event, type_name};
use crate::store::{Metadata, StoreError, Tx};

pub use destination::DestinationPolicy;

/// Delivery states, as the seed's clients read them.
pub const PENDING: &str = "PENDING";
pub const SUCCESS: &str = "SUCCESS";
pub const FAILED: &str = "FAILED";

/// Response bodies kept in the log are cut to this many bytes.
pub const MAX_LOGGED_BODY: usize = 1024;

/// An endpoint ready to deliver to: its config and signing keys, current first.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    pub config: WebhookConfig,
    /// Signing keys: the current one, then a rotated-out one still in its grace period.
    pub keys: Vec<Vec<u8>>,
}

/// One delivery a dispatcher holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub seq: i64,
    pub webhook: String,
    /// The event id: the `webhook-id` of every attempt of this delivery.
    pub event_id: String,
    pub event_type: String,
    /// The event's time (ms), sent as `X-Timestamp`.
    pub event_timestamp: i64,
    /// The exact bytes every attempt sends.
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// What one attempt found.
#[derive(Clone, Debug, Default)]
pub struct Attempt {
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub success: bool,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// What becomes of a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryAt(i64),
    Failed,
}

/// Cuts a response body for the log at a character boundary.
pub fn truncate_body(body: &str) -> String {
    if body.len() <= MAX_LOGGED_BODY {
        return body.to_owned();
    }
    let mut end = MAX_LOGGED_BODY;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].to_owned()
}

/// Makes sure an endpoint has a state row (endpoints of the platform config get one the
/// first time a worker sees them).
pub async fn ensure_endpoint(meta: &Metadata, name: &str, now_ms: i64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO webhooks (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(now_ms)
        .execute(meta.pool())
        .await?;
    Ok(())
}

/// The keys an endpoint signs with, given its current key. When the key differs from the
/// one last seen, the old one keeps signing beside it for `grace`, so that a receiver
/// rolling its secret over accepts deliveries signed with either.
pub async fn signing_keys(
    meta: &Metadata,
    name: &str,
    current: &[u8],
    grace: Duration,
    now_ms: i64,
) -> Result<Vec<Vec<u8>>, StoreError> {
    ensure_endpoint(meta, name, now_ms).await?;
    let encoded = STANDARD.encode(current);
    let row = sqlx::query("SELECT signing_key, previous_key, previous_key_until FROM webhooks WHERE name = $1")
        .bind(name)
        .fetch_one(meta.pool())
        .await?;
    let seen: Option<String> = row.try_get("signing_key")?;
    let mut previous: Option<String> = row.try_get("previous_key")?;
    let mut until: Option<i64> = row.try_get("previous_key_until")?;
    if seen.as_deref() != Some(encoded.as_str()) {
        if let Some(old) = seen {
            previous = Some(old);
            until = Some(now_ms.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)));
        }
        sqlx::query("UPDATE webhooks SET signing_key = $1, previous_key = $2, previous_key_until = $3 WHERE name = $4")
            .bind(&encoded)
            .bind(&previous)
            .bind(until)
            .bind(name)
            .execute(meta.pool())
            .await?;
    }
    let mut keys = vec![current.to_vec()];
    if let (Some(old), Some(until)) = (previous, until)
        && until > now_ms
        && let Ok(old) = STANDARD.decode(old)
        && old != current
    {
        keys.push(old);
    }
    Ok(keys)
}

/// Turns an event into a `PENDING` delivery for every active endpoint that wants it, and
/// returns their names. Idempotent: an event seen twice (a re-publish, a redelivery after
/// a crash) is delivered once per endpoint. Deactivated endpoints receive nothing until
/// reactivated; paused ones keep their deliveries for when they resume.
pub async fn ingest(
    meta: &Metadata,
    endpoints: &[Endpoint],
    event: &Event,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut queued = Vec::new();
    let wanted: Vec<&Endpoint> =
        endpoints.iter().filter(|e| rules::wants(&e.config, event.event_type, &event.payload)).collect();
    if wanted.is_empty() {
        return Ok(queued);
    }
    // As JavaScript writes it: a receiver that parses and serialises it again (the seed's
    // Node.js check) gets the bytes that were signed.
    let body = crate::js_json::to_js_string(&event.payload);
    let event_timestamp = event.payload.get("timestamp").and_then(Value::as_i64).unwrap_or(now_ms);
    for endpoint in wanted {
        ensure_endpoint(meta, &endpoint.name, now_ms).await?;
        let inserted = sqlx::query(
            "INSERT INTO webhook_deliveries \
             (webhook, event_id, event_type, event_timestamp, body, status, attempts, next_attempt_at, created_at) \
             SELECT $1, $2, $3, $4, $5, 'PENDING', 0, $6, $6 WHERE EXISTS \
             (SELECT 1 FROM webhooks WHERE name = $1 AND active = 1) \
             ON CONFLICT (webhook, event_id) DO NOTHING",
        )
        .bind(&endpoint.name)
        .bind(&event.id)
        .bind(type_name(event.event_type))
        .bind(event_timestamp)
        .bind(&body)
        .bind(now_ms)
        .execute(meta.pool())
        .await?
        .rows_affected();
        if inserted > 0 {
            queued.push(endpoint.name.clone());
        }
    }
    Ok(queued)
}

/// Leases up to `limit` due deliveries of one endpoint for `lease`, oldest first, in one
/// statement. Two dispatchers racing for the same rows each get only those they won: the
/// conditions are checked again on the row being updated.
pub async fn claim_due(
    meta: &Metadata,
    webhook: &str,
    now_ms: i64,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Delivery>, StoreError> {
    let lease_until = now_ms.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
    let rows = sqlx::query(
        "UPDATE webhook_deliveries SET lease_until = $1 WHERE seq IN (SELECT seq FROM webhook_deliveries \
         WHERE webhook = $2 AND status = 'PENDING' AND next_attempt_at <= $3 \
         AND (lease_until IS NULL OR lease_until < $3) ORDER BY next_attempt_at, seq LIMIT $4) \
         AND status = 'PENDING' AND (lease_until IS NULL OR lease_until < $3) \
         RETURNING seq, webhook, event_id, event_type, event_timestamp, body, attempts, next_attempt_at",
    )
    .bind(lease_until)
    .bind(webhook)
    .bind(now_ms)
    .bind(limit)
    .fetch_all(meta.pool())
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        let due: i64 = row.try_get("next_attempt_at")?;
        let delivery = Delivery {
            seq: row.try_get("seq")?,
            webhook: row.try_get("webhook")?,
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            event_timestamp: row.try_get("event_timestamp")?,
            body: row.try_get("body")?,
            attempts: row.try_get("attempts")?,
        };
        claimed.push((due, delivery));
    }
    // RETURNING keeps no order.
    claimed.sort_by_key(|(due, d)| (*due, d.seq));
    Ok(claimed.into_iter().map(|(_, d)| d).collect())
}

/// The earliest time one of an endpoint's pending deliveries falls due, if any.
pub async fn next_due(meta: &Metadata, webhook: &str) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > next_attempt_at THEN lease_until \
         ELSE next_attempt_at END) FROM webhook_deliveries WHERE webhook = $1 AND status = 'PENDING'",
    )
    .bind(webhook)
    .fetch_one(meta.pool())
    .await?)
}

/// One finished attempt of a delivery and what follows from it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub delivery: Delivery,
    pub attempt: Attempt,
    pub next: Next,
    /// The endpoint answered 410 Gone: it is deactivated at once.
    pub gone: bool,
    /// When the attempt ended (ms): the delivery's completion time if it ends here.
    pub finished_at: i64,
}

/// Rows written per statement by [`record_attempts`] (well under both databases' limits on
/// bound parameters).
const RECORD_CHUNK: usize = 200;

/// Records one attempt; see [`record_attempts`].
pub async fn record_attempt(
    meta: &Metadata,
    delivery: &Delivery,
    attempt: &Attempt,
    next: Next,
    gone: bool,
    rule: &DeactivationRule,
    now_ms: i64,
) -> Result<Option<String>, StoreError> {
    let outcome = Outcome { delivery: delivery.clone(), attempt: attempt.clone(), next, gone, finished_at: now_ms };
    record_attempts(meta, &delivery.webhook, std::slice::from_ref(&outcome), rule, now_ms).await
}

/// `VALUES` rows of `columns` placeholders each, numbered from `$1`.
fn values_rows(rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(r * columns + c + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// Writes one chunk of outcomes: their attempt rows and their deliveries' new states.
async fn write_outcomes(tx: &mut Tx, webhook: &str, chunk: &[Outcome]) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO webhook_attempts (delivery, webhook, attempt, started_at, duration_ms, \
         status_code, success, error, response_body) VALUES {}",
        values_rows(chunk.len(), 9)
    );
    let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
    for o in chunk {
        insert = insert
            .bind(o.delivery.seq)
            .bind(webhook)
            .bind(o.delivery.attempts + 1)
            .bind(o.attempt.started_at)
            .bind(o.attempt.duration_ms)
            .bind(o.attempt.status_code.map(i64::from))
            .bind(i64::from(o.attempt.success))
            .bind(o.attempt.error.as_deref())
            .bind(o.attempt.response_body.as_deref());
    }
    insert.execute(&mut **tx).await?;
    // `VALUES` columns are column1, column2, ... on both databases; the casts
    // type the columns whose every row is NULL.
    let sql = format!(
        "UPDATE webhook_deliveries SET status = CAST(v.column2 AS TEXT), \
         attempts = CAST(v.column3 AS BIGINT), next_attempt_at = CAST(v.column4 AS BIGINT), \
         lease_until = NULL, completed_at = CAST(v.column5 AS BIGINT), \
         last_status_code = CAST(v.column6 AS BIGINT), last_error = CAST(v.column7 AS TEXT) \
         FROM (VALUES {}) AS v WHERE webhook_deliveries.seq = CAST(v.column1 AS BIGINT)",
        values_rows(chunk.len(), 7)
    );
    let mut update = sqlx::query(sqlx::AssertSqlSafe(sql));
    for o in chunk {
        let (status, next_at, completed) = match o.next {
            Next::Delivered => (SUCCESS, None, Some(o.finished_at)),
            Next::RetryAt(at) => (PENDING, Some(at), None),
            Next::Failed => (FAILED, None, Some(o.finished_at)),
        };
        update = update
            .bind(o.delivery.seq)
            .bind(status)
            .bind(o.delivery.attempts + 1)
            .bind(next_at)
            .bind(completed)
            .bind(o.attempt.status_code.map(i64::from))
            .bind(o.attempt.error.as_deref());
    }
    update.execute(&mut **tx).await?;
    Ok(())
}

/// Records finished attempts of one endpoint in one transaction: their attempt rows, their
/// deliveries' new states, the endpoint's counters (a call per delivery that ended, a
/// failure per one that failed for good), and, when an attempt met 410 Gone or the rule
/// says so, the endpoint's deactivation with a `WEBHOOK_DEACTIVATED` event.
/// Returns the reason of a deactivation these attempts caused.
///
/// A dispatcher records its attempts in batches: the endpoint's counter row is written
/// once per batch rather than once per attempt, so concurrent attempts do not queue on
/// its lock.
pub async fn record_attempts(
    meta: &Metadata,
    webhook: &str,
    outcomes: &[Outcome],
    rule: &DeactivationRule,
    now_ms: i64,
) -> Result<Option<String>, StoreError> {
    if outcomes.is_empty() {
        return Ok(None);
    }
    // Calls are counted per event, as the seed's rule reads ("over 10+ calls"): a delivery
    // counts once, when it ends (delivered, or failed with no retry left), whatever number
    // of attempts it took; an attempt to be retried is not judged yet.
    let ended = |o: &&Outcome| !matches!(o.next, Next::RetryAt(_));
    let calls = i64::try_from(outcomes.iter().filter(ended).count()).unwrap_or(i64::MAX);
    let failures =
        i64::try_from(outcomes.iter().filter(|o| matches!(o.next, Next::Failed)).count()).unwrap_or(i64::MAX);
    let gone = outcomes.iter().any(|o| o.gone);
    meta.write(|mut owned| {
        Box::pin(async move {
            let r = async {
                let tx = &mut owned;
                for chunk in outcomes.chunks(RECORD_CHUNK) {
                    write_outcomes(tx, webhook, chunk).await?;
                }
                let row = sqlx::query(
                    "UPDATE webhooks SET window_calls = window_calls + $1, window_failures = window_failures + $2 \
                     WHERE name = $3 RETURNING window_calls, window_failures, active",
                )
                .bind(calls)
                .bind(failures)
                .bind(webhook)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let (calls, failures, active): (i64, i64, i64) =
                    (row.try_get("window_calls")?, row.try_get("window_failures")?, row.try_get("active")?);
                if active != 1 {
                    return Ok(None);
                }
                let reason = if gone {
                    Some("the endpoint answered 410 Gone".to_owned())
                } else if rules::should_deactivate(rule, calls, failures) {
                    Some(format!(
                        "{failures} of the last {calls} calls failed, above the {} % allowed",
                        rule.failure_rate_percent
                    ))
                } else {
                    None
                };
                if let Some(reason) = &reason {
                    sqlx::query(
                        "UPDATE webhooks SET active = 0, deactivated_reason = $1, deactivated_at = $2 WHERE name = $3",
                    )
                    .bind(reason)
                    .bind(now_ms)
                    .bind(webhook)
                    .execute(&mut **tx)
                    .await?;
                    let mut fields = serde_json::Map::new();
                    fields.insert("webhookId".into(), json!(webhook));
                    fields.insert("reason".into(), json!(reason));
                    fields.insert("totalCalls".into(), json!(calls));
                    fields.insert("failureCount".into(), json!(failures));
                    Event::new(EventType::WebhookDeactivated, now_ms, fields).enqueue(tx, now_ms).await?;
                }
                Ok(reason)
            }
            .await;
            (owned, r)
        })
    })
    .await
}

/// Gives a leased delivery back without counting an attempt (the dispatcher is stopping,
/// or the endpoint was paused meanwhile).
pub async fn release(meta: &Metadata, seq: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE webhook_deliveries SET lease_until = NULL WHERE seq = $1 AND status = 'PENDING'")
        .bind(seq)
        .execute(meta.pool())
        .await?;
    Ok(())
}

/// An endpoint's activation state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Activation {
    pub active: bool,
    pub deactivation_reason: Option<String>,
    pub deactivated_at: Option<i64>,
}

/// Whether an endpoint is active (an endpoint never seen is).
pub async fn activation(meta: &Metadata, name: &str) -> Result<Activation, StoreError> {
    let row = sqlx::query("SELECT active, deactivated_reason, deactivated_at FROM webhooks WHERE name = $1")
        .bind(name)
        .fetch_optional(meta.pool())
        .await?;
    Ok(match row {
        None => Activation { active: true, ..Activation::default() },
        Some(row) => Activation {
            active: row.try_get::<i64, _>("active")? == 1,
            deactivation_reason: row.try_get("deactivated_reason")?,
            deactivated_at: row.try_get("deactivated_at")?,
        },
    })
}

/// Reactivates an endpoint: its failure window starts afresh.
pub async fn reactivate(meta: &Metadata, name: &str, now_ms: i64) -> Result<(), StoreError> {
    ensure_endpoint(meta, name, now_ms).await?;
    sqlx::query(
        "UPDATE webhooks SET active = 1, deactivated_reason = NULL, deactivated_at = NULL, window_calls = 0, \
         window_failures = 0 WHERE name = $1",
    )
    .bind(name)
    .execute(meta.pool())
    .await?;
    Ok(())
}

/// Which FAILED deliveries to send again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    One(i64),
    Since(i64),
}

/// Puts FAILED deliveries of an endpoint back in the queue, due at once, with a fresh
/// retry schedule and the same `webhook-id`. Returns how many.
pub async fn replay(meta: &Metadata, webhook: &str, which: Replay, now_ms: i64) -> Result<u64, StoreError> {
    let query = match which {
        Replay::One(seq) => sqlx::query(
            "UPDATE webhook_deliveries SET status = 'PENDING', attempts = 0, next_attempt_at = $2, \
             lease_until = NULL, completed_at = NULL WHERE webhook = $3 AND status = 'FAILED' AND seq = $1",
        )
        .bind(seq),
        Replay::Since(ms) => sqlx::query(
            "UPDATE webhook_deliveries SET status = 'PENDING', attempts = 0, next_attempt_at = $2, \
             lease_until = NULL, completed_at = NULL WHERE webhook = $3 AND status = 'FAILED' AND created_at >= $1",
        )
        .bind(ms),
    };
    Ok(query.bind(now_ms).bind(webhook).execute(meta.pool()).await?.rows_affected())
}

/// Deletes finished deliveries (and their attempts) completed before `before_ms`. Pending
/// deliveries are never pruned.
pub async fn prune(meta: &Metadata, before_ms: i64) -> Result<u64, StoreError> {
    sqlx::query(
        "DELETE FROM webhook_attempts WHERE delivery IN (SELECT seq FROM webhook_deliveries \
         WHERE status <> 'PENDING' AND completed_at < $1)",
    )
    .bind(before_ms)
    .execute(meta.pool())
    .await?;
    Ok(sqlx::query("DELETE FROM webhook_deliveries WHERE status <> 'PENDING' AND completed_at < $1")
        .bind(before_ms)
        .execute(meta.pool())
        .await?
        .rows_affected())
}

/// One attempt in the delivery log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    pub attempt: i64,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub duration_ms: i64,
    pub status_code: Option<i64>,
    pub success: bool,
    pub error: Option<String>,
    /// The start of the endpoint's answer.
    pub response_body: Option<String>,
}

/// One delivery (an event sent to an endpoint) with its attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    pub id: i64,
    pub webhook_id: String,
    /// The event id, also the `webhook-id` header of every attempt.
    pub event_id: String,
    pub event_type: String,
    /// PENDING, SUCCESS or FAILED.
    pub status: String,
    pub attempts: i64,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    /// The JSON body sent.
    pub payload: Value,
    pub attempt_log: Vec<AttemptRecord>,
}

fn delivery_record(row: &AnyRow) -> Result<DeliveryRecord, StoreError> {
    let body: String = row.try_get("body")?;
    Ok(DeliveryRecord {
        id: row.try_get("seq")?,
        webhook_id: row.try_get("webhook")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        completed_at: row.try_get("completed_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        payload: serde_json::from_str(&body).unwrap_or(Value::String(body)),
        attempt_log: Vec::new(),
    })
}

/// A page of an endpoint's deliveries, newest first, with their attempts, and the total.
pub async fn deliveries(
    meta: &Metadata,
    webhook: &str,
    page: i64,
    size: i64,
) -> Result<(Vec<DeliveryRecord>, i64), StoreError> {
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE webhook = $1")
        .bind(webhook)
        .fetch_one(meta.pool())
        .await?;
    let rows = sqlx::query(
        "SELECT seq, webhook, event_id, event_type, status, attempts, created_at, completed_at, next_attempt_at, \
         last_status_code, last_error, body FROM webhook_deliveries WHERE webhook = $1 \
         ORDER BY seq DESC LIMIT $2 OFFSET $3",
    )
    .bind(webhook)
    .bind(size)
    .bind(page.saturating_mul(size))
    .fetch_all(meta.pool())
    .await?;
    let mut records = rows.iter().map(delivery_record).collect::<Result<Vec<_>, _>>()?;
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        let (high, low) = (first.id, last.id);
        let attempts = sqlx::query(
            "SELECT delivery, attempt, started_at, duration_ms, status_code, success, error, response_body \
             FROM webhook_attempts WHERE webhook = $1 AND delivery >= $2 AND delivery <= $3 ORDER BY id",
        )
        .bind(webhook)
        .bind(low)
        .bind(high)
        .fetch_all(meta.pool())
        .await?;
        for row in attempts {
            let delivery: i64 = row.try_get("delivery")?;
            if let Some(record) = records.iter_mut().find(|r| r.id == delivery) {
                record.attempt_log.push(AttemptRecord {
                    attempt: row.try_get("attempt")?,
                    started_at: row.try_get("started_at")?,
                    duration_ms: row.try_get("duration_ms")?,
                    status_code: row.try_get("status_code")?,
                    success: row.try_get::<i64, _>("success")? == 1,
                    error: row.try_get("error")?,
                    response_body: row.try_get("response_body")?,
                });
            }
        }
    }
    Ok((records, total))
}

/// An endpoint's delivery statistics, over the attempts the log keeps.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub webhook_id: String,
    pub total_calls: i64,
    pub success_count: i64,
    pub failure_count: i64,
    /// Successful calls in percent of all calls, to two decimals; 0 without calls.
    pub success_rate: f64,
    /// When the last attempt started (RFC 3339).
    pub last_triggered: Option<String>,
    pub active: bool,
    pub deactivation_reason: Option<String>,
    /// Deliveries waiting to be sent or retried.
    pub pending: i64,
    /// The latest deliveries, newest first.
    pub recent_events: Vec<DeliveryRecord>,
}

/// Formats milliseconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> Option<String> {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
}

/// Statistics of one endpoint.
pub async fn stats(meta: &Metadata, webhook: &str) -> Result<Stats, StoreError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS total, COALESCE(SUM(CASE WHEN success = 1 THEN 1 ELSE 0 END), 0) AS ok, MAX(started_at) AS last \
         FROM webhook_attempts WHERE webhook = $1",
    )
    .bind(webhook)
    .fetch_one(meta.pool())
    .await?;
    let total: i64 = row.try_get("total")?;
    let success: i64 = row.try_get("ok")?;
    let last: Option<i64> = row.try_get("last")?;
    let pending: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE webhook = $1 AND status = 'PENDING'")
            .bind(webhook)
            .fetch_one(meta.pool())
            .await?;
    let activation = activation(meta, webhook).await?;
    let (recent_events, _) = deliveries(meta, webhook, 0, 10).await?;
    let success_rate = success_rate(success, total).unwrap_or(0.0);
    Ok(Stats {
        webhook_id: webhook.to_owned(),
        total_calls: total,
        success_count: success,
        failure_count: total - success,
        success_rate,
        last_triggered: last.and_then(rfc3339),
        active: activation.active,
        deactivation_reason: activation.deactivation_reason,
        pending,
        recent_events,
    })
}

/// What a Webhook resource's status shows of its endpoint's delivery log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub total_calls: i64,
    pub success_count: i64,
    /// When the last attempt started (ms since the epoch).
    pub last_triggered: Option<i64>,
    pub active: bool,
    pub deactivation_reason: Option<String>,
    /// The latest FAILED delivery: when it failed, its last status code and error.
    pub last_failure: Option<(Option<i64>, Option<i64>, Option<String>)>,
}

impl Summary {
    /// An endpoint with nothing in the log yet.
    pub fn unseen() -> Self {
        Self { active: true, ..Self::default() }
    }

    /// See the module's `success_rate`.
    pub fn success_rate(&self) -> Option<f64> {
        success_rate(self.success_count, self.total_calls)
    }
}

/// Successful calls in percent of all calls, to two decimals; `None` without calls.
#[allow(clippy::cast_precision_loss)]
fn success_rate(success: i64, total: i64) -> Option<f64> {
    (total > 0).then(|| (success as f64 * 10_000.0 / total as f64).round() / 100.0)
}

/// The summaries of every endpoint in the log, in three statements whatever their number:
/// what an operator reconciling a thousand Webhooks reads once rather than per Webhook.
/// Endpoints never seen are absent (see [`Summary::unseen`]).
pub async fn summaries(meta: &Metadata) -> Result<HashMap<String, Summary>, StoreError> {
    let mut found: HashMap<String, Summary> = HashMap::new();
    let rows = sqlx::query(
        "SELECT webhook, COUNT(*) AS total, COALESCE(SUM(CASE WHEN success = 1 THEN 1 ELSE 0 END), 0) AS ok, \
         MAX(started_at) AS last FROM webhook_attempts GROUP BY webhook",
    )
    .fetch_all(meta.pool())
    .await?;
    for row in &rows {
        let summary = found.entry(row.try_get("webhook")?).or_insert_with(Summary::unseen);
        summary.total_calls = row.try_get("total")?;
        summary.success_count = row.try_get("ok")?;
        summary.last_triggered = row.try_get("last")?;
    }
    let rows = sqlx::query("SELECT name, active, deactivated_reason FROM webhooks").fetch_all(meta.pool()).await?;
    for row in &rows {
        let summary = found.entry(row.try_get("name")?).or_insert_with(Summary::unseen);
        summary.active = row.try_get::<i64, _>("active")? == 1;
        summary.deactivation_reason = row.try_get("deactivated_reason")?;
    }
    let rows = sqlx::query(
        "SELECT webhook, completed_at, last_status_code, last_error FROM webhook_deliveries d \
         WHERE status = 'FAILED' AND seq = (SELECT MAX(seq) FROM webhook_deliveries f \
         WHERE f.webhook = d.webhook AND f.status = 'FAILED')",
    )
    .fetch_all(meta.pool())
    .await?;
    for row in &rows {
        let summary = found.entry(row.try_get("webhook")?).or_insert_with(Summary::unseen);
        summary.last_failure =
            Some((row.try_get("completed_at")?, row.try_get("last_status_code")?, row.try_get("last_error")?));
    }
    Ok(found)
}

/// A webhook created through the gateway's API. In standalone mode it lives here, and is
/// compiled with the platform config's webhooks as a Webhook resource would be.
#[derive(Clone, Debug)]
pub struct ApiWebhook {
    /// The resource name it compiles to (DNS-1123).
    pub id: String,
    /// The name the creator gave it.
    pub display_name: String,
    pub spec: crate::crds::webhook::WebhookSpec,
    /// The signing secret as given.
    pub secret: crate::config::SecretValue,
    pub created_by: String,
    pub created_at: i64,
}

/// Stores a new API webhook; `false` when the id is taken.
pub async fn create_api(meta: &Metadata, webhook: &ApiWebhook) -> Result<bool, StoreError> {
    let spec = serde_json::to_string(&webhook.spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let secret = STANDARD.encode(webhook.secret.expose());
    let inserted = sqlx::query(
        "INSERT INTO webhooks (name, display_name, spec, secret, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(&webhook.id)
    .bind(&webhook.display_name)
    .bind(&spec)
    .bind(&secret)
    .bind(&webhook.created_by)
    .bind(webhook.created_at)
    .execute(meta.pool())
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Every API webhook, oldest first.
pub async fn api_webhooks(meta: &Metadata) -> Result<Vec<ApiWebhook>, StoreError> {
    let rows = sqlx::query(
        "SELECT name, display_name, spec, secret, created_by, created_at FROM webhooks WHERE spec IS NOT NULL \
         ORDER BY created_at, name",
    )
    .fetch_all(meta.pool())
    .await?;
    rows.iter()
        .map(|row| {
            let spec: String = row.try_get("spec")?;
            let secret: String = row.try_get("secret")?;
            Ok(ApiWebhook {
                id: row.try_get("name")?,
                display_name: row.try_get::<Option<String>, _>("display_name")?.unwrap_or_default(),
                spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt(format!("webhook spec: {e}")))?,
                secret: crate::config::SecretValue::new(
                    STANDARD.decode(secret).map_err(|_| StoreError::Corrupt("webhook secret".into()))?,
                ),
                created_by: row.try_get::<Option<String>, _>("created_by")?.unwrap_or_default(),
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// Deletes an API webhook with its log; `false` when there is none of that id.
pub async fn delete_api(meta: &Metadata, id: &str) -> Result<bool, StoreError> {
    let deleted = sqlx::query("DELETE FROM webhooks WHERE name = $1 AND spec IS NOT NULL")
        .bind(id)
        .execute(meta.pool())
        .await?
        .rows_affected();
    if deleted == 1 {
        sqlx::query("DELETE FROM webhook_attempts WHERE webhook = $1").bind(id).execute(meta.pool()).await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook = $1").bind(id).execute(meta.pool()).await?;
    }
    Ok(deleted == 1)
}

/// When each known endpoint was first seen (or created), by name.
pub async fn created_at(meta: &Metadata) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
    let rows = sqlx::query("SELECT name, created_at FROM webhooks").fetch_all(meta.pool()).await?;
    rows.iter().map(|row| Ok((row.try_get("name")?, row.try_get("created_at")?))).collect()
}
