//! The CronJob that runs a retention policy, as a pure function of the policy and the
//! release whose workers run it.

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use vellum_crds::{BlueGreenRelease, RetentionPolicy};

use crate::controllers::platform::{
    ReleaseFacts, common_env, config_mounts, config_volumes, names, owned_meta, release_labels,
};

/// The label naming the policy a retention CronJob (and its Jobs and pods) runs.
pub const POLICY_LABEL: &str = "vellum.dev/retention-policy";

/// The CronJob running one retention policy with the workers of the release's active color.
pub fn build_cron_job(policy: &RetentionPolicy, release: &BlueGreenRelease, facts: &ReleaseFacts) -> CronJob {
    let name = policy.name_any();
    let release_name = release.name_any();
    let mut labels = release_labels(&release_name, "retention", None);
    labels.insert(POLICY_LABEL.to_owned(), name.clone());
    let container = Container {
        name: "retention".to_owned(),
        image: Some(release.spec.workers.image.clone()),
        args: Some(vec!["retention".to_owned(), "--policy".to_owned(), name.clone()]),
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
                containers: vec![container],
                volumes: Some(config_volumes(&release_name)),
                ..PodSpec::default()
            }),
        },
        ..JobSpec::default()
    };
    CronJob {
        metadata: owned_meta(policy, names::retention(&name), labels),
        spec: Some(CronJobSpec {
            schedule: policy.spec.schedule.clone(),
            suspend: Some(policy.spec.suspend),
            concurrency_policy: Some("Forbid".to_owned()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec { metadata: None, spec: Some(job) },
            ..CronJobSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
