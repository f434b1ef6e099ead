//! The exact requests a StorageTier reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};

fn tier(backend: &str) -> StorageTier {
    let mut tier: StorageTier = serde_yaml::from_str(&format!(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: hot, namespace: ns, generation: 3, finalizers: [vellum.dev/tier-drain]}}\nspec: {{class: HOT, default: true, backend: {backend}}}\n"
    ))
    .unwrap();
    tier.metadata.uid = Some("t1".into());
    tier
}

async fn reconciled(tier: StorageTier, world: World) -> (Arc<Mutex<Server>>, Action) {
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<StorageTier>("ns", "hot"), serde_json::to_value(&tier).unwrap());
    let ctx = context(&world, Arc::clone(&server));
    let action = reconcile(Arc::new(tier), ctx).await.unwrap();
    (server, action)
}

const STATUS: &str = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/storagetiers/hot/status?&force=true&fieldManager=vellum.dev%2Fstoragetier";
const EVENT: &str = "POST /apis/events.k8s.io/v1/namespaces/ns/events?";

#[tokio::test]
async fn a_local_tier_writes_its_status_under_its_field_manager_and_one_event() {
    let t = tier("{url: 'memory://'}");
    let (server, action) = reconciled(t.clone(), World { tiers: vec![t], ..World::default() }).await;
    assert_eq!(lines(&server), [STATUS, EVENT]);
    let status = &body_of(&server, STATUS)["status"];
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["reason"], reasons::RECONCILED);
    assert_eq!(status["conditions"][0]["observedGeneration"], 3);
    assert_eq!(status["observedGeneration"], 3);
    let event = body_of(&server, EVENT);
    assert_eq!((event["reason"].as_str(), event["type"].as_str()), (Some(reasons::RECONCILED), Some("Normal")));
    assert_eq!(event["regarding"]["name"], "hot");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
}

#[tokio::test]
async fn a_second_default_tier_is_refused_in_status_and_a_warning_without_a_probe() {
    let t = tier("{url: 'memory://'}");
    let mut other = tier("{url: 'memory://'}");
    other.metadata.name = Some("warm".into());
    let (server, action) = reconciled(t.clone(), World { tiers: vec![t, other], ..World::default() }).await;
    assert_eq!(lines(&server), [STATUS, EVENT]);
    let condition = &body_of(&server, STATUS)["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(reasons::INVALID_SPEC))
    );
    let event = body_of(&server, EVENT);
    assert_eq!((event["reason"].as_str(), event["type"].as_str()), (Some(reasons::INVALID_SPEC), Some("Warning")));
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(60)));
}

#[tokio::test]
async fn an_unchanged_verdict_writes_status_again_without_an_event() {
    let t = tier("{url: 'memory://'}");
    let (server, _) = reconciled(t.clone(), World { tiers: vec![t.clone()], ..World::default() }).await;
    let written: StorageTierStatus = serde_json::from_value(body_of(&server, STATUS)["status"].clone()).unwrap();
    let mut again = t;
    again.status = Some(written);
    let (server, _) = reconciled(again.clone(), World { tiers: vec![again], ..World::default() }).await;
    assert_eq!(lines(&server), [STATUS]);
}

#[tokio::test]
async fn a_tier_first_gets_the_drain_finalizer_and_nothing_else() {
    let mut t = tier("{url: 'memory://'}");
    t.metadata.finalizers = None;
    let (server, action) = reconciled(t.clone(), World { tiers: vec![t], ..World::default() }).await;
    let line = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/storagetiers/hot?";
    assert_eq!(lines(&server), [line]);
    let patch = body_of(&server, line);
    assert_eq!(
        patch,
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["vellum.dev/tier-drain"]},
        ])
    );
    assert_eq!(action, Action::await_change(), "the patch itself wakes the next reconcile");
}

#[tokio::test]
async fn a_tier_deleted_while_no_release_runs_the_platform_is_released_at_once() {
    let mut t = tier("{url: 'memory://'}");
    t.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let (server, _) = reconciled(t.clone(), World { tiers: vec![t], ..World::default() }).await;
    let line = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/storagetiers/hot?";
    assert_eq!(lines(&server), [line], "only the finalizer's removal");
    let patch = body_of(&server, line);
    assert_eq!(patch[1]["op"], "remove", "{patch}");
}

#[tokio::test]
async fn a_tier_beside_the_default_is_ready() {
    let mut t = tier("{url: 'memory://'}");
    t.spec.default = false;
    let default = tier("{url: 'memory://'}");
    let mut world = World { tiers: vec![default], ..World::default() };
    world.tiers[0].metadata.name = Some("warm".into());
    world.tiers.push(t.clone());
    let (server, _) = reconciled(t, world).await;
    assert_eq!(body_of(&server, STATUS)["status"]["conditions"][0]["status"], "True");
}

fn release() -> vellum_crds::BlueGreenRelease {
    let mut release: vellum_crds::BlueGreenRelease = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: g}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap();
    release.metadata.uid = Some("r1".into());
    release
}

const SCRUB: &str = "/apis/batch/v1/namespaces/ns/cronjobs/hot-scrub";

#[tokio::test]
async fn a_scrubbed_tier_gets_its_cron_job_and_names_it_and_loses_it_when_the_schedule_goes() {
    let mut t = tier("{url: 'memory://'}");
    t.spec.scrub = Some(vellum_crds::storage_tier::Scrub { schedule: "@weekly".into(), suspend: false });
    let world = World { tiers: vec![t.clone()], releases: vec![release()], ..World::default() };
    let (server, _) = reconciled(t.clone(), world).await;
    let apply = format!("PATCH {SCRUB}?&force=true&fieldManager=vellum.dev%2Fstoragetier");
    assert_eq!(lines(&server), [apply.as_str(), STATUS, EVENT]);
    let expected = build::build_scrub_cron_job(&t, &release(), &ReleaseFacts::default()).unwrap();
    assert_eq!(body_of(&server, &apply), serde_json::to_value(expected).unwrap(), "the built CronJob, whole");
    assert_eq!(body_of(&server, STATUS)["status"]["scrubCronJob"], "hot-scrub");

    // The schedule removed: the CronJob the status names goes, and so does the name.
    t.spec.scrub = None;
    t.status = Some(StorageTierStatus { scrub_cron_job: Some("hot-scrub".into()), ..StorageTierStatus::default() });
    let world = World { tiers: vec![t.clone()], releases: vec![release()], ..World::default() };
    let (server, _) = reconciled(t, world).await;
    assert_eq!(lines(&server)[0], format!("DELETE {SCRUB}?"));
    assert_eq!(body_of(&server, STATUS)["status"].get("scrubCronJob"), None);
}
