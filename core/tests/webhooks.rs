//! The webhook delivery log on SQLite and Postgres: ingestion is idempotent, leases keep
//! two dispatchers apart, attempts schedule retries and end deliveries, the deactivation
//! rule and 410 deactivate with an event, batches of outcomes are recorded in one go, replays requeue FAILED deliveries, and the log
//! is pruned without touching pending work.

use std::time::Duration;

use serde_json::{Map, json};
use vellum_core::config::{SecretHandle, WebhookConfig};
use vellum_core::crds::webhook::{DeactivationRule, EventType, RetryPolicy};
use vellum_core::events::{Event, outbox};
use vellum_core::store::Metadata;
use vellum_core::webhooks::{self, Attempt, Endpoint, Next, Outcome, Replay};
use vellum_testkit::TestDatabase;

struct Env {
    meta: Metadata,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn env(postgres: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (url, db) = TestDatabase::or_sqlite(postgres, dir.path()).await.unwrap();
    Env { meta: Metadata::open(&url).await.unwrap(), _db: db, _dir: dir }
}

fn endpoint(name: &str, event_types: Vec<EventType>) -> Endpoint {
    Endpoint {
        name: name.into(),
        config: WebhookConfig {
            url: "http://receiver.example/hook".into(),
            signing_key: SecretHandle::new("s", "k"),
            event_types,
            filter: None,
            retry: RetryPolicy::default(),
            timeout_seconds: 5,
            rate_limit: None,
            max_concurrency: 2,
            headers: vec![],
            paused: false,
            deactivation: DeactivationRule::default(),
        },
        keys: vec![b"key".to_vec()],
    }
}

fn event(event_type: EventType, now: i64) -> Event {
    let mut fields = Map::new();
    fields.insert("documentId".into(), json!(7));
    Event::new(event_type, now, fields)
}

fn failure(now: i64) -> Attempt {
    Attempt {
        started_at: now,
        duration_ms: 3,
        status_code: Some(500),
        success: false,
        error: Some("HTTP 500".into()),
        response_body: Some("boom".into()),
    }
}

async fn delivery_lifecycle(env: Env) {
    let meta = &env.meta;
    let now = 1_767_225_600_000;
    let endpoints = [endpoint("all", vec![]), endpoint("deletes", vec![EventType::DocumentDeleted])];
    let uploaded = event(EventType::DocumentUploaded, now);
    assert_eq!(webhooks::ingest(meta, &endpoints, &uploaded, now).await.unwrap(), vec!["all".to_owned()]);
    assert!(webhooks::ingest(meta, &endpoints, &uploaded, now).await.unwrap().is_empty(), "idempotent");

    // Two dispatchers: only one gets the lease.
    let lease = Duration::from_secs(30);
    let first = webhooks::claim_due(meta, "all", now, 10, lease).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].body, uploaded.payload.to_string(), "the body is the event payload");
    assert!(webhooks::claim_due(meta, "all", now, 10, lease).await.unwrap().is_empty());
    // A dead dispatcher's lease runs out and another takes the delivery over.
    let again = webhooks::claim_due(meta, "all", now + 30_001, 10, lease).await.unwrap();
    assert_eq!(again, first);

    // A failure schedules a retry; the retry is not due before its time.
    let d = &again[0];
    assert_eq!(
        webhooks::record_attempt(
            meta,
            d,
            &failure(now),
            Next::RetryAt(now + 2000),
            false,
            &DeactivationRule::default(),
            now
        )
        .await
        .unwrap(),
        None
    );
    assert!(webhooks::claim_due(meta, "all", now + 1999, 10, lease).await.unwrap().is_empty());
    assert_eq!(webhooks::next_due(meta, "all").await.unwrap(), Some(now + 2000));
    let retry = webhooks::claim_due(meta, "all", now + 2000, 10, lease).await.unwrap();
    assert_eq!(retry[0].attempts, 1);
    let ok =
        Attempt { started_at: now + 2000, duration_ms: 1, status_code: Some(200), success: true, ..Attempt::default() };
    webhooks::record_attempt(meta, &retry[0], &ok, Next::Delivered, false, &DeactivationRule::default(), now + 2000)
        .await
        .unwrap();

    let stats = webhooks::stats(meta, "all").await.unwrap();
    assert_eq!((stats.total_calls, stats.success_count, stats.failure_count), (2, 1, 1));
    assert!((stats.success_rate - 50.0).abs() < f64::EPSILON);
    assert_eq!(stats.pending, 0);
    assert!(stats.active);
    let (log, total) = webhooks::deliveries(meta, "all", 0, 20).await.unwrap();
    assert_eq!(total, 1);
    assert_eq!(log[0].status, "SUCCESS");
    assert_eq!(log[0].attempt_log.len(), 2);
    assert_eq!(log[0].attempt_log[0].response_body.as_deref(), Some("boom"));
    assert_eq!(log[0].event_id, uploaded.id);
}

