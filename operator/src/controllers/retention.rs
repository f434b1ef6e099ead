//! RetentionPolicy: validated against the StorageTiers it names and scheduled as a CronJob
//! that runs `vellum-workers retention --policy NAME` with the release's workers image.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::CronJob;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use vellum_core::config::{Sources, compile};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::retention_policy::RunSummary;
use vellum_crds::{RetentionPolicy, field_managers};

use crate::builders::{self, ReleaseFacts};
use crate::context::{Context, Result, apply, apply_status, condition};

/// Problems of the policy itself: `Err((reason, message))`.
pub fn validate(policy: &RetentionPolicy, sources: &Sources) -> std::result::Result<(), (&'static str, String)> {
    let name = policy.name_any();
    let mut tiers = sources.tiers.clone();
    // Compiled with the namespace's tiers, all made non-default but one, so that only the
    // policy's own problems (unknown tiers, no FROZEN tier to archive to) show.
    for (i, tier) in tiers.iter_mut().enumerate() {
        tier.spec.default = i == 0;
    }
    let alone = Sources { tiers, retention_policies: vec![policy.clone()], ..Sources::default() };
    match compile(&alone) {
        Ok(_) => Ok(()),
        Err(errors) => {
            let own = format!("RetentionPolicy/{name}");
            match errors.iter().find(|e| e.resource == own) {
                Some(e) => Err((e.reason, e.message.clone())),
                None if sources.tiers.is_empty() => {
                    Err((reasons::TIER_NOT_FOUND, "this namespace has no StorageTier yet".to_owned()))
                }
                None => Ok(()),
            }
        }
    }
}

pub async fn reconcile(policy: Arc<RetentionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = policy.namespace().unwrap_or_default();
    let previous = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let sources = Sources { tiers: ctx.caches.tiers_in(&namespace), ..Sources::default() };
    let cron_jobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let cron_name = builders::names::retention(&policy.name_any());
    let (ready, reason, message) = match (validate(&policy, &sources), ctx.caches.release_of(&namespace)) {
        (Err((reason, message)), _) => {
            // An invalid policy does not run: its schedule goes until it is fixed.
            cron_jobs.delete(&cron_name, &DeleteParams::background()).await.map(|_| ()).or_else(not_found)?;
            (false, reason, message)
        }
        (Ok(()), None) => (
            false,
            reasons::WAITING_FOR_RELEASE,
            "valid; scheduled once a BlueGreenRelease in this namespace provides the workers that run it".to_owned(),
        ),
        (Ok(()), Some(release)) => {
            let job = builders::retention_cron_job(&policy, &release, &ReleaseFacts::default());
            apply(&ctx.client, field_managers::RETENTION_POLICY, &job).await?;
            let what = if policy.spec.suspend { "suspended" } else { "scheduled" };
            (true, reasons::RECONCILED, format!("{what} as CronJob {cron_name} ({})", policy.spec.schedule))
        }
    };
    let was = previous.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let ready_condition =
        condition(&previous.conditions, conditions::READY, ready, reason, message.clone(), generation);
    let now = Some((ready_condition.status.clone(), ready_condition.reason.clone()));
    // The last run, as the workers recorded it in the platform's metadata database, and
    // the next one the schedule names.
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let next_run = (ready && !policy.spec.suspend)
        .then(|| vellum_core::lifecycle::next_run(&policy.spec.schedule, now_ms))
        .flatten()
        .and_then(super::webhook::time_of);
    // Each shard records its part of a run; together they are the run.
    let mut last_run = previous.last_run.clone();
    let shards = ctx.platform_shards(&namespace).await.unwrap_or_default();
    let mut records = Vec::new();
    for db in &shards {
        match vellum_core::lifecycle::last_finished_run(db, &policy.name_any()).await {
            Ok(Some(run)) => records.push(run),
            Ok(None) => {}
            // A database not migrated yet has no runs; a failing one is the ShardSet's to report.
            Err(e) => tracing::debug!(error = %e, "reading the last retention run"),
        }
    }
    if let Some(run) = vellum_core::lifecycle::RunRecord::combine(records) {
        last_run = Some(RunSummary {
            start_time: super::webhook::time_of(run.started_at),
            completion_time: run.finished_at.and_then(super::webhook::time_of),
            dry_run: run.dry_run,
            matched: run.matched,
            transitioned: run.transitioned,
            expired: run.expired,
            bytes_moved: run.bytes_moved,
            errors: run.errors,
        });
    }
    // What the tiers this policy moves documents to save against the default tier.
    let mut estimated_monthly_savings = previous.estimated_monthly_savings;
    let with_tiers =
        Sources { tiers: sources.tiers.clone(), retention_policies: vec![(*policy).clone()], ..Sources::default() };
    if let (Ok((config, _)), true) = (compile(&with_tiers), ready)
        && let Some(compiled) = config.retention_policies.get(&policy.name_any())
        && let Some(counts) = ctx.platform_usage(&namespace).await
    {
        let targets = compiled
            .transitions
            .iter()
            .map(|(_, tier)| tier.as_str())
            .chain(compiled.expiration.as_ref().and_then(|e| e.archive_tier.as_deref()));
        let savings = counts.tiering_savings(&config, targets);
        estimated_monthly_savings = Some((savings * 100.0).round() / 100.0);
    }
    let status = vellum_crds::retention_policy::RetentionPolicyStatus {
        conditions: Conditions(vec![ready_condition]),
        observed_generation: generation,
        last_run,
        next_run,
        estimated_monthly_savings,
    };
    apply_status(&ctx.client, field_managers::RETENTION_POLICY, policy.as_ref(), &status).await?;
    if was != now {
        ctx.event(policy.as_ref(), !ready, if ready { "Scheduled" } else { reason }, message).await;
    }
    // Runs happen on the schedule, outside any watched object: look again in a while.
    Ok(Action::requeue(std::time::Duration::from_secs(60)))
}

/// A delete of something already gone succeeded.
pub fn not_found(e: kube::Error) -> std::result::Result<(), kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        other => Err(other),
    }
}
