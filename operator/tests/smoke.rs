//! The operator's built-in smoke checks against a real gateway on Postgres and an S3 bucket:
//! they pass, they leave no row, object or event behind, and the smoke user they act as can
//! reach nothing of anyone else's.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use vellum_crds::BlueGreenRelease;
use vellum_gateway::auth::AuthSettings;
use vellum_gateway::standalone::{self, Running};
use vellum_operator::controllers::release::smoke;
use vellum_testkit::{TestBucket, TestDatabase};

const LINK_KEY: &[u8] = b"the platform's link key, 32 bytes or more";

struct Platform {
    gateway: Running,
    db: TestDatabase,
    bucket: TestBucket,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn platform() -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let bucket = TestBucket::new().await.unwrap();
    let db = TestDatabase::new().await.unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    let tiers = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: s3}}\nstringData: {{aws_access_key_id: '{}', aws_secret_access_key: '{}'}}\n\
         ---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: hot}}\nspec:\n  class: HOT\n  default: true\n  backend:\n    \
         url: 's3://{}/hot'\n    endpoint: '{}'\n    region: '{}'\n    secretRef: {{name: s3}}\n    \
         options: {{aws_allow_http: 'true', aws_virtual_hosted_style_request: 'false'}}\n",
        bucket.access_key, bucket.secret_key, bucket.name, bucket.endpoint, bucket.region
    );
    std::fs::write(config.join("tiers.yaml"), tiers).unwrap();
    let gateway = standalone::start(standalone::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        config_dir: Some(config),
        secrets_dir: None,
        config_reload: Duration::from_secs(5),
        database_url: Some(db.url.clone()),
        auth: AuthSettings { secret: Some(b"users' secret".to_vec()), ..AuthSettings::default() },
        max_upload_bytes: 1 << 20,
        public_url: None,
        allow_webhook_cidrs: vec![],
        nats_url: None,
        link_key: Some(LINK_KEY.to_vec()),
        kube_namespace: None,
        limits: vellum_gateway::limits::Limits::default(),
        metrics_listen: None,
        cors_origins: Vec::new(),
        metadata_cache: vellum_gateway::cache::CacheSettings::default(),
    })
    .await
    .unwrap();
    Platform { gateway, db, bucket, http: reqwest::Client::new(), _dir: dir }
}

impl Platform {
    /// Stops the gateway before its database and bucket go (a gateway left running keeps
    /// the test's runtime from ending for a minute).
    async fn stop(self) {
        self.gateway.shutdown().await.unwrap();
    }

    fn token(&self, user: &str, roles: &[&str]) -> String {
        self.gateway.state.auth.mint(user, roles, Duration::from_secs(600)).unwrap()
    }

    /// Rows of every table a document leaves a trace in, and the objects in the bucket.
    async fn traces(&self) -> Vec<(String, i64)> {
        let pool = self.db.pool().await.unwrap();
        let mut counts = Vec::new();
        for table in ["documents", "versions", "blobs", "blob_garbage", "document_tags", "outbox"] {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
            counts.push((table.to_owned(), n));
        }
        let objects: Vec<_> = self.bucket.store().unwrap().list(None).try_collect().await.unwrap();
        counts.push(("objects".to_owned(), i64::try_from(objects.len()).unwrap()));
        counts
    }

    async fn upload(&self, token: &str, name: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/documents?filename={name}", self.gateway.url))
            .bearer_auth(token)
            .body(name.as_bytes().to_vec())
            .send()
            .await
            .unwrap()
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message of `ws` that is not a greeting, as JSON.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "connection_established" {
                return value;
            }
        }
    }
}

