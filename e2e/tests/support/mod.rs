//! What the operator's end-to-end test and the rollout benchmark share: kubectl, a platform
//! of every resource kind on a local cluster, clients that keep using it, and the leader.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use vellum_e2e::{Cluster, binary};

pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub async fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> String {
    let out = cluster.kubectl(args, stdin).await.expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubectl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

pub async fn get_json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(cluster, &all, None).await).expect("kubectl prints JSON")
}

/// Polls `check` every half second until it returns `Some`, or fails after `limit` with
/// what `describe` says.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => panic!("{what}: not within {limit:?}: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

pub async fn ready(cluster: &Cluster, resource: &str, namespace: &str) -> Result<Value, String> {
    let out =
        cluster.kubectl(&["get", resource, "-n", namespace, "-o", "json"], None).await.map_err(|e| e.to_string())?;
    let object: Value =
        serde_json::from_slice(&out.stdout).map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())?;
    match condition(&object, "Ready") {
        Some(c) if c["status"] == "True" => Ok(object),
        other => Err(format!("{resource}: {}", other.map_or_else(|| "no Ready condition".into(), ToString::to_string))),
    }
}

/// A webhook receiver: records every request's body (`body`, as JSON and `raw`) with its
/// Standard Webhooks headers (`id`, `timestamp`, `signature`).
/// Whether `kubectl get <resource>` in `namespace` answers NotFound.
pub async fn gone(cluster: &Cluster, resource: &str, namespace: &str) -> Result<(), String> {
    let out = cluster.kubectl(&["-n", namespace, "get", resource], None).await.map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() && stderr.contains("NotFound") {
        Ok(())
    } else {
        Err(format!("{resource}: {stderr}{}", String::from_utf8_lossy(&out.stdout)))
    }
}

pub async fn receiver(cluster: &Cluster) -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let seen = Arc::clone(&seen);
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                let header =
                    |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                    seen.lock().unwrap().push(serde_json::json!({
                        "body": value, "raw": String::from_utf8_lossy(&body),
                        "id": header("webhook-id"), "timestamp": header("webhook-timestamp"),
                        "signature": header("webhook-signature"),
                    }));
                }
                "ok"
            }
        }),
    );
    // Where the workers' pods reach it.
    let listener = cluster.listen().await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

pub const JWT_SECRET: &str = "an-e2e-hs256-secret-of-at-least-32-bytes";
pub const HOOK_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const ROTATED_HOOK_KEY: &str = "whsec_cm90YXRlZC1lMmUtd2ViaG9vay1rZXktMzJieXRlcw==";

