//! RetentionPolicy: validated against the StorageTiers it names and scheduled as a CronJob
//! that runs `vellum-workers retention --policy NAME` with the release's workers image. Its
//! status shows the last run (as the workers recorded it on every shard), the next one, and
//! what the tiers it moves documents to save.

pub mod build;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::CronJob;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use vellum_core::config::{Sources, compile};
use vellum_core::documents::UsageCounts;
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::retention_policy::{RetentionPolicyStatus, RunSummary};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, field_managers};

use crate::context::{Context, Refused, Result, apply, apply_status, condition, ready_event};
use crate::controllers::platform::{ReleaseFacts, names};
use crate::controllers::shared::{not_found, time_of};

const MANAGER: &str = field_managers::RETENTION_POLICY;

/// Runs happen on the schedule, outside any watched object: a policy is looked at again
/// this often.
const RESYNC: Duration = Duration::from_secs(60);

/// What a policy is checked and scheduled with.
#[derive(Debug)]
pub struct Inputs {
    /// The StorageTiers of its namespace.
    pub tiers: Sources,
    /// The release whose workers run it, once there is one.
    pub release: Option<BlueGreenRelease>,
    /// Each shard's part of the policy's last finished run.
    pub runs: Vec<vellum_core::retention::RunRecord>,
    /// What the platform's blobs hold, by tier.
    pub usage: Option<UsageCounts>,
}

