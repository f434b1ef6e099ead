//! Why a release's gateways are not ready: what their pods say (a container crashing or
//! not starting, a pod the scheduler cannot place) and, for a running pod that is not
//! ready, what its own readiness check says (`/readyz` names each failing check: the
//! metadata database, the default StorageTier). The release's status quotes it, so that a
//! person reads the cause instead of "waiting for gateways".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::context::Context;

/// How long a pod's `/readyz` may take to answer the operator.
const READYZ_TIMEOUT: Duration = Duration::from_secs(2);
/// Pods looked at, at most, per reconcile.
const PODS_LOOKED_AT: usize = 3;

/// The pods of `namespace` carrying every label of `labels` (a Deployment's selector), but
/// those being deleted.
pub async fn pods_with(
    ctx: &Context,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<Pod>, kube::Error> {
    let selector = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    Ok(list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
}

/// The cause, as a sentence, when one of the gateway's pods says why it is not ready.
pub async fn why_not_ready(ctx: &Context, gateway: &Deployment) -> Option<String> {
    let namespace = gateway.metadata.namespace.as_deref()?;
    let labels = gateway.spec.as_ref()?.selector.match_labels.as_ref()?;
    let mut pods = match pods_with(ctx, namespace, labels).await {
        Ok(pods) => pods,
        Err(e) => {
            tracing::debug!(error = %e, "listing the gateway's pods");
            return None;
        }
    };
    // The newest pods run the template being rolled out.
    pods.sort_by(|a, b| b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp));
    let unready = pods.iter().filter(|p| !is_ready(p));
    for pod in unready.take(PODS_LOOKED_AT) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(problem) = pod_problem(pod) {
            return Some(format!("pod {name}: {problem}"));
        }
        if let Some(url) = readyz_url(pod)
            && let Some(failing) = ask_readyz(ctx, &url).await
        {
            return Some(format!("pod {name} is not ready: {failing}"));
        }
    }
    None
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What a pod's own status says is wrong: the scheduler cannot place it, a container waits
/// for a reason other than starting (`CrashLoopBackOff`, `ImagePullBackOff`, a missing
/// Secret), with the message of its last exit.
pub fn pod_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    if let Some(c) = unschedulable {
        return Some(format!("cannot be scheduled: {}", c.message.clone().unwrap_or_default()));
    }
    for container in status.container_statuses.iter().flatten() {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        let Some(reason) = waiting.and_then(|w| w.reason.as_deref()) else { continue };
        if matches!(reason, "ContainerCreating" | "PodInitializing") {
            continue;
        }
        let mut problem = format!("container {} is waiting: {reason}", container.name);
        let last = container.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        if let Some(exit) = last {
            let _ = write!(problem, "; it last exited with code {}", exit.exit_code);
            if let Some(message) = exit.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
                let _ = write!(problem, ": {message}");
            }
        } else if let Some(message) = waiting.and_then(|w| w.message.as_deref()).filter(|m| !m.is_empty()) {
            let _ = write!(problem, " ({message})");
        }
        return Some(problem);
    }
    None
}

/// Where the pod's readiness probe asks: its HTTP GET, at the pod's IP.
pub fn readyz_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let containers = &pod.spec.as_ref()?.containers;
    let (container, get) = containers.iter().find_map(|c| Some((c, c.readiness_probe.as_ref()?.http_get.as_ref()?)))?;
    let port = port_number(container, &get.port)?;
    let path = get.path.as_deref().unwrap_or("/");
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    Some(format!("http://{host}:{port}{path}"))
}

fn port_number(container: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => {
            container.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port)
        }
    }
}

/// The failing checks a gateway's `/readyz` names, or what kept it from answering.
async fn ask_readyz(ctx: &Context, url: &str) -> Option<String> {
    let response = match ctx.http.get(url).timeout(READYZ_TIMEOUT).send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => {
            return Some(format!("its readiness check did not answer within {} s", READYZ_TIMEOUT.as_secs()));
        }
        Err(e) if e.is_connect() => return Some("its readiness check refused the connection".to_owned()),
        Err(e) => return Some(format!("its readiness check failed: {e}")),
    };
    if response.status().is_success() {
        return None;
    }
    let code = response.status().as_u16();
    let body: Value = response.bytes().await.ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    Some(failing_checks(&body).unwrap_or_else(|| format!("its readiness check answered {code}")))
}

/// The checks a `/readyz` body reports failing, as `check: message` joined by `; `.
pub fn failing_checks(body: &Value) -> Option<String> {
    let checks = body.get("checks")?.as_object()?;
    let failing: Vec<String> = checks
        .iter()
        .filter(|(_, c)| c.get("status").and_then(Value::as_str) != Some("ok"))
        .map(|(name, c)| {
            let message = c.get("message").and_then(Value::as_str).unwrap_or("failing");
            format!("{} failing: {message}", check_name(name))
        })
        .collect();
    (!failing.is_empty()).then(|| failing.join("; "))
}

/// A `/readyz` check's name as a person says it.
fn check_name(name: &str) -> &str {
    match name {
        "database" => "the metadata database",
        "defaultTier" => "the default StorageTier",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_crashing_container_is_named_with_its_last_exit() {
        let crashing = pod(json!({"metadata": {"name": "gw-1"}, "status": {"containerStatuses": [{
            "name": "gateway", "ready": false, "restartCount": 3, "image": "g", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "Error: opening the storage tiers: bucket docs does not exist\n"}}
        }]}}));
        assert_eq!(
            pod_problem(&crashing).as_deref(),
            Some(
                "container gateway is waiting: CrashLoopBackOff; it last exited with code 1: Error: opening the storage \
                 tiers: bucket docs does not exist"
            )
        );
        let pulling = pod(json!({"status": {"containerStatuses": [{
            "name": "gateway", "ready": false, "restartCount": 0, "image": "g", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "image vellum/gateway:9 not found"}}
        }]}}));
        assert_eq!(
            pod_problem(&pulling).as_deref(),
            Some("container gateway is waiting: ImagePullBackOff (image vellum/gateway:9 not found)")
        );
        let starting = pod(json!({"status": {"containerStatuses": [{
            "name": "gateway", "ready": false, "restartCount": 0, "image": "g", "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating"}}
        }]}}));
        assert_eq!(pod_problem(&starting), None, "starting is not a problem");
    }

    #[test]
    fn an_unschedulable_pod_says_what_the_scheduler_said() {
        let pending = pod(json!({"status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient memory."
        }]}}));
        assert_eq!(
            pod_problem(&pending).as_deref(),
            Some("cannot be scheduled: 0/1 nodes are available: 1 Insufficient memory.")
        );
    }

    #[test]
    fn the_failing_readiness_checks_are_quoted() {
        let body = json!({"status": "not ready", "checks": {
            "database": {"status": "ok"},
            "defaultTier": {"status": "failing", "message": "storage tier hot: connection refused"}
        }});
        assert_eq!(
            failing_checks(&body).as_deref(),
            Some("the default StorageTier failing: storage tier hot: connection refused")
        );
        assert_eq!(failing_checks(&json!({"status": "ready", "checks": {"database": {"status": "ok"}}})), None);
        assert_eq!(failing_checks(&json!("not json we know")), None);
    }

    #[test]
    fn the_readiness_probe_is_asked_where_the_kubelet_asks_it() {
        let running = pod(json!({
            "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}}]},
            "status": {"podIP": "10.88.0.7"}
        }));
        assert_eq!(readyz_url(&running).as_deref(), Some("http://10.88.0.7:8080/readyz"));
    }
}
