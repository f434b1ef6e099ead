//! The node's service proxy, as kube-proxy's userspace mode was: every TCP port of a Service
//! with a cluster IP is listened on at that address (the Service range is routed to the
//! loopback of the cluster's network namespace), and each connection goes to the next of
//! the Service's ready endpoints, from its EndpointSlices. A Service without a ready
//! endpoint refuses connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::meta;

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

/// The service proxy; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    listeners: Arc<Mutex<HashMap<Key, Listener>>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints_come_from_ready_slice_endpoints_by_port_name() {
        let slice = json!({
            "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.88.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.88.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.88.0.3"]},
            ],
        });
        let found = slice_backends(&[&slice], &json!({"name": "metrics", "port": 90}));
        assert_eq!(found, vec!["10.88.0.1:9090".parse().unwrap(), "10.88.0.3:9090".parse().unwrap()]);
        assert!(slice_backends(&[&slice], &json!({"name": "other", "port": 1})).is_empty());
    }
}