pub async fn reconcile(policy: Arc<RetentionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let inputs = dereference(&policy, &ctx).await;
    let scheduled = match validate(&policy, &inputs.tiers) {
        Err(refused) => {
            // An invalid policy does not run: its schedule goes until it is fixed.
            unschedule(&policy, &ctx).await?;
            Err(refused)
        }
        Ok(()) => match &inputs.release {
            None => Err(Refused::new(
                reasons::WAITING_FOR_RELEASE,
                "valid; scheduled once a BlueGreenRelease in this namespace provides the workers that run it",
            )),
            Some(release) => {
                // Its pods read the same platform Secret as the workers, NATS credentials included.
                let job = build::build_cron_job(&policy, release, &ReleaseFacts::of(release));
                apply(&ctx.client, MANAGER, &job).await?;
                Ok(())
            }
        },
    };
    let status = status(&policy, &inputs, scheduled);
    let previous = policy.status.clone().unwrap_or_default();
    apply_status(&ctx.client, MANAGER, policy.as_ref(), &status).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &status.conditions) {
        ctx.event(policy.as_ref(), warning, &reason, note).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Reads the namespace's tiers and release from the caches, and the last run and the
/// storage usage from the platform's shards (nothing when they cannot be read: a database
/// not migrated yet has no runs, and a failing one is the ShardSet's to report).
async fn dereference(policy: &RetentionPolicy, ctx: &Context) -> Inputs {
    let namespace = policy.namespace().unwrap_or_default();
    let mut runs = Vec::new();
    for db in &ctx.platform_shards(&namespace).await.unwrap_or_default() {
        match vellum_core::retention::last_finished_run(db, &policy.name_any()).await {
            Ok(Some(run)) => runs.push(run),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the last retention run"),
        }
    }
    Inputs {
        tiers: Sources { tiers: ctx.caches.tiers_in(&namespace), ..Sources::default() },
        release: ctx.caches.release_of(&namespace),
        runs,
        usage: ctx.platform_usage(&namespace).await,
    }
}

/// Problems of the policy itself, compiled with the namespace's tiers (all made non-default
/// but one, so that only the policy's own problems show: unknown tiers, no FROZEN tier to
/// archive to).
pub fn validate(policy: &RetentionPolicy, tiers: &Sources) -> Result<(), Refused> {
    let mut alone =
        Sources { tiers: tiers.tiers.clone(), retention_policies: vec![policy.clone()], ..Sources::default() };
    for (i, tier) in alone.tiers.iter_mut().enumerate() {
        tier.spec.default = i == 0;
    }
    let Err(errors) = compile(&alone) else { return Ok(()) };
    let own = format!("RetentionPolicy/{}", policy.name_any());
    match errors.iter().find(|e| e.resource == own) {
        Some(e) => Err(Refused::from(e)),
        None if tiers.tiers.is_empty() => {
            Err(Refused::new(reasons::TIER_NOT_FOUND, "this namespace has no StorageTier yet"))
        }
        None => Ok(()),
    }
}

async fn unschedule(policy: &RetentionPolicy, ctx: &Context) -> Result<()> {
    let cron_jobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let name = names::retention(&policy.name_any());
    cron_jobs.delete(&name, &DeleteParams::background()).await.map(|_| ()).or_else(not_found)?;
    Ok(())
}

/// The status after a reconcile that `scheduled` the policy (or says why not).
pub fn status(policy: &RetentionPolicy, inputs: &Inputs, scheduled: Result<(), Refused>) -> RetentionPolicyStatus {
    let previous = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let ready = scheduled.is_ok();
    let (reason, message) = match scheduled {
        Ok(()) => {
            let what = if policy.spec.suspend { "suspended" } else { "scheduled" };
            let cron = names::retention(&policy.name_any());
            (reasons::RECONCILED, format!("{what} as CronJob {cron} ({})", policy.spec.schedule))
        }
        Err(refused) => (refused.reason, refused.message),
    };
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let next_run = (ready && !policy.spec.suspend)
        .then(|| vellum_core::retention::next_run(&policy.spec.schedule, now_ms))
        .flatten()
        .and_then(time_of);
    // Each shard records its part of a run; together they are the run.
    let last_run = vellum_core::retention::RunRecord::combine(inputs.runs.clone())
        .map(|run| RunSummary {
            start_time: time_of(run.started_at),
            completion_time: run.finished_at.and_then(time_of),
            dry_run: run.dry_run,
            matched: run.matched,
            transitioned: run.transitioned,
            expired: run.expired,
            bytes_moved: run.bytes_moved,
            errors: run.errors,
        })
        .or(previous.last_run);
    RetentionPolicyStatus {
        conditions: Conditions(vec![condition(
            &previous.conditions,
            conditions::READY,
            ready,
            reason,
            message,
            generation,
        )]),
        observed_generation: generation,
        last_run,
        next_run,
        estimated_monthly_savings: savings(policy, inputs, ready).or(previous.estimated_monthly_savings),
    }
}

/// What the tiers this policy moves documents to save against the default tier.
fn savings(policy: &RetentionPolicy, inputs: &Inputs, ready: bool) -> Option<f64> {
    let with_tiers =
        Sources { tiers: inputs.tiers.tiers.clone(), retention_policies: vec![policy.clone()], ..Sources::default() };
    let (config, _) = compile(&with_tiers).ok().filter(|_| ready)?;
    let compiled = config.retention_policies.get(&policy.name_any())?;
    let counts = inputs.usage.as_ref()?;
    let targets = compiled
        .transitions
        .iter()
        .map(|(_, tier)| tier.as_str())
        .chain(compiled.expiration.as_ref().and_then(|e| e.archive_tier.as_deref()));
    Some((counts.tiering_savings(&config, targets) * 100.0).round() / 100.0)
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> RetentionPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: vellum.dev/v1alpha1\nkind: RetentionPolicy\nmetadata: {{name: tmp, namespace: ns, generation: 2}}\nspec: {spec}\n"
        ))
        .unwrap()
    }

    fn tiers(yaml: &str) -> Sources {
        let mut sources = Sources::default();
        vellum_core::config::parse_documents(yaml, "tiers.yaml", &mut sources).unwrap();
        sources
    }

    const HOT: &str = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 'memory://'}}\n";

    #[test]
    fn a_policy_naming_an_unknown_tier_is_refused_with_its_reason() {
        let p = policy("{schedule: '@daily', transitions: [{afterDays: 1, toTier: nowhere}]}");
        let refused = validate(&p, &tiers(HOT)).unwrap_err();
        assert_eq!(refused.reason, reasons::TIER_NOT_FOUND, "{refused}");
        assert!(refused.message.contains("nowhere"), "{refused}");
        assert_eq!(validate(&p, &Sources::default()).unwrap_err().reason, reasons::TIER_NOT_FOUND);
    }

    #[test]
    fn the_status_says_how_the_policy_runs_and_when_next() {
        let p = policy("{schedule: '@daily', expiration: {afterDays: 3, action: DELETE}}");
        let inputs = Inputs { tiers: tiers(HOT), release: None, runs: Vec::new(), usage: None };
        assert_eq!(validate(&p, &inputs.tiers), Ok(()));
        let status = status(&p, &inputs, Ok(()));
        let ready = status.conditions.get(conditions::READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", reasons::RECONCILED));
        assert_eq!(ready.message, "scheduled as CronJob tmp-retention (@daily)");
        assert_eq!((ready.observed_generation, status.observed_generation), (Some(2), Some(2)));
        assert!(status.next_run.is_some(), "a scheduled policy shows its next run");

        let waiting = Refused::new(reasons::WAITING_FOR_RELEASE, "valid; waiting");
        let status = super::status(&p, &inputs, Err(waiting));
        let ready = status.conditions.get(conditions::READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reasons::WAITING_FOR_RELEASE));
        assert_eq!(status.next_run, None, "a policy that is not scheduled has no next run");
    }
}