async fn deactivation_and_replay(env: Env) {
    let meta = &env.meta;
    let now = 1_767_225_600_000;
    let endpoints = [endpoint("flaky", vec![])];
    let rule = DeactivationRule::default();
    let mut deactivated = None;
    for i in 0..10 {
        let e = event(EventType::DocumentUploaded, now + i);
        webhooks::ingest(meta, &endpoints, &e, now).await.unwrap();
        let d = webhooks::claim_due(meta, "flaky", now + i, 1, Duration::from_secs(5)).await.unwrap().remove(0);
        // One success, then failures: nothing is judged before the 10th call, whose 9
        // failures are above the 80 % allowed.
        let attempt = if i < 1 {
            Attempt { success: true, status_code: Some(200), ..Attempt::default() }
        } else {
            failure(now + i)
        };
        let next = if attempt.success { Next::Delivered } else { Next::Failed };
        deactivated = webhooks::record_attempt(meta, &d, &attempt, next, false, &rule, now + i).await.unwrap();
        if i < 9 {
            assert_eq!(deactivated, None, "call {i}");
        }
    }
    let reason = deactivated.expect("9 failures of 10 calls deactivate");
    assert!(reason.contains("9 of the last 10"), "{reason}");
    let activation = webhooks::activation(meta, "flaky").await.unwrap();
    assert!(!activation.active);
    assert_eq!(activation.deactivation_reason.as_deref(), Some(reason.as_str()));
    // The deactivation is an event in the outbox, in the same transaction.
    let pending = outbox::pending(meta, 100).await.unwrap();
    let deact: Vec<_> = pending.iter().filter(|p| p.event.event_type == EventType::WebhookDeactivated).collect();
    assert_eq!(deact.len(), 1);
    assert_eq!(deact[0].event.payload["webhookId"], "flaky");
    // Nothing new is queued for a deactivated endpoint.
    let later = event(EventType::DocumentUploaded, now + 100);
    assert!(webhooks::ingest(meta, &endpoints, &later, now + 100).await.unwrap().is_empty());

    // Replay one, then all since a time.
    let (log, _) = webhooks::deliveries(meta, "flaky", 0, 20).await.unwrap();
    let failed: Vec<_> = log.iter().filter(|d| d.status == "FAILED").collect();
    assert_eq!(failed.len(), 9);
    assert_eq!(webhooks::replay(meta, "flaky", Replay::One(failed[0].id), now + 200).await.unwrap(), 1);
    assert_eq!(
        webhooks::replay(meta, "flaky", Replay::One(failed[0].id), now + 200).await.unwrap(),
        0,
        "no longer FAILED"
    );
    assert_eq!(webhooks::replay(meta, "flaky", Replay::Since(now), now + 200).await.unwrap(), 8);
    let due = webhooks::claim_due(meta, "flaky", now + 200, 100, Duration::from_secs(5)).await.unwrap();
    assert_eq!(due.len(), 9);
    assert!(due.iter().all(|d| d.attempts == 0), "a replay starts a fresh schedule");

    // Reactivation starts a new window; 410 deactivates at once.
    webhooks::reactivate(meta, "flaky", now + 300).await.unwrap();
    assert!(webhooks::activation(meta, "flaky").await.unwrap().active);
    let gone = Attempt { status_code: Some(410), ..failure(now + 300) };
    let reason = webhooks::record_attempt(meta, &due[0], &gone, Next::Failed, true, &rule, now + 300).await.unwrap();
    assert!(reason.unwrap().contains("410"));
    // The batched summaries the operator reads agree with the per-endpoint statistics.
    let summaries = webhooks::summaries(meta).await.unwrap();
    let (summary, stats) = (&summaries["flaky"], webhooks::stats(meta, "flaky").await.unwrap());
    assert!(!summary.active);
    assert!(summary.deactivation_reason.as_deref().unwrap().contains("410"));
    assert_eq!((summary.total_calls, summary.success_count), (stats.total_calls, stats.success_count));
    assert_eq!(summary.success_rate(), Some(stats.success_rate));
    assert_eq!(summary.last_failure.as_ref().and_then(|f| f.1), Some(410), "the latest failure is the 410");

    // Pruning keeps pending deliveries.
    let pruned = webhooks::prune(meta, now + 1_000_000).await.unwrap();
    assert_eq!(pruned, 2, "the success and the 410'd delivery");
    let stats = webhooks::stats(meta, "flaky").await.unwrap();
    assert_eq!(stats.pending, 8);
}

