//! The blue-green rollout: what runs changes only by deploying the new pod templates as the
//! other color beside the serving one, migrating, smoke-checking it through the preview
//! Service, switching the active Service (done only once its EndpointSlices list the new
//! color's pods and none of the old), watching its error rate, and then keeping or rolling
//! back. The old color keeps running until the new one is promoted, and
//! `promotion.scaleDownDelaySeconds` after that.
//!
//! Every reconcile acts for the phase recorded in status and records the next phase; it
//! acts for that phase on the next reconcile. A decision (switch, roll back, scale down) is
//! therefore in status before anything acts on it, and an operator replica taking over
//! resumes at the same step: the actions of a phase are idempotent applies.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use vellum_crds::annotations;
use vellum_crds::blue_green_release::{
    BlueGreenReleaseStatus, Color, Phase, PromotionMode, ReleaseOutcome, ReleaseRecord, RequestCounts, SmokeResult,
};
use vellum_crds::conditions::{self, reasons};
use vellum_crds::{BlueGreenRelease, labels};

use super::status::Progress;
use super::{MANAGER, Objects, build, diagnose, smoke};
use crate::context::{Context, Refused, StepError, apply};
use crate::controllers::platform::{GATEWAY_PORT, names, secret_keys, selector_labels};
use crate::controllers::shared::not_found;

/// How soon a rollout under way looks again.
const STEP: Duration = Duration::from_secs(1);
/// How soon a recorded decision is acted on.
const ACT: Duration = Duration::from_millis(100);
/// How soon the active Service's endpoints are looked at again while traffic moves (the
/// cluster moves them in a fraction of a second).
const ENDPOINTS: Duration = Duration::from_millis(250);
/// Past rollouts kept in `status.history`.
const HISTORY: usize = 10;

/// The rollout fields of a release's status, as a reconcile leaves them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    pub active_color: Option<Color>,
    pub active_version: Option<String>,
    pub active_template: Option<String>,
    pub preview_color: Option<Color>,
    pub preview_version: Option<String>,
    pub preview_template: Option<String>,
    pub phase_since: Option<Time>,
    pub rollout_since: Option<Time>,
    pub smoke_results: Vec<SmokeResult>,
    pub observed_error_rate_percent: Option<f64>,
    pub analysis_since: Option<Time>,
    pub analysis_baseline: Option<RequestCounts>,
    pub scale_down_at: Option<Time>,
    pub scale_down_color: Option<Color>,
    pub history: Vec<ReleaseRecord>,
}

impl Rollout {
    pub fn of(status: &BlueGreenReleaseStatus) -> Self {
        Self {
            active_color: status.active_color,
            active_version: status.active_version.clone(),
            active_template: status.active_template.clone(),
            preview_color: status.preview_color,
            preview_version: status.preview_version.clone(),
            preview_template: status.preview_template.clone(),
            phase_since: status.phase_since.clone(),
            rollout_since: status.rollout_since.clone(),
            smoke_results: status.smoke_results.clone(),
            observed_error_rate_percent: status.observed_error_rate_percent,
            analysis_since: status.analysis_since.clone(),
            analysis_baseline: status.analysis_baseline,
            scale_down_at: status.scale_down_at.clone(),
            scale_down_color: status.scale_down_color,
            history: status.history.clone(),
        }
    }

    /// Writes these fields into `status`.
    pub fn write_into(self, status: &mut BlueGreenReleaseStatus) {
        status.active_color = self.active_color;
        status.active_version = self.active_version;
        status.active_template = self.active_template;
        status.preview_color = self.preview_color;
        status.preview_version = self.preview_version;
        status.preview_template = self.preview_template;
        status.phase_since = self.phase_since;
        status.rollout_since = self.rollout_since;
        status.smoke_results = self.smoke_results;
        status.observed_error_rate_percent = self.observed_error_rate_percent;
        status.analysis_since = self.analysis_since;
        status.analysis_baseline = self.analysis_baseline;
        status.scale_down_at = self.scale_down_at;
        status.scale_down_color = self.scale_down_color;
        status.history = self.history;
    }

    /// Ends the rollout under way with `outcome`, recorded first in the history.
    fn end(&mut self, outcome: ReleaseOutcome, reason: &str, message: &str, now: Timestamp) {
        if let (Some(color), Some(version)) = (self.preview_color, self.preview_version.clone()) {
            let seconds =
                |since: &Option<Time>| since.as_ref().and_then(|s| u64::try_from((now - s.0).get_seconds()).ok());
            let record = ReleaseRecord {
                version,
                color,
                outcome,
                reason: Some(reason.to_owned()),
                time: Some(Time(now)),
                message: Some(message.to_owned()),
                template: self.preview_template.clone(),
                duration_seconds: seconds(&self.rollout_since),
                analysis_seconds: seconds(&self.analysis_since),
            };
            self.history.insert(0, record);
            self.history.truncate(HISTORY);
        }
        self.preview_color = None;
        self.preview_version = None;
        self.preview_template = None;
        self.rollout_since = None;
        self.analysis_since = None;
        self.analysis_baseline = None;
        self.phase_since = Some(Time(now));
    }

