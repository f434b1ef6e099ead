//! What a release reached, as its status: phase, colors and versions, and the `Ready`,
//! `Progressing`, `Degraded` and `Promoted` conditions, each written on every reconcile. An
//! Event with the reason of the step marks every change of readiness or phase.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use vellum_crds::BlueGreenRelease;
use vellum_crds::blue_green_release::{BlueGreenReleaseStatus, Color, Phase};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::MANAGER;
use super::rollout::Rollout;
use crate::context::{Context, Refused, Result, apply_status, condition};

/// What the release reached this time.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub phase: Phase,
    /// The platform serves: a color's gateways answer behind the active Service.
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub ready_replicas: Option<i32>,
    pub degraded: Vec<String>,
    /// The rollout's fields of the status, as this reconcile leaves them.
    pub rollout: Rollout,
    /// What the spec asks for serves, promoted.
    pub promoted: bool,
    /// The Event of a change is a Warning (a failed or rolled-back rollout).
    pub warning: bool,
    /// When to look again, sooner than the resync.
    pub requeue: Option<Duration>,
    /// Annotations a person set that this reconcile acted on, removed once it is recorded.
    pub clear: Vec<&'static str>,
    /// The reason of `Degraded` when `degraded` says why (default `InvalidConfig`): the
    /// reason a rollout of the spec's version ended with.
    pub degraded_reason: Option<String>,
}

impl Progress {
    /// Waiting for the schema migrations of `pending` shards before the first version.
    pub fn migrating(pending: &[String], degraded: Vec<String>, rollout: Rollout) -> Self {
        Self {
            phase: Phase::Migrating,
            ready: false,
            reason: reasons::MIGRATING,
            message: format!("migrating the schema of {}", pending.join(", ")),
            ready_replicas: None,
            degraded,
            rollout,
            promoted: false,
            warning: false,
            requeue: Some(Duration::from_secs(5)),
            clear: Vec::new(),
            degraded_reason: None,
        }
    }

    /// Serving as `color` once one gateway of the applied Deployment is ready; deploying
    /// until then.
    pub fn of_gateway(
        release: &BlueGreenRelease,
        color: Color,
        gateway: &Deployment,
        degraded: Vec<String>,
        rollout: Rollout,
    ) -> Self {
        let status = gateway.status.clone().unwrap_or_default();
        let ready_replicas = status.ready_replicas.unwrap_or(0);
        let wanted = gateway.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(1);
        let version = rollout.active_version.clone().unwrap_or_else(|| release.spec.version.clone());
        let serves = ready_replicas >= 1 && status.updated_replicas.unwrap_or(0) >= 1;
        Self {
            phase: if serves { Phase::Stable } else { Phase::Deploying },
            ready: serves,
            reason: if serves { reasons::RECONCILED } else { reasons::DEPLOYING },
            message: if serves {
                format!("version {version} serves as {} with {ready_replicas}/{wanted} gateways ready", color.as_str())
            } else {
                format!("waiting for gateways of version {version} ({ready_replicas}/{wanted} ready)")
            },
            ready_replicas: Some(ready_replicas),
            degraded,
            rollout,
            promoted: false,
            warning: false,
            requeue: (!serves).then_some(Duration::from_secs(5)),
            clear: Vec::new(),
            degraded_reason: None,
        }
    }

    /// Still deploying, and the gateways' pods say why they are not ready.
    #[must_use]
    pub fn not_ready_because(self, cause: &str) -> Self {
        Self { reason: reasons::GATEWAYS_NOT_READY, message: format!("{}: {cause}", self.message), ..self }
    }
}

