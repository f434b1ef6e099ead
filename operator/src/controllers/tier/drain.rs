//! A StorageTier being deleted keeps its `vellum.dev/tier-drain` finalizer while the
//! platform's shards hold blobs in it: a Job of the release's workers moves them to the
//! default tier (`vellum-workers drain`), and only then does the tier go. A drain that
//! cannot proceed says why in the `Ready` condition and an Event.

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use vellum_core::documents::UsageCounts;
use vellum_crds::conditions::reasons;
use vellum_crds::{BlueGreenRelease, StorageTier};

use super::{MANAGER, Verdict, status};
use crate::context::{Context, Error, Refused, Result, apply, apply_status, ready_event};
use crate::controllers::platform::ReleaseFacts;
use crate::controllers::shared::not_found;
use crate::controllers::tier::build::{build_drain_job, drain_job_name};

/// What the platform's shards hold in a tier: blobs and bytes.
async fn held(ctx: &Context, namespace: &str, tier: &str) -> Result<(UsageCounts, i64, i64), String> {
    let total = ctx.shard_usage(namespace).await?.unwrap_or_default();
    let (objects, bytes, _) = total.tiers.get(tier).copied().unwrap_or_default();
    Ok((total, objects, bytes))
}

/// The release that runs the platform, unless it is itself going away.
fn running_release(ctx: &Context, namespace: &str) -> Option<BlueGreenRelease> {
    ctx.caches.release_of(namespace).filter(|r| r.metadata.deletion_timestamp.is_none())
}

/// The tier the blobs move to: the namespace's default, when it is not this one and is not
/// being deleted.
fn destination(ctx: &Context, tier: &StorageTier) -> Option<String> {
    let name = tier.name_any();
    ctx.caches
        .tiers_in(&tier.namespace().unwrap_or_default())
        .into_iter()
        .find(|t| t.spec.default && t.name_any() != name && t.metadata.deletion_timestamp.is_none())
        .map(|t| t.name_any())
}

/// Cleans up a tier being deleted: `Ok` once it holds nothing (the finalizer helper then
/// removes the finalizer), [`Error::Waiting`] with the reason while it does.
pub async fn cleanup(tier: &StorageTier, ctx: &Context) -> Result<Action> {
    let namespace = tier.namespace().unwrap_or_default();
    let name = tier.name_any();
    // A platform without a release (or whose release is going too, as when its namespace
    // is deleted) keeps nothing running that reads the tier.
    let Some(release) = running_release(ctx, &namespace) else { return Ok(Action::await_change()) };
    let (usage, objects, bytes) = match held(ctx, &namespace, &name).await {
        Ok(found) => found,
        Err(e) => {
            let why = format!("what the tier holds cannot be read from the platform's shards: {e}");
            return waiting(tier, ctx, None, Refused::new(reasons::DRAIN_BLOCKED, why)).await;
        }
    };
    if objects == 0 {
        tracing::info!(tier = %name, "the tier holds no blobs; releasing it");
        return Ok(Action::await_change());
    }
    let Some(to) = destination(ctx, tier) else {
        let why = format!(
            "it holds {objects} blobs ({bytes} bytes) and there is no other default tier to move them to: make another StorageTier the default and they move there"
        );
        return waiting(tier, ctx, Some(&usage), Refused::new(reasons::DRAIN_BLOCKED, why)).await;
    };
    let job = apply(&ctx.client, MANAGER, &build_drain_job(tier, &release, &ReleaseFacts::of(&release), &to)).await?;
    let job_status = job.status.unwrap_or_default();
    let job_name = drain_job_name(&name);
    let failed = job_status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Failed" && c.status == "True");
    let refused = if failed {
        Refused::new(
            reasons::DRAIN_FAILED,
            format!(
                "moving {objects} blobs to tier {to} failed: see `kubectl logs job/{job_name}`; delete the Job to try again"
            ),
        )
    } else {
        if job_status.succeeded.unwrap_or(0) > 0 {
            // Blobs arrived after the run (a document moved back, an upload in flight): run again.
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            jobs.delete(&job_name, &DeleteParams::background()).await.map(|_| ()).or_else(not_found)?;
        }
        Refused::new(
            reasons::DRAINING,
            format!("moving {objects} blobs ({bytes} bytes) to tier {to} before the tier goes"),
        )
    };
    waiting(tier, ctx, Some(&usage), refused).await
}

/// Says in status and an Event why the tier stays, and keeps its finalizer.
async fn waiting(tier: &StorageTier, ctx: &Context, usage: Option<&UsageCounts>, why: Refused) -> Result<Action> {
    let previous = tier.status.clone().unwrap_or_default();
    let verdict =
        Verdict { ready: false, reason: why.reason, message: why.message.clone(), reachable: previous.reachable };
    let next = status(tier, &verdict, usage);
    apply_status(&ctx.client, MANAGER, tier, &next).await?;
    if let Some((warning, reason, note)) = ready_event(&previous.conditions, &next.conditions) {
        ctx.event(tier, warning && why.reason != reasons::DRAINING, &reason, note).await;
    }
    Err(Error::Waiting(why))
}
