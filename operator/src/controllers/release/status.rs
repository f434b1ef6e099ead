//! What a release reached, as its status: phase, colors and versions, and the `Ready`,
//! `Progressing` and `Degraded` conditions, each written on every reconcile. An Event with
//! the `Ready` reason marks every change of readiness or phase.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use vellum_crds::BlueGreenRelease;
use vellum_crds::blue_green_release::{BlueGreenReleaseStatus, Color, Phase};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};

use super::MANAGER;
use crate::context::{Context, Refused, Result, apply_status, condition};

/// What the release reached this time.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub phase: Phase,
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub ready_replicas: Option<i32>,
    pub degraded: Vec<String>,
    pub active_version: Option<String>,
}

impl Progress {
    /// Waiting for the schema migrations of `pending` shards.
    pub fn migrating(pending: &[String], degraded: Vec<String>) -> Self {
        Self {
            phase: Phase::Migrating,
            ready: false,
            reason: reasons::MIGRATING,
            message: format!("migrating the schema of {}", pending.join(", ")),
            ready_replicas: None,
            degraded,
            active_version: None,
        }
    }

    /// Serving as `color` once one gateway of the applied Deployment is ready; deploying
    /// until then.
    pub fn of_gateway(
        release: &BlueGreenRelease,
        color: Color,
        gateway: &Deployment,
        active_version: Option<String>,
        degraded: Vec<String>,
    ) -> Self {
        let status = gateway.status.clone().unwrap_or_default();
        let ready_replicas = status.ready_replicas.unwrap_or(0);
        let wanted = gateway.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(1);
        let version = &release.spec.version;
        if ready_replicas >= 1 && status.updated_replicas.unwrap_or(0) >= 1 {
            Self {
                phase: Phase::Stable,
                ready: true,
                reason: reasons::RECONCILED,
                message: format!(
                    "version {version} serves as {} with {ready_replicas}/{wanted} gateways ready",
                    color.as_str()
                ),
                ready_replicas: Some(ready_replicas),
                degraded,
                active_version: Some(version.clone()),
            }
        } else {
            Self {
                phase: Phase::Deploying,
                ready: false,
                reason: reasons::DEPLOYING,
                message: format!("waiting for gateways of version {version} ({ready_replicas}/{wanted} ready)"),
                ready_replicas: Some(ready_replicas),
                degraded,
                active_version,
            }
        }
    }
}

impl Progress {
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
    color: Color,
    reached: Result<Progress, Refused>,
    resync: Duration,
) -> Next {
    let mut status = BlueGreenReleaseStatus { observed_generation: generation, ..previous.clone() };
    let (ready, reason, message, requeue, degraded) = match reached {
        Ok(p) => {
            status.phase = Some(p.phase);
            status.ready_replicas = p.ready_replicas;
            if p.active_version.is_some() {
                status.active_color = Some(color);
                status.active_version = p.active_version;
            }
            let requeue = if p.ready { resync } else { Duration::from_secs(5) };
            (p.ready, p.reason, p.message, requeue, p.degraded)
        }
        Err(refused) => {
            // A refused new version leaves the running one serving: Ready reflects it.
            let serving =
                refused.reason == reasons::NEW_VERSION_REFUSED && previous.conditions.is_true(conditions::READY);
            if !serving {
                status.phase = Some(if previous.active_version.is_some() { Phase::Stable } else { Phase::Failed });
            }
            (serving, refused.reason, refused.message, resync, Vec::new())
        }
    };
    let refused_version = reason == reasons::NEW_VERSION_REFUSED;
    if status.phase == Some(Phase::Stable) && !ready && !refused_version {
        status.phase = Some(Phase::Failed);
    }
    let progressing = matches!(status.phase, Some(Phase::Migrating | Phase::Deploying));
    let was = &previous.conditions;
    let degraded_now = !degraded.is_empty() || refused_version;
    let (degraded_reason, degraded_message) = if refused_version {
        (reason, message.clone())
    } else if degraded_now {
        (reasons::INVALID_CONFIG, degraded.join("; "))
    } else {
        (reasons::RECONCILED, "nothing left out".to_owned())
    };
    status.conditions = Conditions(vec![
        condition(was, conditions::READY, ready, reason, message.clone(), generation),
        condition(
            was,
            conditions::PROGRESSING,
            progressing,
            if progressing { reason } else { reasons::RECONCILED },
            if progressing { message.clone() } else { "no rollout under way".to_owned() },
            generation,
        ),
        condition(was, conditions::DEGRADED, degraded_now, degraded_reason, degraded_message, generation),
    ]);
    let before = was.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let after = status.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let event = (before != after || previous.phase != status.phase).then(|| {
        let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
        let stuck = reason == reasons::GATEWAYS_NOT_READY;
        (!ready && (!progressing || stuck), reason, format!("{phase}: {message}"))
    });
    Next { status, requeue, event }
}

/// Writes the status that follows what the reconcile reached, and its Event.
pub async fn write(
    release: &BlueGreenRelease,
    ctx: &Context,
    color: Color,
    reached: Result<Progress, Refused>,
) -> Result<Action> {
    let previous = release.status.clone().unwrap_or_default();
    let next = next(&previous, release.metadata.generation, color, reached, ctx.resync);
    apply_status(&ctx.client, MANAGER, release, &next.status).await?;
    if let Some((warning, reason, note)) = next.event {
        ctx.event(release, warning, reason, note).await;
    }
    Ok(Action::requeue(next.requeue))
}