/// A client listing and downloading until `stopped`, each request on a new connection (so
/// that it goes where the Service points now): how many it sent, and the ones that failed
/// with when.
pub async fn client(
    base: String,
    token: String,
    document_id: i64,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> (u32, Vec<(tokio::time::Instant, String)>) {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let (mut sent, mut failed) = (0u32, Vec::new());
    while !*stopped.borrow() {
        for path in ["/api/v1/documents".to_owned(), format!("/api/v1/documents/{document_id}/download")] {
            sent += 1;
            // A 429 is the per-user rate limit, the client's to respect, not a failure.
            match within_limits(|| http.get(format!("{base}{path}")).bearer_auth(&token)).await.0 {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => failed.push((tokio::time::Instant::now(), format!("{path}: {}", r.status()))),
                Err(e) => failed.push((tokio::time::Instant::now(), format!("{path}: {e}"))),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sent, failed)
}

/// Sends the request `make` builds, and again after the wait a 429 asks for (the per-user
/// rate limit is the client's to respect: a 429 is refused before anything is done), at
/// most ten times: the answer, and how many 429s came before it.
pub async fn within_limits(make: impl Fn() -> reqwest::RequestBuilder) -> (reqwest::Result<reqwest::Response>, u64) {
    let mut throttled = 0;
    for _ in 0..10 {
        let answer = match make().send().await {
            Ok(answer) if answer.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => answer,
            other => return (other, throttled),
        };
        throttled += 1;
        let wait = answer.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        tokio::time::sleep(Duration::from_secs(wait.unwrap_or(1).clamp(1, 5))).await;
    }
    (make().send().await, throttled)
}

/// The release `docs` once its status reaches `phase` (within 2 minutes).
pub async fn in_phase(cluster: &Cluster, phase: &str, what: &str) -> Value {
    eventually(Duration::from_secs(120), what, || async {
        let release = get_json(cluster, &["-n", "docs", "get", "bgr/docs"]).await;
        if release["status"]["phase"] == phase { Ok(release) } else { Err(release["status"].to_string()) }
    })
    .await
}

/// Kills the operator replica holding the leader-election Lease: the one killed, the one
/// leading after it, and how long the hand-over took.
pub async fn kill_leader(cluster: &Cluster) -> (String, String, Duration) {
    let holder = |lease: &Value| lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_owned();
    let lease = get_json(cluster, &["-n", "vellum-system", "get", "lease/vellum-operator-leader"]).await;
    let leader = holder(&lease);
    let killed = tokio::time::Instant::now();
    kubectl(cluster, &["-n", "vellum-system", "delete", "pod", &leader, "--grace-period=0", "--force"], None).await;
    let next = eventually(Duration::from_secs(120), "another replica leading", || async {
        let lease = get_json(cluster, &["-n", "vellum-system", "get", "lease/vellum-operator-leader"]).await;
        let now = holder(&lease);
        if now.is_empty() || now == leader { Err(lease.to_string()) } else { Ok(now) }
    })
    .await;
    (leader, next, killed.elapsed())
}

/// The directory of the workspace's binaries of one profile (`release`, else debug) beside
/// the running benchmark, with `packages`' binaries built there first when any is missing.
pub fn built(release: bool, packages: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    // <target>/<profile>/deps/<bench>-… → <target>
    let target = exe.ancestors().nth(3).expect("the target directory").to_path_buf();
    let dir = target.join(if release { "release" } else { "debug" });
    if packages.iter().any(|p| !dir.join(p).exists()) {
        let mut build = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "--bins"]).env("CARGO_TARGET_DIR", &target).current_dir(repo());
        if release {
            build.arg("--release");
        }
        for package in packages {
            build.args(["-p", package]);
        }
        assert!(build.status().expect("cargo runs").success(), "building {packages:?} failed");
    }
    dir
}

/// A Kubernetes client of the cluster, as its kubeconfig gives it.
pub async fn kube_client(cluster: &Cluster) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("the kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("the kubeconfig's config");
    kube::Client::try_from(config).expect("a client of the cluster")
}

/// A WebSocket (JSON protocol) and an SSE subscriber of the platform at `base`, connected.
pub async fn subscribers(
    base: &str,
    token: &str,
) -> (tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, reqwest::Response) {
    let ws_url = format!("{}/ws?token={token}", base.replace("http://", "ws://"));
    let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let sse =
        reqwest::Client::new().get(format!("{base}/api/v1/events/stream")).bearer_auth(token).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    (ws, sse)
}

/// The phases `bgr/docs` records, in order, each as a watch sees its status written (a
/// phase too short for polling is seen too).
pub async fn phase_watch(cluster: &Cluster) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<vellum_crds::BlueGreenRelease> = kube::Api::namespaced(kube_client(cluster).await, "docs");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream =
            watcher(api, watcher::Config::default().fields("metadata.name=docs")).applied_objects().boxed();
        let mut last = None;
        while let Some(Ok(release)) = stream.next().await {
            let phase = release.status.and_then(|s| s.phase).map(|p| format!("{p:?}"));
            if phase != last {
                if let Some(p) = &phase
                    && tx.send(p.clone()).is_err()
                {
                    return;
                }
                last = phase;
            }
        }
    });
    rx
}

