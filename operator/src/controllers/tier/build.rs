//! The Job that empties a StorageTier being deleted, as a pure function of the tier, the
//! release whose workers run it, and the tier its blobs move to; and the CronJob that
//! scrubs a tier on its schedule.

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use vellum_crds::{BlueGreenRelease, StorageTier};

use crate::controllers::platform::{
    ReleaseFacts, common_env, config_mounts, config_volumes, owned_meta, release_labels,
};

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
    let release_name = release.name_any();
    let mut labels = release_labels(&release_name, "drain", None);
    labels.insert(TIER_LABEL.to_owned(), name.clone());
    let container = Container {
        name: "drain".to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(["drain", "--tier", name.as_str(), "--to", to].map(str::to_owned).to_vec()),
        env: Some(common_env(release, facts)),
        volume_mounts: Some(config_mounts()),
        ..Container::default()
    };
    Job {
        metadata: owned_meta(tier, drain_job_name(&name), labels.clone()),
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    // The workers never call the Kubernetes API.
                    automount_service_account_token: Some(false),
                    containers: vec![container],
                    volumes: Some(config_volumes(&release_name)),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
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
    let release_name = release.name_any();
    let mut labels = release_labels(&release_name, "scrub", None);
    labels.insert(TIER_LABEL.to_owned(), name.clone());
    let container = Container {
        name: "scrub".to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(["scrub", "--tier", name.as_str()].map(str::to_owned).to_vec()),
        env: Some(common_env(release, facts)),
        volume_mounts: Some(config_mounts()),
        ..Container::default()
    };
    let job = JobSpec {
        backoff_limit: Some(2),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..ObjectMeta::default() }),
            spec: Some(PodSpec {
                restart_policy: Some("Never".to_owned()),
                automount_service_account_token: Some(false),
                containers: vec![container],
                volumes: Some(config_volumes(&release_name)),
                ..PodSpec::default()
            }),
        },
        ..JobSpec::default()
    };
    Some(CronJob {
        metadata: owned_meta(tier, scrub_cron_job_name(&name), labels),
        spec: Some(CronJobSpec {
            schedule: scrub.schedule.clone(),
            suspend: Some(scrub.suspend),
            concurrency_policy: Some("Forbid".to_owned()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec { metadata: None, spec: Some(job) },
            ..CronJobSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests;
