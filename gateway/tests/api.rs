//! The HTTP API as clients use it, over a socket, on SQLite and on Postgres.

use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};
use vellum_testkit::TestDatabase;

const TIERS: &str = "
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: hot}
spec:
  class: HOT
  default: true
  backend: {url: 'file://tiers/hot'}
  compression: {enabled: true}
  costPerGbMonth: 0.023
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: cold}
spec:
  class: COLD
  backend: {url: 'file://tiers/cold'}
  costPerGbMonth: 0.004
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: cool-down}
spec:
  transitions: [{afterDays: 30, toTier: cold}]
";

struct Gateway {
    running: Option<Running>,
    client: reqwest::Client,
    base: String,
    dir: tempfile::TempDir,
    db: Option<TestDatabase>,
}

async fn gateway(postgres: bool, rate_limit: u32) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("tiers.yaml"), TIERS).unwrap();
    let db = if postgres { Some(TestDatabase::new().await.unwrap()) } else { None };
    let options = standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        config_dir: Some(config),
        secrets_dir: None,
        config_reload: std::time::Duration::from_secs(5),
        database_url: db.as_ref().map(|d| d.url.clone()),
        auth: AuthSettings {
            secret: Some(b"test-secret".to_vec()),
            rate_per_second: rate_limit,
            rate_burst: rate_limit,
            ..AuthSettings::default()
        },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec!["127.0.0.1".into()],
        nats_url: None,
        link_key: None,
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    };
    let running = standalone::start(options).await.unwrap();
    let base = running.url.clone();
    Gateway { running: Some(running), client: reqwest::Client::new(), base, dir, db }
}

impl Gateway {
    fn token(&self, user: &str, roles: &[&str]) -> String {
        self.running.as_ref().unwrap().state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, user: &str, path: &str) -> reqwest::RequestBuilder {
        self.send_as(Method::GET, user, path)
    }

    /// A request to `path` as `user`, a plain user.
    fn send_as(&self, method: Method, user: &str, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(self.token(user, &["user"]))
    }

    async fn upload(&self, user: &str, filename: &str, body: &'static [u8]) -> Value {
        let form = Form::new().part("file", Part::bytes(body).file_name(filename.to_owned()));
        let response = self
            .client
            .post(self.url("/api/v1/documents"))
            .bearer_auth(self.token(user, &["user"]))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }
}

async fn error_of(response: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    body["message"].as_str().unwrap().to_owned()
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::gateway(false, 0).await).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::gateway(true, 0).await).await } )*
        }
    };
}

on_both!(
    chunked_upload_sessions,
    tus_protocol,
    uploads_downloads_and_conditional_requests,
    versions_restore_and_deletion,
    auth_and_ownership,
    bad_input_gets_precise_errors,
    signed_links_expire_and_resist_forgery,
    two_editors_cannot_overwrite_each_other,
    webhook_api,
    metadata_reads_are_cached_until_a_change
);