async fn batches_lease_once_and_record_every_outcome(env: Env) {
    let meta = &env.meta;
    let now = 1_767_225_600_000;
    let endpoints = [endpoint("batch", vec![])];
    // More than one statement's worth of rows (200) per batch.
    let n = 250;
    for i in 0..n {
        webhooks::ingest(meta, &endpoints, &event(EventType::DocumentUploaded, now + i), now + i).await.unwrap();
    }
    // Racing dispatchers never lease the same delivery twice, and together lease all.
    let lease = Duration::from_secs(30);
    let (a, b) = tokio::join!(
        webhooks::claim_due(meta, "batch", now + n, 150, lease),
        webhooks::claim_due(meta, "batch", now + n, 150, lease)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut seqs: Vec<i64> = a.iter().chain(&b).map(|d| d.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), a.len() + b.len(), "no delivery leased twice");
    let mut rest = webhooks::claim_due(meta, "batch", now + n, 300, lease).await.unwrap();
    assert_eq!(seqs.len() + rest.len(), 250);
    assert!(a.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    let mut all: Vec<_> = a.into_iter().chain(b).collect();
    all.append(&mut rest);
    all.sort_by_key(|d| d.seq);

    // Every third delivered, every third retried, every third failed for good.
    let outcomes: Vec<Outcome> = all
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (attempt, next) = match i % 3 {
                0 => (Attempt { success: true, status_code: Some(204), ..Attempt::default() }, Next::Delivered),
                1 => (failure(now), Next::RetryAt(now + 10_000)),
                _ => (Attempt { error: Some("connection refused".into()), ..Attempt::default() }, Next::Failed),
            };
            Outcome { delivery: d.clone(), attempt, next, gone: false, finished_at: now + 500 }
        })
        .collect();
    let lenient = DeactivationRule { failure_rate_percent: 100, ..DeactivationRule::default() };
    assert_eq!(webhooks::record_attempts(meta, "batch", &outcomes, &lenient, now + 500).await.unwrap(), None);

    let stats = webhooks::stats(meta, "batch").await.unwrap();
    assert_eq!(stats.pending, 83);
    let summaries = webhooks::summaries(meta).await.unwrap();
    let summary = &summaries["batch"];
    assert_eq!((summary.total_calls, summary.success_count), (250, 84));
    assert_eq!(summary.last_failure.as_ref().and_then(|f| f.2.as_deref()), Some("connection refused"));
    assert!(!summaries.contains_key("never-seen"));
    let (log, total) = webhooks::deliveries(meta, "batch", 0, 300).await.unwrap();
    assert_eq!(total, 250);
    for record in &log {
        let i = all.iter().position(|d| d.seq == record.id).unwrap();
        assert_eq!(record.attempts, 1);
        assert_eq!(record.attempt_log.len(), 1, "delivery {}", record.id);
        match i % 3 {
            0 => {
                assert_eq!(record.status, "SUCCESS");
                assert_eq!(record.completed_at, Some(now + 500));
                assert_eq!(record.last_status_code, Some(204));
            }
            1 => {
                assert_eq!(record.status, "PENDING");
                assert_eq!(record.next_attempt_at, Some(now + 10_000));
                assert_eq!(record.last_error.as_deref(), Some("HTTP 500"));
            }
            _ => {
                assert_eq!(record.status, "FAILED");
                assert_eq!(record.last_status_code, None);
                assert_eq!(record.last_error.as_deref(), Some("connection refused"));
            }
        }
    }
    // The retries fall due at their time, with their attempt counted.
    assert!(webhooks::claim_due(meta, "batch", now + 9_999, 300, lease).await.unwrap().is_empty());
    let retries = webhooks::claim_due(meta, "batch", now + 10_000, 300, lease).await.unwrap();
    assert_eq!(retries.len(), 83);
    assert!(retries.iter().all(|d| d.attempts == 1));

    // The window counted each event once, when it ended: the batch's 84 deliveries and 83
    // failures so far (its 83 retries not yet), then the retries failing for good, which
    // cross the rule: 166 failures of 250 calls.
    let failed: Vec<Outcome> = retries
        .iter()
        .map(|d| Outcome {
            delivery: d.clone(),
            attempt: failure(now + 10_000),
            next: Next::Failed,
            gone: false,
            finished_at: now + 10_001,
        })
        .collect();
    let strict = DeactivationRule { failure_rate_percent: 60, ..DeactivationRule::default() };
    let reason = webhooks::record_attempts(meta, "batch", &failed, &strict, now + 10_001)
        .await
        .unwrap()
        .expect("166 failures of 250 calls deactivate");
    assert!(reason.contains("166 of the last 250"), "{reason}");
}

