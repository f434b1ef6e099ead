//! [`NodeApi`] answered by a real API server, as a kubelet is its client: the node's pods
//! and the cluster's Services from watches (reflectors), ConfigMaps and Secrets fetched one by
//! one and kept a second (the Node authorizer lets a node read only those its pods use),
//! ServiceAccount tokens requested for each pod and renewed at 80 % of their life, status
//! and deletions written before the call returns.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest as Request, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::Value;

use crate::kubelet::api::{NodeApi, TokenRequest};
use crate::network::Network;

/// How long a fetched ConfigMap or Secret is trusted before it is read again.
const OBJECT_TTL: Duration = Duration::from_secs(1);

type ObjectKey = (&'static str, String, String);
type TokenKey = (String, String, Option<String>);

pub struct Remote {
    client: kube::Client,
    handle: tokio::runtime::Handle,
    node: String,
    address: Ipv4Addr,
    api_service: SocketAddr,
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    objects: Mutex<HashMap<ObjectKey, (Instant, Option<Value>)>>,
    tokens: Mutex<HashMap<TokenKey, (Instant, Duration, String)>>,
    network: Network,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("node", &self.node).field("address", &self.address).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Keeps `store` filled from a watch of `api` until the runtime stops.
pub fn reflect<K>(api: Api<K>, config: watcher::Config) -> reflector::Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    use futures::StreamExt;
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(async move {
        stream
            .for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watch");
                }
            })
            .await;
    });
    reader
}

impl Remote {
    /// Starts the watches; must be called inside a multi-threaded Tokio runtime (the node's
    /// synchronous calls wait for the API server in place).
    pub fn start(client: kube::Client, node: &str, address: Ipv4Addr, api_service: SocketAddr, pods: [u8; 2]) -> Self {
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        Self {
            pods: reflect(Api::<Pod>::all(client.clone()), on_node),
            services: reflect(Api::<Service>::all(client.clone()), watcher::Config::default()),
            client,
            handle: tokio::runtime::Handle::current(),
            node: node.to_owned(),
            address,
            api_service,
            objects: Mutex::default(),
            tokens: Mutex::default(),
            network: Network::within(pods),
        }
    }

    /// Waits until the watches have listed once.
    pub async fn synced(&self) {
        let _ = tokio::join!(self.pods.wait_until_ready(), self.services.wait_until_ready());
    }

    fn wait<F: Future>(&self, f: F) -> F::Output {
        tokio::task::block_in_place(|| self.handle.block_on(f))
    }
}

impl NodeApi for Remote {
    fn node_name(&self) -> &str {
        &self.node
    }

    fn host_ip(&self) -> Ipv4Addr {
        self.address
    }

    fn api_server(&self) -> SocketAddr {
        self.api_service
    }

    fn pods(&self) -> Vec<Value> {
        self.pods.state().iter().map(|p| to_value(p.as_ref())).collect()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.pods.get(&reflector::ObjectRef::new(name).within(namespace)).map(|p| to_value(p.as_ref()))
    }

    fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind: &'static str = match kind {
            "ConfigMap" => "ConfigMap",
            "Secret" => "Secret",
            _ => return None,
        };
        let key = (kind, namespace.to_owned(), name.to_owned());
        if let Some((at, object)) = lock(&self.objects).get(&key)
            && at.elapsed() < OBJECT_TTL
        {
            return object.clone();
        }
        let client = self.client.clone();
        let fetched = self.wait(async move {
            if kind == "Secret" {
                Api::<Secret>::namespaced(client, namespace).get_opt(name).await.map(|o| o.map(|s| to_value(&s)))
            } else {
                Api::<ConfigMap>::namespaced(client, namespace).get_opt(name).await.map(|o| o.map(|c| to_value(&c)))
            }
        });
        let object = fetched.unwrap_or_else(|e| {
            tracing::warn!(kind, namespace, name, error = %e, "cannot read");
            None
        });
        lock(&self.objects).insert(key, (Instant::now(), object.clone()));
        object
    }

    fn services(&self, namespace: &str) -> Vec<Value> {
        self.services
            .state()
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
            .map(|s| to_value(s.as_ref()))
            .collect()
    }

    fn set_status(&self, namespace: &str, name: &str, uid: &str, status: Value) {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        // The uid in the patch is a precondition: a pod replaced under the same name is
        // refused, not given the old one's status.
        let patch = serde_json::json!({"metadata": {"uid": uid}, "status": status});
        let result = self.wait(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)));
        if let Err(e) = result {
            tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot report the pod's status");
        }
    }

    fn delete_pod(&self, namespace: &str, name: &str, uid: Option<&str>) {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: uid.map(|uid| Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        if let Err(e) = self.wait(api.delete(name, &params)) {
            tracing::debug!(pod = %format!("{namespace}/{name}"), error = %e, "delete");
        }
    }

    fn event(&self, namespace: &str, event: Value) {
        let Ok(event) = serde_json::from_value::<Event>(event) else { return };
        let api = Api::<Event>::namespaced(self.client.clone(), namespace);
        if let Err(e) = self.wait(api.create(&PostParams::default(), &event)) {
            tracing::debug!(error = %e, "event");
        }
    }

    fn pod_ip(&self) -> Ipv4Addr {
        self.network.pod_ip()
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        self.network.release(ip);
    }

    fn token(&self, request: &TokenRequest) -> Option<String> {
        let key = (request.pod_uid.clone(), request.service_account.clone(), request.audience.clone());
        if let Some((at, life, token)) = lock(&self.tokens).get(&key)
            && at.elapsed() < life.mul_f64(0.8)
        {
            return Some(token.clone());
        }
        let body = Request {
            spec: TokenRequestSpec {
                audiences: request.audience.iter().cloned().collect(),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(request.pod_name.clone()),
                    uid: Some(request.pod_uid.clone()),
                }),
                expiration_seconds: Some(request.expiration_seconds),
            },
            ..Request::default()
        };
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), &request.namespace);
        let issued = self.wait(api.create_token_request(&request.service_account, &PostParams::default(), &body));
        match issued {
            Ok(response) => {
                let token = response.status?.token;
                let life = Duration::from_secs(u64::try_from(request.expiration_seconds).unwrap_or(600));
                lock(&self.tokens).insert(key, (Instant::now(), life, token.clone()));
                // Tokens of pods that are gone are forgotten.
                let running: std::collections::HashSet<String> =
                    self.pods.state().iter().filter_map(|p| p.metadata.uid.clone()).collect();
                lock(&self.tokens).retain(|(uid, _, _), _| running.contains(uid));
                Some(token)
            }
            Err(e) => {
                tracing::warn!(service_account = %request.service_account, error = %e, "token request");
                None
            }
        }
    }
}
