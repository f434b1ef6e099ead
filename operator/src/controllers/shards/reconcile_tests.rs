//! The exact requests a ShardSet reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};

#[tokio::test]
async fn a_shard_whose_secret_is_missing_is_reported_without_touching_any_database() {
    let mut set: ShardSet = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: meta, namespace: ns, generation: 1, finalizers: [vellum.dev/shard-routing]}\nspec: {shards: [{name: a, urlSecretRef: {name: db, key: a}}]}\n",
    )
    .unwrap();
    set.metadata.uid = Some("s1".into());
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<ShardSet>("ns", "meta"), serde_json::to_value(&set).unwrap());
    let world = World { shard_sets: vec![set.clone()], ..World::default() };
    let ctx = context(&world, Arc::clone(&server));
    let action = reconcile(Arc::new(set), Arc::clone(&ctx)).await.unwrap();
    let status_line = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/shardsets/meta/status?&force=true&fieldManager=vellum.dev%2Fshardset";
    let event_line = "POST /apis/events.k8s.io/v1/namespaces/ns/events?";
    assert_eq!(lines(&server), [status_line, event_line]);
    let status: ShardSetStatus = serde_json::from_value(body_of(&server, status_line)["status"].clone()).unwrap();
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reasons::SECRET_NOT_FOUND));
    assert_eq!(status.shards[0].name, "a");
    assert!(!status.shards[0].ready);
    assert_eq!((status.routing_version, status.ready_shards), (Some(1), Some(0)));
    assert_eq!(body_of(&server, event_line)["reason"], reasons::SECRET_NOT_FOUND);
    assert_eq!(action, Action::requeue(ctx.resync / 4));
}

fn shard_set() -> ShardSet {
    let mut set: ShardSet = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: meta, namespace: ns, generation: 1, finalizers: [vellum.dev/shard-routing]}\nspec: {shards: [{name: a, urlSecretRef: {name: db, key: a}}]}\n",
    )
    .unwrap();
    set.metadata.uid = Some("s1".into());
    set
}

fn routing_release() -> BlueGreenRelease {
    serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: ns, uid: r1}\nspec: {version: 1.0.0, gateway: {image: g}, workers: {image: w}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: k}}}\n",
    )
    .unwrap()
}

async fn reconciled(set: ShardSet, world: &World) -> (Arc<Mutex<Server>>, Result<Action>) {
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<ShardSet>("ns", "meta"), serde_json::to_value(&set).unwrap());
    let result = reconcile(Arc::new(set), context(world, Arc::clone(&server))).await;
    (server, result)
}

const OBJECT: &str = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/shardsets/meta?";

fn deleted(mut set: ShardSet) -> ShardSet {
    set.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    set
}

#[tokio::test]
async fn a_shard_set_first_gets_the_routing_finalizer_and_nothing_else() {
    let mut set = shard_set();
    set.metadata.finalizers = None;
    let (server, action) = reconciled(set.clone(), &World { shard_sets: vec![set], ..World::default() }).await;
    assert_eq!(lines(&server), [OBJECT], "no database is probed before the finalizer is on");
    assert_eq!(
        body_of(&server, OBJECT),
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["vellum.dev/shard-routing"]},
        ])
    );
    assert_eq!(action.unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_shard_set_a_release_routes_by_stays_until_the_release_goes() {
    let set = deleted(shard_set());
    let world = World { shard_sets: vec![set.clone()], releases: vec![routing_release()], ..World::default() };
    let (server, result) = reconciled(set.clone(), &world).await;
    let status_line = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/shardsets/meta/status?&force=true&fieldManager=vellum.dev%2Fshardset";
    assert!(!lines(&server).iter().any(|l| l == OBJECT), "the finalizer stays: {:?}", lines(&server));
    let status: ShardSetStatus = serde_json::from_value(body_of(&server, status_line)["status"].clone()).unwrap();
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reasons::ROUTING_IN_USE));
    assert!(ready.message.contains("BlueGreenRelease docs"), "{}", ready.message);
    assert!(matches!(result, Err(crate::context::Error::Waiting(_))), "{result:?}");

    // The release being deleted too (its namespace going): the ShardSet goes.
    let mut going = routing_release();
    going.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let world = World { shard_sets: vec![set.clone()], releases: vec![going], ..World::default() };
    let (server, result) = reconciled(set, &world).await;
    assert_eq!(lines(&server), [OBJECT], "only the finalizer's removal");
    assert_eq!(body_of(&server, OBJECT)[1]["op"], "remove");
    assert_eq!(result.unwrap(), Action::await_change());
}
