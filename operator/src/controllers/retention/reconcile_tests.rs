//! The exact requests a RetentionPolicy reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};
use vellum_crds::StorageTier;

fn policy(spec: &str) -> RetentionPolicy {
    let mut p: RetentionPolicy = serde_yaml::from_str(&format!(
        "apiVersion: vellum.dev/v1alpha1\nkind: RetentionPolicy\nmetadata: {{name: tmp, namespace: ns, generation: 1}}\nspec: {spec}\n"
    ))
    .unwrap();
    p.metadata.uid = Some("p1".into());
    p
}

fn world(with_release: bool) -> World {
    let tier: StorageTier = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot, namespace: ns}\nspec: {class: HOT, default: true, backend: {url: 'memory://'}}\n",
    )
    .unwrap();
    let mut release: BlueGreenRelease = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: g}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap();
    release.metadata.uid = Some("r1".into());
    World { tiers: vec![tier], releases: if with_release { vec![release] } else { Vec::new() }, ..World::default() }
}

async fn reconciled(p: RetentionPolicy, world: &World) -> Arc<Mutex<Server>> {
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<RetentionPolicy>("ns", "tmp"), serde_json::to_value(&p).unwrap());
    let action = reconcile(Arc::new(p), context(world, Arc::clone(&server))).await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    server
}

const CRON_JOB: &str = "/apis/batch/v1/namespaces/ns/cronjobs/tmp-retention";
const STATUS: &str = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/retentionpolicies/tmp/status?&force=true&fieldManager=vellum.dev%2Fretentionpolicy";
const EVENT: &str = "POST /apis/events.k8s.io/v1/namespaces/ns/events?";

#[tokio::test]
async fn a_valid_policy_is_applied_as_its_cron_job_then_its_status_under_one_field_manager() {
    let p = policy("{schedule: '@daily', expiration: {afterDays: 3, action: DELETE}}");
    let server = reconciled(p.clone(), &world(true)).await;
    let apply = format!("PATCH {CRON_JOB}?&force=true&fieldManager=vellum.dev%2Fretentionpolicy");
    assert_eq!(lines(&server), [apply.as_str(), STATUS, EVENT]);
    let release = &world(true).releases[0];
    let expected = build::build_cron_job(&p, release, &ReleaseFacts::default());
    assert_eq!(body_of(&server, &apply), serde_json::to_value(expected).unwrap(), "the built CronJob, whole");
    assert_eq!(body_of(&server, STATUS)["status"]["conditions"][0]["reason"], reasons::RECONCILED);
    assert_eq!(body_of(&server, EVENT)["reason"], reasons::RECONCILED);
}

#[tokio::test]
async fn an_invalid_policy_loses_its_cron_job_and_says_why() {
    let p = policy("{schedule: '@daily', transitions: [{afterDays: 1, toTier: nowhere}]}");
    let server = reconciled(p, &world(true)).await;
    assert_eq!(lines(&server), [format!("DELETE {CRON_JOB}?").as_str(), STATUS, EVENT]);
    let condition = &body_of(&server, STATUS)["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(reasons::TIER_NOT_FOUND))
    );
    assert_eq!(body_of(&server, EVENT)["type"], "Warning");
}

#[tokio::test]
async fn a_valid_policy_without_a_release_waits_and_schedules_nothing() {
    let p = policy("{schedule: '@daily', expiration: {afterDays: 3, action: DELETE}}");
    let server = reconciled(p, &world(false)).await;
    assert_eq!(lines(&server), [STATUS, EVENT]);
    assert_eq!(body_of(&server, STATUS)["status"]["conditions"][0]["reason"], reasons::WAITING_FOR_RELEASE);
}