    /// Whether the template `desired` was rolled out before and did not end promoted: it
    /// waits for a change of the spec or `vellum.dev/retry`.
    pub fn abandoned(&self, desired: &str) -> bool {
        self.history
            .first()
            .is_some_and(|r| r.template.as_deref() == Some(desired) && r.outcome != ReleaseOutcome::Promoted)
    }
}

/// What one reconcile of the rollout sees and acts with.
struct Step<'a> {
    release: &'a BlueGreenRelease,
    ctx: &'a Context,
    objects: &'a Objects,
    name: String,
    namespace: String,
    now: Timestamp,
    rollout: Rollout,
    phase: Phase,
}

/// Acts for the phase the release's status records and returns the progress to record.
pub async fn step(release: &BlueGreenRelease, ctx: &Context, objects: &Objects) -> Result<Progress, StepError> {
    let status = release.status.clone().unwrap_or_default();
    let mut step = Step {
        release,
        ctx,
        objects,
        name: release.name_any(),
        namespace: release.namespace().unwrap_or_default(),
        now: Timestamp::now(),
        rollout: Rollout::of(&status),
        phase: status.phase.unwrap_or_default(),
    };
    let desired = objects.template.clone();
    let Some(active) = step.rollout.active_color else { return step.first_deployment().await };
    // A release an earlier operator deployed recorded no template: what serves is what the
    // spec asks for when the versions agree.
    if step.rollout.active_template.is_none() && step.rollout.active_version.as_deref() == Some(&release.spec.version) {
        step.rollout.active_template = Some(desired.clone());
    }
    let asked = |key: &str| release.annotations().contains_key(key);
    let Some(target) = step.rollout.preview_color else {
        let serving = step.rollout.active_template.as_deref() == Some(desired.as_str());
        if serving || (step.rollout.abandoned(&desired) && !asked(annotations::RETRY)) {
            return step.steady(active, serving).await;
        }
        return Ok(step.begin(active.other()));
    };
    if step.rollout.preview_template.as_deref() != Some(desired.as_str()) {
        // A newer spec mid-rollout replaces the preview: traffic goes back to the serving
        // color (Deploying routes it there) and the new templates deploy from the start.
        return Ok(step.begin(target));
    }
    if asked(annotations::ABORT) {
        return step.abort(active, target).await;
    }
    let deadline = Duration::from_secs(u64::from(release.spec.promotion.progress_deadline_seconds));
    let since = step.rollout.phase_since.as_ref().map_or(step.now, |t| t.0);
    let late = Duration::try_from(step.now - since).is_ok_and(|d| d > deadline);
    if late && matches!(step.phase, Phase::Deploying | Phase::Migrating | Phase::SmokeTesting | Phase::Switching) {
        let message =
            format!("{:?} took longer than promotion.progressDeadlineSeconds ({} s)", step.phase, deadline.as_secs());
        return step.fail(active, target, reasons::PROGRESS_DEADLINE_EXCEEDED, &message).await;
    }
    match step.phase {
        Phase::Deploying => step.deploying(active, target).await,
        Phase::Migrating => step.migrating(active, target).await,
        Phase::SmokeTesting => step.smoke_testing(active, target).await,
        Phase::AwaitingPromotion => step.awaiting_promotion(active, target).await,
        Phase::Switching => step.switching(active, target).await,
        Phase::Analyzing => step.analyzing(active, target).await,
        Phase::RollingBack => step.rolling_back(active, target).await,
        // A preview recorded beside a phase that has none: start it over.
        _ => Ok(step.begin(target)),
    }
}