/// Uploads a small document every 200 ms until `stopped`; the ids, in order.
pub async fn uploader(base: String, token: String, stopped: tokio::sync::watch::Receiver<bool>) -> Vec<i64> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut ids = Vec::new();
    while !*stopped.borrow() {
        let n = ids.len();
        let form = reqwest::multipart::Form::new()
            .part("file", reqwest::multipart::Part::bytes(format!("upload {n}").into_bytes()).file_name("rollout.txt"));
        let response = http.post(format!("{base}/api/v1/documents")).bearer_auth(&token).multipart(form).send().await;
        let response = response.unwrap_or_else(|e| panic!("upload {n} during the rollout: {e}"));
        assert_eq!(response.status(), 201, "upload {n} during the rollout");
        ids.push(response.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ids
}

/// The document ids of the `DOCUMENT_UPLOADED` events of the upload test files a WebSocket
/// receives, until `n` arrived (or 20 s passed).
pub async fn uploaded_events_ws(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    n: usize,
) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut ids = Vec::new();
    while ids.len() < n {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, ws.next()).await else { break };
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
        assert!(!text.contains("vellum:smoke"), "a smoke check's event reached a subscriber: {text}");
        let event: Value = serde_json::from_str(&text).unwrap_or_default();
        if event["type"] == "DOCUMENT_UPLOADED" && event["data"]["filename"] == "rollout.txt" {
            ids.push(event["data"]["documentId"].as_i64().unwrap_or_default());
        }
    }
    ids
}

/// The same, from a Server-Sent Events stream.
pub async fn uploaded_events_sse(response: &mut reqwest::Response, n: usize) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut buffer, mut ids) = (String::new(), Vec::new());
    while ids.len() < n {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            assert!(!block.contains("vellum:smoke"), "a smoke check's event reached a subscriber: {block}");
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
            // An SSE event names its type on its `event:` line; `data:` holds the fields.
            let kind = block.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim);
            let fields: Value = serde_json::from_str(data.trim()).unwrap_or_default();
            if kind == Some("DOCUMENT_UPLOADED") && fields["filename"] == "rollout.txt" {
                ids.push(fields["documentId"].as_i64().unwrap_or_default());
            }
        }
        if ids.len() >= n {
            break;
        }
        let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, response.chunk()).await else { break };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
    ids
}

/// Asserts that the `DOCUMENT_UPLOADED` event of each of `uploaded` reached the WebSocket
/// and the SSE subscriber exactly once: none lost, none repeated.
pub async fn each_seen_once(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    sse: &mut reqwest::Response,
    uploaded: &[i64],
    during: &str,
) {
    let over_ws = uploaded_events_ws(ws, uploaded.len()).await;
    let over_sse = uploaded_events_sse(sse, uploaded.len()).await;
    let mut expected = uploaded.to_vec();
    expected.sort_unstable();
    for (name, mut seen) in [("WebSocket", over_ws), ("SSE", over_sse)] {
        seen.sort_unstable();
        assert_eq!(seen, expected, "{name}: each upload's event once during {during}, none lost or repeated");
    }
}

