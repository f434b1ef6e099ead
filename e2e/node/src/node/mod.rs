//! A node of a real Kubernetes control plane: the kubelet of this crate as a client of the
//! API server (authenticated as `system:node:<name>`, so the Node authorizer and the
//! NodeRestriction admission plugin judge what it does), and a userspace service proxy.
//!
//! It registers its Node (capacity, address, a Ready condition kept fresh) and renews its
//! Lease in `kube-node-lease`; runs the pods the scheduler binds to it as local processes
//! with addresses of a pod range routed to the namespace's loopback; projects each pod's
//! ServiceAccount token, the root CA and the namespace where in-cluster clients look;
//! reports pod status and Events; serves the kubelet API's container logs over TLS, so that
//! `kubectl logs` works through the API server; and forwards every Service's cluster IP and
//! port to the Service's ready endpoints, from its EndpointSlices.

pub mod host;
pub mod remote;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

use crate::kubelet::{self, ImageRule, Kubelet};
use crate::meta;

pub use remote::Remote;

/// The version the node reports.
pub const VERSION: &str = "v1.37.2-vellum-node";

/// How to run a node.
#[derive(Debug)]
pub struct Options {
    pub name: String,
    /// The node's credentials and the API server's address.
    pub kubeconfig: PathBuf,
    /// The service proxy's credentials (`system:kube-proxy`, whom the `system:node-proxier`
    /// role lets watch Services and EndpointSlices, which a node may not list).
    pub proxy_kubeconfig: PathBuf,
    /// The node's address (its `InternalIP`), where the kubelet API listens.
    pub address: Ipv4Addr,
    /// The first two octets of the pods' addresses (a /16 routed to the loopback).
    pub pod_prefix: [u8; 2],
    /// The `kubernetes` Service's address, given to containers.
    pub api_service: SocketAddr,
    pub images: Vec<ImageRule>,
    pub kwok: bool,
    /// Where the pods' files go.
    pub root: PathBuf,
    /// The kubelet API's serving certificate and key, and the CA its clients' certificates
    /// must chain to (the API server's kubelet client).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    /// Host loopback ports to make reachable at the namespace's loopback.
    pub host_ports: Vec<u16>,
    pub host: Option<host::Host>,
}

async fn connect(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Runs the node until the process ends.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let client = connect(&options.kubeconfig).await?;
    let proxy = connect(&options.proxy_kubeconfig).await?;
    let tls = tls_config(&options)?;
    register(&client, &options.name, options.address).await?;
    tokio::spawn(heartbeat(client.clone(), options.name.clone(), options.address));

    let remote =
        Arc::new(Remote::start(client, &options.name, options.address, options.api_service, options.pod_prefix));
    remote.synced().await;
    let kubelet = Kubelet::new(
        remote.clone(),
        kubelet::Config { images: options.images, kwok: options.kwok, restart_backoff: Duration::from_secs(1) },
        options.root.join("pods"),
    );

    if let Some(host) = &options.host {
        for port in &options.host_ports {
            let (host, port) = (host.clone(), *port);
            tokio::spawn(async move {
                if let Err(e) = host::mirror(host, port).await {
                    tracing::error!(port, error = %e, "cannot mirror the host's port");
                }
            });
        }
    }
    let listen = SocketAddr::from((options.address, 10250));
    tokio::spawn(serve_kubelet_api(listen, tls, kubelet.clone()));

    let proxies = crate::services::Proxies::default();
    let services = remote::reflect(Api::<Service>::all(proxy.clone()), watcher::Config::default());
    let slices = remote::reflect(Api::<EndpointSlice>::all(proxy), watcher::Config::default());
    let _ = tokio::join!(services.wait_until_ready(), slices.wait_until_ready());
    tracing::info!(node = %options.name, address = %options.address, "node ready");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        kubelet.sync();
        let services: Vec<serde_json::Value> = services.state().iter().map(|s| remote::to_value(s.as_ref())).collect();
        let slices: Vec<serde_json::Value> = slices.state().iter().map(|s| remote::to_value(s.as_ref())).collect();
        proxies.sync_with(&services, |svc, port| {
            let owned: Vec<&serde_json::Value> = slices
                .iter()
                .filter(|s| {
                    meta::namespace(s) == meta::namespace(svc)
                        && meta::str_at(s, "/metadata/labels/kubernetes.io~1service-name") == Some(meta::name(svc))
                })
                .collect();
            crate::services::slice_backends(&owned, port)
        });
    }
}

fn node_status(name: &str, address: Ipv4Addr) -> serde_json::Value {
    kubelet::api::node_object(name, address, VERSION)["status"].clone()
}

/// Creates the Node (when it is not there yet) and reports its status.
async fn register(client: &kube::Client, name: &str, address: Ipv4Addr) -> anyhow::Result<()> {
    let nodes = Api::<Node>::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node: Node = serde_json::from_value(kubelet::api::node_object(name, address, VERSION))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    let patch = serde_json::json!({"status": node_status(name, address)});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Renews the node's Lease every 10 s and its status every minute, as a kubelet does, so
/// that the node lifecycle controller keeps it Ready.
async fn heartbeat(client: kube::Client, name: String, address: Ipv4Addr) {
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    let nodes = Api::<Node>::all(client);
    let mut beats: u64 = 0;
    loop {
        let renewed = serde_json::json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": meta::now_micro()}});
        let result = match leases.get_opt(&name).await {
            Ok(Some(_)) => leases.patch(&name, &PatchParams::default(), &Patch::Merge(&renewed)).await.map(drop),
            Ok(None) => {
                let uid = nodes.get(&name).await.ok().and_then(|n| n.metadata.uid);
                let mut lease = renewed.clone();
                lease["metadata"] = serde_json::json!({"name": name, "ownerReferences": uid.map(|uid| vec![
                    serde_json::json!({"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid})])});
                match serde_json::from_value::<Lease>(lease) {
                    Ok(lease) => leases.create(&PostParams::default(), &lease).await.map(drop),
                    Err(e) => {
                        tracing::error!(error = %e, "lease");
                        Ok(())
                    }
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "renewing the node's lease");
        }
        if beats % 6 == 5 {
            let patch = serde_json::json!({"status": node_status(&name, address)});
            if let Err(e) = nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::warn!(error = %e, "reporting the node's status");
            }
        }
        beats += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

fn tls_config(options: &Options) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&options.client_ca)? {
        roots.add(cert?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = CertificateDer::pem_file_iter(&options.tls_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&options.tls_key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The kubelet API, as far as the API server asks it of this node: container logs.
fn kubelet_api(kubelet: Kubelet) -> axum::Router {
    async fn logs(
        State(kubelet): State<Kubelet>,
        Path((namespace, pod, container)): Path<(String, String, String)>,
        Query(mut params): Query<std::collections::HashMap<String, String>>,
    ) -> Response {
        params.insert("container".into(), container);
        kubelet::logs::serve(&kubelet, &namespace, &pod, &params).unwrap_or_else(IntoResponse::into_response)
    }
    axum::Router::new()
        .route("/containerLogs/{namespace}/{pod}/{container}", axum::routing::get(logs))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(kubelet)
}

async fn serve_kubelet_api(listen: SocketAddr, tls: Arc<rustls::ServerConfig>, kubelet: Kubelet) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot serve the kubelet API");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = kubelet_api(kubelet);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
