//! StorageTier: validated by the config compiler, probed through `object_store` (write,
//! read back, delete a probe object), `Ready` with a precise reason when it fails, and what
//! the platform keeps in it priced by its `costPerGbMonth`.

pub mod build;
mod drain;

use std::sync::Arc;

use k8s_openapi::api::batch::v1::CronJob;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use vellum_core::blob::Tier;
use vellum_core::config::{PlatformConfig, SecretBundle, Sources, compile};
use vellum_core::documents::UsageCounts;
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::storage_tier::StorageTierStatus;
use vellum_crds::{StorageTier, field_managers, finalizers};

use crate::context::{Context, Refused, Result, apply, apply_status, condition, ready_event, redact};
use crate::controllers::platform::ReleaseFacts;
use crate::controllers::shared::not_found;

const MANAGER: &str = field_managers::STORAGE_TIER;

/// What a tier is checked with.
#[derive(Debug)]
pub struct Inputs {
    /// When this tier is the default: the other tiers of the namespace that are too.
    pub other_defaults: usize,
    /// The tier compiled alone (as the default), with its secrets.
    pub compiled: Result<(PlatformConfig, SecretBundle), Refused>,
    /// What the platform's shards keep, by tier.
    pub usage: Option<UsageCounts>,
}

/// What the probe found.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub reachable: Option<bool>,
}

impl Verdict {
    fn ok(message: &str, reachable: Option<bool>) -> Self {
        Self { ready: true, reason: reasons::RECONCILED, message: message.to_owned(), reachable }
    }
    fn refused(refused: Refused, reachable: Option<bool>) -> Self {
        Self { ready: false, reason: refused.reason, message: refused.message, reachable }
    }
}

/// Reconciles a tier through the `vellum.dev/tier-drain` finalizer: added first, so that a
/// tier is never deleted without its blobs drained; a tier being deleted is drained
/// (`drain::cleanup`), any other is checked and probed (`observe`).
pub async fn reconcile(tier: Arc<StorageTier>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<StorageTier> = Api::namespaced(ctx.client.clone(), &tier.namespace().unwrap_or_default());
    let outcome = finalizer(&api, finalizers::TIER_DRAIN, tier, |event| async {
        match event {
            Finalizer::Apply(tier) => observe(&tier, &ctx).await,
            Finalizer::Cleanup(tier) => drain::cleanup(&tier, &ctx).await,
        }
    })
    .await;
    outcome.map_err(crate::context::Error::from)
}

/// Checks and probes a tier and writes what it found.
async fn observe(tier: &StorageTier, ctx: &Context) -> Result<Action> {
    let Inputs { other_defaults, compiled, usage } = dereference(tier, ctx).await;
    let verdict = match validate(other_defaults, compiled) {
        Ok((config, secrets)) => probe(tier, ctx, config, secrets).await,
        Err(refused) => Verdict::refused(refused, None),
    };
    let previous = tier.status.clone().unwrap_or_default();
    let mut status = status(tier, &verdict, usage.as_ref());
    status.scrub_cron_job = schedule_scrub(tier, &previous, ctx).await?;
    apply_status(&ctx.client, MANAGER, tier, &status).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &status.conditions) {
        ctx.event(tier, warning, &reason, note).await;
    }
    // Probe again later: a bucket's policy or credentials change outside Kubernetes.
    Ok(Action::requeue(if verdict.ready { ctx.resync * 5 } else { ctx.resync }))
}

/// Puts the tier's scrub CronJob in place when it has a schedule and a release provides
/// the workers that run it, and returns its name; removes the one `previous` names
/// otherwise.
async fn schedule_scrub(tier: &StorageTier, previous: &StorageTierStatus, ctx: &Context) -> Result<Option<String>> {
    let namespace = tier.namespace().unwrap_or_default();
    let release = ctx.caches.release_of(&namespace);
    let wanted = release.as_ref().and_then(|r| build::build_scrub_cron_job(tier, r, &ReleaseFacts::of(r)));
    if let Some(cron_job) = wanted {
        apply(&ctx.client, MANAGER, &cron_job).await?;
        return Ok(Some(cron_job.name_any()));
    }
    if let Some(name) = &previous.scrub_cron_job {
        let cron_jobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &namespace);
        cron_jobs.delete(name, &DeleteParams::background()).await.map(drop).or_else(not_found)?;
    }
    Ok(None)
}

async fn dereference(tier: &StorageTier, ctx: &Context) -> Inputs {
    let namespace = tier.namespace().unwrap_or_default();
    let name = tier.name_any();
    // Only a default tier minds the others that are the default too.
    let other_defaults = if tier.spec.default {
        ctx.caches.tiers_in(&namespace).iter().filter(|t| t.spec.default && t.name_any() != name).count()
    } else {
        0
    };
    // Compiled alone (as the default, so the compiler has one), to see its own problems only.
    let mut alone = tier.clone();
    alone.spec.default = true;
    let sources = Sources { tiers: vec![alone], secrets: ctx.caches.secrets(&namespace), ..Sources::default() };
    let compiled = compile(&sources).map_err(|errors| Refused::from(&errors[0]));
    Inputs { other_defaults, compiled, usage: ctx.platform_usage(&namespace).await }
}