async fn key_rotation_keeps_the_old_key_for_the_grace_period(env: Env) {
    let meta = &env.meta;
    let now = 1_767_225_600_000;
    let grace = Duration::from_secs(3600);
    assert_eq!(webhooks::signing_keys(meta, "w", b"one", grace, now).await.unwrap(), vec![b"one".to_vec()]);
    assert_eq!(webhooks::signing_keys(meta, "w", b"one", grace, now + 1).await.unwrap(), vec![b"one".to_vec()]);
    let rotated = webhooks::signing_keys(meta, "w", b"two", grace, now + 10).await.unwrap();
    assert_eq!(rotated, vec![b"two".to_vec(), b"one".to_vec()]);
    let later = webhooks::signing_keys(meta, "w", b"two", grace, now + 10 + 3_599_999).await.unwrap();
    assert_eq!(later.len(), 2);
    let after = webhooks::signing_keys(meta, "w", b"two", grace, now + 10 + 3_600_000).await.unwrap();
    assert_eq!(after, vec![b"two".to_vec()]);
}

/// Three events to a dead endpoint, each tried four times, are three calls, not twelve:
/// the endpoint stays active until ten events have ended, as the seed's rule reads.
async fn retries_count_as_one_call_per_event(env: Env) {
    let meta = &env.meta;
    let now = 1_767_225_600_000;
    let rule = DeactivationRule::default();
    webhooks::ingest(meta, &[endpoint("dead", vec![])], &event(EventType::DocumentUploaded, now), now).await.unwrap();
    let mut at = now;
    for event_number in 0..10 {
        if event_number > 0 {
            let e = event(EventType::DocumentUploaded, at);
            webhooks::ingest(meta, &[endpoint("dead", vec![])], &e, at).await.unwrap();
        }
        for attempt in 0..4 {
            let d = webhooks::claim_due(meta, "dead", at, 1, Duration::from_secs(5)).await.unwrap().remove(0);
            let next = if attempt < 3 { Next::RetryAt(at + 1) } else { Next::Failed };
            let deactivated = webhooks::record_attempt(meta, &d, &failure(at), next, false, &rule, at).await.unwrap();
            at += 1;
            if event_number < 9 || attempt < 3 {
                assert_eq!(deactivated, None, "event {event_number}, attempt {attempt}");
            } else {
                let reason = deactivated.expect("the tenth failed event deactivates");
                assert!(reason.contains("10 of the last 10"), "{reason}");
            }
        }
    }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test] async fn $name() { super::$name(super::env(false).await).await } )* }
        mod postgres { $( #[tokio::test] async fn $name() { super::$name(super::env(true).await).await } )* }
    };
}

on_both!(
    delivery_lifecycle,
    deactivation_and_replay,
    retries_count_as_one_call_per_event,
    batches_lease_once_and_record_every_outcome,
    key_rotation_keeps_the_old_key_for_the_grace_period,
);
