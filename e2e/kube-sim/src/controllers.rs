//! The cluster's controllers, each a pass over the store that the simulator runs a few
//! times a second: Deployments own Pods (rolling replacement when the template changes,
//! status as `kubectl rollout status` reads it), Services get Endpoints from their ready
//! Pods, and terminating namespaces are emptied. Pods are run by the [`crate::kubelet`].

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde_json::{Value, json};

use crate::meta;
use crate::registry::ResourceType;
use crate::select::{LabelSelector, labels_of};
use crate::store::{DeleteOptions, Store};

/// Marks Endpoints the endpoints controller manages (and so deletes with their Service).
const MANAGED_BY: &str = "kube-sim.dev/managed-by";

/// Runs every controller once.
pub fn run_once(store: &Store) {
    store.terminate_namespaces();
    let registry = store.registry();
    let (Some(pods), Some(deployments), Some(services), Some(endpoints)) = (
        registry.by_kind("v1", "Pod").cloned(),
        registry.by_kind("apps/v1", "Deployment").cloned(),
        registry.by_kind("v1", "Service").cloned(),
        registry.by_kind("v1", "Endpoints").cloned(),
    ) else {
        return;
    };
    for deployment in store.list(&deployments, None).0 {
        if let Err(e) = deployment_pass(store, &deployments, &pods, &deployment) {
            tracing::debug!(deployment = meta::name(&deployment), error = %e, "deployment controller");
        }
    }
    endpoints_pass(store, &services, &endpoints, &pods);
    let now = time::OffsetDateTime::now_utc();
    crate::jobs::cronjob_pass(store, now);
    crate::jobs::job_pass(store, now);
}

pub fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// `25%` of `total`, rounded up or down, or a plain number.
fn scaled(value: Option<&Value>, total: i64, default_percent: i64, round_up: bool) -> i64 {
    let percent = |p: i64| {
        let x = total * p;
        if round_up { (x + 99) / 100 } else { x / 100 }
    };
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.strip_suffix('%').and_then(|p| p.parse().ok()).map_or(0, percent),
        _ => percent(default_percent),
    }
}

/// The live pods a Deployment owns.
fn owned_pods(store: &Store, pods: &ResourceType, namespace: &str, uid: &str) -> Vec<Value> {
    store
        .list(pods, Some(namespace))
        .0
        .into_iter()
        .filter(|p| meta::owner_uids(p).iter().any(|u| u == uid) && !meta::deleting(p))
        .collect()
}

/// The template hash a pod was made from.
fn template_hash_of(pod: &Value) -> &str {
    meta::str_at(pod, "/metadata/labels/pod-template-hash").unwrap_or_default()
}

fn template_hash(template: &Value) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    format!("{:x}", hasher.finish() & 0xff_ffff_ffff)
}

/// One pass of the Deployment controller over one Deployment.
fn deployment_pass(
    store: &Store,
    t: &ResourceType,
    pods_t: &ResourceType,
    d: &Value,
) -> Result<(), crate::status::ApiError> {
    let ns = meta::namespace(d);
    let name = meta::name(d);
    let uid = meta::uid(d);
    if meta::deleting(d) {
        return Ok(());
    }
    let replicas = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let template = d.pointer("/spec/template").cloned().unwrap_or_default();
    let hash = template_hash(&template);
    let owned = owned_pods(store, pods_t, ns, uid);
    let (current, old): (Vec<&Value>, Vec<&Value>) = owned.iter().partition(|p| template_hash_of(p) == hash);
    let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
    let surge =
        if recreate { 0 } else { scaled(d.pointer("/spec/strategy/rollingUpdate/maxSurge"), replicas, 25, true) };
    let unavailable = if recreate {
        replicas
    } else {
        scaled(d.pointer("/spec/strategy/rollingUpdate/maxUnavailable"), replicas, 25, false)
    };
    let unavailable = if surge == 0 && unavailable == 0 { 1 } else { unavailable };
    let ready_total = i64::try_from(owned.iter().filter(|p| is_ready(p)).count()).unwrap_or(0);
    let total = i64::try_from(owned.len()).unwrap_or(0);
    let n_current = i64::try_from(current.len()).unwrap_or(0);

    // Scale the new generation up within the surge, old pods down within the availability.
    if n_current < replicas && (!recreate || old.is_empty()) {
        let room = (replicas + surge - total).max(0).min(replicas - n_current);
        for _ in 0..room {
            store.create(pods_t, ns, pod_for(d, &template, &hash), false)?;
        }
    }
    let min_available = replicas - unavailable;
    let mut can_remove = (ready_total - min_available).max(0);
    let mut old_sorted = old.clone();
    old_sorted.sort_by_key(|p| is_ready(p));
    for pod in old_sorted {
        // Unready old pods go first and never count against availability.
        if is_ready(pod) {
            if can_remove == 0 && !recreate {
                break;
            }
            can_remove -= 1;
        }
        store.delete(pods_t, ns, meta::name(pod), &DeleteOptions::default())?;
    }
    if n_current > replicas {
        let mut extra: Vec<&&Value> = current.iter().collect();
        extra.sort_by_key(|p| {
            (
                is_ready(p),
                std::cmp::Reverse(meta::str_at(p, "/metadata/creationTimestamp").unwrap_or_default().to_owned()),
            )
        });
        for pod in extra.into_iter().take(usize::try_from(n_current - replicas).unwrap_or(0)) {
            store.delete(pods_t, ns, meta::name(pod), &DeleteOptions::default())?;
        }
    }

    // Status, as rollout status reads it.
    let owned = owned_pods(store, pods_t, ns, uid);
    let previous = d.get("status").cloned().unwrap_or_default();
    let status = deployment_status(d, &owned, &hash, replicas, min_available);
    if status != previous {
        let mut next = d.clone();
        next["status"] = status;
        store.update(t, ns, name, next, true, false)?;
    }
    Ok(())
}