/// The tier's own problems: a second default, or what the compiler finds.
pub fn validate(
    other_defaults: usize,
    compiled: Result<(PlatformConfig, SecretBundle), Refused>,
) -> Result<(PlatformConfig, SecretBundle), Refused> {
    if other_defaults > 0 {
        return Err(Refused::new(
            reasons::INVALID_SPEC,
            "another StorageTier of this namespace is the default too; uploads need exactly one",
        ));
    }
    compiled
}

/// Sorts a failed probe into the reason a person acts on.
pub fn classify(message: &str) -> &'static str {
    const CREDENTIALS: &[&str] =
        &["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden", "401 Unauthorized"];
    if CREDENTIALS.iter().any(|m| message.contains(m)) {
        reasons::INVALID_CREDENTIALS
    } else if message.contains("NoSuchBucket") || message.contains("404 Not Found") {
        reasons::BUCKET_NOT_FOUND
    } else {
        reasons::TIER_UNREACHABLE
    }
}

/// Writes, reads back and deletes a probe object, within the probe timeout. Messages never
/// hold the tier's secret values.
async fn probe(tier: &StorageTier, ctx: &Context, config: PlatformConfig, secrets: SecretBundle) -> Verdict {
    let name = tier.name_any();
    let tier_config = &config.tiers[&name];
    if tier_config.url.starts_with("file://") || tier_config.url.starts_with("memory://") {
        return Verdict::ok("local tier: the pods that mount it check it on start", None);
    }
    let secret_values: Vec<String> = tier_config
        .secret_options
        .values()
        .filter_map(|h| secrets.get(h).and_then(|v| v.expose_str()).map(str::to_owned))
        .collect();
    let hide = |message: String| secret_values.iter().fold(message, |m, s| redact(&m, s));
    let opened = match Tier::open(&name, tier_config, &secrets, std::path::Path::new("/nonexistent")) {
        Ok(tier) => tier,
        Err(e) => return Verdict::refused(Refused::new(reasons::INVALID_SPEC, hide(e.to_string())), Some(false)),
    };
    match tokio::time::timeout(ctx.probe_timeout, opened.probe()).await {
        Ok(Ok(())) => Verdict::ok("a probe object was written, read back and deleted", Some(true)),
        Ok(Err(e)) => {
            let message = hide(e.to_string());
            Verdict::refused(Refused::new(classify(&message), message), Some(false))
        }
        Err(_) => Verdict::refused(
            Refused::new(
                reasons::TIER_UNREACHABLE,
                format!("the backend did not answer within {} s", ctx.probe_timeout.as_secs()),
            ),
            Some(false),
        ),
    }
}

/// The status after a probe: `Ready`, reachability, and what the platform keeps in the tier
/// (kept from before when the shards cannot be read).
pub fn status(tier: &StorageTier, verdict: &Verdict, usage: Option<&UsageCounts>) -> StorageTierStatus {
    let previous = tier.status.clone().unwrap_or_default();
    let generation = tier.metadata.generation;
    let ready =
        condition(&previous.conditions, conditions::READY, verdict.ready, verdict.reason, &verdict.message, generation);
    let (mut objects, mut bytes, mut estimated_monthly_cost) =
        (previous.objects, previous.bytes, previous.estimated_monthly_cost);
    if let Some(counts) = usage {
        let (count, stored, _) = counts.tiers.get(&tier.name_any()).copied().unwrap_or_default();
        objects = Some(count);
        bytes = Some(stored);
        let cost = vellum_core::documents::monthly_cost(stored, tier.spec.cost_per_gb_month.unwrap_or(0.0));
        estimated_monthly_cost = Some((cost * 10_000.0).round() / 10_000.0);
    }
    StorageTierStatus {
        conditions: Conditions(vec![ready]),
        observed_generation: generation,
        reachable: verdict.reachable,
        objects,
        bytes,
        estimated_monthly_cost,
        scrub_cron_job: None,
    }
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_failures_get_the_reason_a_person_acts_on() {
        assert_eq!(classify("Error performing PUT: 403 Forbidden: InvalidAccessKeyId"), reasons::INVALID_CREDENTIALS);
        assert_eq!(classify("<Code>SignatureDoesNotMatch</Code>"), reasons::INVALID_CREDENTIALS);
        assert_eq!(classify("<Code>NoSuchBucket</Code>"), reasons::BUCKET_NOT_FOUND);
        assert_eq!(classify("error sending request: connection refused"), reasons::TIER_UNREACHABLE);
    }

    #[test]
    fn a_second_default_tier_is_refused_before_anything_is_probed() {
        let refused = validate(1, Err(Refused::new(reasons::SECRET_NOT_FOUND, "unused"))).unwrap_err();
        assert_eq!(refused.reason, reasons::INVALID_SPEC);
        let compiled = Err(Refused::new(reasons::SECRET_NOT_FOUND, "Secret s3 does not exist"));
        let refused = validate(0, compiled).unwrap_err();
        assert_eq!((refused.reason, refused.message.as_str()), (reasons::SECRET_NOT_FOUND, "Secret s3 does not exist"));
    }
}
