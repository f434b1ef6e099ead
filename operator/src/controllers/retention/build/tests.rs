use super::*;
use crate::controllers::golden::assert_golden;

#[test]
fn a_policy_runs_as_this_cron_job_with_the_release_workers() {
    let policy: RetentionPolicy = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: RetentionPolicy\nmetadata: {name: tmp, namespace: docs-ns, uid: p1}\nspec: {schedule: '@daily', suspend: true, expiration: {afterDays: 3, action: DELETE}}\n",
    )
    .unwrap();
    let mut release: BlueGreenRelease = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: docs-ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: 'vellum/gateway:1.0.0'}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap();
    release.metadata.uid = Some("r1".into());
    assert_golden("retention-cron-job", &build_cron_job(&policy, &release, &ReleaseFacts::default()));
    let with_credentials = ReleaseFacts { nats_credentials: true, ..ReleaseFacts::default() };
    assert_golden("retention-cron-job-nats-credentials", &build_cron_job(&policy, &release, &with_credentials));
}
