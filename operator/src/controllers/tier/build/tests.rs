use super::*;
use crate::controllers::golden::assert_golden;

#[test]
fn a_tier_being_deleted_is_drained_by_this_job() {
    let mut tier: StorageTier = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: cold, namespace: docs-ns}\nspec: {class: COLD, backend: {url: 's3://archive'}}\n",
    )
    .unwrap();
    tier.metadata.uid = Some("t1".into());
    let release: BlueGreenRelease = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: docs-ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: 'vellum/gateway:1.0.0'}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap();
    assert_golden("tier-drain-job", &build_drain_job(&tier, &release, &ReleaseFacts::default(), "hot"));
    assert!(drain_job_name(&"t".repeat(80)).len() <= 63);
}

#[test]
fn a_tier_with_a_scrub_schedule_is_scrubbed_by_this_cron_job() {
    let mut tier: StorageTier = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: cold, namespace: docs-ns}\nspec: {class: COLD, backend: {url: 's3://archive'}, scrub: {schedule: '@weekly'}}\n",
    )
    .unwrap();
    tier.metadata.uid = Some("t1".into());
    let release: BlueGreenRelease = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: docs-ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: 'vellum/gateway:1.0.0'}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap();
    let cron = build_scrub_cron_job(&tier, &release, &ReleaseFacts::default()).unwrap();
    assert_golden("tier-scrub-cron-job", &cron);
    tier.spec.scrub = None;
    assert_eq!(build_scrub_cron_job(&tier, &release, &ReleaseFacts::default()), None, "not scrubbed");
    assert!(scrub_cron_job_name(&"t".repeat(80)).len() <= 52);
}
