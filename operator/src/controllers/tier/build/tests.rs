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
