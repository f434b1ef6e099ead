//! What the kubelet needs of the API server, as one trait: the simulator's in-memory store
//! answers it directly ([`SimApi`]); a real API server answers it through a client
//! (`crate::node::Remote`), as the node agent of a real control plane.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use crate::meta;
use crate::network::Network;
use crate::store::{DeleteOptions, Store};

/// A projected ServiceAccount token: what a `serviceAccountToken` volume source asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// The node's view of the cluster. Calls are synchronous: reads come from a cache or the
/// store, writes are done before they return.
pub trait NodeApi: Send + Sync + std::fmt::Debug {
    /// The node's name.
    fn node_name(&self) -> &str;
    /// The node's address, reported as each pod's `hostIP`.
    fn host_ip(&self) -> Ipv4Addr;
    /// Where containers reach the API server (`KUBERNETES_SERVICE_HOST` and `_PORT`).
    fn api_server(&self) -> SocketAddr;
    /// Registers the node when it is not yet (the simulator's; a real node does it in a task
    /// of its own, with its Lease).
    fn register(&self) {}
    /// The pods bound to this node, and, where the node is its own scheduler, unbound ones.
    fn pods(&self) -> Vec<Value>;
    /// A pod by name, whatever its uid.
    fn pod(&self, namespace: &str, name: &str) -> Option<Value>;
    /// Binds an unbound pod to this node and returns it; `None` where a scheduler binds.
    fn bind(&self, pod: &Value) -> Option<Value>;
    /// A ConfigMap or a Secret.
    fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value>;
    /// The Services of a namespace (for containers' Service variables).
    fn services(&self, namespace: &str) -> Vec<Value>;
    /// Replaces the status of the pod `namespace/name` if it is still the one with `uid`.
    fn set_status(&self, namespace: &str, name: &str, uid: &str, status: Value);
    /// Deletes a pod at once (grace period 0), only if it is the one with `uid` when given.
    fn delete_pod(&self, namespace: &str, name: &str, uid: Option<&str>);
    /// Records an Event.
    fn event(&self, namespace: &str, event: Value);
    /// A new pod's address.
    fn pod_ip(&self) -> Ipv4Addr;
    /// Hands a pod's address back.
    fn release_ip(&self, ip: Ipv4Addr);
    /// A token for a pod's ServiceAccount, bound to the pod; `None` when the API server
    /// cannot issue one (the simulator has no token issuer).
    fn token(&self, request: &TokenRequest) -> Option<String>;
}

/// The simulator's store as the node sees it.
#[derive(Debug)]
pub struct SimApi {
    pub store: Store,
    pub api_server: SocketAddr,
}

/// The simulator's node.
pub const SIM_NODE: &str = "kube-sim";

impl SimApi {
    fn network(&self) -> &Arc<Network> {
        self.store.network()
    }
}

impl NodeApi for SimApi {
    fn node_name(&self) -> &str {
        SIM_NODE
    }

    fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::LOCALHOST
    }

    fn api_server(&self) -> SocketAddr {
        self.api_server
    }

    fn register(&self) {
        let registry = self.store.registry();
        if let Some(t) = registry.by_kind("v1", "Node")
            && self.store.get(t, "", SIM_NODE).is_err()
        {
            let _ = self.store.create(t, "", sim_node(), false);
        }
    }

    fn pods(&self) -> Vec<Value> {
        let registry = self.store.registry();
        registry.by_kind("v1", "Pod").map(|t| self.store.list(t, None).0).unwrap_or_default()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let registry = self.store.registry();
        self.store.get(registry.by_kind("v1", "Pod")?, namespace, name).ok()
    }

    fn bind(&self, pod: &Value) -> Option<Value> {
        let registry = self.store.registry();
        let t = registry.by_kind("v1", "Pod")?;
        self.store
            .modify(t, meta::namespace(pod), meta::name(pod), false, false, |mut p| {
                p["spec"]["nodeName"] = serde_json::json!(SIM_NODE);
                Ok(p)
            })
            .ok()
    }

    fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let registry = self.store.registry();
        self.store.get(registry.by_kind("v1", kind)?, namespace, name).ok()
    }

    fn services(&self, namespace: &str) -> Vec<Value> {
        let registry = self.store.registry();
        registry.by_kind("v1", "Service").map(|t| self.store.list(t, Some(namespace)).0).unwrap_or_default()
    }

    fn set_status(&self, namespace: &str, name: &str, uid: &str, status: Value) {
        let registry = self.store.registry();
        let Some(t) = registry.by_kind("v1", "Pod") else { return };
        let result = self.store.modify(t, namespace, name, true, false, |mut pod| {
            if meta::uid(&pod) != uid {
                return Err(crate::status::ApiError::bad_request("the pod was replaced"));
            }
            pod["status"] = status;
            Ok(pod)
        });
        if let Err(e) = result {
            tracing::debug!(pod = %name, error = %e, "kubelet status");
        }
    }

    fn delete_pod(&self, namespace: &str, name: &str, uid: Option<&str>) {
        let registry = self.store.registry();
        let Some(t) = registry.by_kind("v1", "Pod") else { return };
        let force = DeleteOptions { grace_period: Some(0), uid: uid.map(str::to_owned), ..DeleteOptions::default() };
        let _ = self.store.delete(t, namespace, name, &force);
    }

    fn event(&self, namespace: &str, event: Value) {
        let registry = self.store.registry();
        if let Some(t) = registry.by_kind("v1", "Event") {
            let _ = self.store.create(t, namespace, event, false);
        }
    }

    fn pod_ip(&self) -> Ipv4Addr {
        self.network().pod_ip()
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        self.network().release(ip);
    }

    fn token(&self, _: &TokenRequest) -> Option<String> {
        None
    }
}

/// The Node object a node registers: its capacity, addresses and a Ready condition.
pub fn node_object(name: &str, address: Ipv4Addr, version: &str) -> Value {
    let now = meta::now();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                               "kubernetes.io/arch": "amd64"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": cpus.to_string(), "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": cpus.to_string(), "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "addresses": [{"type": "InternalIP", "address": address.to_string()}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": version, "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "vellum-node://1", "osImage": "vellum-node", "kernelVersion": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        },
    })
}

fn sim_node() -> Value {
    let mut node = node_object(SIM_NODE, Ipv4Addr::LOCALHOST, "v1.33.0-kube-sim");
    node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = serde_json::json!("");
    node["status"]["capacity"]["pods"] = serde_json::json!("1000");
    node["status"]["allocatable"]["pods"] = serde_json::json!("1000");
    node
}
