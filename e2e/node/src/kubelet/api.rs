//! What the kubelet needs of the API server, as one trait: a real API server answers it
//! through a client ([`crate::node::Remote`]); unit tests answer it from memory.

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::Value;

use crate::meta;

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

/// The node's view of the cluster. Calls are synchronous: reads come from a cache, writes
/// are done before they return.
pub trait NodeApi: Send + Sync + std::fmt::Debug {
    /// The node's name.
    fn node_name(&self) -> &str;
    /// The node's address, reported as each pod's `hostIP`.
    fn host_ip(&self) -> Ipv4Addr;
    /// Where containers reach the API server (`KUBERNETES_SERVICE_HOST` and `_PORT`).
    fn api_server(&self) -> SocketAddr;
    /// The pods bound to this node.
    fn pods(&self) -> Vec<Value>;
    /// A pod by name, whatever its uid.
    fn pod(&self, namespace: &str, name: &str) -> Option<Value>;
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
    /// refused one.
    fn token(&self, request: &TokenRequest) -> Option<String>;
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

/// A cluster in memory, for unit tests of what the kubelet reads.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Memory {
    /// Objects by (kind, namespace, name).
    pub objects: std::sync::Mutex<std::collections::HashMap<(String, String, String), Value>>,
}

#[cfg(test)]
impl Memory {
    pub fn put(&self, kind: &str, namespace: &str, object: Value) {
        let name = meta::name(&object).to_owned();
        self.objects.lock().unwrap().insert((kind.to_owned(), namespace.to_owned(), name), object);
    }
}

#[cfg(test)]
impl NodeApi for Memory {
    fn node_name(&self) -> &'static str {
        "memory"
    }
    fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 87, 0, 1)
    }
    fn api_server(&self) -> SocketAddr {
        ([10, 96, 0, 1], 443).into()
    }
    fn pods(&self) -> Vec<Value> {
        Vec::new()
    }
    fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("Pod", namespace, name)
    }
    fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(&(kind.to_owned(), namespace.to_owned(), name.to_owned())).cloned()
    }
    fn services(&self, _: &str) -> Vec<Value> {
        Vec::new()
    }
    fn set_status(&self, _: &str, _: &str, _: &str, _: Value) {}
    fn delete_pod(&self, _: &str, _: &str, _: Option<&str>) {}
    fn event(&self, _: &str, _: Value) {}
    fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 1)
    }
    fn release_ip(&self, _: Ipv4Addr) {}
    fn token(&self, request: &TokenRequest) -> Option<String> {
        Some(format!("token-for-{}-{}", request.service_account, request.pod_uid))
    }
}
