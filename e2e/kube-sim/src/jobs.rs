//! Jobs and CronJobs: the API server's defaulting and validation of both, the Job
//! controller (pods up to `parallelism` until `completions` succeeded, `Failed` past
//! `backoffLimit` or `activeDeadlineSeconds`, `ttlSecondsAfterFinished`) and the CronJob
//! controller (Jobs on the schedule, in UTC, with the concurrency policy, the starting
//! deadline and the history limits).

use std::str::FromStr;

use serde_json::{Value, json};

use crate::meta;
use crate::registry::ResourceType;
use crate::status::ApiError;
use crate::store::{DeleteOptions, Store};

const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
const JOB_NAME: &str = "batch.kubernetes.io/job-name";
const SCHEDULED: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

fn default(object: &mut Value, pointer: &str, value: Value) {
    if object.pointer(pointer).is_none() {
        let (parent, field) = pointer.rsplit_once('/').unwrap_or(("", pointer));
        if let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut) {
            map.insert(field.to_owned(), value);
        }
    }
}

fn restart_policy_check(t: &ResourceType, object: &Value, pointer: &str, field: &str) -> Result<(), ApiError> {
    match meta::str_at(object, pointer) {
        Some("Never" | "OnFailure") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            t,
            meta::name(object),
            &[(field.into(), format!("Unsupported value: \"{other}\": supported values: \"OnFailure\", \"Never\""))],
        )),
        None => Err(ApiError::invalid(
            t,
            meta::name(object),
            &[(field.into(), "Required value: valid values: \"OnFailure\", \"Never\"".into())],
        )),
    }
}

/// Defaults and checks of a Job being created (its uid already set), as the API server's.
pub fn admit_job(t: &ResourceType, job: &mut Value) -> Result<(), ApiError> {
    if !job.get("spec").is_some_and(Value::is_object) {
        return Ok(());
    }
    restart_policy_check(t, job, "/spec/template/spec/restartPolicy", "spec.template.spec.restartPolicy")?;
    let parallelism_set = job.pointer("/spec/parallelism").is_some();
    let completions_set = job.pointer("/spec/completions").is_some();
    if !parallelism_set && !completions_set {
        default(job, "/spec/completions", json!(1));
    }
    default(job, "/spec/parallelism", json!(1));
    default(job, "/spec/backoffLimit", json!(6));
    default(job, "/spec/completionMode", json!("NonIndexed"));
    default(job, "/spec/suspend", json!(false));
    let uid = meta::uid(job).to_owned();
    let name = meta::name(job).to_owned();
    if job.pointer("/spec/manualSelector").and_then(Value::as_bool) != Some(true) {
        job["spec"]["selector"] = json!({"matchLabels": {CONTROLLER_UID: uid}});
        default(job, "/spec/template/metadata", json!({}));
        default(job, "/spec/template/metadata/labels", json!({}));
        if let Some(labels) = job.pointer_mut("/spec/template/metadata/labels").and_then(Value::as_object_mut) {
            for (k, v) in [(CONTROLLER_UID, &uid), (JOB_NAME, &name), ("controller-uid", &uid), ("job-name", &name)] {
                labels.insert(k.into(), json!(v));
            }
        }
    }
    Ok(())
}

/// Defaults and checks of a CronJob, as the API server's.
pub fn admit_cronjob(t: &ResourceType, cronjob: &mut Value) -> Result<(), ApiError> {
    if !cronjob.get("spec").is_some_and(Value::is_object) {
        return Ok(());
    }
    let schedule = meta::str_at(cronjob, "/spec/schedule").unwrap_or_default().to_owned();
    if let Err(e) = parse_schedule(&schedule) {
        return Err(ApiError::invalid(
            t,
            meta::name(cronjob),
            &[("spec.schedule".into(), format!("Invalid value: \"{schedule}\": {e}"))],
        ));
    }
    if let Some(zone) = meta::str_at(cronjob, "/spec/timeZone").filter(|z| !matches!(*z, "UTC" | "Etc/UTC")) {
        return Err(ApiError::invalid(
            t,
            meta::name(cronjob),
            &[("spec.timeZone".into(), format!("Invalid value: \"{zone}\": this simulator schedules in UTC only"))],
        ));
    }
    restart_policy_check(
        t,
        cronjob,
        "/spec/jobTemplate/spec/template/spec/restartPolicy",
        "spec.jobTemplate.spec.template.spec.restartPolicy",
    )?;
    default(cronjob, "/spec/concurrencyPolicy", json!("Allow"));
    default(cronjob, "/spec/suspend", json!(false));
    default(cronjob, "/spec/successfulJobsHistoryLimit", json!(3));
    default(cronjob, "/spec/failedJobsHistoryLimit", json!(1));
    Ok(())
}

