//! Services reachable from the host, as kube-proxy makes them: every port of a Service with
//! a cluster IP is listened on at that address (a loopback address of the simulator's own),
//! and each connection goes to the next of the Service's ready endpoints. And the API
//! server's proxy paths: `…/services/{name}[:port]/proxy/{path}` and
//! `…/pods/{name}[:port]/proxy/{path}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::meta;
use crate::status::ApiError;
use crate::store::Store;

type Key = (String, String, u16);

#[derive(Debug)]
struct Listener {
    ip: String,
    backends: Arc<RwLock<Vec<SocketAddr>>>,
    task: Option<JoinHandle<()>>,
    /// When binding failed, when to try again.
    retry: Option<Instant>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The kube-proxy of the simulator; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    listeners: Arc<Mutex<HashMap<Key, Listener>>>,
}

/// The ready endpoints of a Service port (`port` is the Service's port object).
fn backends(endpoints: Option<&Value>, port: &Value) -> Vec<SocketAddr> {
    let Some(endpoints) = endpoints else { return Vec::new() };
    let name = meta::str_at(port, "/name").unwrap_or_default();
    let mut out = Vec::new();
    for subset in endpoints.get("subsets").and_then(Value::as_array).into_iter().flatten() {
        let ports = subset.get("ports").and_then(Value::as_array).cloned().unwrap_or_default();
        let Some(target) = ports
            .iter()
            .find(|p| meta::str_at(p, "/name").unwrap_or_default() == name)
            .or_else(|| (ports.len() == 1).then(|| &ports[0]))
            .and_then(|p| p.get("port").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for address in subset.get("addresses").and_then(Value::as_array).into_iter().flatten() {
            if let Some(Ok(ip)) = meta::str_at(address, "/ip").map(str::parse::<std::net::IpAddr>) {
                out.push(SocketAddr::new(ip, target));
            }
        }
    }
    out
}

async fn serve(listener: tokio::net::TcpListener, backends: Arc<RwLock<Vec<SocketAddr>>>) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        let candidates = backends.read().unwrap_or_else(PoisonError::into_inner).clone();
        if candidates.is_empty() {
            // No ready endpoint: the connection is refused, as kube-proxy rejects it.
            drop(inbound);
            continue;
        }
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            for i in 0..candidates.len() {
                let backend = candidates[(start + i) % candidates.len()];
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

impl Proxies {
    /// Stops listening everywhere.
    pub fn shutdown(&self) {
        self.listeners.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// One pass over the simulator's store: listen for every Service port on its loopback
    /// cluster IP, forget Services that went, and point each listener at the ready
    /// endpoints of now.
    pub fn sync(&self, store: &Store) {
        let registry = store.registry();
        let (Some(services_t), Some(endpoints_t)) =
            (registry.by_kind("v1", "Service"), registry.by_kind("v1", "Endpoints"))
        else {
            return;
        };
        let (services, _) = store.list(services_t, None);
        let (endpoints, _) = store.list(endpoints_t, None);
        let by_name: HashMap<(&str, &str), &Value> =
            endpoints.iter().map(|e| ((meta::namespace(e), meta::name(e)), e)).collect();
        let services: Vec<Value> = services
            .into_iter()
            .filter(|svc| meta::str_at(svc, "/spec/clusterIP").is_some_and(|ip| ip.starts_with("127.")))
            .collect();
        self.sync_with(&services, |svc, port| {
            backends(by_name.get(&(meta::namespace(svc), meta::name(svc))).copied(), port)
        });
    }

    /// One pass over `services` (those with a cluster IP): listen for every TCP port, forget
    /// Services that went, and point each listener at what `targets` gives for the port.
    pub fn sync_with(&self, services: &[Value], targets: impl Fn(&Value, &Value) -> Vec<SocketAddr>) {
        let mut listeners = self.listeners.lock().unwrap_or_else(PoisonError::into_inner);
        let mut wanted = std::collections::HashSet::new();
        for svc in services {
            let Some(ip) = meta::str_at(svc, "/spec/clusterIP").filter(|ip| !ip.is_empty() && *ip != "None") else {
                continue;
            };
            let (ns, name) = (meta::namespace(svc), meta::name(svc));
            for port in svc.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
                if meta::str_at(port, "/protocol").is_some_and(|p| p != "TCP") {
                    continue;
                }
                let Some(number) = port.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let key = (ns.to_owned(), name.to_owned(), number);
                wanted.insert(key.clone());
                let targets = targets(svc, port);
                if listeners.get(&key).is_some_and(|l| l.ip != ip) {
                    listeners.remove(&key);
                }
                let listener = listeners.entry(key).or_insert_with(|| Listener {
                    ip: ip.to_owned(),
                    backends: Arc::default(),
                    task: None,
                    retry: None,
                });
                *listener.backends.write().unwrap_or_else(PoisonError::into_inner) = targets;
                if listener.task.is_none() && listener.retry.is_none_or(|at| Instant::now() >= at) {
                    match bind(ip, number) {
                        Ok(bound) => {
                            listener.task = Some(tokio::spawn(serve(bound, listener.backends.clone())));
                            listener.retry = None;
                        }
                        Err(e) => {
                            tracing::warn!(service = %format!("{ns}/{name}"), %ip, port = number, error = %e, "cannot listen for the service");
                            listener.retry = Some(Instant::now() + Duration::from_secs(5));
                        }
                    }
                }
            }
        }
        listeners.retain(|key, _| wanted.contains(key));
    }
}

/// The ready endpoints of a Service port from the Service's EndpointSlices.
pub fn slice_backends(slices: &[&Value], port: &Value) -> Vec<SocketAddr> {
    let name = meta::str_at(port, "/name").unwrap_or_default();
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| meta::str_at(p, "/name").unwrap_or_default() == name)
            .and_then(|p| p.get("port").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.get("endpoints").and_then(Value::as_array).into_iter().flatten() {
            if endpoint.pointer("/conditions/ready").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            for address in endpoint.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                if let Some(Ok(ip)) = address.as_str().map(str::parse::<std::net::IpAddr>) {
                    out.push(SocketAddr::new(ip, target));
                }
            }
        }
    }
    out
}

