//! Webhook: validated (Secret and key present, key well-formed, reserved headers, the
//! destination policy on the addresses the URL resolves to), delivery statistics and
//! deactivation read from the delivery log, reactivated by a spec change or the
//! `vellum.dev/reactivate` annotation.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use vellum_core::config::compile_webhooks;
use vellum_core::webhooks::{self, DestinationPolicy};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::webhook::{DeliveryFailure, WebhookStatus};
use vellum_crds::{Webhook, annotations, field_managers};

use crate::context::{Context, Result, apply_status, condition};

/// Whether the webhook's own spec is acceptable: `Err((reason, message))` if not.
pub async fn validate(webhook: &Webhook, ctx: &Context) -> std::result::Result<(), (&'static str, String)> {
    let namespace = webhook.namespace().unwrap_or_default();
    if let Err(errors) = compile_webhooks(vec![webhook.clone()], ctx.caches.secrets(&namespace)) {
        let e = &errors[0];
        return Err((e.reason, e.message.clone()));
    }
    let policy = match ctx.caches.release_of(&namespace) {
        Some(release) => DestinationPolicy::parse(release.spec.webhook_allowed_cidrs.iter().map(String::as_str))
            .map_err(|e| (reasons::INVALID_CONFIG, format!("the release's webhookAllowedCidrs: {e}")))?,
        None => DestinationPolicy::default(),
    };
    check_destination(&webhook.spec.url, &policy).await
}

/// Resolves the URL's host and checks every address against the policy. A name that does
/// not resolve yet is not an error here: deliveries check again when they connect.
pub async fn check_destination(
    url: &str,
    policy: &DestinationPolicy,
) -> std::result::Result<(), (&'static str, String)> {
    let parsed = url::Url::parse(url).map_err(|e| (reasons::INVALID_SPEC, format!("url: {e}")))?;
    let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        vec![ip]
    } else {
        match tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        }
    };
    for addr in addrs {
        if let Err(why) = policy.check(addr) {
            return Err((
                reasons::DESTINATION_FORBIDDEN,
                format!("{host} resolves to {why}; list it in the BlueGreenRelease's webhookAllowedCidrs to allow it"),
            ));
        }
    }
    Ok(())
}

pub fn time_of(ms: i64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok().map(Time)
}

#[allow(clippy::too_many_lines)] // one status, assembled in order
pub async fn reconcile(webhook: Arc<Webhook>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = webhook.namespace().unwrap_or_default();
    let name = webhook.name_any();
    let previous = webhook.status.clone().unwrap_or_default();
    let generation = webhook.metadata.generation;
    let valid = validate(&webhook, &ctx).await;

    let mut status = WebhookStatus { observed_generation: generation, ..previous.clone() };
    let mut conditions = Vec::new();
    let mut log_problem = None;
    match ctx.platform_database(&namespace).await {
        Ok(Some(db)) => {
            let reactivate_asked = webhook.annotations().contains_key(annotations::REACTIVATE);
            let spec_changed = previous.observed_generation.is_some() && previous.observed_generation != generation;
            if previous.active == Some(false) && (reactivate_asked || spec_changed) {
                let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                webhooks::reactivate(&db, &name, now).await.map_err(|e| crate::context::Error::Other(e.to_string()))?;
                ctx.forget_summaries(&namespace).await;
                ctx.event(webhook.as_ref(), false, "Reactivated", "deliveries resume".into()).await;
            }
            if reactivate_asked {
                // Handled: the annotation goes, so that setting it again asks again.
                let api: Api<Webhook> = Api::namespaced(ctx.client.clone(), &namespace);
                let patch = json!({"metadata": {"annotations": {annotations::REACTIVATE: null}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            match ctx.delivery_summaries(&namespace, &db).await {
                Ok(all) => {
                    let found = all.get(&name).cloned().unwrap_or_else(webhooks::Summary::unseen);
                    status.total_calls = found.total_calls;
                    status.success_count = found.success_count;
                    status.failure_count = found.total_calls - found.success_count;
                    status.success_rate = found.success_rate();
                    status.active = Some(found.active);
                    status.deactivation_reason.clone_from(&found.deactivation_reason);
                    status.last_triggered = found.last_triggered.and_then(time_of);
                    status.last_failure = found.last_failure.map(|(at, code, error)| DeliveryFailure {
                        time: at.and_then(time_of),
                        status_code: code.and_then(|c| i32::try_from(c).ok()),
                        message: error.unwrap_or_else(|| "failed".into()),
                    });
                }
                Err(e) => {
                    ctx.forget_database_of(&namespace).await;
                    log_problem = Some(e.to_string());
                }
            }
        }
        Ok(None) => {}
        Err(e) => log_problem = Some(e),
    }
    if status.active.is_none() {
        status.active = Some(true);
    }

    let (ready, reason, message) = match &valid {
        Err((reason, message)) => (false, *reason, message.clone()),
        Ok(()) if webhook.spec.paused => {
            (true, reasons::PAUSED, "paused: events are kept and delivered on resume".to_owned())
        }
        Ok(()) if status.active == Some(false) => (
            false,
            reasons::FAILURE_RATE_EXCEEDED,
            format!(
                "deactivated: {}; change the spec or set the {} annotation to resume",
                status.deactivation_reason.clone().unwrap_or_default(),
                annotations::REACTIVATE
            ),
        ),
        Ok(()) => (true, reasons::RECONCILED, format!("delivering to {}", webhook.spec.url)),
    };
    conditions.push(condition(&previous.conditions, conditions::READY, ready, reason, message.clone(), generation));
    let deactivated = status.active == Some(false);
    let deactivation_reason = if status.deactivation_reason.as_deref().is_some_and(|r| r.contains("410")) {
        reasons::ENDPOINT_GONE
    } else {
        reasons::FAILURE_RATE_EXCEEDED
    };
    conditions.push(condition(
        &previous.conditions,
        conditions::DEACTIVATED,
        deactivated,
        if deactivated { deactivation_reason } else { reasons::RECONCILED },
        status.deactivation_reason.clone().unwrap_or_else(|| "active".into()),
        generation,
    ));
    if let Some(problem) = &log_problem {
        conditions.push(condition(
            &previous.conditions,
            conditions::DEGRADED,
            true,
            reasons::DELIVERY_LOG_UNAVAILABLE,
            format!("delivery statistics could not be read: {problem}"),
            generation,
        ));
    }
    let was = previous.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let now = conditions.first().map(|c| (c.status.clone(), c.reason.clone()));
    status.conditions = Conditions(conditions);
    apply_status(&ctx.client, field_managers::WEBHOOK, webhook.as_ref(), &status).await?;
    if was != now {
        ctx.event(webhook.as_ref(), !ready, if ready { "Ready" } else { reason }, message).await;
    }
    Ok(Action::requeue(ctx.resync))
}