/// `GET url` as the tests' user: its JSON body, after a 200 (anything else fails the test
/// with the status and body).
pub async fn get_api(http: &reqwest::Client, url: &str) -> Value {
    let response = http.get(url).bearer_auth(token()).send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

pub fn token() -> String {
    token_signed_with(JWT_SECRET)
}

pub fn token_signed_with(secret: &str) -> String {
    let claims = serde_json::json!({
        "sub": "e2e", "roles": ["admin", "user"], "iss": "https://auth.e2e", "aud": "vellum-e2e",
        "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn platform(database_url: &str, bucket: &vellum_testkit::S3Bucket, hook: &str, cost: &str) -> String {
    let nats = std::env::var("VELLUM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    format!(
        r"
apiVersion: v1
kind: Secret
metadata: {{name: platform-secrets}}
stringData:
  shard-a: '{database_url}'
  hs256: '{JWT_SECRET}'
  hook: {HOOK_KEY}
---
apiVersion: v1
kind: Secret
metadata: {{name: s3-credentials}}
stringData:
  aws_access_key_id: '{access}'
  aws_secret_access_key: '{secret}'
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {{name: hot}}
spec:
  class: HOT
  default: true
  costPerGbMonth: {cost}
  backend:
    url: 's3://{bucket_name}'
    endpoint: '{endpoint}'
    region: '{region}'
    options: {{aws_allow_http: 'true', aws_virtual_hosted_style_request: 'false'}}
    secretRef: {{name: s3-credentials}}
---
apiVersion: vellum.dev/v1alpha1
kind: ShardSet
metadata: {{name: metadata}}
spec:
  shards:
    - name: shard-a
      urlSecretRef: {{name: platform-secrets, key: shard-a}}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: receiver}}
spec:
  url: '{hook}'
  secretRef: {{name: platform-secrets, key: hook}}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {{name: temporary-files}}
spec:
  selector: {{tags: [temporary]}}
  expiration: {{afterDays: 30, action: DELETE}}
  schedule: '0 3 * * *'
---
apiVersion: vellum.dev/v1alpha1
kind: BlueGreenRelease
metadata: {{name: docs}}
spec:
  version: 1.0.0
  gateway: {{image: 'vellum/gateway:1.0.0', replicas: 2}}
  workers: {{image: 'vellum/workers:1.0.0', replicas: 1}}
  shardSetRef: metadata
  nats: {{url: '{nats}'}}
  jwt:
    secretRef: {{name: platform-secrets, key: hs256}}
    issuer: https://auth.e2e
    audience: vellum-e2e
  webhookAllowedCidrs: [127.0.0.0/8]
",
        access = bucket.access_key,
        secret = bucket.secret_key,
        bucket_name = bucket.name,
        endpoint = bucket.endpoint,
        region = bucket.region,
    )
}

/// The images a platform's pods run: the workspace's binaries, and a broken build of the
/// gateway (the same binary answering 30 % of API requests 500) for versions `*-broken`.
pub struct Images {
    _dir: tempfile::TempDir,
    pub list: Vec<(&'static str, PathBuf)>,
}

impl Images {
    pub fn new() -> Self {
        let (operator, gateway, workers) =
            (binary("vellum-operator"), binary("vellum-gateway"), binary("vellum-workers"));
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("vellum-gateway-broken");
        std::fs::write(
            &broken,
            format!("#!/bin/sh\nVELLUM_FAULT_5XX_PERCENT=30 exec '{}' \"$@\"\n", gateway.display()),
        )
        .unwrap();
        std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let list = vec![
            ("vellum/gateway:*-broken", broken),
            ("vellum/operator", operator),
            ("vellum/gateway", gateway),
            ("vellum/workers", workers),
        ];
        Self { _dir: dir, list }
    }

    pub fn as_slice(&self) -> Vec<(&str, &Path)> {
        self.list.iter().map(|(name, path)| (*name, path.as_path())).collect()
    }
}

/// Installs the operator (`manifests/install.yaml`) and waits for its CRDs and replicas.
pub async fn install_operator(cluster: &Cluster) {
    let install = repo().join("manifests/install.yaml");
    kubectl(cluster, &["apply", "-f", install.to_str().unwrap()], None).await;
    kubectl(cluster, &["wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"], None).await;
    kubectl(
        cluster,
        &["-n", "vellum-system", "rollout", "status", "deployment/vellum-operator", "--timeout=60s"],
        None,
    )
    .await;
}

/// The address here of the active Service `docs` (`http://…`).
pub async fn active_base(cluster: &Cluster) -> String {
    let service = get_json(cluster, &["-n", "docs", "get", "service/docs"]).await;
    let ip: std::net::IpAddr = service["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    format!("http://{}", cluster.forward((ip, 80).into()).await.unwrap())
}
