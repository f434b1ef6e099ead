//! Webhook: validated (Secret and key present, key well-formed, reserved headers, the
//! destination policy on the addresses the URL resolves to), delivery statistics and
//! deactivation read from the delivery log, reactivated by a spec change or the
//! `vellum.dev/reactivate` annotation.

use std::net::IpAddr;
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use vellum_core::config::compile_webhooks;
use vellum_core::webhooks::{self, DestinationPolicy, Summary};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::webhook::{DeliveryFailure, WebhookStatus};
use vellum_crds::{Webhook, annotations, field_managers};

use crate::context::{Context, Error, Refused, Result, apply_status, condition, ready_event};
use crate::controllers::shared::time_of;

const MANAGER: &str = field_managers::WEBHOOK;

pub async fn reconcile(webhook: Arc<Webhook>, ctx: Arc<Context>) -> Result<Action> {
    let valid = validate(&webhook, &ctx).await;
    let delivery = delivery_log(&webhook, &ctx).await?;
    let previous = webhook.status.clone().unwrap_or_default();
    let status = status(&webhook, valid, delivery);
    apply_status(&ctx.client, MANAGER, webhook.as_ref(), &status).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &status.conditions) {
        ctx.event(webhook.as_ref(), warning, &reason, note).await;
    }
    Ok(Action::requeue(ctx.resync))
}

/// Whether the webhook's own spec is acceptable.
pub async fn validate(webhook: &Webhook, ctx: &Context) -> Result<(), Refused> {
    let namespace = webhook.namespace().unwrap_or_default();
    if let Err(errors) = compile_webhooks(vec![webhook.clone()], ctx.caches.secrets(&namespace)) {
        return Err(Refused::from(&errors[0]));
    }
    let policy = match ctx.caches.release_of(&namespace) {
        Some(release) => DestinationPolicy::parse(release.spec.webhook_allowed_cidrs.iter().map(String::as_str))
            .map_err(|e| Refused::new(reasons::INVALID_CONFIG, format!("the release's webhookAllowedCidrs: {e}")))?,
        None => DestinationPolicy::default(),
    };
    check_destination(&webhook.spec.url, &policy).await
}

/// Resolves the URL's host and checks every address against the policy. A name that does
/// not resolve yet is not an error here: deliveries check again when they connect.
pub async fn check_destination(url: &str, policy: &DestinationPolicy) -> Result<(), Refused> {
    let parsed = url::Url::parse(url).map_err(|e| Refused::new(reasons::INVALID_SPEC, format!("url: {e}")))?;
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
            return Err(Refused::new(
                reasons::DESTINATION_FORBIDDEN,
                format!("{host} resolves to {why}; list it in the BlueGreenRelease's webhookAllowedCidrs to allow it"),
            ));
        }
    }
    Ok(())
}

/// What the delivery log says of the endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// The platform has no database yet.
    NoLog,
    /// The log could not be read: why.
    Unavailable(String),
    Read(Summary),
}

