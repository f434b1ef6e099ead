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

/// What a reconcile reached, reduced to what the conditions say.
struct Reached {
    ready: bool,
    reason: &'static str,
    message: String,
    requeue: Duration,
    degraded: Vec<String>,
    degraded_reason: Option<String>,
    promoted: bool,
    warning: bool,
}

/// Writes what the reconcile reached into `status` (phase, replicas, the rollout's fields).
fn record(
    previous: &BlueGreenReleaseStatus,
    status: &mut BlueGreenReleaseStatus,
    reached: Result<Progress, Refused>,
    resync: Duration,
) -> Reached {
    match reached {
        Ok(p) => {
            status.phase = Some(p.phase);
            if p.ready_replicas.is_some() {
                status.ready_replicas = p.ready_replicas;
            }
            p.rollout.write_into(status);
            Reached {
                ready: p.ready,
                reason: p.reason,
                message: p.message,
                requeue: p.requeue.unwrap_or(resync),
                degraded: p.degraded,
                degraded_reason: p.degraded_reason,
                promoted: p.promoted,
                warning: p.warning,
            }
        }
        Err(refused) => {
            // The running color keeps serving while the spec cannot be acted on.
            let active = previous.active_version.clone();
            let serving = active.is_some() && previous.conditions.is_true(conditions::READY);
            if !serving {
                status.phase = Some(Phase::Failed);
            }
            let message = match active.filter(|_| serving) {
                Some(version) => format!("{}; version {version} keeps serving", refused.message),
                None => refused.message,
            };
            Reached {
                ready: serving,
                reason: refused.reason,
                message,
                requeue: resync,
                degraded: Vec::new(),
                degraded_reason: None,
                promoted: false,
                warning: true,
            }
        }
    }
}

/// The four conditions of `status` after `r`: `Ready`, `Progressing`, `Degraded`, `Promoted`.
fn conditions_of(
    was: &Conditions,
    status: &BlueGreenReleaseStatus,
    r: &Reached,
    generation: Option<i64>,
) -> Conditions {
    let rolling = status.preview_color.is_some();
    let progressing = rolling || matches!(status.phase, Some(Phase::Migrating | Phase::Deploying));
    let active = status.active_version.clone().unwrap_or_default();
    let ended_badly = r.warning && !rolling;
    let degraded = !r.degraded.is_empty() || ended_badly;
    let (degraded_reason, degraded_message) = if ended_badly {
        (r.reason, r.message.clone())
    } else if degraded {
        (r.degraded_reason.as_deref().unwrap_or(reasons::INVALID_CONFIG), r.degraded.join("; "))
    } else {
        (reasons::RECONCILED, "nothing left out".to_owned())
    };
    let (ready_reason, ready_message) = if r.ready && rolling {
        (reasons::RECONCILED, format!("version {active} serves; {}", r.message))
    } else {
        (r.reason, r.message.clone())
    };
    let (progress_reason, progress_message) = if progressing {
        (r.reason, r.message.clone())
    } else {
        (reasons::RECONCILED, "no rollout under way".to_owned())
    };
    let (promoted_reason, promoted_message) = if r.promoted {
        (reasons::PROMOTED, format!("version {active} is promoted"))
    } else {
        (r.reason, r.message.clone())
    };
    Conditions(vec![
        condition(was, conditions::READY, r.ready, ready_reason, ready_message, generation),
        condition(was, conditions::PROGRESSING, progressing, progress_reason, progress_message, generation),
        condition(was, conditions::DEGRADED, degraded, degraded_reason, degraded_message, generation),
        condition(was, conditions::PROMOTED, r.promoted, promoted_reason, promoted_message, generation),
    ])
}

/// The status that follows `previous` after a reconcile of `generation` reached `reached`.
pub fn next(
    previous: &BlueGreenReleaseStatus,
    generation: Option<i64>,
    reached: Result<Progress, Refused>,
    resync: Duration,
) -> Next {
    let mut status = BlueGreenReleaseStatus { observed_generation: generation, ..previous.clone() };
    let r = record(previous, &mut status, reached, resync);
    let was = &previous.conditions;
    status.conditions = conditions_of(was, &status, &r, generation);
    // An Event when the step (Progressing's reason), the phase or readiness changed.
    let step = |c: &Conditions, phase| (c.get(conditions::PROGRESSING).map(|c| c.reason.clone()), phase);
    let ready = |c: &Conditions| c.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let changed =
        step(was, previous.phase) != step(&status.conditions, status.phase) || ready(was) != ready(&status.conditions);
    let event = changed.then(|| {
        let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
        let progressing = status.conditions.is_true(conditions::PROGRESSING);
        let stuck = r.reason == reasons::GATEWAYS_NOT_READY;
        (r.warning || (!r.ready && (!progressing || stuck)), r.reason, format!("{phase}: {}", r.message))
    });
    Next { status, requeue: r.requeue, event }
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