fn parse_schedule(schedule: &str) -> Result<croner::Cron, String> {
    let fields = schedule.split_whitespace().count();
    if !schedule.starts_with('@') && fields != 5 {
        return Err(format!("expected exactly 5 fields, found {fields}"));
    }
    croner::Cron::from_str(schedule).map_err(|e| e.to_string())
}

fn finished(job: &Value) -> Option<&'static str> {
    let conditions = job.pointer("/status/conditions").and_then(Value::as_array)?;
    conditions.iter().filter(|c| c["status"] == "True").find_map(|c| match c["type"].as_str() {
        Some("Complete") => Some("Complete"),
        Some("Failed") => Some("Failed"),
        _ => None,
    })
}

fn owned(store: &Store, t: &ResourceType, namespace: &str, uid: &str) -> Vec<Value> {
    store.list(t, Some(namespace)).0.into_iter().filter(|o| meta::owner_uids(o).iter().any(|u| u == uid)).collect()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn phase(pod: &Value) -> &str {
    meta::str_at(pod, "/status/phase").unwrap_or("Pending")
}

/// A pod that still runs (or will): not finished, not being deleted.
fn pod_active(pod: &Value) -> bool {
    !matches!(phase(pod), "Succeeded" | "Failed") && !meta::deleting(pod)
}

/// A Job that still runs: not finished, not being deleted.
fn job_active(job: &Value) -> bool {
    finished(job).is_none() && !meta::deleting(job)
}

/// One pass of the Job controller over every Job.
pub fn job_pass(store: &Store, now: time::OffsetDateTime) {
    let registry = store.registry();
    let (Some(jobs_t), Some(pods_t)) = (registry.by_kind("batch/v1", "Job"), registry.by_kind("v1", "Pod")) else {
        return;
    };
    for job in store.list(jobs_t, None).0 {
        if let Err(e) = sync_job(store, jobs_t, pods_t, &job, now) {
            tracing::debug!(job = meta::name(&job), error = %e, "job controller");
        }
    }
}

fn delete_pods(store: &Store, pods_t: &ResourceType, pods: &[&Value]) {
    for pod in pods {
        let _ = store.delete(pods_t, meta::namespace(pod), meta::name(pod), &DeleteOptions::default());
    }
}

/// Deletes a finished Job once its `ttlSecondsAfterFinished` has passed.
fn expire(
    store: &Store,
    jobs_t: &ResourceType,
    job: &Value,
    done: &str,
    now: time::OffsetDateTime,
) -> Result<(), ApiError> {
    let since = if done == "Complete" { "/status/completionTime" } else { "/status/conditions/0/lastTransitionTime" };
    if let (Some(ttl), Some(at)) = (
        job.pointer("/spec/ttlSecondsAfterFinished").and_then(Value::as_i64),
        meta::str_at(job, since).and_then(meta::parse_time),
    ) && now >= at + time::Duration::seconds(ttl)
    {
        store.delete(jobs_t, meta::namespace(job), meta::name(job), &DeleteOptions::default())?;
    }
    Ok(())
}

fn sync_job(
    store: &Store,
    jobs_t: &ResourceType,
    pods_t: &ResourceType,
    job: &Value,
    now: time::OffsetDateTime,
) -> Result<(), ApiError> {
    let (ns, name, uid) = (meta::namespace(job), meta::name(job), meta::uid(job));
    if meta::deleting(job) {
        return Ok(());
    }
    let int = |p: &str| job.pointer(p).and_then(Value::as_i64);
    if let Some(done) = finished(job) {
        // Finished: only the TTL is left to honour.
        return expire(store, jobs_t, job, done, now);
    }
    let pods = owned(store, pods_t, ns, uid);
    let active: Vec<&Value> = pods.iter().filter(|p| pod_active(p)).collect();
    let succeeded = count(pods.iter().filter(|p| phase(p) == "Succeeded").count());
    // Restarts of OnFailure pods count against the back-off limit, as failed pods do.
    let restarts: i64 = pods
        .iter()
        .flat_map(|p| p.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default())
        .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
        .sum();
    let failed = count(pods.iter().filter(|p| phase(p) == "Failed").count());
    let ready = count(active.iter().filter(|p| crate::controllers::is_ready(p)).count());
    let parallelism = int("/spec/parallelism").unwrap_or(1);
    let completions = int("/spec/completions");
    let backoff_limit = int("/spec/backoffLimit").unwrap_or(6);
    let start = meta::str_at(job, "/status/startTime").map_or_else(meta::now, str::to_owned);
    let started = meta::parse_time(&start).unwrap_or(now);
    let suspended = job.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true);

    let stamp = meta::format_time(now);
    let mut conditions: Vec<Value> = Vec::new();
    let mut completion_time = None;
    let condition = |kind: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": "True", "reason": reason, "message": message,
               "lastProbeTime": stamp, "lastTransitionTime": stamp})
    };
    let complete = match completions {
        Some(c) => succeeded >= c,
        None => succeeded > 0 && active.is_empty(),
    };
    if failed + restarts > backoff_limit {
        delete_pods(store, pods_t, &active);
        conditions.push(condition(
            "FailureTarget",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ));
        conditions.push(condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"));
    } else if let Some(deadline) = int("/spec/activeDeadlineSeconds")
        && !suspended
        && now >= started + time::Duration::seconds(deadline)
    {
        delete_pods(store, pods_t, &active);
        conditions.push(condition(
            "FailureTarget",
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ));
        conditions.push(condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"));
    } else if complete {
        delete_pods(store, pods_t, &active);
        conditions.push(condition(
            "SuccessCriteriaMet",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        ));
        conditions.push(condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods"));
        completion_time = Some(stamp.clone());
    } else if suspended {
        delete_pods(store, pods_t, &active);
        conditions.push(condition("Suspended", "JobSuspended", "Job suspended"));
    } else {
        let remaining = completions.map_or(parallelism, |c| (c - succeeded).min(parallelism));
        let missing = remaining - count(active.len());
        for _ in 0..missing.max(0) {
            store.create(pods_t, ns, pod_for(job), false)?;
        }
    }
    let active_now = count(owned(store, pods_t, ns, uid).iter().filter(|p| pod_active(p)).count());
    let counts = Counts {
        active: active_now,
        succeeded,
        failed,
        ready,
        terminating: count(pods.iter().filter(|p| meta::deleting(p)).count()),
    };
    let status = job_status(job, &start, &counts, conditions, completion_time, suspended);
    if job.get("status") != Some(&status) {
        let mut next = job.clone();
        next["status"] = status;
        store.update(jobs_t, ns, name, next, true, false)?;
    }
    Ok(())
}

/// A Job's pod counts.
struct Counts {
    active: i64,
    succeeded: i64,
    failed: i64,
    ready: i64,
    terminating: i64,
}

/// A Job's status: its counts, and its conditions with the new ones added.
fn job_status(
    job: &Value,
    start: &str,
    counts: &Counts,
    conditions: Vec<Value>,
    completion_time: Option<String>,
    suspended: bool,
) -> Value {
    let mut status = job.get("status").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
    status["startTime"] = json!(start);
    status["active"] = json!(counts.active);
    status["succeeded"] = json!(counts.succeeded);
    status["failed"] = json!(counts.failed);
    status["ready"] = json!(counts.ready);
    status["terminating"] = json!(counts.terminating);
    status["uncountedTerminatedPods"] = json!({});
    if !conditions.is_empty() || status.get("conditions").is_some() {
        let mut all: Vec<Value> = status.get("conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        all.retain(|c| c["type"] != "Suspended" || suspended);
        for c in conditions {
            if !all.iter().any(|a| a["type"] == c["type"]) {
                all.push(c);
            }
        }
        status["conditions"] = json!(all);
    }
    if let Some(at) = completion_time {
        status["completionTime"] = json!(at);
    }
    for zero in ["active", "succeeded", "failed", "terminating"] {
        if status[zero] == 0 {
            status.as_object_mut().map(|s| s.remove(zero));
        }
    }
    status
}

fn pod_for(job: &Value) -> Value {
    let template = job.pointer("/spec/template").cloned().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{}-", meta::name(job)),
            "labels": template.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})),
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or_else(|| json!({})),
            "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": meta::name(job), "uid": meta::uid(job),
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

fn to_chrono(at: time::OffsetDateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(at.unix_timestamp(), 0)
}

fn from_chrono(at: chrono::DateTime<chrono::Utc>) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp()).ok()
}