/// A Deployment's status from the pods it owns.
fn deployment_status(d: &Value, owned: &[Value], hash: &str, replicas: i64, min_available: i64) -> Value {
    let name = meta::name(d);
    let count = |f: &dyn Fn(&Value) -> bool| i64::try_from(owned.iter().filter(|p| f(p)).count()).unwrap_or(0);
    let updated = count(&|p| template_hash_of(p) == hash);
    let ready = count(&is_ready);
    let available = ready;
    let total = i64::try_from(owned.len()).unwrap_or(0);
    let complete = updated == replicas && total == replicas && available == replicas;
    let now = meta::now();
    let previous = d.get("status").cloned().unwrap_or_default();
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind && c["status"] == status && c["reason"] == reason))
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now));
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": since, "lastTransitionTime": since})
    };
    let available_ok = available >= min_available;
    let mut status = json!({
        "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (total - available).max(0),
        "conditions": [
            condition("Available", available_ok,
                if available_ok { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                format!("Deployment {} minimum availability.", if available_ok { "has" } else { "does not have" })),
            condition("Progressing", true,
                if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                format!("ReplicaSet \"{name}-{hash}\" {}.", if complete { "has successfully progressed" } else { "is progressing" })),
        ],
    });
    for field in ["readyReplicas", "availableReplicas", "unavailableReplicas", "updatedReplicas"] {
        if status[field] == 0 {
            status.as_object_mut().map(|s| s.remove(field));
        }
    }
    status
}

fn pod_for(d: &Value, template: &Value, hash: &str) -> Value {
    let mut labels: BTreeMap<String, Value> = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    labels.insert("pod-template-hash".into(), json!(hash));
    let mut spec = template.get("spec").cloned().unwrap_or_else(|| json!({}));
    if spec.get("restartPolicy").is_none() {
        spec["restartPolicy"] = json!("Always");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{}-{hash}-", meta::name(d)),
            "labels": labels,
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or_else(|| json!({})),
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": meta::name(d), "uid": meta::uid(d),
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
    })
}

/// The port number a Service's `targetPort` names on a Pod.
fn target_port(port: &Value, pod: &Value) -> Option<i64> {
    match port.get("targetPort") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(name)) => meta::pod_port(pod, name).map(i64::from),
        _ => port.get("port").and_then(Value::as_i64),
    }
}

