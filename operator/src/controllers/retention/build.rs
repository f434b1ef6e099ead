//! The CronJob that runs a retention policy, as a pure function of the policy and the
//! release whose workers run it.

use k8s_openapi::api::batch::v1::CronJob;
use kube::ResourceExt;
use vellum_crds::{BlueGreenRelease, RetentionPolicy};

use crate::controllers::platform::{ReleaseFacts, cron_job, names, owned_meta, release_labels, workers_job};

/// The label naming the policy a retention CronJob (and its Jobs and pods) runs.
pub const POLICY_LABEL: &str = "vellum.dev/retention-policy";

/// The CronJob running one retention policy with the workers of the release's active color.
pub fn build_cron_job(policy: &RetentionPolicy, release: &BlueGreenRelease, facts: &ReleaseFacts) -> CronJob {
    let name = policy.name_any();
    let mut labels = release_labels(&release.name_any(), "retention", None);
    labels.insert(POLICY_LABEL.to_owned(), name.clone());
    let job = workers_job(release, facts, ("retention", &["retention", "--policy", &name]), &labels, 2);
    cron_job(owned_meta(policy, names::retention(&name), labels), &policy.spec.schedule, policy.spec.suspend, job)
}

#[cfg(test)]
mod tests;