fn release(checks: &str) -> BlueGreenRelease {
    serde_yaml::from_str(&format!(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {{name: docs, namespace: p}}\n\
         spec: {{version: 1.0.0, gateway: {{image: 'vellum/gateway:1.0.0'}}, workers: {{image: 'vellum/workers:1.0.0'}}, \
         shardSetRef: meta, nats: {{url: 'nats://nats:4222'}}, jwt: {{secretRef: {{name: jwt, key: hs256}}}}, smokeChecks: {checks}}}\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn the_built_in_checks_pass_and_leave_no_row_object_or_event_behind() {
    let p = platform().await;
    let admin_url = format!("{}/ws?token={}", p.gateway.url.replacen("http", "ws", 1), p.token("root", &["admin"]));
    let (mut admin, _) = tokio_tungstenite::connect_async(admin_url).await.unwrap();
    // Subscribed once greeted.
    let greeting = tokio::time::timeout(Duration::from_secs(10), admin.next()).await.unwrap().unwrap().unwrap();
    assert!(greeting.to_text().unwrap().contains("connection_established"), "{greeting:?}");
    // Something of a user's first, so that "nothing changed" is not "nothing there".
    assert_eq!(p.upload(&p.token("alice", &["user"]), "alice.txt").await.status(), StatusCode::CREATED);
    assert_eq!(next_event(&mut admin).await["data"]["filename"], "alice.txt");
    let before = p.traces().await;

    let results = smoke::run(&p.http, &release("[{name: missing, path: /nope}]"), LINK_KEY, &p.gateway.url).await;
    let summary: Vec<(&str, bool, Option<i32>)> =
        results.iter().map(|r| (r.name.as_str(), r.passed, r.status_code)).collect();
    assert_eq!(
        summary,
        [
            ("readyz", true, Some(200)),
            ("round-trip", true, Some(204)),
            ("websocket", true, Some(101)),
            ("missing", false, Some(404)),
        ],
        "{results:?}"
    );
    assert_eq!(results[3].message.as_deref(), Some("answered 404, expected 200"));
    assert!(results.iter().all(|r| r.duration_ms.is_some() && r.time.is_some()));

    assert_eq!(p.traces().await, before, "the round trip left rows, objects or outbox events behind");
    // Events reach subscribers in outbox order: the admin's first event after the checks is
    // the next user upload's, so the round trip sent none.
    assert_eq!(p.upload(&p.token("bob", &["user"]), "bob.txt").await.status(), StatusCode::CREATED);
    let first = next_event(&mut admin).await;
    assert_eq!(first["data"]["filename"], "bob.txt", "{first}");
    p.stop().await;
}

#[tokio::test]
async fn the_smoke_user_is_confined_to_its_own_documents_and_hidden_from_listings() {
    let p = platform().await;
    let alice = p.token("alice", &["user"]);
    let admin = p.token("root", &["admin"]);
    let smoke = smoke::token(LINK_KEY);
    let alices: Value = p.upload(&alice, "alice.txt").await.json().await.unwrap();
    let own: Value = p.upload(&smoke, "smoke.txt").await.json().await.unwrap();
    assert_eq!(own["uploadedBy"], "vellum:smoke", "{own}");

    let get = |token: &str, id: &Value| {
        p.http.get(format!("{}/api/v1/documents/{id}", p.gateway.url)).bearer_auth(token.to_owned()).send()
    };
    assert_eq!(get(&smoke, &alices["id"]).await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(get(&smoke, &own["id"]).await.unwrap().status(), StatusCode::OK);
    let listing: Value = p
        .http
        .get(format!("{}/api/v1/documents", p.gateway.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> =
        listing["items"].as_array().unwrap().iter().map(|d| d["filename"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice.txt"], "an admin's listing shows no smoke document: {listing}");

    // Only the platform's key makes a smoke token, and users' keys cannot name the smoke user.
    let forged = smoke::token(b"some other platform's link key, 32 bytes");
    let refused = p.upload(&forged, "forged.txt").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["message"], "the smoke-check token does not verify", "{body}");
    let impersonation = p.upload(&p.token("vellum:smoke", &["user"]), "impersonation.txt").await;
    assert_eq!(impersonation.status(), StatusCode::UNAUTHORIZED);
    let body: Value = impersonation.json().await.unwrap();
    assert_eq!(body["message"], "the subject vellum:smoke is reserved for the platform's smoke checks", "{body}");
    p.stop().await;
}

#[tokio::test]
async fn a_failing_step_of_the_round_trip_says_which_and_why() {
    let p = platform().await;
    // A gateway that does not know this platform's link key refuses the smoke token.
    let outcome =
        smoke::round_trip(&p.http, &p.gateway.url, &smoke::token(b"a key the gateway does not hold......")).await;
    assert!(!outcome.passed);
    assert_eq!(outcome.status_code, Some(401));
    assert_eq!(outcome.message.as_deref(), Some("the upload answered 401: the smoke-check token does not verify"));
    let outcome = smoke::websocket(&p.gateway.url, "not-a-token").await;
    assert_eq!((outcome.passed, outcome.status_code), (false, Some(401)), "{outcome:?}");
    p.stop().await;
}