fn bind(ip: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let ip: std::net::IpAddr = ip.parse().map_err(std::io::Error::other)?;
    let listener = std::net::TcpListener::bind((ip, port))?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// `name`, `name:port` or `scheme:name:port`.
fn split_target(segment: &str) -> (&str, Option<&str>) {
    let parts: Vec<&str> = segment.split(':').collect();
    match parts.as_slice() {
        [name] => (name, None),
        [name, port] => (name, Some(port)),
        [_, name, port] => (name, Some(*port).filter(|p| !p.is_empty())),
        _ => (segment, None),
    }
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", message)
}

/// Where a proxy path leads: the address of a pod's port, or of a ready endpoint of a
/// Service's port.
fn resolve(store: &Store, namespace: &str, kind: &str, segment: &str) -> Result<SocketAddr, ApiError> {
    let registry = store.registry();
    let (name, port) = split_target(segment);
    if kind == "pods" {
        let t = registry.by_kind("v1", "Pod").ok_or_else(ApiError::path_not_found)?;
        let pod = store.get(t, namespace, name)?;
        let ip: std::net::IpAddr = meta::str_at(&pod, "/status/podIP")
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?;
        let number = match port {
            None => 80,
            Some(p) => p
                .parse()
                .ok()
                .or_else(|| meta::pod_port(&pod, p))
                .ok_or_else(|| ApiError::bad_request(format!("no such port \"{p}\" on pod {name}")))?,
        };
        return Ok(SocketAddr::new(ip, number));
    }
    let t = registry.by_kind("v1", "Service").ok_or_else(ApiError::path_not_found)?;
    let svc = store.get(t, namespace, name)?;
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    let chosen = match port {
        None if ports.len() == 1 => ports.first(),
        None => None,
        Some(p) => ports.iter().find(|sp| {
            meta::str_at(sp, "/name") == Some(p)
                || sp.get("port").and_then(Value::as_u64).map(|n| n.to_string()).as_deref() == Some(p)
        }),
    }
    .ok_or_else(|| unavailable(format!("no endpoints available for service \"{segment}\"")))?;
    let endpoints_t = registry.by_kind("v1", "Endpoints").ok_or_else(ApiError::path_not_found)?;
    let endpoints = store.get(endpoints_t, namespace, name).ok();
    backends(endpoints.as_ref(), chosen)
        .first()
        .copied()
        .ok_or_else(|| unavailable(format!("no endpoints available for service \"{name}\"")))
}

/// Forwards a request to a pod or Service, as the API server's proxy does.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    store: &Store,
    namespace: &str,
    kind: &str,
    segment: &str,
    path: &str,
    query: Option<&str>,
    method: Method,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let address = resolve(store, namespace, kind, segment)?;
    let url = format!("http://{address}/{path}{}", query.map(|q| format!("?{q}")).unwrap_or_default());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| unavailable(e.to_string()))?;
    let mut request = client.request(method, &url).body(body);
    for (name, value) in headers {
        if !matches!(name.as_str(), "host" | "connection" | "authorization" | "content-length" | "transfer-encoding") {
            request = request.header(name, value);
        }
    }
    let response = request
        .send()
        .await
        .map_err(|e| unavailable(format!("error trying to reach service: dial tcp {address}: {e}")))?;
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = Response::builder().status(status);
    for (name, value) in response.headers() {
        if !matches!(name.as_str(), "connection" | "transfer-encoding") {
            out = out.header(name, value);
        }
    }
    let stream = response.bytes_stream();
    Ok(out.body(Body::from_stream(stream)).unwrap_or_else(|_| {
        (StatusCode::BAD_GATEWAY, [(header::CONTENT_TYPE, "text/plain")], "bad upstream response").into_response()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn proxy_targets_name_ports_and_endpoints_follow_port_names() {
        assert_eq!(split_target("web"), ("web", None));
        assert_eq!(split_target("web:http"), ("web", Some("http")));
        assert_eq!(split_target("https:web:443"), ("web", Some("443")));
        let endpoints = json!({"subsets": [{"addresses": [{"ip": "127.9.0.1"}, {"ip": "127.9.0.2"}],
                                            "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]}]});
        let found = backends(Some(&endpoints), &json!({"name": "metrics", "port": 90}));
        assert_eq!(found, vec!["127.9.0.1:9090".parse().unwrap(), "127.9.0.2:9090".parse().unwrap()]);
    }
}
