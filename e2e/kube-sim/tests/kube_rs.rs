//! kube-rs against the simulator: typed CRUD, optimistic concurrency, server-side apply, a
//! conflicts between field managers, a `watcher` that sees every change (and resumes after its watch is cut), and a
//! `Controller` reconciling a custom resource served from a CRD.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Config};
use kube_sim::{Options, Simulator};
use serde_json::json;

async fn client(sim: &Simulator) -> Client {
    let kubeconfig = Kubeconfig::read_from(sim.kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "data": {"value": value}
    }))
    .unwrap()
}

#[tokio::test]
async fn typed_clients_create_update_conflict_patch_apply_and_delete() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    let client = client(&sim).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms.create(&PostParams::default(), &config_map("one", "1")).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let err = cms.create(&PostParams::default(), &config_map("one", "1")).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"), "{err:?}");

    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.data = Some([("value".to_owned(), "2".to_owned())].into());
    cms.replace("one", &PostParams::default(), &fresh).await.unwrap();
    stale.data = Some([("value".to_owned(), "3".to_owned())].into());
    let err = cms.replace("one", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{err:?}");

    let merged =
        cms.patch("one", &PatchParams::default(), &Patch::Merge(json!({"data": {"extra": "x"}}))).await.unwrap();
    assert_eq!(merged.data.unwrap()["extra"], "x");

    let apply = PatchParams::apply("kube-sim-test").force();
    let applied = cms
        .patch(
            "applied",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "applied"}, "data": {"a": "1", "b": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.as_ref().unwrap().len(), 2);
    let reapplied = cms
        .patch(
            "applied",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "applied"}, "data": {"a": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(reapplied.data.unwrap().len(), 1, "a field no longer applied is removed");
    let managers: Vec<String> =
        reapplied.metadata.managed_fields.unwrap().into_iter().filter_map(|m| m.manager).collect();
    assert_eq!(managers, vec!["kube-sim-test".to_owned()]);

    // Another manager applying a field with a different value conflicts unless it forces.
    let other = Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"},
        "data": {"a": "changed"}}));
    let err = cms.patch("applied", &PatchParams::apply("other"), &other).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"
            && s.message.contains(r#"conflict with "kube-sim-test""#) && s.message.contains(".data.a")),
        "{err:?}"
    );
    let forced = cms.patch("applied", &PatchParams::apply("other").force(), &other).await.unwrap();
    assert_eq!(forced.data.unwrap()["a"], "changed");
    // The same value is shared, not a conflict; a plain patch takes what it changed.
    let same = Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"},
        "data": {"a": "changed"}}));
    cms.patch("applied", &PatchParams::apply("third"), &same).await.unwrap();
    let patched = cms
        .patch(
            "applied",
            &PatchParams { field_manager: Some("editor".into()), ..PatchParams::default() },
            &Patch::Merge(json!({"data": {"a": "edited"}})),
        )
        .await
        .unwrap();
    let entries = patched.metadata.managed_fields.unwrap();
    let editor = entries.iter().find(|e| e.manager.as_deref() == Some("editor")).expect("an Update entry");
    assert_eq!(editor.operation.as_deref(), Some("Update"));
    assert!(
        !entries.iter().any(|e| e.manager.as_deref() == Some("other")),
        "its only field was taken by the edit: {entries:?}"
    );

    let listed = cms.list(&ListParams::default().labels("app=demo")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    let page = cms.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("a second page");
    let rest = cms.list(&ListParams::default().limit(1).continue_token(&token)).await.unwrap();
    assert_ne!(rest.items[0].metadata.name, page.items[0].metadata.name);

    cms.delete("one", &DeleteParams::default()).await.unwrap();
    let err = cms.get("one").await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"), "{err:?}");
    let err =
        Api::<ConfigMap>::namespaced(client, "missing").create(&PostParams::default(), &config_map("x", "1")).await;
    assert!(matches!(&err, Err(kube::Error::Api(s)) if s.code == 404), "{err:?}");
}

#[tokio::test]
async fn a_watcher_sees_every_change_and_resumes_after_a_cut() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    let client = client(&sim).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("before", "0")).await.unwrap();
    // Short server-side timeouts cut the watch every second; the watcher resumes from the
    // last version it saw and must neither miss nor repeat a change.
    let config = watcher::Config::default().timeout(1);
    let mut seen = Box::pin(watcher(cms.clone(), config).applied_objects());
    let first = tokio::time::timeout(Duration::from_secs(10), seen.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("before"));
    for i in 0..5 {
        cms.create(&PostParams::default(), &config_map(&format!("cm-{i}"), &i.to_string())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut names = Vec::new();
    while names.len() < 5 {
        let next = tokio::time::timeout(Duration::from_secs(10), seen.try_next()).await.unwrap().unwrap().unwrap();
        names.push(next.metadata.name.unwrap());
    }
    assert_eq!(names, (0..5).map(|i| format!("cm-{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_controller_reconciles_a_custom_resource_served_from_its_crd() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    let client = client(&sim).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = crds.get("widgets.example.com").await.unwrap();
    let conditions = established.status.unwrap().conditions.unwrap();
    assert!(conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"));

    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}
    }))
    .unwrap();
    widgets.create(&PostParams::default(), &widget).await.unwrap();

    // The controller writes each widget's size into status through the status subresource.
    let reconcile = |obj: Arc<DynamicObject>, ctx: Arc<Api<DynamicObject>>| async move {
        let size = obj.data["spec"]["size"].clone();
        let name = obj.metadata.name.clone().unwrap_or_default();
        ctx.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"observedSize": size}})))
            .await?;
        Ok::<_, kube::Error>(Action::await_change())
    };
    let controller = Controller::new_with(widgets.clone(), watcher::Config::default(), resource.clone())
        .run(reconcile, |_, _, _| Action::requeue(Duration::from_secs(1)), Arc::new(widgets.clone()))
        .for_each(|_| async {});
    let driver = tokio::spawn(controller);
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = widgets.get("w1").await.unwrap().data["status"].clone();
        if status["observedSize"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["observedSize"], 3);
    widgets.patch("w1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 5}}))).await.unwrap();
    for _ in 0..100 {
        status = widgets.get("w1").await.unwrap().data["status"].clone();
        if status["observedSize"] == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["observedSize"], 5, "a spec change is reconciled");
    let w1 = widgets.get("w1").await.unwrap();
    assert_eq!(w1.metadata.generation, Some(2), "the status write did not bump the generation");
    driver.abort();

    // Deleting the CRD takes its objects with it.
    crds.delete("widgets.example.com", &DeleteParams::default()).await.unwrap();
    assert!(widgets.list(&ListParams::default()).await.is_err());
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    assert!(deployments.list(&ListParams::default()).await.unwrap().items.is_empty());
}
