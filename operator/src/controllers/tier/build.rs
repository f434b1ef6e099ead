//! The Job that empties a StorageTier being deleted, as a pure function of the tier, the
//! release whose workers run it, and the tier its blobs move to; and the CronJob that
//! scrubs a tier on its schedule.

use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::ResourceExt;
use vellum_crds::{BlueGreenRelease, StorageTier};

use crate::controllers::platform::{ReleaseFacts, cron_job, owned_meta, release_labels, workers_job};

/// The label naming the tier a drain Job (and its pods) empties.
pub const TIER_LABEL: &str = "vellum.dev/storage-tier";

/// The drain Job of a tier: `<tier>-drain`, within the 63 characters of a label value.
pub fn drain_job_name(tier: &str) -> String {
    let base: String = format!("{tier}-drain").chars().take(63).collect();
    base.trim_end_matches('-').to_owned()
}

/// `vellum-workers drain --tier <tier> --to <to>` with the release's workers image and the
/// platform config, owned by the tier (so it goes with it).
pub fn build_drain_job(tier: &StorageTier, release: &BlueGreenRelease, facts: &ReleaseFacts, to: &str) -> Job {
    let name = tier.name_any();
    let mut labels = release_labels(&release.name_any(), "drain", None);
    labels.insert(TIER_LABEL.to_owned(), name.clone());
    let job = workers_job(release, facts, ("drain", &["drain", "--tier", &name, "--to", to]), &labels, 3);
    Job { metadata: owned_meta(tier, drain_job_name(&name), labels), spec: Some(job), status: None }
}

/// The scrub CronJob of a tier: `<tier>-scrub`, leaving room for the Jobs' suffixes.
pub fn scrub_cron_job_name(tier: &str) -> String {
    let base: String = format!("{tier}-scrub").chars().take(52).collect();
    base.trim_end_matches('-').to_owned()
}

/// `vellum-workers scrub --tier <tier>` on the tier's `scrub.schedule`, with the release's
/// workers image and the platform config, owned by the tier (so it goes with it). `None`
/// when the tier is not scrubbed.
pub fn build_scrub_cron_job(tier: &StorageTier, release: &BlueGreenRelease, facts: &ReleaseFacts) -> Option<CronJob> {
    let scrub = tier.spec.scrub.as_ref()?;
    let name = tier.name_any();
    let mut labels = release_labels(&release.name_any(), "scrub", None);
    labels.insert(TIER_LABEL.to_owned(), name.clone());
    let job = workers_job(release, facts, ("scrub", &["scrub", "--tier", &name]), &labels, 2);
    Some(cron_job(owned_meta(tier, scrub_cron_job_name(&name), labels), &scrub.schedule, scrub.suspend, job))
}

#[cfg(test)]
mod tests;