/// Reactivates the endpoint when its spec changed or the annotation asks (and removes the
/// annotation, so that setting it again asks again), then reads its delivery summary.
async fn delivery_log(webhook: &Webhook, ctx: &Context) -> Result<Delivery> {
    let namespace = webhook.namespace().unwrap_or_default();
    let name = webhook.name_any();
    let db = match ctx.platform_database(&namespace).await {
        Ok(Some(db)) => db,
        Ok(None) => return Ok(Delivery::NoLog),
        Err(e) => return Ok(Delivery::Unavailable(e)),
    };
    let previous = webhook.status.clone().unwrap_or_default();
    let reactivate_asked = webhook.annotations().contains_key(annotations::REACTIVATE);
    let spec_changed =
        previous.observed_generation.is_some() && previous.observed_generation != webhook.metadata.generation;
    if previous.active == Some(false) && (reactivate_asked || spec_changed) {
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        webhooks::reactivate(&db, &name, now)
            .await
            .map_err(|source| Error::Database { what: "reactivating the endpoint", source })?;
        ctx.forget_summaries(&namespace).await;
        ctx.event(webhook, false, "Reactivated", "deliveries resume".into()).await;
    }
    if reactivate_asked {
        let api: Api<Webhook> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"metadata": {"annotations": {annotations::REACTIVATE: null}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    match ctx.delivery_summaries(&namespace, &db).await {
        Ok(all) => Ok(Delivery::Read(all.get(&name).cloned().unwrap_or_else(Summary::unseen))),
        Err(e) => {
            ctx.forget_database_of(&namespace).await;
            Ok(Delivery::Unavailable(e.to_string()))
        }
    }
}

/// The status from the validation and the delivery log: statistics, and the `Ready`,
/// `Deactivated` and `Degraded` conditions, all three written every time so that none
/// outlives what set it.
pub fn status(webhook: &Webhook, valid: Result<(), Refused>, delivery: Delivery) -> WebhookStatus {
    let previous = webhook.status.clone().unwrap_or_default();
    let generation = webhook.metadata.generation;
    let mut status = WebhookStatus { observed_generation: generation, ..previous.clone() };
    let mut log_problem = None;
    match delivery {
        Delivery::NoLog => {}
        Delivery::Unavailable(why) => log_problem = Some(why),
        Delivery::Read(found) => {
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
    }
    if status.active.is_none() {
        status.active = Some(true);
    }
    let (ready, reason, message) = match valid {
        Err(refused) => (false, refused.reason, refused.message),
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
    let deactivated = status.active == Some(false);
    let deactivation_reason = if status.deactivation_reason.as_deref().is_some_and(|r| r.contains("410")) {
        reasons::ENDPOINT_GONE
    } else {
        reasons::FAILURE_RATE_EXCEEDED
    };
    let was = &previous.conditions;
    status.conditions = Conditions(vec![
        condition(was, conditions::READY, ready, reason, message, generation),
        condition(
            was,
            conditions::DEACTIVATED,
            deactivated,
            if deactivated { deactivation_reason } else { reasons::RECONCILED },
            status.deactivation_reason.clone().unwrap_or_else(|| "active".into()),
            generation,
        ),
        match &log_problem {
            Some(problem) => condition(
                was,
                conditions::DEGRADED,
                true,
                reasons::DELIVERY_LOG_UNAVAILABLE,
                format!("delivery statistics could not be read: {problem}"),
                generation,
            ),
            None => {
                condition(was, conditions::DEGRADED, false, reasons::RECONCILED, "delivery statistics read", generation)
            }
        },
    ]);
    status
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(status: Option<WebhookStatus>) -> Webhook {
        let mut w: Webhook = serde_yaml::from_str(
            "apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {name: hook, namespace: ns, generation: 1}\nspec: {url: 'https://example.com/h', secretRef: {name: keys, key: a}}\n",
        )
        .unwrap();
        w.status = status;
        w
    }

    fn condition_of<'a>(status: &'a WebhookStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status.conditions.get(type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_log_read_that_failed_once_is_degraded_only_until_the_next_read() {
        let failed = status(&webhook(None), Ok(()), Delivery::Unavailable("relation does not exist".into()));
        assert_eq!(condition_of(&failed, conditions::DEGRADED), ("True", reasons::DELIVERY_LOG_UNAVAILABLE));
        assert_eq!(condition_of(&failed, conditions::READY), ("True", reasons::RECONCILED));
        let read = status(&webhook(Some(failed)), Ok(()), Delivery::Read(Summary::unseen()));
        assert_eq!(condition_of(&read, conditions::DEGRADED), ("False", reasons::RECONCILED));
        assert_eq!(read.conditions.0.len(), 3, "{:?}", read.conditions);
    }

    #[test]
    fn a_refused_spec_is_not_ready_with_the_refusal_reason() {
        let refused = Refused::new(reasons::SECRET_NOT_FOUND, "Secret keys does not exist");
        let s = status(&webhook(None), Err(refused), Delivery::NoLog);
        assert_eq!(condition_of(&s, conditions::READY), ("False", reasons::SECRET_NOT_FOUND));
        assert_eq!(condition_of(&s, conditions::DEACTIVATED), ("False", reasons::RECONCILED));
        assert_eq!(s.active, Some(true));
    }
}