/// The status a reconcile writes, when to look again, and whether an Event is due.
#[derive(Clone, Debug, PartialEq)]
pub struct Next {
    pub status: BlueGreenReleaseStatus,
    pub requeue: Duration,
    /// `(warning, reason, note)` when readiness or the phase changed.
    pub event: Option<(bool, &'static str, String)>,
}

/// The status that follows `previous` after a reconcile of `generation` reached `reached`.
pub fn next(
    previous: &BlueGreenReleaseStatus,
    generation: Option<i64>,
    reached: Result<Progress, Refused>,
    resync: Duration,
) -> Next {
    let mut status = BlueGreenReleaseStatus { observed_generation: generation, ..previous.clone() };
    let mut degraded_reason = None;
    let (ready, reason, message, requeue, degraded, promoted, warning) = match reached {
        Ok(p) => {
            status.phase = Some(p.phase);
            if p.ready_replicas.is_some() {
                status.ready_replicas = p.ready_replicas;
            }
            p.rollout.write_into(&mut status);
            let requeue = p.requeue.unwrap_or(resync);
            degraded_reason = p.degraded_reason;
            (p.ready, p.reason, p.message, requeue, p.degraded, p.promoted, p.warning)
        }
        Err(refused) => {
            // The running color keeps serving while the spec cannot be acted on.
            let serving = previous.active_version.is_some() && previous.conditions.is_true(conditions::READY);
            if !serving {
                status.phase = Some(Phase::Failed);
            }
            let message = if serving {
                format!(
                    "{}; version {} keeps serving",
                    refused.message,
                    previous.active_version.clone().unwrap_or_default()
                )
            } else {
                refused.message
            };
            (serving, refused.reason, message, resync, Vec::new(), false, true)
        }
    };
    let rolling = status.preview_color.is_some();
    let progressing = rolling || matches!(status.phase, Some(Phase::Migrating | Phase::Deploying));
    let was = &previous.conditions;
    let degraded_now = !degraded.is_empty() || (warning && !rolling);
    let (degraded_reason, degraded_message) = if warning && !rolling {
        (reason, message.clone())
    } else if degraded_now {
        (degraded_reason.as_deref().unwrap_or(reasons::INVALID_CONFIG), degraded.join("; "))
    } else {
        (reasons::RECONCILED, "nothing left out".to_owned())
    };
    let ready_message = if ready && rolling {
        format!("version {} serves; {}", status.active_version.clone().unwrap_or_default(), message)
    } else {
        message.clone()
    };
    let ready_reason = if ready && rolling { reasons::RECONCILED } else { reason };
    status.conditions = Conditions(vec![
        condition(was, conditions::READY, ready, ready_reason, ready_message, generation),
        condition(
            was,
            conditions::PROGRESSING,
            progressing,
            if progressing { reason } else { reasons::RECONCILED },
            if progressing { message.clone() } else { "no rollout under way".to_owned() },
            generation,
        ),
        condition(was, conditions::DEGRADED, degraded_now, degraded_reason, degraded_message, generation),
        condition(
            was,
            conditions::PROMOTED,
            promoted,
            if promoted { reasons::PROMOTED } else { reason },
            if promoted {
                format!("version {} is promoted", status.active_version.clone().unwrap_or_default())
            } else {
                message.clone()
            },
            generation,
        ),
    ]);
    let before = (was.get(conditions::PROGRESSING).map(|c| c.reason.clone()), previous.phase);
    let after = (status.conditions.get(conditions::PROGRESSING).map(|c| c.reason.clone()), status.phase);
    let ready_before = was.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let ready_after = status.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let event = (before != after || ready_before != ready_after).then(|| {
        let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
        let stuck = reason == reasons::GATEWAYS_NOT_READY;
        (warning || (!ready && (!progressing || stuck)), reason, format!("{phase}: {message}"))
    });
    Next { status, requeue, event }
}

/// Records, once written, the phase a rollout left and the rollout that ended.
fn observe(ctx: &Context, previous: &BlueGreenReleaseStatus, next: &BlueGreenReleaseStatus) {
    let now = k8s_openapi::jiff::Timestamp::now();
    let since = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().and_then(|t| Duration::try_from(now - t.0).ok()).unwrap_or_default()
    };
    let rolling = previous.preview_color.is_some() || next.preview_color.is_some();
    if rolling
        && previous.phase != next.phase
        && next.phase_since != previous.phase_since
        && let Some(phase) = previous.phase
    {
        ctx.metrics.phase_ended(&format!("{phase:?}"), since(&previous.phase_since));
    }
    if next.history.first() != previous.history.first()
        && let Some(ended) = next.history.first()
    {
        let took = Duration::from_secs(ended.duration_seconds.unwrap_or_default());
        ctx.metrics.rollout_ended(&format!("{:?}", ended.outcome), took);
    }
}

/// Writes the status that follows what the reconcile reached, and its Event.
pub async fn write(release: &BlueGreenRelease, ctx: &Context, reached: Result<Progress, Refused>) -> Result<Action> {
    let previous = release.status.clone().unwrap_or_default();
    let clear = reached.as_ref().map(|p| p.clear.clone()).unwrap_or_default();
    let next = next(&previous, release.metadata.generation, reached, ctx.resync);
    apply_status(&ctx.client, MANAGER, release, &next.status).await?;
    observe(ctx, &previous, &next.status);
    if let Some((warning, reason, note)) = next.event {
        // Each rollout's Events apart from the last one's: the version they are about.
        let version = [&previous.preview_version, &next.status.preview_version, &next.status.active_version]
            .into_iter()
            .find_map(Clone::clone)
            .unwrap_or_else(|| release.spec.version.clone());
        ctx.event_of(release, &format!("Rollout {version}"), warning, reason, note).await;
    }
    // Acted on and recorded: the request is taken back, so it is not acted on twice.
    let asked: Vec<&str> = clear.into_iter().filter(|key| release.annotations().contains_key(*key)).collect();
    if !asked.is_empty() {
        let removed: serde_json::Map<String, serde_json::Value> =
            asked.iter().map(|key| ((*key).to_owned(), serde_json::Value::Null)).collect();
        let api: Api<BlueGreenRelease> = Api::namespaced(ctx.client.clone(), &release.namespace().unwrap_or_default());
        let patch = Patch::Merge(serde_json::json!({"metadata": {"annotations": removed}}));
        api.patch(&release.name_any(), &PatchParams::default(), &patch).await?;
    }
    Ok(Action::requeue(next.requeue))
}
