//! The exact requests a ShardSet reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};

#[tokio::test]
async fn a_shard_whose_secret_is_missing_is_reported_without_touching_any_database() {
    let mut set: ShardSet = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: meta, namespace: ns, generation: 1}\nspec: {shards: [{name: a, urlSecretRef: {name: db, key: a}}]}\n",
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