/// The latest scheduled time after `after` and at or before `now` (at most 100 looked at,
/// as the CronJob controller does).
fn due(cron: &croner::Cron, after: time::OffsetDateTime, now: time::OffsetDateTime) -> Option<time::OffsetDateTime> {
    let mut latest = None;
    for at in cron.iter_after(to_chrono(after)?).take(100) {
        let at = from_chrono(at)?;
        if at > now {
            break;
        }
        latest = Some(at);
    }
    latest
}

/// One pass of the CronJob controller over every CronJob.
pub fn cronjob_pass(store: &Store, now: time::OffsetDateTime) {
    let registry = store.registry();
    let (Some(cron_t), Some(jobs_t)) = (registry.by_kind("batch/v1", "CronJob"), registry.by_kind("batch/v1", "Job"))
    else {
        return;
    };
    for cronjob in store.list(cron_t, None).0 {
        if let Err(e) = sync_cronjob(store, cron_t, jobs_t, &cronjob, now) {
            tracing::debug!(cronjob = meta::name(&cronjob), error = %e, "cronjob controller");
        }
    }
}

fn sync_cronjob(
    store: &Store,
    cron_t: &ResourceType,
    jobs_t: &ResourceType,
    cj: &Value,
    now: time::OffsetDateTime,
) -> Result<(), ApiError> {
    let (ns, name, uid) = (meta::namespace(cj), meta::name(cj), meta::uid(cj));
    if meta::deleting(cj) {
        return Ok(());
    }
    let Ok(cron) = parse_schedule(meta::str_at(cj, "/spec/schedule").unwrap_or_default()) else { return Ok(()) };
    let mut jobs = owned(store, jobs_t, ns, uid);
    let mut status = cj.get("status").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
    let suspended = cj.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true);
    let last = meta::str_at(&status, "/lastScheduleTime")
        .or_else(|| meta::str_at(cj, "/metadata/creationTimestamp"))
        .and_then(meta::parse_time)
        .unwrap_or(now);
    if !suspended && let Some(at) = due(&cron, last, now) {
        let deadline = cj.pointer("/spec/startingDeadlineSeconds").and_then(Value::as_i64);
        let too_late = deadline.is_some_and(|d| now > at + time::Duration::seconds(d));
        let active: Vec<&Value> = jobs.iter().filter(|j| job_active(j)).collect();
        let policy = meta::str_at(cj, "/spec/concurrencyPolicy").unwrap_or("Allow");
        let skip = too_late || (policy == "Forbid" && !active.is_empty());
        if !skip {
            if policy == "Replace" {
                for j in &active {
                    store.delete(jobs_t, ns, meta::name(j), &DeleteOptions::default())?;
                }
            }
            let minutes = at.unix_timestamp() / 60;
            let template = cj.pointer("/spec/jobTemplate").cloned().unwrap_or_default();
            let mut annotations = template.pointer("/metadata/annotations").cloned().unwrap_or_else(|| json!({}));
            annotations[SCHEDULED] = json!(meta::format_time(at));
            let job = json!({
                "apiVersion": "batch/v1", "kind": "Job",
                "metadata": {
                    "name": format!("{name}-{minutes}"),
                    "labels": template.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({})),
                    "annotations": annotations,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": name, "uid": uid,
                                         "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
            });
            match store.create(jobs_t, ns, job, false) {
                Ok(_) | Err(ApiError { code: 409, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // A missed or skipped run counts as scheduled, so it is not retried.
        status["lastScheduleTime"] = json!(meta::format_time(at));
        jobs = owned(store, jobs_t, ns, uid);
    }
    // History: the newest successful and failed Jobs within their limits.
    for (kind, limit) in [
        ("Complete", cj.pointer("/spec/successfulJobsHistoryLimit").and_then(Value::as_u64).unwrap_or(3)),
        ("Failed", cj.pointer("/spec/failedJobsHistoryLimit").and_then(Value::as_u64).unwrap_or(1)),
    ] {
        let mut done: Vec<&Value> = jobs.iter().filter(|j| finished(j) == Some(kind) && !meta::deleting(j)).collect();
        done.sort_by_key(|j| meta::str_at(j, "/metadata/creationTimestamp").unwrap_or_default().to_owned());
        let excess = done.len().saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
        for j in done.into_iter().take(excess) {
            let _ = store.delete(jobs_t, ns, meta::name(j), &DeleteOptions::default());
        }
    }
    let active: Vec<Value> = jobs
        .iter()
        .filter(|j| job_active(j))
        .map(|j| json!({"apiVersion": "batch/v1", "kind": "Job", "name": meta::name(j), "namespace": ns, "uid": meta::uid(j)}))
        .collect();
    if active.is_empty() {
        status.as_object_mut().map(|s| s.remove("active"));
    } else {
        status["active"] = json!(active);
    }
    if let Some(latest) = jobs.iter().filter_map(|j| meta::str_at(j, "/status/completionTime")).max() {
        status["lastSuccessfulTime"] = json!(latest);
    }
    if cj.get("status") != Some(&status) {
        let mut next = cj.clone();
        next["status"] = status;
        store.update(cron_t, ns, name, next, true, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> time::OffsetDateTime {
        meta::parse_time(text).unwrap()
    }

    #[test]
    fn a_cronjob_runs_on_its_schedule_within_its_concurrency_policy_and_history() {
        let store = Store::new();
        let reg = store.registry();
        let cron_t = reg.by_kind("batch/v1", "CronJob").cloned().unwrap();
        let jobs_t = reg.by_kind("batch/v1", "Job").cloned().unwrap();
        let bad = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "bad"},
            "spec": {"schedule": "* * * *", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}}}}});
        assert_eq!(store.create(&cron_t, "default", bad, false).unwrap_err().code, 422);
        let cj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
            "spec": {"schedule": "*/5 * * * *", "concurrencyPolicy": "Forbid",
                     "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}}});
        let created = store.create(&cron_t, "default", cj, false).unwrap();
        assert_eq!(created["spec"]["successfulJobsHistoryLimit"], 3);
        let mut cj = created.clone();
        cj["status"] = json!({"lastScheduleTime": "2026-01-01T00:00:00Z"});
        store.update(&cron_t, "default", "tick", cj, true, false).unwrap();
        // Not yet due.
        cronjob_pass(&store, at("2026-01-01T00:04:59Z"));
        assert!(store.list(&jobs_t, Some("default")).0.is_empty());
        // Due at 00:05: one Job, named by the minute, however often the controller looks.
        cronjob_pass(&store, at("2026-01-01T00:05:10Z"));
        cronjob_pass(&store, at("2026-01-01T00:05:20Z"));
        let jobs = store.list(&jobs_t, Some("default")).0;
        assert_eq!(jobs.len(), 1);
        assert_eq!(meta::name(&jobs[0]), format!("tick-{}", at("2026-01-01T00:05:00Z").unix_timestamp() / 60));
        assert_eq!(jobs[0]["spec"]["selector"]["matchLabels"][CONTROLLER_UID], meta::uid(&jobs[0]));
        let status = store.get(&cron_t, "default", "tick").unwrap()["status"].clone();
        assert_eq!(status["lastScheduleTime"], "2026-01-01T00:05:00Z");
        assert_eq!(status["active"][0]["name"], meta::name(&jobs[0]));
        // Forbid: the 00:10 run is skipped while the first is active.
        cronjob_pass(&store, at("2026-01-01T00:10:01Z"));
        assert_eq!(store.list(&jobs_t, Some("default")).0.len(), 1);
        // Finished: the next run goes ahead.
        let mut job = jobs[0].clone();
        job["status"] =
            json!({"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-01-01T00:06:00Z"});
        let job_name = meta::name(&job).to_owned();
        store.update(&jobs_t, "default", &job_name, job, true, false).unwrap();
        cronjob_pass(&store, at("2026-01-01T00:15:01Z"));
        assert_eq!(store.list(&jobs_t, Some("default")).0.len(), 2);
        let status = store.get(&cron_t, "default", "tick").unwrap()["status"].clone();
        assert_eq!(status["lastSuccessfulTime"], "2026-01-01T00:06:00Z");
    }

    #[test]
    fn jobs_need_a_restart_policy_that_ends() {
        let store = Store::new();
        let jobs_t = store.registry().by_kind("batch/v1", "Job").cloned().unwrap();
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
            "spec": {"template": {"spec": {"restartPolicy": "Always", "containers": [{"name": "c", "image": "x"}]}}}});
        let err = store.create(&jobs_t, "default", job, false).unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.status()["message"]
                .as_str()
                .unwrap()
                .contains("spec.template.spec.restartPolicy: Unsupported value: \"Always\"")
        );
    }
}
