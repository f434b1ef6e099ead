//! The harness the socket tests share: a standalone gateway on a free port, tokens, and
//! uploads (whole, or chunked session by session) to any gateway's base URL.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};

pub struct Gateway {
    pub running: Running,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A tier on memory, the default.
pub const MEMORY_TIER: &str = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 'memory://'}}\n";

/// Standalone options in `dir` with `tiers` (StorageTier YAML) as the platform config, on
/// a free port, an HS256 `secret`, 1 MiB uploads and default limits; tests change what
/// they need.
pub fn options(dir: &std::path::Path, tiers: &str, secret: &[u8]) -> standalone::Options {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("tiers.yaml"), tiers).unwrap();
    standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        config_dir: Some(config),
        secrets_dir: None,
        config_reload: Duration::from_secs(5),
        database_url: None,
        auth: AuthSettings { secret: Some(secret.to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec![],
        nats_url: None,
        link_key: None,
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    }
}

pub async fn gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), MEMORY_TIER, b"test-secret");
    Gateway { running: standalone::start(options).await.unwrap(), client: reqwest::Client::new(), _dir: dir }
}

impl Gateway {
    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        self.running.state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
    }

    pub async fn upload(&self, user: &str, filename: &str) -> Value {
        upload(&self.client, &self.running.url, &self.token(user, &["user"]), filename).await
    }
}

/// The JSON answer to `request`.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Uploads a document named and filled with `filename`; returns the created document.
pub async fn upload(client: &reqwest::Client, base: &str, token: &str, filename: &str) -> Value {
    let form = Form::new().part("file", Part::bytes(filename.as_bytes().to_vec()).file_name(filename.to_owned()));
    let response =
        client.post(format!("{base}/api/v1/documents")).bearer_auth(token).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{:?}", response.text().await);
    response.json().await.unwrap()
}

/// Starts a chunked upload session; returns its id.
pub async fn initiate(client: &reqwest::Client, base: &str, token: &str, total: u64, chunk: u64) -> String {
    let init = json!({"filename": "big.bin", "totalSize": total, "chunkSize": chunk});
    let response =
        client.post(format!("{base}/api/v1/upload/initiate")).bearer_auth(token).json(&init).send().await.unwrap();
    let session: Value = response.json().await.unwrap();
    session["sessionId"].as_str().unwrap().to_owned()
}

/// Sends chunk `n` of a session.
pub async fn put_chunk(client: &reqwest::Client, base: &str, token: &str, id: &str, n: u64, bytes: Vec<u8>) {
    let url = format!("{base}/api/v1/upload/{id}/chunk/{n}");
    let response = client.put(url).bearer_auth(token).body(bytes).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Completes a session into a document.
pub async fn complete(client: &reqwest::Client, base: &str, token: &str, id: &str) {
    let response = client.post(format!("{base}/api/v1/upload/{id}/complete")).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// `vellum-workers run` in this process: the outbox relays to JetStream and webhook
/// delivery of a cluster, which its gateway replicas leave to it. Stopped when dropped.
pub struct Worker {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), vellum_workers::run::RunError>>>,
}

impl Worker {
    /// A worker of the platform configured in `config_dir`, whose first shard (or only
    /// database) is `database_url`.
    pub fn start(database_url: &str, nats_url: &str, config_dir: &std::path::Path) -> Self {
        Self::serving(database_url, nats_url, config_dir, None)
    }

    /// [`Self::start`], serving `/readyz` and `/metrics` at `metrics_listen`.
    pub fn serving(
        database_url: &str,
        nats_url: &str,
        config_dir: &std::path::Path,
        metrics_listen: Option<std::net::SocketAddr>,
    ) -> Self {
        let options = vellum_workers::run::Options {
            database_url: database_url.to_owned(),
            nats_url: nats_url.to_owned(),
            config_dir: config_dir.to_owned(),
            // Where a compiled config's secret values are, if it is compiled.
            secrets_dir: Some(config_dir.to_owned()),
            reload: Duration::from_secs(1),
            relay_poll: Duration::from_millis(50),
            log_retention: Duration::from_secs(3600),
            settings: vellum_workers::Settings::default(),
            metrics_listen,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(vellum_workers::run::run(options, stopped));
        Self { stop, task: Some(task) }
    }

    /// Stops it, attempts in flight finishing first.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