/// Endpoints of every Service with a selector: the ready Pods it selects.
fn endpoints_pass(store: &Store, services: &ResourceType, endpoints: &ResourceType, pods: &ResourceType) {
    let (all_services, _) = store.list(services, None);
    for svc in &all_services {
        let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object).filter(|s| !s.is_empty()) else {
            continue;
        };
        let selector = LabelSelector::from_map(selector);
        let ns = meta::namespace(svc);
        let name = meta::name(svc);
        let selected: Vec<Value> = store
            .list(pods, Some(ns))
            .0
            .into_iter()
            .filter(|p| selector.matches_object(p) && is_ready(p) && !meta::deleting(p))
            .collect();
        let ports: Vec<Value> = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut subsets = Vec::new();
        if !selected.is_empty() {
            let addresses: Vec<Value> = selected
                .iter()
                .map(|p| {
                    json!({"ip": meta::str_at(p, "/status/podIP").unwrap_or_default(),
                           "targetRef": {"kind": "Pod", "name": meta::name(p), "namespace": ns, "uid": meta::uid(p)}})
                })
                .collect();
            let ports: Vec<Value> = ports
                .iter()
                .map(|port| {
                    let mut p = json!({"port": target_port(port, &selected[0]).unwrap_or(0),
                                       "protocol": port.get("protocol").cloned().unwrap_or(json!("TCP"))});
                    if let Some(n) = port.get("name") {
                        p["name"] = n.clone();
                    }
                    p
                })
                .collect();
            subsets.push(json!({"addresses": addresses, "ports": ports}));
        }
        let desired = json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": ns, "labels": {MANAGED_BY: "endpoints-controller"}},
            "subsets": subsets,
        });
        match store.get(endpoints, ns, name) {
            Ok(current) => {
                if current.get("subsets").cloned().unwrap_or(json!([])) != desired["subsets"] {
                    let mut next = current.clone();
                    next["subsets"] = desired["subsets"].clone();
                    let _ = store.update(endpoints, ns, name, next, false, false);
                }
            }
            Err(_) => {
                let _ = store.create(endpoints, ns, desired, false);
            }
        }
    }
    // Endpoints this controller made for a Service that is gone.
    for ep in store.list(endpoints, None).0 {
        let managed = labels_of(&ep).contains_key(MANAGED_BY);
        let ns = meta::namespace(&ep);
        let name = meta::name(&ep);
        if managed && !all_services.iter().any(|s| meta::namespace(s) == ns && meta::name(s) == name) {
            let _ = store.delete(endpoints, ns, name, &DeleteOptions::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_and_unavailability_follow_the_deployment_defaults() {
        assert_eq!(scaled(None, 4, 25, true), 1);
        assert_eq!(scaled(None, 3, 25, true), 1);
        assert_eq!(scaled(None, 3, 25, false), 0);
        assert_eq!(scaled(Some(&json!("50%")), 3, 25, true), 2);
        assert_eq!(scaled(Some(&json!(2)), 3, 25, true), 2);
    }

    #[test]
    fn a_deployment_rolls_its_pods_to_a_new_template() {
        let store = Store::new();
        let dir = tempfile::tempdir().unwrap();
        let config = crate::kubelet::Config {
            images: vec![],
            kwok: true,
            restart_backoff: std::time::Duration::from_secs(1),
            kubeconfig: None,
        };
        let api = std::sync::Arc::new(crate::kubelet::SimApi {
            store: store.clone(),
            api_server: ([127, 0, 0, 1], 6443).into(),
        });
        let kubelet = crate::kubelet::Kubelet::new(api, config, dir.path().to_owned());
        let run_once = |store: &Store| {
            run_once(store);
            kubelet.sync();
        };
        let reg = store.registry();
        let deployments = reg.by_kind("apps/v1", "Deployment").cloned().unwrap();
        let pods = reg.by_kind("v1", "Pod").cloned().unwrap();
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}});
        store.create(&deployments, "default", d, false).unwrap();
        for _ in 0..10 {
            run_once(&store);
        }
        let status = store.get(&deployments, "default", "web").unwrap()["status"].clone();
        assert_eq!((status["replicas"].as_i64(), status["availableReplicas"].as_i64()), (Some(3), Some(3)), "{status}");
        let mut d = store.get(&deployments, "default", "web").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
        store.update(&deployments, "default", "web", d, false, false).unwrap();
        for _ in 0..20 {
            run_once(&store);
        }
        let (all, _) = store.list(&pods, Some("default"));
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|p| p["spec"]["containers"][0]["image"] == "web:2"));
        let status = store.get(&deployments, "default", "web").unwrap()["status"].clone();
        assert_eq!(status["updatedReplicas"], 3);
        assert_eq!(status["observedGeneration"], 2);
        let ips: Vec<&str> = all.iter().map(|p| meta::str_at(p, "/status/podIP").unwrap()).collect();
        assert_eq!(ips.iter().collect::<std::collections::HashSet<_>>().len(), 3, "an address per pod");
    }
}
