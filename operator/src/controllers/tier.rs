//! StorageTier: validated by the config compiler, probed through `object_store` (write,
//! read back, delete a probe object), `Ready` with a precise reason when it fails.

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use vellum_core::blob::Tier;
use vellum_core::config::{Sources, compile};
use vellum_crds::conditions::{self, reasons};
use vellum_crds::storage_tier::StorageTierStatus;
use vellum_crds::{StorageTier, field_managers};

use crate::context::{Context, Result, apply_status, condition, redact};

/// What a reconcile concluded about a tier.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub reachable: Option<bool>,
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

async fn verdict(tier: &StorageTier, ctx: &Context) -> Verdict {
    let namespace = tier.namespace().unwrap_or_default();
    let name = tier.name_any();
    let others_default =
        ctx.caches.tiers_in(&namespace).iter().filter(|t| t.spec.default && t.name_any() != name).count();
    if tier.spec.default && others_default > 0 {
        return Verdict {
            ready: false,
            reason: reasons::INVALID_SPEC,
            message: "another StorageTier of this namespace is the default too; uploads need exactly one".into(),
            reachable: None,
        };
    }
    // Compiled alone (as the default, so the compiler has one), to see its own problems only.
    let mut alone = tier.clone();
    alone.spec.default = true;
    let sources = Sources { tiers: vec![alone], secrets: ctx.caches.secrets(&namespace), ..Sources::default() };
    let (config, secrets) = match compile(&sources) {
        Ok(compiled) => compiled,
        Err(errors) => {
            let e = &errors[0];
            return Verdict { ready: false, reason: e.reason, message: e.message.clone(), reachable: None };
        }
    };
    let tier_config = &config.tiers[&name];
    if tier_config.url.starts_with("file://") || tier_config.url.starts_with("memory://") {
        return Verdict {
            ready: true,
            reason: reasons::RECONCILED,
            message: "local tier: the pods that mount it check it on start".into(),
            reachable: None,
        };
    }
    let secret_values: Vec<String> = tier_config
        .secret_options
        .values()
        .filter_map(|h| secrets.get(h).and_then(|v| v.expose_str()).map(str::to_owned))
        .collect();
    let hide = |message: String| secret_values.iter().fold(message, |m, s| redact(&m, s));
    let opened = match Tier::open(&name, tier_config, &secrets, std::path::Path::new("/nonexistent")) {
        Ok(tier) => tier,
        Err(e) => {
            return Verdict {
                ready: false,
                reason: reasons::INVALID_SPEC,
                message: hide(e.to_string()),
                reachable: Some(false),
            };
        }
    };
    match tokio::time::timeout(ctx.probe_timeout, opened.probe()).await {
        Ok(Ok(())) => Verdict {
            ready: true,
            reason: reasons::RECONCILED,
            message: "a probe object was written, read back and deleted".into(),
            reachable: Some(true),
        },
        Ok(Err(e)) => {
            let message = hide(e.to_string());
            Verdict { ready: false, reason: classify(&message), message, reachable: Some(false) }
        }
        Err(_) => Verdict {
            ready: false,
            reason: reasons::TIER_UNREACHABLE,
            message: format!("the backend did not answer within {} s", ctx.probe_timeout.as_secs()),
            reachable: Some(false),
        },
    }
}

pub async fn reconcile(tier: Arc<StorageTier>, ctx: Arc<Context>) -> Result<Action> {
    let verdict = verdict(&tier, &ctx).await;
    let previous = tier.status.clone().unwrap_or_default();
    let generation = tier.metadata.generation;
    let ready =
        condition(&previous.conditions, conditions::READY, verdict.ready, verdict.reason, &verdict.message, generation);
    let changed =
        previous.conditions.get(conditions::READY).is_none_or(|c| c.status != ready.status || c.reason != ready.reason);
    // What the platform's shards keep in this tier, priced by its costPerGbMonth.
    let (mut objects, mut bytes, mut estimated_monthly_cost) =
        (previous.objects, previous.bytes, previous.estimated_monthly_cost);
    if let Some(counts) = ctx.platform_usage(&tier.namespace().unwrap_or_default()).await {
        let (count, stored, _) = counts.tiers.get(&tier.name_any()).copied().unwrap_or_default();
        objects = Some(count);
        bytes = Some(stored);
        let cost = vellum_core::documents::monthly_cost(stored, tier.spec.cost_per_gb_month.unwrap_or(0.0));
        estimated_monthly_cost = Some((cost * 10_000.0).round() / 10_000.0);
    }
    let status = StorageTierStatus {
        conditions: vellum_crds::common::Conditions(vec![ready]),
        observed_generation: generation,
        reachable: verdict.reachable,
        objects,
        bytes,
        estimated_monthly_cost,
    };
    apply_status(&ctx.client, field_managers::STORAGE_TIER, tier.as_ref(), &status).await?;
    if changed {
        let note = format!("{}: {}", verdict.reason, verdict.message);
        ctx.event(tier.as_ref(), !verdict.ready, if verdict.ready { "Ready" } else { verdict.reason }, note).await;
    }
    // Probe again later: a bucket's policy or credentials change outside Kubernetes.
    Ok(Action::requeue(if verdict.ready { ctx.resync * 5 } else { ctx.resync }))
}

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
}