impl Step<'_> {
    fn version(&self) -> &str {
        &self.release.spec.version
    }

    /// The progress of a rollout under way, looked at again in a second.
    fn rolling(&self, phase: Phase, reason: &'static str, message: String) -> Progress {
        Progress {
            phase,
            ready: true,
            reason,
            message,
            ready_replicas: None,
            degraded: self.objects.degraded.clone(),
            rollout: self.rollout.clone(),
            promoted: false,
            warning: false,
            requeue: Some(STEP),
            clear: Vec::new(),
            degraded_reason: None,
        }
    }

    /// Records the next phase; it is acted on in the next reconcile, at once (a decision
    /// waits for nothing but its record).
    fn enter(&mut self, phase: Phase, reason: &'static str, message: String) -> Progress {
        self.rollout.phase_since = Some(Time(self.now));
        let mut progress = self.rolling(phase, reason, message);
        progress.requeue = Some(ACT);
        progress
    }

    /// Records a rollout of the spec's templates as `target`, from its first phase.
    fn begin(&mut self, target: Color) -> Progress {
        let r = &mut self.rollout;
        r.preview_color = Some(target);
        r.preview_version = Some(self.release.spec.version.clone());
        r.preview_template = Some(self.objects.template.clone());
        r.rollout_since = Some(Time(self.now));
        r.smoke_results.clear();
        r.observed_error_rate_percent = None;
        r.analysis_since = None;
        r.analysis_baseline = None;
        // The color about to be deployed again is not the one to scale down any more.
        if r.scale_down_color == Some(target) {
            r.scale_down_at = None;
            r.scale_down_color = None;
        }
        let message = format!("deploying version {} as {} beside the serving color", self.version(), target.as_str());
        let mut progress = self.enter(Phase::Deploying, reasons::DEPLOYING, message);
        progress.clear = vec![annotations::RETRY, annotations::PROMOTE];
        progress
    }

    /// The first version of a platform: its migrations, then its workloads as blue.
    async fn first_deployment(self) -> Result<Progress, StepError> {
        let color = Color::Blue;
        let pending = self.migrate().await?;
        if !pending.is_empty() {
            return Ok(Progress::migrating(&pending, self.objects.degraded.clone(), self.rollout));
        }
        let (gateway, _) = self.deploy(color).await?;
        self.route(color, color.other()).await?;
        self.scaling(color).await?;
        let progress = Progress::of_gateway(self.release, color, &gateway, self.objects.degraded.clone(), self.rollout);
        if progress.ready {
            let mut progress = progress;
            progress.rollout.active_color = Some(color);
            progress.rollout.active_version = Some(self.release.spec.version.clone());
            progress.rollout.active_template = Some(self.objects.template.clone());
            progress.promoted = true;
            return Ok(progress);
        }
        Ok(match diagnose::why_not_ready(self.ctx, &gateway).await {
            Some(cause) => progress.not_ready_because(&cause),
            None => progress,
        })
    }

    /// No rollout under way: the active color's objects (its Deployments only when they
    /// run what the spec asks for), and the previous color scaled to zero once due.
    async fn steady(mut self, active: Color, serving: bool) -> Result<Progress, StepError> {
        let gateway = if serving {
            let (gateway, _) = self.deploy(active).await?;
            self.route(active, active.other()).await?;
            gateway
        } else {
            self.route(active, active.other()).await?;
            let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
            deployments.get_opt(&names::gateway(&self.name, active)).await?.unwrap_or_default()
        };
        self.scaling(active).await?;
        let mut requeue = None;
        if let (Some(at), Some(color)) = (self.rollout.scale_down_at.clone(), self.rollout.scale_down_color) {
            match Duration::try_from(at.0 - self.now) {
                Ok(wait) if !wait.is_zero() => requeue = Some(wait.min(self.ctx.resync)),
                _ => {
                    self.scale_to_zero(color).await?;
                    self.rollout.scale_down_at = None;
                    self.rollout.scale_down_color = None;
                }
            }
        }
        let mut progress =
            Progress::of_gateway(self.release, active, &gateway, self.objects.degraded.clone(), self.rollout);
        progress.requeue = requeue;
        progress.promoted = serving;
        // With no rollout under way, a promote or abort has nothing to act on: left, it
        // would act on the next rollout the moment it began.
        progress.clear = vec![annotations::PROMOTE, annotations::ABORT];
        if serving {
            progress.clear.push(annotations::RETRY);
        }
        if !serving {
            // The spec's templates failed or were aborted: the previous version serves.
            let last = progress.rollout.history.first().cloned();
            if let Some(last) = last {
                progress.phase = match last.outcome {
                    ReleaseOutcome::Aborted => Phase::Aborted,
                    ReleaseOutcome::Failed => Phase::Failed,
                    _ => Phase::Stable,
                };
                progress.degraded_reason.clone_from(&last.reason);
                progress.degraded.push(format!(
                    "version {} ended {:?}: {}; version {} serves (set vellum.dev/retry to roll it out again)",
                    last.version,
                    last.outcome,
                    last.message.unwrap_or_default(),
                    progress.rollout.active_version.clone().unwrap_or_default()
                ));
            }
        }
        Ok(progress)
    }

    /// `Deploying`: the new color's Deployments at full size, the preview Service on them.
    async fn deploying(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        let (gateway, workers) = self.deploy(target).await?;
        self.route(active, target).await?;
        let (ready, wanted) = rolled_out(&gateway);
        if ready && rolled_out(&workers).0 {
            let message = format!("migrating the schema for version {}", self.version());
            return Ok(self.enter(Phase::Migrating, reasons::MIGRATING, message));
        }
        let ready_replicas = gateway.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
        let mut message = format!(
            "deploying version {} as {}: {ready_replicas}/{wanted} gateways ready",
            self.version(),
            target.as_str()
        );
        let mut progress = self.rolling(Phase::Deploying, reasons::DEPLOYING, String::new());
        if let Some(cause) = diagnose::why_not_ready(self.ctx, &gateway).await {
            message = format!("{message}: {cause}");
            progress.reason = reasons::GATEWAYS_NOT_READY;
        }
        progress.message = message;
        Ok(progress)
    }

    /// `Migrating`: the new version's migration Job per shard; the old color keeps serving
    /// on the migrated schema (migrations only add while two colors run).
    async fn migrating(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        match self.migrate().await {
            Ok(pending) if pending.is_empty() => {
                let message = format!("smoke-checking version {} through the preview Service", self.version());
                Ok(self.enter(Phase::SmokeTesting, reasons::SMOKE_TESTING, message))
            }
            Ok(pending) => {
                let message = format!("migrating the schema of {} for version {}", pending.join(", "), self.version());
                Ok(self.rolling(Phase::Migrating, reasons::MIGRATING, message))
            }
            Err(StepError::Refused(refused)) => self.fail(active, target, refused.reason, &refused.message).await,
            Err(e) => Err(e),
        }
    }

    /// `SmokeTesting`: the built-in checks and the spec's, through the preview Service.
    async fn smoke_testing(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        let preview = self.route(active, target).await?;
        let spec = preview.spec.unwrap_or_default();
        let address = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None");
        let port = spec.ports.unwrap_or_default().first().map_or(80, |p| p.port);
        let Some(address) = address else {
            let message = "the preview Service has no cluster IP yet".to_owned();
            return Ok(self.rolling(Phase::SmokeTesting, reasons::SMOKE_TESTING, message));
        };
        let host = if address.contains(':') { format!("[{address}]") } else { address };
        let link_key = self.objects.secret.data.as_ref().and_then(|d| d.get(secret_keys::LINK_KEY));
        let link_key = link_key.map(|k| k.0.as_slice()).unwrap_or_default();
        let results = smoke::run(&self.ctx.http, self.release, link_key, &format!("http://{host}:{port}")).await;
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{}: {}", r.name, r.message.clone().unwrap_or_default()))
            .collect();
        self.rollout.smoke_results = results;
        if !failed.is_empty() {
            let message = format!("smoke checks of version {} failed: {}", self.version(), failed.join("; "));
            return self.fail(active, target, reasons::SMOKE_CHECK_FAILED, &message).await;
        }
        Ok(match self.release.spec.promotion.mode {
            PromotionMode::Manual => {
                let message = format!(
                    "version {} passed its smoke checks as {}; waiting for the vellum.dev/promote annotation",
                    self.version(),
                    target.as_str()
                );
                self.enter(Phase::AwaitingPromotion, reasons::AWAITING_PROMOTION, message)
            }
            PromotionMode::Auto => self.switch_to(target),
        })
    }

    fn switch_to(&mut self, target: Color) -> Progress {
        let message = format!("switching the active Service to {} (version {})", target.as_str(), self.version());
        self.enter(Phase::Switching, reasons::SWITCHING, message)
    }

    /// `AwaitingPromotion`: the preview serves only smoke traffic until a person promotes.
    async fn awaiting_promotion(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        self.route(active, target).await?;
        if self.release.annotations().contains_key(annotations::PROMOTE) {
            let mut progress = self.switch_to(target);
            progress.clear = vec![annotations::PROMOTE];
            return Ok(progress);
        }
        let message = format!(
            "version {} passed its smoke checks as {}; waiting for the vellum.dev/promote annotation",
            self.version(),
            target.as_str()
        );
        let mut progress = self.rolling(Phase::AwaitingPromotion, reasons::AWAITING_PROMOTION, message);
        progress.requeue = Some(self.ctx.resync);
        Ok(progress)
    }

    /// `Switching`: the active Service selects the new color; done when its EndpointSlices
    /// list ready pods of the new color and none of the old.
    async fn switching(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        self.route(target, active).await?;
        match self.endpoints_on(target).await? {
            Ok(()) => {
                self.rollout.analysis_baseline = Some(self.request_counts(target).await);
                self.rollout.analysis_since = Some(Time(self.now));
                self.rollout.observed_error_rate_percent = None;
                let window = self.release.spec.analysis.window_seconds;
                let message = format!(
                    "version {} serves as {}; watching its error rate for {window} s",
                    self.version(),
                    target.as_str()
                );
                Ok(self.enter(Phase::Analyzing, reasons::ANALYZING, message))
            }
            Err(waiting) => {
                let message = format!("switching the active Service to {}: {waiting}", target.as_str());
                let mut progress = self.rolling(Phase::Switching, reasons::SWITCHING, message);
                progress.requeue = Some(ENDPOINTS);
                Ok(progress)
            }
        }
    }

    /// `Analyzing`: the new color's 5xx answers over its requests since the switch, for
    /// `analysis.windowSeconds`; the old color keeps running throughout.
    async fn analyzing(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        self.route(target, active).await?;
        let baseline = self.rollout.analysis_baseline.unwrap_or_default();
        let now = self.request_counts(target).await;
        let (requests, errors) =
            (now.requests.saturating_sub(baseline.requests), now.errors.saturating_sub(baseline.errors));
        #[allow(clippy::cast_precision_loss)]
        let rate = if requests == 0 { 0.0 } else { errors as f64 * 100.0 / requests as f64 };
        self.rollout.observed_error_rate_percent = Some((rate * 100.0).round() / 100.0);
        let analysis = &self.release.spec.analysis;
        // Without autoRollback a failed analysis is a person's to decide: it stays failed
        // (recorded as Progressing's reason) even if the rate drops again.
        let failed_before = self
            .release
            .status
            .as_ref()
            .and_then(|s| s.conditions.get(conditions::PROGRESSING))
            .is_some_and(|c| c.reason == reasons::ANALYSIS_FAILED);
        if rate > analysis.max_error_rate_percent || failed_before {
            let measured = format!(
                "version {} answered {errors} of {requests} requests with 5xx ({rate:.2} %, at most {} % allowed)",
                self.version(),
                analysis.max_error_rate_percent
            );
            if self.release.spec.promotion.auto_rollback {
                let mut progress = self.enter(Phase::RollingBack, reasons::ANALYSIS_FAILED, measured);
                progress.warning = true;
                return Ok(progress);
            }
            if self.release.annotations().contains_key(annotations::PROMOTE) {
                let message = format!(
                    "version {} promoted as {} by request despite its analysis: {measured}",
                    self.version(),
                    target.as_str()
                );
                return Ok(self.promote(active, target, message));
            }
            let message = format!(
                "{measured}; it keeps serving as {} (promotion.autoRollback is false): vellum.dev/promote keeps it, vellum.dev/abort rolls back",
                target.as_str()
            );
            let mut progress = self.rolling(Phase::Analyzing, reasons::ANALYSIS_FAILED, message);
            progress.warning = true;
            progress.requeue = Some(Duration::from_secs(5));
            return Ok(progress);
        }
        let since = self.rollout.phase_since.as_ref().map_or(self.now, |t| t.0);
        let watched = Duration::try_from(self.now - since).unwrap_or_default();
        let window = Duration::from_secs(u64::from(analysis.window_seconds));
        if watched < window {
            let message = format!(
                "version {} serves as {}; {rate:.2} % of {requests} requests failed in {} of {} s",
                self.version(),
                target.as_str(),
                watched.as_secs(),
                window.as_secs()
            );
            let mut progress = self.rolling(Phase::Analyzing, reasons::ANALYZING, message);
            progress.requeue = Some(window.saturating_sub(watched).min(Duration::from_secs(5)));
            return Ok(progress);
        }
        let message = format!("version {} promoted as {} ({rate:.2} % errors)", self.version(), target.as_str());
        Ok(self.promote(active, target, message))
    }

    /// Promoted: the new color is the active one; the old one stays for a fast rollback
    /// and is scaled down `promotion.scaleDownDelaySeconds` later.
    fn promote(mut self, active: Color, target: Color, message: String) -> Progress {
        let delay = i64::from(self.release.spec.promotion.scale_down_delay_seconds);
        let now = self.now;
        let r = &mut self.rollout;
        r.active_color = Some(target);
        r.active_version = r.preview_version.clone();
        r.active_template = r.preview_template.clone();
        r.scale_down_at = Some(Time(now + k8s_openapi::jiff::SignedDuration::from_secs(delay)));
        r.scale_down_color = Some(active);
        r.end(ReleaseOutcome::Promoted, reasons::PROMOTED, &message, now);
        let mut progress = self.rolling(Phase::Stable, reasons::PROMOTED, message);
        progress.promoted = true;
        progress.clear = vec![annotations::PROMOTE];
        progress
    }

    /// `RollingBack`: the active Service back on the old color, which never stopped; done
    /// when its EndpointSlices list only the old color, then the new one is scaled down.
    async fn rolling_back(self, active: Color, target: Color) -> Result<Progress, StepError> {
        self.route(active, target).await?;
        if let Err(waiting) = self.endpoints_on(active).await? {
            let message = format!("rolling back to {}: {waiting}", active.as_str());
            let mut progress = self.rolling(Phase::RollingBack, reasons::ROLLING_BACK, message);
            progress.requeue = Some(ENDPOINTS);
            return Ok(progress);
        }
        let aborted = self.release.annotations().contains_key(annotations::ABORT);
        let (outcome, reason) = if aborted {
            (ReleaseOutcome::Aborted, reasons::ABORTED)
        } else {
            (ReleaseOutcome::RolledBack, reasons::ROLLED_BACK)
        };
        let message = format!(
            "traffic is back on {} (version {}); version {} was {}",
            active.as_str(),
            active_version(&self.rollout),
            self.version(),
            if aborted { "aborted" } else { "rolled back" }
        );
        let phase = if aborted { Phase::Aborted } else { Phase::Stable };
        self.finish(target, outcome, phase, reason, message).await
    }

    /// `vellum.dev/abort`: before the switch, the new color is scaled down at once; after
    /// it, traffic goes back first (as a rollback does).
    async fn abort(mut self, active: Color, target: Color) -> Result<Progress, StepError> {
        if matches!(self.phase, Phase::Switching | Phase::Analyzing) {
            let message = format!("aborting: moving traffic back to {}", active.as_str());
            return Ok(self.enter(Phase::RollingBack, reasons::ROLLING_BACK, message));
        }
        if self.phase == Phase::RollingBack {
            return self.rolling_back(active, target).await;
        }
        self.route(active, target).await?;
        let message =
            format!("version {} was aborted; version {} serves", self.version(), active_version(&self.rollout));
        self.finish(target, ReleaseOutcome::Aborted, Phase::Aborted, reasons::ABORTED, message).await
    }

    /// Ends the rollout as failed: traffic stays on (or goes back to) the old color, the
    /// new one is scaled down.
    async fn fail(
        mut self,
        active: Color,
        target: Color,
        reason: &'static str,
        why: &str,
    ) -> Result<Progress, StepError> {
        self.route(active, target).await?;
        if matches!(self.phase, Phase::Switching | Phase::Analyzing) && self.endpoints_on(active).await?.is_err() {
            // Traffic may still reach the new color: roll back first, fail once it is off.
            let message = format!("{why}; moving traffic back to {}", active.as_str());
            return Ok(self.enter(Phase::RollingBack, reason, message));
        }
        let message = format!("{why}; version {} serves", active_version(&self.rollout));
        self.finish(target, ReleaseOutcome::Failed, Phase::Failed, reason, message).await
    }

    /// Ends a rollout that did not promote, with the old color serving: the new color is
    /// scaled down, the rollout recorded in the history (a Warning), and a promote or abort
    /// still asked for taken back, as nothing is left for it to act on.
    async fn finish(
        mut self,
        target: Color,
        outcome: ReleaseOutcome,
        phase: Phase,
        reason: &'static str,
        message: String,
    ) -> Result<Progress, StepError> {
        self.scale_to_zero(target).await?;
        let now = self.now;
        self.rollout.end(outcome, reason, &message, now);
        let mut progress = self.rolling(phase, reason, message);
        progress.warning = true;
        progress.clear = vec![annotations::ABORT, annotations::PROMOTE];
        progress.requeue = None;
        Ok(progress)
    }

    /// Applies the ServiceAccount, its RoleBinding and `color`'s Deployments from the spec;
    /// returns the gateway and workers Deployments as the API server has them.
    async fn deploy(&self, color: Color) -> Result<(Deployment, Deployment), StepError> {
        let client = &self.ctx.client;
        apply(client, MANAGER, &build::build_gateway_service_account(self.release)).await?;
        apply(client, MANAGER, &build::build_gateway_role_binding(self.release)).await?;
        let facts = &self.objects.facts;
        let mut gateway = build::build_gateway_deployment(self.release, color, facts);
        if let Some(autoscaling) = &self.release.spec.gateway.autoscaling
            && self.rollout.preview_color == Some(color)
        {
            // The autoscaler follows the serving color: the preview (perhaps scaled to zero
            // after an earlier rollout) starts at the autoscaler's floor, ready for traffic.
            if let Some(spec) = gateway.spec.as_mut() {
                spec.replicas = Some(autoscaling.min_replicas);
            }
        }
        let gateway = apply(client, MANAGER, &gateway).await?;
        let workers = apply(client, MANAGER, &build::build_workers_deployment(self.release, color, facts)).await?;
        Ok((gateway, workers))
    }

    /// Points the active Service at `active` and the preview Service at `preview`; returns
    /// the preview Service.
    async fn route(&self, active: Color, preview: Color) -> Result<Service, StepError> {
        let client = &self.ctx.client;
        let release = self.release;
        apply(client, MANAGER, &build::build_gateway_service(release, &names::active_service(&self.name), active))
            .await?;
        let preview = build::build_gateway_service(release, &names::preview_service(&self.name), preview);
        Ok(apply(client, MANAGER, &preview).await?)
    }

    /// The disruption budget and autoscaler of the serving color (a leftover autoscaler is
    /// deleted when the spec has none).
    async fn scaling(&self, color: Color) -> Result<(), StepError> {
        let client = &self.ctx.client;
        apply(client, MANAGER, &build::build_gateway_disruption_budget(self.release, color)).await?;
        if let Some(hpa) = build::build_gateway_autoscaler(self.release, color) {
            apply(client, MANAGER, &hpa).await?;
        } else {
            let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
                Api::namespaced(client.clone(), &self.namespace);
            let name = names::gateway_policy(&self.name);
            hpas.delete(&name, &DeleteParams::background()).await.map(|_| ()).or_else(not_found)?;
        }
        Ok(())
    }

    /// Applies the migration Jobs of the spec's version and returns the shards still
    /// migrating; a failed Job refuses the rollout with its name.
    async fn migrate(&self) -> Result<Vec<String>, StepError> {
        let mut pending = Vec::new();
        for (shard, job) in &self.objects.migrations {
            let job = apply(&self.ctx.client, MANAGER, job).await?;
            let status = job.status.unwrap_or_default();
            if status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Failed" && c.status == "True") {
                return Err(Refused::new(
                    reasons::MIGRATION_FAILED,
                    format!(
                        "the schema migration of shard {shard} failed: see `kubectl logs job/{0}`; it runs again as a \
                         new Job once the shard's URL or the workers' image changes (or `kubectl delete job {0}`)",
                        job.metadata.name.unwrap_or_default()
                    ),
                )
                .into());
            }
            if status.succeeded.unwrap_or(0) < 1 {
                pending.push(shard.clone());
            }
        }
        Ok(pending)
    }

    /// Scales both Deployments of `color` to zero (they stay, for the next rollout).
    async fn scale_to_zero(&self, color: Color) -> Result<(), StepError> {
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = PatchParams { field_manager: Some(MANAGER.to_owned()), ..PatchParams::default() };
        let zero = Patch::Merge(json!({"spec": {"replicas": 0}}));
        for name in [names::gateway(&self.name, color), names::workers(&self.name, color)] {
            deployments.patch(&name, &params, &zero).await.map(|_| ()).or_else(not_found)?;
        }
        Ok(())
    }

    /// The gateway pods of `color` that have an IP and are not being deleted: name and IP.
    async fn gateway_pods(&self, color: Color) -> Result<Vec<(String, String)>, StepError> {
        let labels = selector_labels(&self.name, "gateway", Some(color));
        let pods = diagnose::pods_with(self.ctx, &self.namespace, &labels).await?;
        Ok(pods.into_iter().filter_map(|p| Some((p.name_any(), p.status?.pod_ip?))).collect())
    }

    /// `Ok` when the active Service's EndpointSlices list at least one ready endpoint and
    /// every ready endpoint is a pod of `color`; otherwise what is still missing.
    async fn endpoints_on(&self, color: Color) -> Result<Result<(), String>, StepError> {
        let ours: std::collections::BTreeSet<String> =
            self.gateway_pods(color).await?.into_iter().map(|(_, ip)| ip).collect();
        let slices: Api<EndpointSlice> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let service = names::active_service(&self.name);
        let selector = format!("{}={service}", labels::SERVICE_NAME);
        let slices = slices.list(&ListParams::default().labels(&selector)).await?;
        let ready: Vec<String> = slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        let others = ready.iter().filter(|ip| !ours.contains(*ip)).count();
        Ok(if ready.is_empty() {
            Err(format!("Service {service} lists no ready endpoint yet"))
        } else if others > 0 {
            Err(format!("Service {service} still lists {others} endpoints of the other color"))
        } else {
            Ok(())
        })
    }

    /// Requests and 5xx answers the gateway pods of `color` served so far (their own
    /// `/metrics`; probes and scrapes left out). A pod that does not answer counts nothing.
    async fn request_counts(&self, color: Color) -> RequestCounts {
        let pods = match self.gateway_pods(color).await {
            Ok(pods) => pods,
            Err(e) => {
                tracing::debug!(error = %e, "listing the gateway pods for their metrics");
                return RequestCounts::default();
            }
        };
        let mut total = RequestCounts::default();
        for (name, ip) in pods {
            let url = format!("http://{ip}:{GATEWAY_PORT}/metrics");
            let answer = self.ctx.http.get(&url).timeout(Duration::from_secs(2)).send().await;
            let text = match answer {
                Ok(response) if response.status().is_success() => response.text().await.unwrap_or_default(),
                Ok(response) => {
                    tracing::debug!(pod = %name, status = %response.status(), "reading a gateway's metrics");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(pod = %name, error = %e, "reading a gateway's metrics");
                    continue;
                }
            };
            let counts = request_counts(&text);
            total.requests += counts.requests;
            total.errors += counts.errors;
        }
        total
    }
}

