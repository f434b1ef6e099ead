//! The operator provisions a platform on a cluster the way a platform team uses it:
//! `kubectl apply` of the install manifest (two operator replicas, one leading) and of a
//! platform's resources, then `Ready` conditions, an upload through the active Service
//! (real gateway and worker processes against real Postgres, NATS and S3), the webhook
//! delivery seen by a receiver here and in `kubectl get wh`, a StorageTier change the
//! gateways pick up without a restart, a bad resource reported with a reason while the rest
//! keeps working, and deletion leaving nothing behind.
//!
//! The local cluster's node runs the workspace's own binaries as the images: build them
//! first (`cargo test --workspace` does).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vellum_e2e::Cluster;
use vellum_testkit::{TestBucket, TestDatabase};

mod support;
use support::*;

#[tokio::test]
#[allow(clippy::too_many_lines)] // one platform's life, in order
async fn the_operator_provisions_a_working_platform_from_its_resources() {
    let images = Images::new();
    let cluster = Cluster::start(&images.as_slice()).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let database = TestDatabase::new().await.unwrap();
    let bucket = TestBucket::new().await.unwrap();
    let (hook, deliveries) = receiver(&cluster).await;

    install_operator(&cluster).await;

    kubectl(&cluster, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: docs}\n")).await;
    let yaml = platform(&database.url, &bucket, &hook, "0.023");
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&yaml)).await;

    let limit = Duration::from_secs(120);
    for resource in [
        "storagetier/hot",
        "shardset/metadata",
        "webhook/receiver",
        "retentionpolicy/temporary-files",
        "bluegreenrelease/docs",
    ] {
        eventually(limit, resource, || ready(&cluster, resource, "docs")).await;
    }
    let release = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
    assert_eq!(release["status"]["phase"], "Stable", "{release}");
    assert_eq!(release["status"]["activeColor"], "blue");
    assert_eq!(release["status"]["activeVersion"], "1.0.0");
    let tier = get_json(&cluster, &["-n", "docs", "get", "storagetier/hot"]).await;
    assert_eq!(tier["status"]["reachable"], true, "{tier}");
    let cron = get_json(&cluster, &["-n", "docs", "get", "cronjob/temporary-files-retention"]).await;
    assert_eq!(cron["spec"]["schedule"], "0 3 * * *");
    let policy = get_json(&cluster, &["-n", "docs", "get", "retentionpolicy/temporary-files"]).await;
    let next = policy["status"]["nextRun"].as_str().unwrap_or_default();
    assert!(next.ends_with("T03:00:00Z"), "the next run is the schedule's: {policy}");

    // Exactly one operator replica leads.
    let lease = get_json(&cluster, &["-n", "vellum-system", "get", "lease/vellum-operator-leader"]).await;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_owned();
    assert!(holder.starts_with("vellum-operator-"), "{lease}");

    // An upload through the active Service reaches the webhook receiver.
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    let ip: std::net::IpAddr = service["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let base = format!("http://{}", cluster.forward((ip, 80).into()).await.unwrap());
    let http = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(b"hello platform".to_vec()).file_name("hello.txt"));
    let uploaded =
        http.post(format!("{base}/api/v1/documents")).bearer_auth(token()).multipart(form).send().await.unwrap();
    assert_eq!(uploaded.status(), 201);
    let document: Value = uploaded.json().await.unwrap();
    let document_id = document["id"].as_i64().unwrap();
    eventually(limit, "a delivery at the receiver", || {
        let seen = deliveries.lock().unwrap().len();
        async move { if seen > 0 { Ok(()) } else { Err("none yet".into()) } }
    })
    .await;
    eventually(limit, "the delivery in kubectl get wh", || async {
        let table = kubectl(&cluster, &["-n", "docs", "get", "wh", "receiver"], None).await;
        let webhook = get_json(&cluster, &["-n", "docs", "get", "wh/receiver"]).await;
        if webhook["status"]["successCount"].as_i64().unwrap_or(0) >= 1 {
            Ok(table)
        } else {
            Err(webhook["status"].to_string())
        }
    })
    .await;

    // A webhook created through the gateway's API becomes a Webhook resource and a Secret,
    // made by the gateway's own ServiceAccount, compiled by the operator like any other.
    let account = get_json(&cluster, &["-n", "docs", "get", "rolebinding/docs-gateway"]).await;
    assert_eq!(account["roleRef"]["name"], "vellum-gateway", "{account}");
    let created = http
        .post(format!("{base}/api/webhooks"))
        .bearer_auth(token())
        .json(&serde_json::json!({
            "name": "Made Through The API", "url": hook, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "eventTypes": ["DOCUMENT_UPLOADED"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("made-through-the-api-"), "{created}");
    assert_eq!(created["source"], "api");
    let made_resource = format!("webhook/{id}");
    let made = eventually(limit, "the API's Webhook Ready", || ready(&cluster, &made_resource, "docs")).await;
    assert_eq!(made["metadata"]["annotations"]["vellum.dev/display-name"], "Made Through The API");
    let secret_name = made["spec"]["secretRef"]["name"].as_str().unwrap().to_owned();
    let secret = get_json(&cluster, &["-n", "docs", "get", &format!("secret/{secret_name}")]).await;
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], id.as_str(), "{secret}");
    let listed: Value =
        http.get(format!("{base}/api/webhooks")).bearer_auth(token()).send().await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().any(|w| w["id"] == id.as_str() && w["source"] == "api"), "{listed}");
    let refused = http.delete(format!("{base}/api/webhooks/receiver")).bearer_auth(token()).send().await.unwrap();
    assert_eq!(refused.status(), 409, "an applied Webhook is not the API's to delete");
    let deleted = http.delete(format!("{base}/api/webhooks/{id}")).bearer_auth(token()).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    for resource in [format!("webhook/{id}"), format!("secret/{secret_name}")] {
        eventually(limit, "the API's webhook deleted", || gone(&cluster, &resource, "docs")).await;
    }

    // A changed StorageTier reaches the running gateways without a restart.
    let pods_before = kubectl(
        &cluster,
        &["-n", "docs", "get", "pods", "-l", "app.kubernetes.io/component=gateway", "-o", "name"],
        None,
    )
    .await;
    let yaml = platform(&database.url, &bucket, &hook, "0.05");
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&yaml)).await;
    let hash = eventually(limit, "a new config hash", || async {
        let cm = get_json(&cluster, &["-n", "docs", "get", "configmap/docs-platform"]).await;
        let config: Value =
            serde_json::from_str(cm["data"]["platform.json"].as_str().unwrap_or("{}")).unwrap_or_default();
        if config["tiers"]["hot"]["costPerGbMonth"] == 0.05 {
            Ok(cm["metadata"]["annotations"]["vellum.dev/config-hash"].as_str().unwrap_or_default().to_owned())
        } else {
            Err(config["tiers"].to_string())
        }
    })
    .await;
    eventually(limit, "the gateways serving the new config", || {
        let (http, base, hash) = (http.clone(), base.clone(), hash.clone());
        async move {
            // Every replica behind the Service, round-robin: ask a few times.
            for _ in 0..4 {
                let body: Value = http
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                if body["configHash"] != hash.as_str() {
                    return Err(body.to_string());
                }
            }
            Ok(())
        }
    })
    .await;
    // The tier's status counts what the platform's shards keep there, priced anew.
    eventually(limit, "the tier's objects and cost in its status", || async {
        let tier = get_json(&cluster, &["-n", "docs", "get", "storagetier/hot"]).await;
        let status = &tier["status"];
        let counted = status["objects"].as_i64().unwrap_or(0) >= 1 && status["bytes"].as_i64().unwrap_or(0) > 0;
        if counted && status["estimatedMonthlyCost"].as_f64().is_some() { Ok(()) } else { Err(status.to_string()) }
    })
    .await;
    // A StorageTier deleted while it holds blobs stays until they moved to the default
    // tier (its finalizer), and the documents read from it keep downloading.
    let cold_bucket = TestBucket::new().await.unwrap();
    let cold = format!(
        "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: cold}}\nspec:\n  class: COLD\n  backend:\n    url: 's3://{}'\n    endpoint: '{}'\n    region: '{}'\n    options: {{aws_allow_http: 'true', aws_virtual_hosted_style_request: 'false'}}\n    secretRef: {{name: s3-credentials}}\n",
        cold_bucket.name, cold_bucket.endpoint, cold_bucket.region
    );
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&cold)).await;
    let cold_tier = eventually(limit, "storagetier/cold", || ready(&cluster, "storagetier/cold", "docs")).await;
    let finalizers = &cold_tier["metadata"]["finalizers"];
    assert_eq!(finalizers, &serde_json::json!(["vellum.dev/tier-drain"]), "{cold_tier}");
    let moved = eventually(limit, "the document moved to the cold tier", || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let url = format!("{base}/api/v1/documents/{document_id}/tier");
            let response = http.post(url).bearer_auth(token()).json(&serde_json::json!({"tier": "cold"})).send().await;
            let response = response.map_err(|e| e.to_string())?;
            // Until every gateway has the config with the new tier, some answer 400.
            if response.status() == 200 {
                response.json::<Value>().await.map_err(|e| e.to_string())
            } else {
                Err(response.status().to_string())
            }
        }
    })
    .await;
    assert_eq!(moved["storageTier"], "cold", "{moved}");
    kubectl(&cluster, &["-n", "docs", "delete", "storagetier", "cold", "--wait=false"], None).await;
    eventually(limit, "the cold tier drained and gone", || gone(&cluster, "storagetier/cold", "docs")).await;
    let after = get_api(&http, &format!("{base}/api/v1/documents/{document_id}")).await;
    assert_eq!(after["storageTier"], "hot", "drained to the default tier: {after}");
    let content =
        http.get(format!("{base}/api/v1/documents/{document_id}/download")).bearer_auth(token()).send().await.unwrap();
    assert_eq!(content.status(), 200);
    assert_eq!(content.bytes().await.unwrap().as_ref(), b"hello platform");

    // A rotated JWT secret reaches the running gateways too: tokens signed with the old
    // one are refused and tokens signed with the new one accepted, by every replica.
    let rotated = "a-rotated-e2e-hs256-secret-of-32-bytes-or-more";
    let yaml = platform(&database.url, &bucket, &hook, "0.05").replace(JWT_SECRET, rotated);
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&yaml)).await;
    eventually(limit, "the gateways checking tokens with the rotated key", || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            for _ in 0..4 {
                let status = |token: String| {
                    let (http, base) = (http.clone(), base.clone());
                    async move {
                        let response = http.get(format!("{base}/api/v1/documents")).bearer_auth(token).send().await;
                        response.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
                    }
                };
                let (old, new) = (status(token()).await?, status(token_signed_with(rotated)).await?);
                if (old, new) != (401, 200) {
                    return Err(format!("old key {old}, rotated key {new}"));
                }
            }
            Ok(())
        }
    })
    .await;
    let pods_after = kubectl(
        &cluster,
        &["-n", "docs", "get", "pods", "-l", "app.kubernetes.io/component=gateway", "-o", "name"],
        None,
    )
    .await;
    assert_eq!(pods_before, pods_after, "no gateway pod was replaced");

    // Only the leader acts; killed, it hands over within the lease duration (15 s).
    let operators = kubectl(
        &cluster,
        &["-n", "vellum-system", "get", "pods", "-l", "app.kubernetes.io/component=operator", "-o", "name"],
        None,
    )
    .await;
    let mut leading = Vec::new();
    for pod in operators.lines() {
        let log = kubectl(&cluster, &["-n", "vellum-system", "logs", pod], None).await;
        if log.contains("leading: starting the controllers") {
            leading.push(pod.trim_start_matches("pod/").to_owned());
        }
    }
    assert_eq!(leading, std::slice::from_ref(&holder), "exactly the Lease holder runs the controllers");
    println!("{:?}: killing the leader", t0.elapsed());
    let (killed, next, handed_over) = kill_leader(&cluster).await;
    assert_eq!(killed, holder);
    assert!(handed_over < Duration::from_secs(30), "hand-over took {handed_over:?}");
    println!("leader {holder} killed; {next} leads after {handed_over:?}");

    // A webhook's signing key rotated (a value in a Secret, no change to any resource's
    // spec, long after the workers loaded the last config change) signs the deliveries
    // from then on, beside the old one for its grace.
    let yaml = platform(&database.url, &bucket, &hook, "0.05")
        .replace(JWT_SECRET, rotated)
        .replace(HOOK_KEY, ROTATED_HOOK_KEY);
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&yaml)).await;
    let key = vellum_core::signing::parse_signing_key(ROTATED_HOOK_KEY.as_bytes()).unwrap();
    let before = deliveries.lock().unwrap().len();
    eventually(limit, "a delivery signed with the rotated key", || {
        let latest: Vec<Value> = deliveries.lock().unwrap()[before..].to_vec();
        let (key, http, base) = (key.clone(), http.clone(), base.clone());
        async move {
            let signed = latest.iter().any(|d| {
                let timestamp = d["timestamp"].as_str().unwrap_or_default().parse::<i64>().unwrap_or_default();
                let (id, raw) = (d["id"].as_str().unwrap_or_default(), d["raw"].as_str().unwrap_or_default());
                let expected = vellum_core::signing::standard_signature(&key, id, timestamp, raw.as_bytes());
                d["signature"].as_str().unwrap_or_default().split(' ').any(|s| s == expected)
            });
            if signed {
                return Ok(());
            }
            // Another upload, until the workers have the rotated key.
            let form = reqwest::multipart::Form::new()
                .part("file", reqwest::multipart::Part::bytes(b"after the rotation".to_vec()).file_name("rotated.txt"));
            let url = format!("{base}/api/v1/documents");
            let sent = http.post(url).bearer_auth(token_signed_with(rotated)).multipart(form).send().await;
            Err(format!("{} deliveries since, none signed with the rotated key ({sent:?})", latest.len()))
        }
    })
    .await;

    let started = tokio::time::Instant::now();
    // A bad resource says why (the new leader is the one acting), and the rest keeps working.
    let bad = "apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {name: orphan}\nspec: {url: 'https://example.com/hook', secretRef: {name: missing, key: k}}\n";
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(bad)).await;
    let orphan = eventually(limit, "the orphan's reason", || async {
        let webhook = get_json(&cluster, &["-n", "docs", "get", "wh/orphan"]).await;
        match condition(&webhook, "Ready") {
            Some(c) if c["status"] == "False" => Ok(c.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(orphan["reason"], "SecretNotFound", "{orphan}");
    assert!(orphan["message"].as_str().unwrap().contains("missing"), "{orphan}");
    let release = eventually(limit, "the release noting what it left out", || async {
        let release = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
        match condition(&release, "Degraded") {
            Some(c) if c["status"] == "True" => Ok(release),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(condition(&release, "Ready").unwrap()["status"], "True", "{release}");

    println!("the new leader reported the bad resource after {:?}", started.elapsed());

    // A new version rolls out blue-green while a client keeps using the platform: green is
    // deployed beside blue, smoke-checked, switched to and watched, and not one request
    // fails. Every request opens a new connection, so that it goes where the Service points.
    let started = tokio::time::Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(client(base.clone(), token_signed_with(rotated), document_id, stopped.clone()));
    // Subscribers connected before the rollout (to blue, which keeps serving them) and an
    // uploader throughout: every upload's event reaches each subscriber exactly once.
    let (mut ws, mut sse) = subscribers(&base, &token_signed_with(rotated)).await;
    let uploads = tokio::spawn(uploader(base.clone(), token_signed_with(rotated), stopped));
    // The platform at version `v`, analyzed for `window` s, the old color kept `delay` s.
    let version = |v: &str, window: u32, delay: u32| {
        platform(&database.url, &bucket, &hook, "0.05")
            .replace(JWT_SECRET, rotated)
            .replace(HOOK_KEY, ROTATED_HOOK_KEY)
            .replace(
                "version: 1.0.0",
                &format!(
                    "version: {v}\n  analysis: {{windowSeconds: {window}}}\n  promotion: {{scaleDownDelaySeconds: {delay}}}"
                ),
            )
            .replace(":1.0.0'", &format!(":{v}'"))
    };
    let mut watched = phase_watch(&cluster).await;
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.1.0", 5, 30))).await;
    // The leader killed the moment the switch is decided (recorded, not yet acted on): its
    // successor switches once and goes on, and no request fails meanwhile.
    let switching = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(phase) = watched.recv().await {
            if phase == "Switching" {
                return;
            }
        }
    });
    switching.await.expect("version 1.1.0 reaching Switching");
    let (killed, next, took) = kill_leader(&cluster).await;
    println!("leader {killed} killed in Switching; {next} leads after {took:?}");
    let phases = Arc::new(Mutex::new(Vec::<String>::new()));
    let promoted = eventually(Duration::from_secs(180), "version 1.1.0 promoted as green", || {
        let phases = Arc::clone(&phases);
        let cluster = &cluster;
        async move {
            let release = get_json(cluster, &["-n", "docs", "get", "bgr/docs"]).await;
            let status = &release["status"];
            let phase = status["phase"].as_str().unwrap_or_default().to_owned();
            let mut seen = phases.lock().unwrap();
            if seen.last() != Some(&phase) {
                seen.push(phase.clone());
            }
            let done = status["activeVersion"] == "1.1.0" && phase == "Stable";
            if done { Ok(release.clone()) } else { Err(format!("{phase}: {}", status["conditions"])) }
        }
    })
    .await;
    let phases = phases.lock().unwrap().clone();
    let mut after_kill = Vec::new();
    while let Ok(phase) = watched.try_recv() {
        after_kill.push(phase);
    }
    assert_eq!(after_kill, ["Analyzing", "Stable"], "the successor resumed the switch, once, and went on");
    let rolled_out = started.elapsed();
    stop.send_replace(true);
    let (sent, failed) = traffic.await.unwrap();
    println!("version 1.1.0 rolled out in {rolled_out:?} through {phases:?}; {sent} requests, {} failed", failed.len());
    assert!(failed.is_empty(), "requests failed during the rollout: {failed:?}");
    assert!(sent > 50, "the client kept going throughout: {sent}");
    let uploaded = uploads.await.unwrap();
    assert!(uploaded.len() > 10, "the uploader kept going throughout: {}", uploaded.len());
    each_seen_once(&mut ws, &mut sse, &uploaded, "the promoted rollout").await;
    println!("{} uploads during the rollout, each seen once over WebSocket and over SSE", uploaded.len());
    let status = &promoted["status"];
    assert_eq!(status["activeColor"], "green", "{promoted}");
    assert_eq!(status["history"][0]["outcome"], "Promoted", "{promoted}");
    // The built-in checks exercised the API (and their events reached neither subscriber).
    let checks: Vec<(&str, bool)> = status["smokeResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap_or_default(), r["passed"] == true))
        .collect();
    assert_eq!(checks, [("readyz", true), ("round-trip", true), ("websocket", true)], "{promoted}");
    assert_eq!(condition(&promoted, "Promoted").unwrap()["status"], "True", "{promoted}");
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    assert_eq!(service["spec"]["selector"]["vellum.dev/color"], "green", "{service}");
    // Blue was kept for a fast rollback, and is scaled to zero after the delay.
    eventually(limit, "blue scaled to zero after the delay", || async {
        let blue = get_json(&cluster, &["-n", "docs", "get", "deployment/docs-gateway-blue"]).await;
        if blue["spec"]["replicas"] == 0 { Ok(()) } else { Err(blue["spec"]["replicas"].to_string()) }
    })
    .await;

    // Another version, aborted while it serves: traffic goes back to green (which never
    // stopped), the new color is scaled down, and still not one request fails nor one
    // real-time event is lost or repeated.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(client(base.clone(), token_signed_with(rotated), document_id, stopped.clone()));
    let (mut ws, mut sse) = subscribers(&base, &token_signed_with(rotated)).await;
    let uploads = tokio::spawn(uploader(base.clone(), token_signed_with(rotated), stopped));
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&version("1.2.0", 120, 5))).await;
    let analyzing = in_phase(&cluster, "Analyzing", "version 1.2.0 analyzing as blue").await;
    // The leader killed while the new color serves under analysis: its successor resumes
    // the same analysis (same rollout, same start), never deploying or switching again.
    kill_leader(&cluster).await;
    // The analysis message counts the seconds watched: a new one is the new leader's.
    let handed_over = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
    let message = condition(&handed_over, "Progressing").cloned().unwrap_or_default()["message"].clone();
    let resumed = eventually(limit, "the new leader's reconcile", || async {
        let release = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
        let progressing = condition(&release, "Progressing").cloned().unwrap_or_default();
        if progressing["message"] == message { Err(release["status"].to_string()) } else { Ok(release) }
    })
    .await;
    for field in ["phase", "rolloutSince", "analysisSince", "previewVersion", "previewColor"] {
        assert_eq!(resumed["status"][field], analyzing["status"][field], "{field} after the failover: {resumed}");
    }
    let asked = kubectl(&cluster, &["vellum", "-n", "docs", "abort", "bgr/docs"], None).await;
    assert!(asked.contains("annotated vellum.dev/abort"), "{asked}");
    let aborted = in_phase(&cluster, "Aborted", "version 1.2.0 aborted").await;
    stop.send_replace(true);
    let (sent, failed) = traffic.await.unwrap();
    println!("version 1.2.0 aborted while it served; {sent} requests, {} failed", failed.len());
    assert!(failed.is_empty(), "requests failed during the abort: {failed:?}");
    let uploaded = uploads.await.unwrap();
    assert!(uploaded.len() > 10, "the uploader kept going throughout: {}", uploaded.len());
    each_seen_once(&mut ws, &mut sse, &uploaded, "the aborted rollout").await;
    println!("{} uploads during the aborted rollout, each seen once over WebSocket and over SSE", uploaded.len());
    let status = &aborted["status"];
    assert_eq!((status["activeColor"].as_str(), status["activeVersion"].as_str()), (Some("green"), Some("1.1.0")));
    assert_eq!(status["history"][0]["outcome"], "Aborted", "{aborted}");
    // Recorded first, then the request is taken back.
    eventually(limit, "the abort annotation taken back", || async {
        let release = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
        let annotations = &release["metadata"]["annotations"];
        if annotations.get("vellum.dev/abort").is_none() { Ok(()) } else { Err(annotations.to_string()) }
    })
    .await;
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    assert_eq!(service["spec"]["selector"]["vellum.dev/color"], "green", "{service}");
    let blue = get_json(&cluster, &["-n", "docs", "get", "deployment/docs-gateway-blue"]).await;
    assert_eq!(blue["spec"]["replicas"], 0, "the aborted color is scaled down");

    // A broken version (30 % of its API answers are 500) passes its smoke checks, takes the
    // traffic, and is rolled back by the analysis well inside its window.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(client(base.clone(), token_signed_with(rotated), document_id, stopped));
    let broken_version = version("1.3.0-broken", 120, 5);
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&broken_version)).await;
    let rolled_back = eventually(Duration::from_secs(180), "version 1.3.0-broken rolled back", || async {
        let release = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
        let last = &release["status"]["history"][0];
        if last["version"] == "1.3.0-broken" && last["outcome"] == "RolledBack" {
            Ok(release)
        } else {
            Err(release["status"].to_string())
        }
    })
    .await;
    // From the start of the analysis to traffic back on green, as the history records it.
    let took = Duration::from_secs(rolled_back["status"]["history"][0]["analysisSeconds"].as_u64().unwrap());
    stop.send_replace(true);
    let (sent, failed) = traffic.await.unwrap();
    println!(
        "version 1.3.0-broken rolled back {took:?} after its analysis began; {sent} requests, {} answered 500 meanwhile",
        failed.len()
    );
    assert!(took < Duration::from_secs(60), "rolled back inside the 120 s window: {took:?}");
    let status = &rolled_back["status"];
    assert_eq!((status["activeColor"].as_str(), status["activeVersion"].as_str()), (Some("green"), Some("1.1.0")));
    assert!(status["observedErrorRatePercent"].as_f64().unwrap_or(0.0) > 1.0, "{rolled_back}");
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    assert_eq!(service["spec"]["selector"]["vellum.dev/color"], "green", "{service}");
    // The kubectl plugin tells the story as a person asks for it.
    let told = kubectl(&cluster, &["vellum", "-n", "docs", "status", "bgr/docs"], None).await;
    assert!(told.lines().any(|l| l == "Active:     green (version 1.1.0)"), "{told}");
    let history = kubectl(&cluster, &["vellum", "-n", "docs", "history", "bgr/docs"], None).await;
    let outcomes: Vec<&str> = history.lines().skip(1).filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(outcomes, ["RolledBack", "Aborted", "Promoted"], "{history}");
    let listed =
        http.get(format!("{base}/api/v1/documents")).bearer_auth(token_signed_with(rotated)).send().await.unwrap();
    assert_eq!(listed.status(), 200, "green serves again");

    // A version whose smoke check fails never receives traffic: the rollout fails before
    // the switch, with the check's answer in status, and green serves on.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(client(base.clone(), token_signed_with(rotated), document_id, stopped));
    let checked = version("1.4.0", 120, 5).replace(
        "  shardSetRef: metadata",
        "  smokeChecks: [{name: no-such-route, path: /api/v1/no-such-route, expectStatus: 200}]\n  shardSetRef: metadata",
    );
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&checked)).await;
    let failed_release = in_phase(&cluster, "Failed", "version 1.4.0 failing its smoke check").await;
    stop.send_replace(true);
    let (sent, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "requests failed while 1.4.0 was checked: {failed:?}");
    let status = &failed_release["status"];
    let smoke = status["smokeResults"].as_array().unwrap();
    let check = smoke.iter().find(|r| r["name"] == "no-such-route").unwrap();
    assert_eq!((check["passed"].as_bool(), check["statusCode"].as_i64()), (Some(false), Some(404)), "{failed_release}");
    assert_eq!(status["history"][0]["outcome"], "Failed", "{failed_release}");
    assert!(status["history"][0]["analysisSeconds"].is_null(), "never analyzed, never switched: {failed_release}");
    let degraded = condition(&failed_release, "Degraded").unwrap();
    assert_eq!(degraded["reason"], "SmokeCheckFailed", "{failed_release}");
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    assert_eq!(service["spec"]["selector"]["vellum.dev/color"], "green", "{service}");
    println!("version 1.4.0 failed its smoke check before any traffic reached it; {sent} requests, 0 failed");
    // A manual release waits for a person: smoke-checked, it takes no user's request until
    // `kubectl vellum promote`, then switches, is watched and promoted, which `kubectl wait`
    // sees.
    let manual = version("1.5.0", 2, 5).replace("promotion: {", "promotion: {mode: Manual, ");
    kubectl(&cluster, &["apply", "-n", "docs", "-f", "-"], Some(&manual)).await;
    in_phase(&cluster, "AwaitingPromotion", "version 1.5.0 waiting for its promotion").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
    assert_eq!(waiting["status"]["phase"], "AwaitingPromotion", "it waits: {waiting}");
    let service = get_json(&cluster, &["-n", "docs", "get", "service/docs"]).await;
    assert_eq!(service["spec"]["selector"]["vellum.dev/color"], "green", "{service}");
    let asked = kubectl(&cluster, &["vellum", "-n", "docs", "promote", "bgr/docs"], None).await;
    assert!(asked.contains("annotated vellum.dev/promote"), "{asked}");
    kubectl(&cluster, &["-n", "docs", "wait", "--for=condition=Promoted", "bgr/docs", "--timeout=120s"], None).await;
    let promoted = get_json(&cluster, &["-n", "docs", "get", "bgr/docs"]).await;
    let status = &promoted["status"];
    assert_eq!((status["activeColor"].as_str(), status["activeVersion"].as_str()), (Some("blue"), Some("1.5.0")));
    assert_eq!(status["history"][0]["outcome"], "Promoted", "{promoted}");
    println!("version 1.5.0 waited for kubectl vellum promote, then was promoted as blue");
    // The default tier, deleted while it holds blobs, has nowhere to drain to: it stays and
    // says so, and the platform keeps serving from it.
    kubectl(&cluster, &["-n", "docs", "delete", "storagetier", "hot", "--wait=false"], None).await;
    let blocked = eventually(limit, "the default tier's drain blocked", || async {
        let tier = get_json(&cluster, &["-n", "docs", "get", "storagetier/hot"]).await;
        match condition(&tier, "Ready") {
            Some(c) if c["reason"] == "DrainBlocked" => Ok(c.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(blocked["message"].as_str().unwrap().contains("default"), "{blocked}");
    let url = format!("{base}/api/v1/documents/{document_id}/download");
    let content = http.get(url).bearer_auth(token_signed_with(rotated)).send().await.unwrap();
    assert_eq!(content.status(), 200, "the platform still serves from the tier");
    let started = tokio::time::Instant::now();
    // Deleting the platform leaves nothing the operator made.
    kubectl(&cluster, &["delete", "namespace", "docs", "--wait=true", "--timeout=120s"], None).await;
    let left = kubectl(
        &cluster,
        &["get", "all,configmap,secret,cronjob,job", "-n", "docs", "-o", "name", "--ignore-not-found"],
        None,
    )
    .await;
    assert!(left.trim().is_empty(), "left behind: {left}");
    println!("the platform was deleted in {:?}; {:?} since the start", started.elapsed(), t0.elapsed());
}