/// A receiver on loopback that records deliveries and answers with `status`.
async fn webhook_receiver(status: u16) -> (String, std::sync::Arc<std::sync::Mutex<Vec<(HeaderMap, String)>>>) {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
        let record = Arc::clone(&record);
        async move {
            let mut h = HeaderMap::new();
            for (k, v) in &headers {
                h.insert(
                    header::HeaderName::from_bytes(k.as_str().as_bytes()).unwrap(),
                    header::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                );
            }
            record.lock().unwrap().push((h, body));
            (axum::http::StatusCode::from_u16(status).unwrap(), r#"{"received":true}"#)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/docs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[allow(clippy::too_many_lines)]
async fn webhook_api(gw: Gateway) {
    let admin = gw.token("root", &["user", "admin"]);
    let (url, seen) = webhook_receiver(200).await;
    let create = |body: Value| gw.client.post(gw.url("/api/webhooks")).bearer_auth(&admin).json(&body).send();

    // The seed's request, answered in the seed's shape.
    let response = create(json!({
        "name": "Document Upload Notifier",
        "url": url,
        "secret": "your-webhook-secret-for-hmac",
        "eventTypes": ["DOCUMENT_UPLOADED", "DOCUMENT_ARCHIVED", "DOCUMENT_DELETED"],
        "retryCount": 3,
        "timeoutSeconds": 30
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let hook: Value = response.json().await.unwrap();
    let id = hook["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("document-upload-notifier-"), "{id}");
    assert_eq!(hook["name"], "Document Upload Notifier");
    assert_eq!(hook["active"], true);
    assert_eq!(hook["eventTypes"], json!(["DOCUMENT_UPLOADED", "DOCUMENT_ARCHIVED", "DOCUMENT_DELETED"]));
    assert!(hook["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(!hook.to_string().contains("your-webhook-secret"), "the secret is never shown");

    // Users may not manage webhooks; bad input gets precise errors.
    let user = gw.client.get(gw.url("/api/webhooks")).bearer_auth(gw.token("ann", &["user"])).send().await.unwrap();
    assert!(error_of(user, StatusCode::FORBIDDEN).await.contains("admin"));
    let bad = [
        (json!({"name": "x", "url": "http://10.0.0.1/h", "secret": "s"}), "private"),
        (json!({"name": "x", "url": "ftp://example.com/", "secret": "s"}), "scheme"),
        (json!({"name": "x", "url": "http://example.com/", "secret": "whsec_!!"}), "base64"),
        (json!({"name": "x", "url": "http://example.com/", "secret": "s", "retryCount": 99}), "retryCount"),
        (json!({"name": "", "url": "http://example.com/", "secret": "s"}), "name"),
        (
            json!({"name": "x", "url": "http://example.com/", "secret": "s",
                   "headers": [{"name": "Webhook-Signature", "value": "v1,forged"}]}),
            "cannot be overridden",
        ),
    ];
    for (body, expected) in bad {
        let message = error_of(create(body.clone()).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(message.contains(expected), "{body}: {message}");
        assert!(!message.contains("whsec_!!"), "secrets stay out of errors");
    }
    let unknown = create(json!({"name": "x", "url": "http://example.com/", "secret": "s", "eventTypes": ["NOPE"]}))
        .await
        .unwrap();
    assert!(error_of(unknown, StatusCode::UNPROCESSABLE_ENTITY).await.contains("NOPE"));

    // An upload is delivered, signed both ways with the secret as given.
    let doc = gw.upload("ann", "contract.pdf", b"%PDF-1.7 q4").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (headers, body) = seen.lock().unwrap()[0].clone();
    let payload: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(payload["eventType"], "DOCUMENT_UPLOADED");
    assert_eq!(payload["documentId"], doc["id"]);
    assert_eq!(payload["filename"], "contract.pdf");
    assert_eq!(payload["uploadedBy"], "ann");
    assert_eq!(headers["x-event-type"], "DOCUMENT_UPLOADED");
    assert_eq!(
        headers["x-webhook-signature"],
        vellum_core::signing::legacy_signature(b"your-webhook-secret-for-hmac", body.as_bytes()).as_str()
    );
    assert!(headers["webhook-signature"].to_str().unwrap().starts_with("v1,"));

    // Stats, delivery log and test, in the seed's shapes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stats: Value = loop {
        let stats: Value = gw
            .client
            .get(gw.url(&format!("/api/webhooks/{id}/stats")))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if stats["totalCalls"] == 1 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["webhookId"], id.as_str());
    assert_eq!(
        (stats["totalCalls"].as_i64(), stats["successCount"].as_i64(), stats["failureCount"].as_i64()),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(stats["successRate"], 100.0);
    assert_eq!(stats["active"], true);
    assert!(stats["lastTriggered"].is_string());
    assert_eq!(stats["recentEvents"][0]["eventType"], "DOCUMENT_UPLOADED");
    let log: Value = gw
        .client
        .get(gw.url(&format!("/api/webhooks/{id}/events?page=0&size=20")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["totalElements"], 1);
    assert_eq!(log["content"][0]["status"], "SUCCESS");
    assert_eq!(log["content"][0]["attemptLog"][0]["statusCode"], 200);
    assert_eq!(log["content"][0]["attemptLog"][0]["responseBody"], r#"{"received":true}"#);
    let bad_page = gw
        .client
        .get(gw.url(&format!("/api/webhooks/{id}/events?size=1000")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    error_of(bad_page, StatusCode::BAD_REQUEST).await;
    let test: Value = gw
        .client
        .post(gw.url(&format!("/api/webhooks/{id}/test")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(test["success"], true);
    assert_eq!(test["responseCode"], 200);
    assert_eq!(test["responseBody"], r#"{"received":true}"#);
    assert!(test["durationMs"].is_i64());
    assert_eq!(seen.lock().unwrap().last().unwrap().0["x-event-type"], "WEBHOOK_TEST");

    // Listed under both paths; replay of nothing FAILED replays nothing; delete.
    let list: Value =
        gw.client.get(gw.url("/api/v1/webhooks")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["source"], "api");
    let replay: Value = gw
        .client
        .post(gw.url(&format!("/api/webhooks/{id}/replay")))
        .bearer_auth(&admin)
        .json(&json!({"since": "2020-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replay["replayed"], 0);
    let both = gw
        .client
        .post(gw.url(&format!("/api/webhooks/{id}/replay")))
        .bearer_auth(&admin)
        .json(&json!({"since": "2020-01-01T00:00:00Z", "deliveryId": 1}))
        .send()
        .await
        .unwrap();
    error_of(both, StatusCode::BAD_REQUEST).await;
    let reactivated: Value = gw
        .client
        .post(gw.url(&format!("/api/webhooks/{id}/reactivate")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reactivated["active"], true);
    let gone = gw.client.delete(gw.url(&format!("/api/webhooks/{id}"))).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NO_CONTENT);
    let missing = gw.client.get(gw.url(&format!("/api/webhooks/{id}/stats"))).bearer_auth(&admin).send().await.unwrap();
    error_of(missing, StatusCode::NOT_FOUND).await;
}

async fn uploads_downloads_and_conditional_requests(gw: Gateway) {
    // Multipart, with fields after the file.
    let form = Form::new()
        .part("file", Part::bytes(b"hello, vellum".as_slice()).file_name("hello.txt"))
        .text("title", "Greeting")
        .text("tags", "a, b")
        .text("metadata", r#"{"dept":"ops"}"#);
    let response = gw.send_as(Method::POST, "alice", "/api/v1/documents").multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let doc: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/api/v1/documents/{}", doc["id"]));
    assert_eq!(doc["title"], "Greeting");
    assert_eq!(doc["tags"], json!(["a", "b"]));
    assert_eq!(doc["metadata"]["dept"], "ops");
    assert_eq!(doc["deduplicated"], false);

    // Raw body, same bytes, another user: deduplicated.
    let raw: Value = gw
        .send_as(Method::POST, "bob", "/api/v1/documents?filename=copy.txt&tags=x")
        .header(header::CONTENT_TYPE, "text/plain")
        .body("hello, vellum")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["deduplicated"], true);
    assert_eq!(raw["checksum"], doc["checksum"]);

    let content = format!("/api/v1/documents/{}/content", doc["id"]);
    let full = gw.get("alice", &content).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    let etag = full.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", doc["checksum"].as_str().unwrap().trim_start_matches("sha256:")));
    assert_eq!(full.headers()[header::CONTENT_TYPE], "text/plain");
    assert_eq!(full.headers()[header::CONTENT_LENGTH], "13");
    assert!(full.headers()[header::CONTENT_DISPOSITION].to_str().unwrap().contains("hello.txt"));
    assert_eq!(full.text().await.unwrap(), "hello, vellum");

    let part = gw.get("alice", &content).header(header::RANGE, "bytes=7-").send().await.unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()[header::CONTENT_RANGE], "bytes 7-12/13");
    assert_eq!(part.text().await.unwrap(), "vellum");

    let beyond = gw.get("alice", &content).header(header::RANGE, "bytes=100-").send().await.unwrap();
    assert_eq!(beyond.headers()[header::CONTENT_RANGE], "bytes */13");
    error_of(beyond, StatusCode::RANGE_NOT_SATISFIABLE).await;

    let cached = gw.get("alice", &content).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let stale_range = gw
        .get("alice", &content)
        .header(header::RANGE, "bytes=0-0")
        .header(header::IF_RANGE, "\"old\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale_range.status(), StatusCode::OK, "If-Range with another ETag serves the whole");

    // Listing, with a filter, and the metadata patch.
    let page: Value = gw.get("alice", "/api/v1/documents?tag=a&limit=10").send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let patched: Value = gw
        .send_as(Method::PATCH, "alice", &format!("/api/v1/documents/{}", doc["id"]))
        .json(&json!({"description": "Says hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["description"], "Says hello");
    // The seed's path prefix answers the same.
    let seed: Value =
        gw.get("alice", &format!("/api/documents/{}", doc["id"])).send().await.unwrap().json().await.unwrap();
    assert_eq!(seed["id"], doc["id"]);
}

/// Seed 001's conflict resolution: metadata changes and new versions honour `If-Match`, so
/// the second of two editors who read the same document is told (412, with the ETag now)
/// instead of silently overwriting the first.
async fn two_editors_cannot_overwrite_each_other(gw: Gateway) {
    let doc = gw.upload("alice", "plan.md", b"draft").await;
    let url = gw.url(&format!("/api/v1/documents/{}", doc["id"]));
    let token = gw.token("alice", &["user"]);
    let read = gw.client.get(&url).bearer_auth(&token).send().await.unwrap();
    let seen = read.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert!(seen.starts_with('"') && seen.ends_with('"'), "{seen}");
    let patch = |title: &str, tag: &str| {
        gw.client.patch(&url).bearer_auth(&token).header(header::IF_MATCH, tag).json(&json!({"title": title})).send()
    };
    // The first editor's change goes through and answers the new ETag.
    let first = patch("First", &seen).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let now = first.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert_ne!(now, seen);
    // The second, based on what both read, is refused and told the ETag now.
    let second = patch("Second", &seen).await.unwrap();
    assert_eq!(second.headers()[header::ETAG].to_str().unwrap(), now);
    assert!(error_of(second, StatusCode::PRECONDITION_FAILED).await.contains("changed since it was read"));
    let seed_path = gw.url(&format!("/api/documents/{}/metadata", doc["id"]));
    let stale =
        gw.client.put(&seed_path).bearer_auth(&token).header(header::IF_MATCH, &seen).json(&json!({"title": "x"}));
    error_of(stale.send().await.unwrap(), StatusCode::PRECONDITION_FAILED).await;
    // A new version on a stale ETag is refused before its bytes are kept; on the current one
    // (or `*`, or a list holding it) it goes through.
    let version = |tag: &str, body: &'static [u8]| {
        let form = Form::new().part("file", Part::bytes(body).file_name("plan.md"));
        gw.client
            .post(format!("{url}/versions"))
            .bearer_auth(&token)
            .header(header::IF_MATCH, tag)
            .multipart(form)
            .send()
    };
    error_of(version(&seen, b"stale").await.unwrap(), StatusCode::PRECONDITION_FAILED).await;
    let current: Value = gw.client.get(&url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!((current["title"].as_str(), current["currentVersion"].as_i64()), (Some("First"), Some(1)));
    let listed = format!("\"other\", {now}");
    assert_eq!(version(&listed, b"second").await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(version("*", b"third").await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(patch("Weak", &format!("W/{now}")).await.unwrap().status(), StatusCode::PRECONDITION_FAILED);
    // Without If-Match, a change is unconditional, as before.
    let plain = gw.client.patch(&url).bearer_auth(&token).json(&json!({"title": "Last"})).send().await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
}

async fn versions_restore_and_deletion(gw: Gateway) {
    let doc = gw.upload("alice", "report.md", b"first").await;
    let id = &doc["id"];
    let form = Form::new()
        .part("file", Part::bytes(b"second".as_slice()).file_name("report.md"))
        .text("changeDescription", "Fixed typos");
    let v2 = gw
        .send_as(Method::POST, "alice", &format!("/api/v1/documents/{id}/versions"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(v2.status(), StatusCode::CREATED);
    let history: Value =
        gw.get("alice", &format!("/api/v1/documents/{id}/versions")).send().await.unwrap().json().await.unwrap();
    assert_eq!(history["currentVersion"], 2);
    assert_eq!(history["versions"][0]["changeDescription"], "Fixed typos");
    assert_eq!(history["versions"][0]["isLatest"], true);

    let restored: Value = gw
        .send_as(Method::POST, "alice", &format!("/api/v1/documents/{id}/versions/1/restore"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        restored,
        json!({"documentId": id, "versionNumber": 3, "restoredFromVersion": 1, "message": "Version 1 restored as version 3"})
    );
    let body = gw.get("alice", &format!("/api/v1/documents/{id}/content")).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "first");
    let v2_body = gw
        .get("alice", &format!("/api/v1/documents/{id}/versions/2/content"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(v2_body, "second");

    // Legal hold: admins only, and it blocks deletion.
    let hold = format!("/api/v1/documents/{id}/legal-hold");
    let refused = gw.send_as(Method::PUT, "alice", &hold).send().await.unwrap();
    error_of(refused, StatusCode::FORBIDDEN).await;
    let on_hold: Value = gw
        .client
        .put(gw.url(&hold))
        .bearer_auth(gw.token("root", &["admin"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(on_hold["legalHold"], true);
    let doc_url = gw.url(&format!("/api/v1/documents/{id}"));
    let blocked = gw.client.delete(&doc_url).bearer_auth(gw.token("alice", &["user"])).send().await.unwrap();
    assert!(error_of(blocked, StatusCode::CONFLICT).await.contains("legal hold"));
    gw.client.delete(gw.url(&hold)).bearer_auth(gw.token("root", &["admin"])).send().await.unwrap();

    let deleted = gw.client.delete(&doc_url).bearer_auth(gw.token("alice", &["user"])).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    error_of(gw.get("alice", &format!("/api/v1/documents/{id}")).send().await.unwrap(), StatusCode::NOT_FOUND).await;
    let purged = gw
        .client
        .delete(format!("{doc_url}?permanent=true"))
        .bearer_auth(gw.token("alice", &["user"]))
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), StatusCode::NO_CONTENT);
}

async fn auth_and_ownership(gw: Gateway) {
    let doc = gw.upload("alice", "private.txt", b"mine").await;
    let path = format!("/api/v1/documents/{}", doc["id"]);
    let none = gw.client.get(gw.url(&path)).send().await.unwrap();
    assert!(none.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
    error_of(none, StatusCode::UNAUTHORIZED).await;
    let garbage = gw.client.get(gw.url(&path)).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(error_of(garbage, StatusCode::UNAUTHORIZED).await, "the token is not a JWT");
    let other =
        vellum_gateway::auth::Auth::new(&AuthSettings { secret: Some(b"other".to_vec()), ..AuthSettings::default() })
            .unwrap()
            .mint("alice", &["admin"], Duration::from_secs(60))
            .unwrap();
    let forged = gw.client.get(gw.url(&path)).bearer_auth(other).send().await.unwrap();
    assert_eq!(error_of(forged, StatusCode::UNAUTHORIZED).await, "the token's signature does not verify");
    // Another user's document does not exist for them; an admin sees it.
    error_of(gw.get("bob", &path).send().await.unwrap(), StatusCode::NOT_FOUND).await;
    let seen = gw.client.get(gw.url(&path)).bearer_auth(gw.token("root", &["admin"])).send().await.unwrap();
    assert_eq!(seen.status(), StatusCode::OK);
}

async fn bad_input_gets_precise_errors(gw: Gateway) {
    let token = gw.token("alice", &["user"]);
    let post = |path: &str| gw.client.post(gw.url(path)).bearer_auth(&token);
    let traversal = Form::new().part("file", Part::bytes(b"x".as_slice()).file_name("../../etc/passwd"));
    let message =
        error_of(post("/api/v1/documents").multipart(traversal).send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    assert!(message.contains("is a path"), "{message}");
    let no_name = post("/api/v1/documents").body("x").send().await.unwrap();
    assert!(error_of(no_name, StatusCode::BAD_REQUEST).await.contains("no file name"));
    let mut headers = HeaderMap::new();
    headers.insert("x-filename", header::HeaderValue::from_bytes(b"caf\xe9.txt").unwrap());
    let latin1 = post("/api/v1/documents").headers(headers).body("x").send().await.unwrap();
    assert!(error_of(latin1, StatusCode::BAD_REQUEST).await.contains("UTF-8"));
    let big = post("/api/v1/documents?filename=big.bin").body(vec![0u8; (1 << 20) + 1]).send().await.unwrap();
    assert!(error_of(big, StatusCode::PAYLOAD_TOO_LARGE).await.contains("limit"));
    let bad_meta = post("/api/v1/documents?filename=a.txt&metadata=%5B1%5D").body("x").send().await.unwrap();
    assert!(error_of(bad_meta, StatusCode::BAD_REQUEST).await.contains("JSON object"));
    let unknown = post("/api/v1/documents?filename=a.txt&colour=red").body("x").send().await.unwrap();
    assert!(error_of(unknown, StatusCode::BAD_REQUEST).await.contains("colour"));

    let doc = gw.upload("alice", "a.txt", b"a").await;
    let malformed = gw
        .client
        .patch(gw.url(&format!("/api/v1/documents/{}", doc["id"])))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"title\": ")
        .send()
        .await
        .unwrap();
    error_of(malformed, StatusCode::BAD_REQUEST).await;
    error_of(gw.get("alice", "/api/v1/documents/abc").send().await.unwrap(), StatusCode::NOT_FOUND).await;
    error_of(gw.get("alice", "/api/v1/documents?limit=0").send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    error_of(gw.get("alice", "/api/v1/documents?from=yesterday").send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    error_of(gw.get("alice", "/api/v1/nothing-here").send().await.unwrap(), StatusCode::NOT_FOUND).await;
    // Nothing of the refused uploads was kept.
    let page: Value = gw.get("alice", "/api/v1/documents").send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

async fn signed_links_expire_and_resist_forgery(gw: Gateway) {
    let doc = gw.upload("alice", "shared.txt", b"for your eyes").await;
    let link: Value = gw
        .send_as(Method::POST, "alice", &format!("/api/v1/documents/{}/links", doc["id"]))
        .json(&json!({"expiresInSeconds": 60}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = link["url"].as_str().unwrap();
    assert_eq!(gw.client.get(url).send().await.unwrap().text().await.unwrap(), "for your eyes");
    let tampered = url.replace(&format!("/{}.", doc["id"]), "/1.");
    error_of(gw.client.get(&tampered).send().await.unwrap(), StatusCode::FORBIDDEN).await;
    let mut flipped = url.to_owned();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    error_of(gw.client.get(&flipped).send().await.unwrap(), StatusCode::FORBIDDEN).await;
    let too_long = gw
        .send_as(Method::POST, "alice", &format!("/api/v1/documents/{}/links", doc["id"]))
        .json(&json!({"expiresInSeconds": 99_999_999}))
        .send()
        .await
        .unwrap();
    error_of(too_long, StatusCode::BAD_REQUEST).await;
}

/// The document list pages by number as the seed's Spring clients ask (`page`, `size`), as
/// the webhook event list does, beside its cursors.
#[tokio::test]
async fn documents_page_by_number_as_spring_clients_ask() {
    let gw = gateway(false, 0).await;
    for name in ["1.txt", "2.txt", "3.txt", "4.txt", "5.txt"] {
        gw.upload("paula", name, b"paged").await;
    }
    gw.upload("someone-else", "6.txt", b"paged").await;
    let all: Value = gw.get("paula", "/api/v1/documents?limit=10").send().await.unwrap().json().await.unwrap();
    let all: Vec<Value> = all["items"].as_array().unwrap().iter().map(|d| d["id"].clone()).collect();
    assert_eq!(all.len(), 5);
    let mut seen = Vec::new();
    for (page, expected, last) in [(0, 2, false), (1, 2, false), (2, 1, true), (3, 0, true)] {
        let path = if page == 1 { "/api/documents" } else { "/api/v1/documents" };
        let answer = gw.get("paula", &format!("{path}?page={page}&size=2")).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["content"].as_array().unwrap().len(), expected, "page {page}: {body}");
        assert_eq!((body["page"].as_u64(), body["size"].as_u64()), (Some(page), Some(2)));
        assert_eq!(body["numberOfElements"], expected);
        assert_eq!((body["first"].as_bool(), body["last"].as_bool()), (Some(page == 0), Some(last)), "{body}");
        assert_eq!(body["nextCursor"].is_string(), !last);
        seen.extend(body["content"].as_array().unwrap().iter().map(|d| d["id"].clone()));
    }
    assert_eq!(seen, all, "the pages are the list, in its order, each document once");
    let default: Value = gw.get("paula", "/api/v1/documents?page=0").send().await.unwrap().json().await.unwrap();
    assert_eq!((default["size"].as_u64(), default["numberOfElements"].as_u64()), (Some(20), Some(5)));
    for (query, says) in [
        ("page=0&size=2&limit=2", "not both"),
        ("size=2&cursor=abc", "not both"),
        ("page=0&size=0", "size must be between 1 and 1000"),
        ("page=20&size=1000", "nextCursor"),
    ] {
        let answer = gw.get("paula", &format!("/api/v1/documents?{query}")).send().await.unwrap();
        let message = error_of(answer, StatusCode::BAD_REQUEST).await;
        assert!(message.contains(says), "{query}: {message}");
    }
}

#[tokio::test]
async fn a_user_over_the_rate_limit_is_told_when_to_come_back() {
    let gw = gateway(false, 3).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(gw.get("alice", "/api/v1/documents").send().await.unwrap());
    }
    let limited = statuses.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).expect("a 429");
    let retry: u64 = limited.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    error_of(limited, StatusCode::TOO_MANY_REQUESTS).await;
    // Another user is not held back.
    assert_eq!(gw.get("bob", "/api/v1/documents").send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn health_readiness_and_graceful_shutdown() {
    let mut gw = gateway(false, 0).await;
    assert_eq!(gw.client.get(gw.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    let ready: Value = gw.client.get(gw.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert!(gw.client.get(gw.url("/healthz")).send().await.unwrap().headers().contains_key("x-request-id"));
    gw.upload("alice", "a.txt", b"twice").await;
    gw.upload("bob", "b.txt", b"twice").await;
    let doc = gw.upload("carol", "c.txt", b"thrice").await;
    gw.get("carol", &format!("/api/v1/documents/{}/content", doc["id"])).send().await.unwrap();
    // The relay publishes the three upload events soon after their commits.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = gw.client.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l == "vellum_gateway_outbox_depth 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for line in [
        r#"vellum_gateway_http_requests_total{method="GET",route="/healthz",status="200"} 2"#,
        r#"vellum_gateway_http_requests_total{method="POST",route="/api/v1/documents",status="201"} 3"#,
        "vellum_gateway_deduplicated_bytes_total 5",
        "vellum_gateway_outbox_depth 0",
        r#"vellum_gateway_http_response_bytes_total{route="/api/v1/documents/{id}/content"} 6"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from:\n{metrics}");
    }
    assert!(metrics.contains("vellum_gateway_http_request_duration_seconds_bucket"));
    // The same under Spring Boot Actuator's names, which the seeds' probes and dashboards use.
    let actuator = |path: &str| gw.client.get(gw.url(path)).send();
    let health = actuator("/actuator/health").await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "UP");
    assert_eq!(
        (&health["components"]["db"]["status"], &health["components"]["defaultTier"]["status"]),
        (&json!("UP"), &json!("UP"))
    );
    for probe in ["/actuator/health/liveness", "/actuator/health/readiness"] {
        let answer: Value = actuator(probe).await.unwrap().json().await.unwrap();
        assert_eq!(answer["status"], "UP", "{probe}");
    }
    let prometheus = actuator("/actuator/prometheus").await.unwrap().text().await.unwrap();
    assert!(prometheus.contains("vellum_gateway_outbox_depth"), "{prometheus}");
    gw.running.take().unwrap().shutdown().await.unwrap();
    assert!(gw.client.get(gw.url("/healthz")).send().await.is_err(), "nothing serves after shutdown");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

// One scenario, step by step, as a client lives it.
#[allow(clippy::too_many_lines)]
async fn chunked_upload_sessions(gw: Gateway) {
    let token = gw.token("alice", &["user"]);
    let file: Vec<u8> = (0..2500u32).map(|i| (i % 97) as u8).collect();
    let init = json!({"filename": "big.bin", "totalSize": 2500, "chunkSize": 1000, "tags": ["chunked"],
                      "checksum": format!("sha256:{}", sha256_hex(&file))});
    let response =
        gw.client.post(gw.url("/api/v1/upload/initiate")).bearer_auth(&token).json(&init).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let session: Value = response.json().await.unwrap();
    assert_eq!((session["totalChunks"].as_u64(), session["status"].as_str()), (Some(3), Some("ACTIVE")));
    let id = session["sessionId"].as_str().unwrap().to_owned();
    let chunk_url = |n: u64| gw.url(&format!("/api/v1/upload/{id}/chunk/{n}"));
    let put = |n: u64, body: Vec<u8>, sum: Option<String>| {
        let mut request = gw.client.put(chunk_url(n)).bearer_auth(&token).body(body);
        if let Some(sum) = sum {
            request = request.header("x-chunk-checksum", sum);
        }
        request.send()
    };
    let part = |n: usize| file[n * 1000..((n + 1) * 1000).min(2500)].to_vec();

    // Out of order, with checksums; bad chunks change nothing.
    let last = put(2, part(2), Some(format!("sha256:{}", sha256_hex(&part(2))))).await.unwrap();
    assert_eq!(last.status(), StatusCode::OK);
    let wrong_sum = put(0, part(0), Some(format!("sha256:{}", sha256_hex(b"other")))).await.unwrap();
    assert!(error_of(wrong_sum, StatusCode::UNPROCESSABLE_ENTITY).await.contains("SHA-256"));
    let short = put(0, part(0)[..999].to_vec(), None).await.unwrap();
    assert!(error_of(short, StatusCode::BAD_REQUEST).await.contains("exactly 1000 bytes"));
    let beyond = put(3, vec![1], None).await.unwrap();
    assert!(error_of(beyond, StatusCode::BAD_REQUEST).await.contains("out of bounds"));
    let missing: Value = gw
        .client
        .get(gw.url(&format!("/api/v1/upload/{id}/missing-chunks")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(missing["missingChunks"], json!([0, 1]));
    let early =
        gw.client.post(gw.url(&format!("/api/v1/upload/{id}/complete"))).bearer_auth(&token).send().await.unwrap();
    assert!(error_of(early, StatusCode::BAD_REQUEST).await.contains("2 chunk(s) missing: 0, 1"));
    // Another user cannot see or touch the session.
    let stranger =
        gw.client.put(chunk_url(0)).bearer_auth(gw.token("bob", &["user"])).body(part(0)).send().await.unwrap();
    error_of(stranger, StatusCode::NOT_FOUND).await;

    put(0, part(0), None).await.unwrap();
    put(1, vec![0u8; 1000], None).await.unwrap();
    put(1, part(1), None).await.unwrap(); // sent again: replaces
    let chunks: Value = gw
        .client
        .get(gw.url(&format!("/api/v1/upload/{id}/chunks")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(chunks["chunks"][1]["checksum"], format!("sha256:{}", sha256_hex(&part(1))));
    let status: Value = gw
        .client
        .get(gw.url(&format!("/api/v1/upload/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((status["uploadedChunks"].as_u64(), status["progress"].as_f64()), (Some(3), Some(100.0)));

    let done =
        gw.client.post(gw.url(&format!("/api/v1/upload/{id}/complete"))).bearer_auth(&token).send().await.unwrap();
    assert_eq!(done.status(), StatusCode::CREATED);
    let doc: Value = done.json().await.unwrap();
    assert_eq!(doc["checksum"], format!("sha256:{}", sha256_hex(&file)));
    assert_eq!(doc["tags"], json!(["chunked"]));
    let body = gw
        .get("alice", &format!("/api/v1/documents/{}/content", doc["id"]))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), file.as_slice());
    let again: Value = gw
        .client
        .post(gw.url(&format!("/api/v1/upload/{id}/complete")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], doc["id"], "completing twice answers with the same document");
    let late = put(0, part(0), None).await.unwrap();
    error_of(late, StatusCode::GONE).await;
    // A completed session reports what it received, all of it.
    let status_of = |id: String| {
        let request = gw.client.get(gw.url(&format!("/api/v1/upload/{id}"))).bearer_auth(&token);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let finished = status_of(id.clone()).await;
    assert_eq!(finished["status"], "COMPLETED");
    assert_eq!((finished["uploadedChunks"].as_u64(), finished["uploadedBytes"].as_u64()), (Some(3), Some(2500)));
    assert_eq!(finished["progress"].as_f64(), Some(100.0));
    // Progress reads 100 only once every byte is in, however close the rest comes.
    let init = json!({"filename": "nearly.bin", "totalSize": 100_001, "chunkSize": 100_000});
    let nearly: Value = gw
        .client
        .post(gw.url("/api/v1/upload/initiate"))
        .bearer_auth(&token)
        .json(&init)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nearly_id = nearly["sessionId"].as_str().unwrap().to_owned();
    let first = gw.client.put(gw.url(&format!("/api/v1/upload/{nearly_id}/chunk/0"))).bearer_auth(&token);
    assert_eq!(first.body(vec![7u8; 100_000]).send().await.unwrap().status(), StatusCode::OK);
    let nearly = status_of(nearly_id).await;
    assert_eq!((nearly["uploadedChunks"].as_u64(), nearly["progress"].as_f64()), (Some(1), Some(99.99)), "{nearly}");

    // A session whose assembled bytes do not match the announced checksum fails and can be cancelled.
    let init = json!({"filename": "x.bin", "totalSize": 3, "checksum": format!("sha256:{}", sha256_hex(b"abc"))});
    let session: Value = gw
        .client
        .post(gw.url("/api/v1/upload/initiate"))
        .bearer_auth(&token)
        .json(&init)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = session["sessionId"].as_str().unwrap().to_owned();
    gw.client
        .put(gw.url(&format!("/api/v1/upload/{id}/chunk/0")))
        .bearer_auth(&token)
        .body("abd")
        .send()
        .await
        .unwrap();
    let mismatch =
        gw.client.post(gw.url(&format!("/api/v1/upload/{id}/complete"))).bearer_auth(&token).send().await.unwrap();
    error_of(mismatch, StatusCode::UNPROCESSABLE_ENTITY).await;
    let cancelled = gw.client.delete(gw.url(&format!("/api/v1/upload/{id}"))).bearer_auth(&token).send().await.unwrap();
    assert_eq!(cancelled.status(), StatusCode::NO_CONTENT);
    let after = gw
        .client
        .put(gw.url(&format!("/api/v1/upload/{id}/chunk/0")))
        .bearer_auth(&token)
        .body("abc")
        .send()
        .await
        .unwrap();
    error_of(after, StatusCode::GONE).await;
    let unknown = gw.client.get(gw.url("/api/v1/upload/no-such-session")).bearer_auth(&token).send().await.unwrap();
    error_of(unknown, StatusCode::NOT_FOUND).await;
    let bad_init = gw
        .client
        .post(gw.url("/api/v1/upload/initiate"))
        .bearer_auth(&token)
        .json(&json!({"filename": "a", "totalSize": 10, "chunkSize": 0}))
        .send()
        .await
        .unwrap();
    error_of(bad_init, StatusCode::BAD_REQUEST).await;
}

/// Two gateways on one database and one tier directory: a session started on one is
/// continued and completed on the other.
#[tokio::test]
async fn an_upload_session_moves_between_replicas() {
    let first = gateway(true, 0).await;
    let running = first.running.as_ref().unwrap();
    let db_url = first.db.as_ref().unwrap().url.clone();
    let second = standalone::start(standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: first.dir.path().join("data"),
        config_dir: Some(first.dir.path().join("config")),
        secrets_dir: None,
        config_reload: std::time::Duration::from_secs(5),
        database_url: Some(db_url),
        auth: AuthSettings { secret: Some(b"test-secret".to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec!["127.0.0.1".into()],
        nats_url: None,
        link_key: None,
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    })
    .await
    .unwrap();
    let token = first.token("alice", &["user"]);
    let init = json!({"filename": "moved.txt", "totalSize": 6, "chunkSize": 3});
    let session: Value = first
        .client
        .post(first.url("/api/v1/upload/initiate"))
        .bearer_auth(&token)
        .json(&init)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = session["sessionId"].as_str().unwrap_or_else(|| panic!("{session}"));
    first
        .client
        .put(format!("{}/api/v1/upload/{id}/chunk/0", running.url))
        .bearer_auth(&token)
        .body("abc")
        .send()
        .await
        .unwrap();
    let on_second =
        |path: String| first.client.request(reqwest::Method::PUT, format!("{}{path}", second.url)).bearer_auth(&token);
    assert_eq!(
        on_second(format!("/api/v1/upload/{id}/chunk/1")).body("def").send().await.unwrap().status(),
        StatusCode::OK
    );
    let done: Value = first
        .client
        .post(format!("{}/api/v1/upload/{id}/complete", second.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = first
        .get("alice", &format!("/api/v1/documents/{}/content", done["id"]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "abcdef");

    // A tus upload created on one replica is resumed on the other.
    let created = first
        .client
        .post(first.url("/api/v1/tus"))
        .bearer_auth(&token)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", "4")
        .send()
        .await
        .unwrap();
    let location = created.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let patch = |base: &str, offset: u64, body: &'static str| {
        first
            .client
            .patch(format!("{base}{location}"))
            .bearer_auth(&token)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset.to_string())
            .header(header::CONTENT_TYPE, "application/offset+octet-stream")
            .body(body)
            .send()
    };
    assert_eq!(patch(&running.url, 0, "wx").await.unwrap().status(), StatusCode::NO_CONTENT);
    let last = patch(&second.url, 2, "yz").await.unwrap();
    assert_eq!(last.headers()["upload-offset"], "4");
    let doc = last.headers()["vellum-document-id"].to_str().unwrap().to_owned();
    let body = first.get("alice", &format!("/api/v1/documents/{doc}/content")).send().await.unwrap();
    assert_eq!(body.text().await.unwrap(), "wxyz");
    second.shutdown().await.unwrap();
}

fn tus(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.header("Tus-Resumable", "1.0.0")
}

fn sha256_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

#[allow(clippy::too_many_lines)]
async fn tus_protocol(gw: Gateway) {
    let token = gw.token("alice", &["user"]);
    let c = &gw.client;

    // Discovery needs no token and no version header.
    let options = c.request(reqwest::Method::OPTIONS, gw.url("/api/v1/tus")).send().await.unwrap();
    assert_eq!(options.status(), StatusCode::NO_CONTENT);
    assert_eq!(options.headers()["tus-version"], "1.0.0");
    assert_eq!(options.headers()["tus-resumable"], "1.0.0");
    assert_eq!(options.headers()["tus-max-size"], (1u64 << 20).to_string().as_str());
    assert_eq!(options.headers()["tus-checksum-algorithm"], "sha256");
    let extensions = options.headers()["tus-extension"].to_str().unwrap();
    for ext in ["creation", "termination", "checksum", "expiration"] {
        assert!(extensions.split(',').any(|e| e == ext), "{extensions}");
    }

    // Creation: version, token and length are checked.
    let create = || c.post(gw.url("/api/v1/tus")).bearer_auth(&token);
    let no_version = create().header("Upload-Length", "10").send().await.unwrap();
    assert!(error_of(no_version, StatusCode::BAD_REQUEST).await.contains("Tus-Resumable"));
    let old = create().header("Tus-Resumable", "0.2.2").header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(old.headers()["tus-version"], "1.0.0");
    error_of(old, StatusCode::PRECONDITION_FAILED).await;
    let anonymous = tus(c.post(gw.url("/api/v1/tus"))).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.headers()["tus-resumable"], "1.0.0");
    error_of(tus(create()).send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    error_of(tus(create()).header("Upload-Length", "-1").send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    let huge = tus(create()).header("Upload-Length", (2u64 << 20).to_string()).send().await.unwrap();
    error_of(huge, StatusCode::PAYLOAD_TOO_LARGE).await;
    let traversal =
        tus(create()).header("Upload-Length", "3").header("Upload-Metadata", "filename Li4vLi4vZXRjL3Bhc3N3ZA==");
    assert!(error_of(traversal.send().await.unwrap(), StatusCode::BAD_REQUEST).await.contains("file"));
    let bad_meta = tus(create()).header("Upload-Length", "3").header("Upload-Metadata", "filename ???");
    error_of(bad_meta.send().await.unwrap(), StatusCode::BAD_REQUEST).await;

    let bytes: &'static [u8] = b"tus makes uploads resumable";
    let metadata = "filename cmVwb3J0LnR4dA==,title UmVwb3J0";
    let created = tus(create())
        .header("Upload-Length", bytes.len().to_string())
        .header("Upload-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let location = created.headers()[header::LOCATION].to_str().unwrap().to_owned();
    assert!(location.starts_with("/api/v1/tus/"), "{location}");
    let expires = created.headers()["upload-expires"].to_str().unwrap();
    let expires = httpdate::parse_http_date(expires).unwrap();
    let in_a_day = expires.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(in_a_day > Duration::from_secs(23 * 3600) && in_a_day <= Duration::from_secs(24 * 3600), "{in_a_day:?}");

    let head = || tus(c.head(gw.url(&location)).bearer_auth(&token));
    let offset = |response: &reqwest::Response| response.headers()["upload-offset"].to_str().unwrap().to_owned();
    let status = head().send().await.unwrap();
    assert_eq!(status.status(), StatusCode::OK);
    assert_eq!((offset(&status).as_str(), status.headers()["upload-length"].to_str().unwrap()), ("0", "27"));
    assert_eq!(status.headers()["upload-metadata"], metadata);
    assert_eq!(status.headers()[header::CACHE_CONTROL], "no-store");
    let others = tus(c.head(gw.url(&location)).bearer_auth(gw.token("bob", &["user"]))).send().await.unwrap();
    assert_eq!(others.status(), StatusCode::NOT_FOUND);

    let patch = |at: usize, body: &'static [u8]| {
        tus(c.patch(gw.url(&location)).bearer_auth(&token))
            .header("Upload-Offset", at.to_string())
            .header(header::CONTENT_TYPE, "application/offset+octet-stream")
            .body(body)
    };
    // Wrong content type, wrong offset, wrong checksum, unknown algorithm, too many bytes:
    // each refused precisely, and the offset stays where it was.
    let plain = tus(c.patch(gw.url(&location)).bearer_auth(&token))
        .header("Upload-Offset", "0")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(&bytes[..4])
        .send()
        .await
        .unwrap();
    error_of(plain, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert!(error_of(patch(5, &bytes[..4]).send().await.unwrap(), StatusCode::CONFLICT).await.contains("offset 0"));
    let forged = patch(0, &bytes[..4]).header("Upload-Checksum", format!("sha256 {}", sha256_b64(b"nope")));
    assert_eq!(forged.send().await.unwrap().status().as_u16(), 460);
    let md5 = patch(0, &bytes[..4]).header("Upload-Checksum", "md5 1B2M2Y8AsgTpgAmY7PhCfg==");
    assert!(error_of(md5.send().await.unwrap(), StatusCode::BAD_REQUEST).await.contains("not supported"));
    let long: &'static [u8] = b"this body is longer than the twenty-seven bytes announced";
    error_of(patch(0, long).send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    assert_eq!(offset(&head().send().await.unwrap()), "0");

    // Two checked PATCHes, the second through X-HTTP-Method-Override, finish the upload.
    let first = patch(0, &bytes[..10]).header("Upload-Checksum", format!("sha256 {}", sha256_b64(&bytes[..10])));
    let first = first.send().await.unwrap();
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset(&first), "10");
    assert!(first.headers().contains_key("upload-expires"));
    let last = tus(c.post(gw.url(&location)).bearer_auth(&token))
        .header("X-HTTP-Method-Override", "PATCH")
        .header("Upload-Offset", "10")
        .header(header::CONTENT_TYPE, "application/offset+octet-stream")
        .body(&bytes[10..])
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset(&last), "27");
    let doc = last.headers()["vellum-document-id"].to_str().unwrap().to_owned();
    let document: Value =
        gw.get("alice", &format!("/api/v1/documents/{doc}")).send().await.unwrap().json().await.unwrap();
    assert_eq!((document["filename"].as_str(), document["title"].as_str()), (Some("report.txt"), Some("Report")));
    assert_eq!(document["checksum"], format!("sha256:{}", sha256_hex(bytes)));
    let content = gw.get("alice", &format!("/api/v1/documents/{doc}/content")).send().await.unwrap();
    assert_eq!(content.bytes().await.unwrap().as_ref(), bytes);
    let done = head().send().await.unwrap();
    assert_eq!((offset(&done), done.headers()["vellum-document-id"].to_str().unwrap()), ("27".into(), doc.as_str()));

    // Creation with upload: the POST carries the bytes; an empty upload is done at once.
    let with_data = tus(create())
        .header("Upload-Length", "5")
        .header("Upload-Metadata", "filename aGkudHh0")
        .header(header::CONTENT_TYPE, "application/offset+octet-stream")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(with_data.status(), StatusCode::CREATED);
    assert_eq!(offset(&with_data), "5");
    assert!(with_data.headers().contains_key("vellum-document-id"));
    let empty = tus(create()).header("Upload-Length", "0").send().await.unwrap();
    assert_eq!((empty.status(), offset(&empty).as_str()), (StatusCode::CREATED, "0"));
    assert!(empty.headers().contains_key("vellum-document-id"));

    // Termination: the upload is gone afterwards; a chunked-session path refuses it.
    let doomed = tus(create()).header("Upload-Length", "9").send().await.unwrap();
    let doomed = doomed.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let session = doomed.rsplit('/').next().unwrap();
    let chunk = c.put(gw.url(&format!("/api/v1/upload/{session}/chunk/0"))).bearer_auth(&token).body("x");
    assert!(error_of(chunk.send().await.unwrap(), StatusCode::BAD_REQUEST).await.contains("tus"));
    let deleted = tus(c.delete(gw.url(&doomed)).bearer_auth(&token)).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = tus(c.head(gw.url(&doomed)).bearer_auth(&token)).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::GONE);
    let unknown = tus(c.head(gw.url("/api/v1/tus/0123456789abcdef")).bearer_auth(&token)).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

/// The Python tus client, as published, uploads in pieces, stops, resumes from the server's
/// offset with SHA-256 checksums, and the document is the file it read.
#[tokio::test]
async fn a_stock_tus_client_uploads_and_resumes() {
    let gw = gateway(false, 0).await;
    let file = gw.dir.path().join("upload.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[1]).collect();
    std::fs::write(&file, &bytes).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tus_client.py");
    let output = tokio::process::Command::new(vellum_testkit::python())
        .arg(script)
        .arg(gw.url("/api/v1/tus"))
        .arg(gw.token("alice", &["user"]))
        .arg(&file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["stoppedAt"], 65_536 * 2);
    assert_eq!(report["resumedFrom"], 65_536 * 2, "the second client asked the server where to go on");
    let doc = report["documentId"].as_str().unwrap();
    let document: Value =
        gw.get("alice", &format!("/api/v1/documents/{doc}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(document["filename"], "upload.bin");
    assert_eq!(document["checksum"], format!("sha256:{}", sha256_hex(&bytes)));
    let content = gw.get("alice", &format!("/api/v1/documents/{doc}/content")).send().await.unwrap();
    assert_eq!(content.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

/// Every operation `/openapi.json` documents, as METHOD and path, sorted.
const OPERATIONS: [&str; 65] = [
    "DELETE /api/v1/documents/bulk/{job}",
    "DELETE /api/v1/documents/{id}",
    "DELETE /api/v1/documents/{id}/legal-hold",
    "DELETE /api/v1/tus/{id}",
    "DELETE /api/v1/upload/{session}",
    "DELETE /api/v1/webhooks/{id}",
    "GET /actuator/health",
    "GET /actuator/health/liveness",
    "GET /actuator/health/readiness",
    "GET /actuator/prometheus",
    "GET /api/v1/documents",
    "GET /api/v1/documents/bulk/{job}",
    "GET /api/v1/documents/bulk/{job}/export",
    "GET /api/v1/documents/{id}",
    "GET /api/v1/documents/{id}/content",
    "GET /api/v1/documents/{id}/download",
    "GET /api/v1/documents/{id}/lifecycle",
    "GET /api/v1/documents/{id}/versions",
    "GET /api/v1/documents/{id}/versions/{n}/content",
    "GET /api/v1/events/stream",
    "GET /api/v1/links/{token}",
    "GET /api/v1/storage/usage",
    "GET /api/v1/upload/{session}",
    "GET /api/v1/upload/{session}/chunks",
    "GET /api/v1/upload/{session}/missing-chunks",
    "GET /api/v1/webhooks",
    "GET /api/v1/webhooks/{id}",
    "GET /api/v1/webhooks/{id}/events",
    "GET /api/v1/webhooks/{id}/stats",
    "GET /api/v1/websocket/stats",
    "GET /api/v1/websocket/user/{userId}/status",
    "GET /healthz",
    "GET /metrics",
    "GET /readyz",
    "GET /ws",
    "GET /ws/info",
    "GET /ws/job-status",
    "GET /ws/job-status-native",
    "GET /ws/websocket",
    "HEAD /api/v1/tus/{id}",
    "OPTIONS /api/v1/tus",
    "OPTIONS /api/v1/tus/{id}",
    "PATCH /api/v1/documents/{id}",
    "PATCH /api/v1/tus/{id}",
    "POST /api/v1/documents",
    "POST /api/v1/documents/bulk",
    "POST /api/v1/documents/{id}/links",
    "POST /api/v1/documents/{id}/restore",
    "POST /api/v1/documents/{id}/tier",
    "POST /api/v1/documents/{id}/versions",
    "POST /api/v1/documents/{id}/versions/{n}/restore",
    "POST /api/v1/tus",
    "POST /api/v1/tus/{id}",
    "POST /api/v1/upload/initiate",
    "POST /api/v1/upload/{session}/chunk/{n}",
    "POST /api/v1/upload/{session}/complete",
    "POST /api/v1/webhooks",
    "POST /api/v1/webhooks/{id}/reactivate",
    "POST /api/v1/webhooks/{id}/replay",
    "POST /api/v1/webhooks/{id}/test",
    "POST /api/v1/websocket/broadcast/maintenance",
    "POST /api/v1/websocket/broadcast/system",
    "PUT /api/v1/documents/{id}/legal-hold",
    "PUT /api/v1/documents/{id}/metadata",
    "PUT /api/v1/upload/{session}/chunk/{n}",
];

/// `/openapi.json` documents exactly the routes that serve: the expected operations are
/// there, and each one, requested, is matched by the router (its route shows in the request
/// metrics) rather than falling through to "no such route".
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let gw = gateway(false, 0).await;
    let spec: Value = gw.client.get(gw.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{}", spec["openapi"]);
    assert_eq!(spec["info"]["title"], "Vellum gateway API");
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for schema in
        ["Document", "Uploaded", "Page", "VersionHistory", "Session", "Initiate", "MetadataPatch", "ErrorBody"]
    {
        assert!(spec["components"]["schemas"][schema].is_object(), "schema {schema} missing");
    }
    let mut operations: Vec<(String, String)> = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations.sort();
    let listed: Vec<String> = operations.iter().map(|(m, p)| format!("{m} {p}")).collect();
    // The seed's prefixes document the same document and webhook operations.
    let mut expected: Vec<String> = OPERATIONS.iter().map(|op| (*op).to_owned()).collect();
    for op in OPERATIONS {
        let (method, path) = op.split_once(' ').unwrap();
        for (v1, seed) in [("/api/v1/documents", "/api/documents"), ("/api/v1/webhooks", "/api/webhooks")] {
            if let Some(rest) = path.strip_prefix(v1) {
                expected.push(format!("{method} {seed}{rest}"));
            }
        }
    }
    expected.sort();
    assert_eq!(listed, expected);
    let ids: std::collections::BTreeSet<&str> = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values().filter_map(|op| op["operationId"].as_str()))
        .collect();
    assert_eq!(ids.len(), listed.len(), "every operation has an id of its own");

    let token = gw.token("alice", &["user", "admin"]);
    for (method, path) in &operations {
        let concrete = path
            .replace("{id}", "1")
            .replace("{n}", "1")
            .replace("{session}", "s")
            .replace("{token}", "t")
            .replace("{userId}", "u");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = gw.client.request(method.clone(), gw.url(&concrete)).bearer_auth(&token).send().await.unwrap();
        if method != reqwest::Method::HEAD && response.status() == StatusCode::NOT_FOUND {
            let body: Value = response.json().await.unwrap();
            assert_ne!(body["message"], "no such route", "{method} {path}");
        }
    }
    let metrics = gw.client.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (method, path) in &operations {
        let label = format!(r#"method="{method}",route="{path}""#);
        assert!(metrics.contains(&label), "{method} {path} was not matched by the router:\n{metrics}");
    }
    // The seed's alias answers too, without being documented twice.
    let alias = gw.get("alice", "/api/documents").send().await.unwrap();
    assert_eq!(alias.status(), StatusCode::OK);
}

/// A document's lifecycle on the API: its next action and date, a move to another tier on
/// request, restore refused for a document that is not archived, and storage usage (admins).
#[tokio::test]
async fn lifecycle_and_storage_usage() {
    let gw = gateway(false, 1000).await;
    let doc = gw.upload("alice", "plan.txt", b"a plan worth keeping for a while").await;
    let id = doc["id"].as_i64().unwrap();
    let alice = gw.token("alice", &["user"]);
    let life: Value =
        gw.get("alice", &format!("/api/v1/documents/{id}/lifecycle")).send().await.unwrap().json().await.unwrap();
    assert_eq!(life["storageTier"], "hot");
    assert_eq!(life["nextAction"]["action"], "TRANSITION");
    assert_eq!(life["nextAction"]["tier"], "cold");
    assert_eq!(life["nextAction"]["policy"], "cool-down");
    let due = vellum_core::clock::parse_rfc3339(life["nextAction"]["dueAt"].as_str().unwrap()).unwrap();
    let created = vellum_core::clock::parse_rfc3339(doc["createdAt"].as_str().unwrap()).unwrap();
    assert_eq!(due - created, 30 * 86_400_000);
    let other = gw.get("bob", &format!("/api/v1/documents/{id}/lifecycle")).send().await.unwrap();
    error_of(other, StatusCode::NOT_FOUND).await;

    let tier = format!("/api/v1/documents/{id}/tier");
    let moved: Value = gw
        .client
        .post(gw.url(&tier))
        .bearer_auth(&alice)
        .json(&json!({"tier": "cold"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(moved["storageTier"], "cold");
    let body = gw.get("alice", &format!("/api/v1/documents/{id}/content")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], b"a plan worth keeping for a while");
    let life: Value =
        gw.get("alice", &format!("/api/v1/documents/{id}/lifecycle")).send().await.unwrap().json().await.unwrap();
    assert!(life["nextAction"].is_null(), "nothing colder to go to: {life}");
    let unknown =
        gw.client.post(gw.url(&tier)).bearer_auth(&alice).json(&json!({"tier": "tape"})).send().await.unwrap();
    assert!(error_of(unknown, StatusCode::BAD_REQUEST).await.contains("tape"));
    let malformed = gw.client.post(gw.url(&tier)).bearer_auth(&alice).json(&json!({"tier": 7})).send().await.unwrap();
    assert_eq!(malformed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let restore =
        gw.client.post(gw.url(&format!("/api/v1/documents/{id}/restore"))).bearer_auth(&alice).send().await.unwrap();
    assert!(error_of(restore, StatusCode::CONFLICT).await.contains("not archived"));

    let refused = gw.get("alice", "/api/v1/storage/usage").send().await.unwrap();
    error_of(refused, StatusCode::FORBIDDEN).await;
    let usage: Value = gw
        .client
        .get(gw.url("/api/v1/storage/usage"))
        .bearer_auth(gw.token("root", &["admin"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tiers = usage["tiers"].as_array().unwrap();
    let cold = tiers.iter().find(|t| t["tier"] == "cold").unwrap();
    assert_eq!((cold["objects"].as_i64(), cold["class"].as_str()), (Some(1), Some("COLD")));
    assert_eq!(tiers.iter().find(|t| t["tier"] == "hot").unwrap()["objects"], 0);
    assert!(usage["monthlySavings"]["tiering"].as_f64().unwrap() > 0.0, "{usage}");
    let metrics = gw.client.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("vellum_gateway_storage_objects{tier=\"cold\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_document_whose_stored_bytes_a_scrub_found_altered_is_refused_with_502_and_the_reason() {
    let gw = gateway(true, 0).await;
    let doc = gw.upload("alice", "ledger.txt", b"the ledger as it was uploaded").await;
    let docs = gw.running.as_ref().unwrap().state.docs();
    let sha = doc["checksum"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let key: String = sqlx::query_scalar("SELECT object_key FROM blobs WHERE sha256 = $1")
        .bind(&sha)
        .fetch_one(docs.primary().meta().pool())
        .await
        .unwrap();
    // Someone (a disk, a bucket policy, a person) changed the stored object.
    std::fs::write(gw.dir.path().join("data/tiers/hot").join(&key), b"tampered").unwrap();
    let report = docs.primary().scrub(None, &|_| {}).await.unwrap();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let content = format!("/api/v1/documents/{}/content", doc["id"]);
    let message = error_of(gw.get("alice", &content).send().await.unwrap(), StatusCode::BAD_GATEWAY).await;
    assert!(message.contains("quarantined") && message.contains("integrity scrub"), "{message}");
    // The metadata is still there to see.
    assert_eq!(
        gw.get("alice", &format!("/api/v1/documents/{}", doc["id"])).send().await.unwrap().status(),
        StatusCode::OK
    );
}

/// Uploads `n` documents of `user`'s; their ids.
async fn upload_many(gw: &Gateway, user: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(gw.upload(user, &format!("bulk-{i}.txt"), b"bulk").await["id"].as_i64().unwrap());
    }
    ids
}

/// Polls a bulk job until it has finished.
async fn finished_job(gw: &Gateway, user: &str, location: &str) -> Value {
    job_ended_as(gw, user, location, &["COMPLETED", "CANCELLED"]).await
}

/// The job at `location` once its status is one of `ends`, within 30 s.
async fn job_ended_as(gw: &Gateway, user: &str, location: &str, ends: &[&str]) -> Value {
    for _ in 0..300 {
        let job: Value = gw.get(user, location).send().await.unwrap().json().await.unwrap();
        if ends.iter().any(|end| job["status"] == *end) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the job at {location} did not end as one of {ends:?} within 30 s");
}

/// `user`'s WebSocket to the gateway (the JSON protocol), as a seed's client opens it.
async fn user_socket(
    gw: &Gateway,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let ws_url = format!("{}/ws?token={}", gw.base.replace("http://", "ws://"), gw.token(user, &["user"]));
    tokio_tungstenite::connect_async(ws_url).await.unwrap().0
}

/// The next `status_update` of `event_type` (seed 003's StatusUpdateEvent) on `ws`, each
/// message waited for at most 10 s.
async fn status_update(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    event_type: &str,
) -> Value {
    use futures::StreamExt as _;
    loop {
        let message =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a notification").unwrap().unwrap();
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["type"] == "status_update" && message["eventType"] == event_type {
            return message;
        }
    }
}

async fn start_bulk(gw: &Gateway, user: &str, request: Value) -> reqwest::Response {
    gw.client
        .post(gw.url("/api/v1/documents/bulk"))
        .bearer_auth(gw.token(user, &["user"]))
        .json(&request)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn bulk_jobs_act_as_their_starter_report_progress_and_can_be_cancelled() {
    use futures::StreamExt as _;
    let gw = gateway(true, 0).await;
    let mine = upload_many(&gw, "alice", 30).await;
    let bobs = gw.upload("bob", "not-alices.txt", b"bob").await["id"].as_i64().unwrap();
    // Alice's client, as seed 000's: it handles BULK_OPERATION_PROGRESS among its notifications.
    let mut ws = user_socket(&gw, "alice").await;

    let mut ids = mine.clone();
    ids.push(bobs);
    let started =
        start_bulk(&gw, "alice", json!({"operation": "tag", "documentIds": ids, "tags": ["q4", " q4 "]})).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let job: Value = started.json().await.unwrap();
    assert_eq!(
        (job["operation"].as_str(), job["total"].as_i64(), job["tags"].clone()),
        (Some("tag"), Some(31), json!(["q4"]))
    );
    let done = finished_job(&gw, "alice", &location).await;
    assert_eq!(
        (done["status"].as_str(), done["succeeded"].as_i64(), done["failed"].as_i64(), done["progress"].as_i64()),
        (Some("COMPLETED"), Some(30), Some(1), Some(100)),
        "{done}"
    );
    assert_eq!(done["errors"][0]["documentId"], bobs, "bob's document is not alice's to tag: {done}");
    let doc: Value =
        gw.get("alice", &format!("/api/v1/documents/{}", mine[7])).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["tags"], json!(["q4"]));
    let untouched: Value =
        gw.get("bob", &format!("/api/v1/documents/{bobs}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(untouched["tags"], json!([]));
    // The starter's client was told: progress, then the end, with the job's id.
    let mut kinds = Vec::new();
    while !kinds.contains(&"BULK_OPERATION_COMPLETED".to_owned()) {
        let message =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a notification").unwrap().unwrap();
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["type"].as_str().is_some_and(|t| t.starts_with("BULK_")) {
            assert_eq!(message["data"]["jobId"], job["id"], "{message}");
            kinds.push(message["type"].as_str().unwrap().to_owned());
            if message["type"] == "BULK_OPERATION_COMPLETED" {
                assert_eq!(
                    (message["data"]["totalDocuments"].as_i64(), message["data"]["successCount"].as_i64()),
                    (Some(31), Some(30))
                );
            }
        }
    }
    assert_eq!(kinds.first().map(String::as_str), Some("BULK_OPERATION_PROGRESS"), "{kinds:?}");
    // Someone else's job is not found; a finished one is not cancelled.
    assert_eq!(gw.get("bob", &location).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let again = gw.send_as(Method::DELETE, "alice", &location).send().await.unwrap();
    assert!(error_of(again, StatusCode::CONFLICT).await.contains("COMPLETED"));

    // A selector: the documents a search finds, as the list finds them.
    let started = start_bulk(&gw, "alice", json!({"operation": "delete", "selector": {"tag": "q4"}})).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let done = finished_job(&gw, "alice", &location).await;
    assert_eq!((done["total"].as_i64(), done["succeeded"].as_i64()), (Some(30), Some(30)), "{done}");
    let left: Value = gw.get("alice", "/api/v1/documents").send().await.unwrap().json().await.unwrap();
    assert_eq!(left["items"], json!([]), "every tagged document deleted");

    // Cancelled: it stops, and what it did stays done.
    let many = upload_many(&gw, "alice", 200).await;
    let started = start_bulk(&gw, "alice", json!({"operation": "tag", "documentIds": many, "tags": ["slow"]})).await;
    let location = started.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let cancelled = gw.send_as(Method::DELETE, "alice", &location).send().await.unwrap();
    if cancelled.status() == StatusCode::OK {
        let first = finished_job(&gw, "alice", &location).await;
        assert_eq!(first["status"], "CANCELLED");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later: Value = gw.get("alice", &location).send().await.unwrap().json().await.unwrap();
        assert_eq!(later["processed"], first["processed"], "nothing more after the cancel");
        assert!(later["processed"].as_i64() < Some(200), "{later}");
    } else {
        assert_eq!(cancelled.status(), StatusCode::CONFLICT, "finished before the cancel");
    }

    // Requests that cannot run are refused before a job exists.
    for (request, says) in [
        (json!({"operation": "tag", "documentIds": [1]}), "needs tags"),
        (json!({"operation": "move", "documentIds": [1], "tier": "nowhere"}), "no storage tier"),
        (json!({"operation": "delete", "documentIds": [1], "selector": {"tag": "x"}}), "not both"),
        (json!({"operation": "delete"}), "documentIds or a selector"),
        (json!({"operation": "delete", "selector": {"tag": "nothing-has-this"}}), "finds no documents"),
        (json!({"operation": "archive", "documentIds": [1]}), "FROZEN"),
    ] {
        let message = error_of(start_bulk(&gw, "alice", request.clone()).await, StatusCode::BAD_REQUEST).await;
        assert!(message.contains(says), "{request}: {message}");
    }
    let unknown = start_bulk(&gw, "alice", json!({"operation": "shred", "documentIds": [1]})).await;
    assert!(unknown.status().is_client_error());
}

#[tokio::test]
async fn an_export_job_writes_every_document_into_one_zip_and_reports_on_topic_extractions() {
    let gw = gateway(true, 0).await;
    let mut ids = Vec::new();
    for (name, body) in [("a.txt", &b"first"[..]), ("a.txt", b"second, same name"), ("c.bin", b"\x00\x01\x02")] {
        ids.push(gw.upload("alice", name, body).await["id"].as_i64().unwrap());
    }
    let mut ws = user_socket(&gw, "alice").await;
    let started = start_bulk(&gw, "alice", json!({"operation": "export", "documentIds": ids})).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let done = finished_job(&gw, "alice", &location).await;
    assert_eq!((done["status"].as_str(), done["succeeded"].as_i64()), (Some("COMPLETED"), Some(3)), "{done}");
    let download = done["download"].as_str().expect("a completed export names its download").to_owned();
    assert_eq!(download, format!("{location}/export"));
    let zip = gw.get("alice", &download).send().await.unwrap();
    assert_eq!(zip.status(), StatusCode::OK);
    assert_eq!(zip.headers()[header::CONTENT_TYPE], "application/zip");
    let zip = zip.bytes().await.unwrap().to_vec();
    // Read by Python's zipfile, as a user's script would.
    let path = gw.dir.path().join("export.zip");
    std::fs::write(&path, &zip).unwrap();
    let listing = std::process::Command::new(vellum_testkit::python())
        .args([
            "-c",
            "import sys, zipfile, json; z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; \
            print(json.dumps([[i.filename, list(z.read(i))] for i in z.infolist()]))",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
    let files: Vec<(String, Vec<u8>)> = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(
        files,
        [
            (format!("{}-a.txt", ids[0]), b"first".to_vec()),
            (format!("{}-a.txt", ids[1]), b"second, same name".to_vec()),
            (format!("{}-c.bin", ids[2]), b"\x00\x01\x02".to_vec()),
        ]
    );
    // Not someone else's to download; and a job that is not an export has none.
    assert_eq!(gw.get("bob", &download).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    // The starter heard of it on the extractions channel, as seed 003's StatusUpdateEvent.
    let update = status_update(&mut ws, "completed").await;
    let entity = format!("export/{}", done["id"].as_str().unwrap());
    assert_eq!(
        (
            update["entityType"].as_str(),
            update["entityId"].as_str(),
            update["status"].as_str(),
            update["progress"].as_i64()
        ),
        (Some("export"), Some(entity.as_str()), Some("COMPLETED"), Some(100))
    );
    let tagged = start_bulk(&gw, "alice", json!({"operation": "tag", "documentIds": [ids[0]], "tags": ["t"]})).await;
    let location = tagged.headers()[header::LOCATION].to_str().unwrap().to_owned();
    finished_job(&gw, "alice", &location).await;
    let none = gw.get("alice", &format!("{location}/export")).send().await.unwrap();
    assert!(error_of(none, StatusCode::CONFLICT).await.contains("not an export"));
}

/// An export whose ZIP cannot be stored (a file stands where the exports' folder would
/// be) is tried again after a pause, and fails at the third try: the job says why, has no
/// download, and its starter hears of it on `/topic/extractions` as a `failed` update.
#[tokio::test]
async fn an_export_whose_zip_cannot_be_stored_fails_and_says_so_on_topic_extractions() {
    let gw = gateway(true, 0).await;
    let id = gw.upload("alice", "kept.txt", b"kept").await["id"].as_i64().unwrap();
    std::fs::write(gw.dir.path().join("data/tiers/hot/exports"), b"not a folder").unwrap();
    let mut ws = user_socket(&gw, "alice").await;
    let started = start_bulk(&gw, "alice", json!({"operation": "export", "documentIds": [id]})).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let job = job_ended_as(&gw, "alice", &location, &["FAILED"]).await;
    assert!(job["failure"].as_str().is_some_and(|f| f.contains("could not be stored")), "{job}");
    assert!(job.get("download").is_none(), "{job}");
    let none = gw.get("alice", &format!("{location}/export")).send().await.unwrap();
    assert_eq!(none.status(), StatusCode::CONFLICT);
    let update = status_update(&mut ws, "failed").await;
    let entity = format!("export/{}", job["id"].as_str().unwrap());
    assert_eq!((update["status"].as_str(), update["entityId"].as_str()), (Some("FAILED"), Some(entity.as_str())));
    // The document itself is untouched.
    let content = gw.get("alice", &format!("/api/v1/documents/{id}/content")).send().await.unwrap();
    assert_eq!(content.bytes().await.unwrap().as_ref(), b"kept");
}

/// A document's metadata and versions are answered from the gateway's cache: a row changed
/// behind the gateway's back (no event) still reads as it was, until `Cache-Control:
/// no-cache` asks for the database; a change through the API is read back at once.
async fn metadata_reads_are_cached_until_a_change(gw: Gateway) {
    let doc = gw.upload("alice", "cached.txt", b"first").await;
    let id = doc["id"].as_i64().unwrap();
    let path = format!("/api/v1/documents/{id}");
    let state = &gw.running.as_ref().unwrap().state;
    let (documents, versions) = (state.metrics.seed.cache("documents"), state.metrics.seed.cache("versions"));
    let read = |fresh: bool| {
        let request = gw.get("alice", &path);
        async move {
            let response =
                if fresh { request.header(header::CACHE_CONTROL, "no-cache") } else { request }.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let etag = response.headers()[header::ETAG].to_str().unwrap().to_owned();
            (etag, response.json::<Value>().await.unwrap())
        }
    };
    let (etag, first) = read(false).await;
    assert_eq!((&first["id"], &first["checksum"]), (&doc["id"], &doc["checksum"]));
    // The upload's own event drops what a read before it arrives stored: read until one
    // is answered from the cache.
    for attempt in 0.. {
        let hits = documents.hits.get();
        assert_eq!(read(false).await, (etag.clone(), first.clone()));
        if documents.hits.get() == hits + 1 {
            break;
        }
        assert!(attempt < 100, "no read was answered from the cache");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Someone else's request finds nothing, cached or not.
    assert_eq!(gw.get("bob", &path).send().await.unwrap().status(), StatusCode::NOT_FOUND);

    sqlx::query("UPDATE documents SET title = 'behind the cache' WHERE id = $1")
        .bind(id)
        .execute(state.docs().primary().meta().pool())
        .await
        .unwrap();
    assert_eq!(read(false).await.1["title"], Value::Null, "answered from the cache");
    let (fresh_etag, fresh) = read(true).await;
    assert_eq!(fresh["title"], "behind the cache");
    assert_ne!(fresh_etag, etag);
    assert_eq!(read(false).await.1["title"], "behind the cache", "the fresh read refreshed the entry");

    // A change through the API reads back at once.
    let patched = gw.send_as(Method::PATCH, "alice", &path).json(&json!({"title": "patched"})).send().await.unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    assert_eq!(read(false).await.1["title"], "patched");

    let history = |gw: &Gateway| gw.get("alice", &format!("{path}/versions")).send();
    let listed: Value = history(&gw).await.unwrap().json().await.unwrap();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 1);
    let hits = versions.hits.get();
    assert_eq!(history(&gw).await.unwrap().json::<Value>().await.unwrap(), listed);
    assert_eq!(versions.hits.get(), hits + 1);
    let form = Form::new().part("file", Part::bytes(b"second".as_slice()).file_name("cached.txt"));
    let v2 = gw.send_as(Method::POST, "alice", &format!("{path}/versions")).multipart(form).send().await.unwrap();
    assert_eq!(v2.status(), StatusCode::CREATED);
    let listed: Value = history(&gw).await.unwrap().json().await.unwrap();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 2);
    assert_eq!(read(false).await.1["currentVersion"], 2);

    let metrics = gw.get("alice", "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("cache_hits_total{level=\"L1\",cache=\"documents\"}"), "{metrics}");
    assert!(metrics.contains("cache_misses_total{level=\"L1\",cache=\"versions\"}"), "{metrics}");
}