fn active_version(rollout: &Rollout) -> String {
    rollout.active_version.clone().unwrap_or_default()
}

/// Whether a Deployment runs its current template on every replica it wants, and how many
/// it wants.
pub fn rolled_out(deployment: &Deployment) -> (bool, i32) {
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = deployment.status.as_ref() else { return (false, wanted) };
    let current = status.observed_generation >= deployment.metadata.generation;
    let updated = status.updated_replicas.unwrap_or(0) >= wanted;
    let ready = status.ready_replicas.unwrap_or(0) >= wanted;
    let no_old = status.replicas.unwrap_or(0) <= wanted;
    (current && updated && ready && no_old, wanted)
}

/// Requests and 5xx answers in a gateway's `/metrics` text (`vellum_gateway_http_requests`,
/// without the health, readiness and metrics routes).
pub fn request_counts(text: &str) -> RequestCounts {
    let mut counts = RequestCounts::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vellum_gateway_http_requests_total{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        if ["/healthz", "/readyz", "/metrics"].iter().any(|r| labels.contains(&format!("route=\"{r}\""))) {
            continue;
        }
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        counts.requests += value;
        if labels.contains("status=\"5") {
            counts.errors += value;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_rate_counts_api_requests_and_their_5xx_only() {
        let text = "# HELP vellum_gateway_http_requests HTTP requests\n\
            vellum_gateway_http_requests_total{method=\"GET\",route=\"/api/v1/documents\",status=\"200\"} 90\n\
            vellum_gateway_http_requests_total{method=\"POST\",route=\"/api/v1/documents\",status=\"503\"} 7\n\
            vellum_gateway_http_requests_total{method=\"GET\",route=\"/api/v1/documents/{id}\",status=\"500\"} 3\n\
            vellum_gateway_http_requests_total{method=\"GET\",route=\"/readyz\",status=\"503\"} 40\n\
            vellum_gateway_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"200\"} 4\n\
            vellum_gateway_http_request_duration_seconds_count{route=\"/api/v1/documents\"} 100\n";
        assert_eq!(request_counts(text), RequestCounts { requests: 100, errors: 10 });
    }

    #[test]
    fn a_deployment_is_rolled_out_when_every_wanted_replica_runs_the_current_template_and_is_ready() {
        let d = |generation: i64, observed: i64, replicas: i32, updated: i32, ready: i32| -> Deployment {
            serde_json::from_value(json!({
                "metadata": {"generation": generation},
                "spec": {"replicas": 2, "selector": {}, "template": {}},
                "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated, "readyReplicas": ready}
            }))
            .unwrap()
        };
        assert_eq!(rolled_out(&d(3, 3, 2, 2, 2)), (true, 2));
        assert!(!rolled_out(&d(3, 2, 2, 2, 2)).0, "the controller has not seen the new template yet");
        assert!(!rolled_out(&d(3, 3, 3, 2, 2)).0, "an old pod is still there");
        assert!(!rolled_out(&d(3, 3, 2, 2, 1)).0, "one replica is not ready");
    }

    fn record(outcome: ReleaseOutcome, template: &str) -> ReleaseRecord {
        ReleaseRecord {
            version: "2".into(),
            color: Color::Green,
            outcome,
            reason: None,
            time: None,
            message: None,
            template: Some(template.into()),
            duration_seconds: None,
            analysis_seconds: None,
        }
    }

    #[test]
    fn a_failed_or_aborted_template_is_not_rolled_out_again_by_itself() {
        let mut r = Rollout::default();
        assert!(!r.abandoned("t2"));
        r.history = vec![record(ReleaseOutcome::Failed, "t2")];
        assert!(r.abandoned("t2"));
        assert!(!r.abandoned("t3"), "a changed spec is a new rollout");
        r.history = vec![record(ReleaseOutcome::Promoted, "t2")];
        assert!(!r.abandoned("t2"));
    }

    #[test]
    fn ending_a_rollout_records_it_first_and_clears_the_preview() {
        let start = Timestamp::from_second(1_000).unwrap();
        let mut r = Rollout {
            preview_color: Some(Color::Green),
            preview_version: Some("2".into()),
            preview_template: Some("t2".into()),
            rollout_since: Some(Time(start)),
            analysis_since: Some(Time(Timestamp::from_second(1_060).unwrap())),
            history: vec![record(ReleaseOutcome::Promoted, "t1")],
            ..Rollout::default()
        };
        r.end(ReleaseOutcome::RolledBack, "AnalysisFailed", "errors", Timestamp::from_second(1_090).unwrap());
        assert_eq!((r.preview_color, r.preview_template.as_deref()), (None, None));
        assert_eq!(r.history.len(), 2);
        let last = &r.history[0];
        assert_eq!(
            (last.outcome, last.template.as_deref(), last.duration_seconds, last.analysis_seconds),
            (ReleaseOutcome::RolledBack, Some("t2"), Some(90), Some(30))
        );
    }
}
