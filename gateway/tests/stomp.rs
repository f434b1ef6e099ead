//! STOMP through the gateway with the stock client the seed front ends use
//! (`@stomp/stompjs`), over a plain WebSocket and over SockJS (`sockjs-client`).

use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;

mod support;

use support::{Gateway, gateway};

/// `gateway/tests/js/stomp_client.js` running under Node.
struct StompClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl StompClient {
    fn start(mode: &str, url: &str, token: Option<&str>, destinations: &[&str]) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/stomp_client.js");
        let mut child = Command::new("node")
            .arg(script)
            .arg(mode)
            .arg(url)
            .arg(token.unwrap_or_default())
            .args(destinations)
            .env("NODE_PATH", vellum_testkit::node_modules())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (scripts/test installs it)");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(15), self.lines.next_line())
            .await
            .expect("the STOMP client printed nothing for 15 s")
            .unwrap()
            .expect("the STOMP client exited");
        serde_json::from_str(&line).unwrap()
    }

    /// Reads until `ready` (every subscription confirmed by a receipt); returns CONNECTED's headers.
    async fn ready(&mut self) -> Value {
        let connected = self.next().await;
        assert!(connected.get("connected").is_some(), "{connected}");
        let ready = self.next().await;
        assert_eq!(ready, json!({"ready": true}));
        connected["connected"].clone()
    }

    async fn message(&mut self) -> Value {
        let line = self.next().await;
        assert!(line.get("message").is_some(), "expected a MESSAGE, got {line}");
        line["message"].clone()
    }

    /// Closes stdin: the client sends DISCONNECT and exits. Returns what it printed last.
    async fn stop(mut self) -> Vec<Value> {
        drop(self.child.stdin.take());
        let mut rest = Vec::new();
        while let Some(line) =
            tokio::time::timeout(Duration::from_secs(10), self.lines.next_line()).await.unwrap().unwrap()
        {
            rest.push(serde_json::from_str(&line).unwrap());
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success());
        rest
    }
}

fn ws_url(gw: &Gateway, path: &str) -> String {
    format!("{}{path}", gw.running.url.replace("http://", "ws://"))
}

async fn stats(gw: &Gateway) -> Value {
    let admin = gw.token("root", &["user", "admin"]);
    let url = format!("{}/api/v1/websocket/stats", gw.running.url);
    let stats: Value = gw.client.get(url).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
    stats["data"].clone()
}

#[tokio::test]
async fn stompjs_over_websocket_and_sockjs_receives_what_each_user_may_see() {
    let gw = gateway().await;
    let alice_token = gw.token("alice", &["user"]);
    let mut alice = StompClient::start(
        "ws",
        &ws_url(&gw, "/ws"),
        Some(&alice_token),
        &["/topic/documents", "/user/queue/notifications"],
    );
    let connected = alice.ready().await;
    assert_eq!(connected["version"], "1.2");
    assert_eq!(connected["heart-beat"], "10000,10000");
    assert_eq!(connected["user-name"], "alice");
    let bob_token = gw.token("bob", &["user"]);
    let mut bob = StompClient::start(
        "sockjs",
        &format!("{}/ws", gw.running.url),
        Some(&bob_token),
        &["/topic/file-changes", "/topic/notifications"],
    );
    bob.ready().await;
    let counts = stats(&gw).await;
    assert_eq!(counts["activeConnections"], 2);
    assert_eq!(counts["activeChannelSubscriptions"], 4);

    let doc = gw.upload("alice", "alice.txt").await;
    let mut seen = vec![alice.message().await, alice.message().await];
    seen.sort_by_key(|m| m["destination"].as_str().unwrap().to_owned());
    assert_eq!(seen[0]["destination"], "/topic/documents");
    assert_eq!(seen[1]["destination"], "/user/queue/notifications");
    for message in &seen {
        assert_eq!(message["body"]["type"], "DOCUMENT_UPLOADED");
        assert_eq!(message["body"]["data"]["documentId"], doc["id"]);
        assert_eq!(message["body"]["data"]["filename"], "alice.txt");
    }
    // Bob sees none of Alice's documents: his first message is about his own upload.
    gw.upload("bob", "bob.txt").await;
    let own = bob.message().await;
    assert_eq!(own["destination"], "/topic/file-changes");
    assert_eq!(own["body"]["data"]["filename"], "bob.txt");

    // An admin broadcast reaches Bob's topic and Alice's personal queue.
    let sent = gw
        .client
        .post(format!("{}/api/v1/websocket/broadcast/maintenance", gw.running.url))
        .bearer_auth(gw.token("root", &["user", "admin"]))
        .json(&json!({"message": "Read-only from 02:00", "scheduledAt": "02:00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    let notice = bob.message().await;
    assert_eq!(notice["destination"], "/topic/notifications");
    assert_eq!(notice["body"]["type"], "maintenance_notification");
    assert_eq!(notice["body"]["scheduledAt"], "02:00");
    let notice = alice.message().await;
    assert_eq!(notice["destination"], "/user/queue/notifications");
    assert_eq!(notice["body"]["message"], "Read-only from 02:00");

    alice.stop().await;
    bob.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stats(&gw).await["activeConnections"], 0, "closed connections are counted out");
}

#[tokio::test]
async fn stompjs_over_the_sockjs_http_fallbacks_receives_and_sends() {
    let gw = gateway().await;
    for mode in ["sockjs-xhr-streaming", "sockjs-xhr-polling"] {
        let token = gw.token("carol", &["user"]);
        let mut carol = StompClient::start(
            mode,
            &format!("{}/ws", gw.running.url),
            Some(&token),
            &["/topic/file-changes", "/user/queue/notifications"],
        );
        let connected = carol.ready().await;
        assert_eq!(connected["user-name"], "carol", "{mode}");
        assert_eq!(stats(&gw).await["activeConnections"], 1, "{mode}");
        let doc = gw.upload("carol", &format!("{mode}.txt")).await;
        let mut seen = vec![carol.message().await, carol.message().await];
        seen.sort_by_key(|m| m["destination"].as_str().unwrap().to_owned());
        assert_eq!(seen[0]["destination"], "/topic/file-changes", "{mode}");
        assert_eq!(seen[1]["destination"], "/user/queue/notifications", "{mode}");
        assert!(seen.iter().all(|m| m["body"]["data"]["documentId"] == doc["id"]), "{mode}: {seen:?}");
        // DISCONNECT travels through xhr_send; the connection is counted out.
        carol.stop().await;
        let mut open = 1;
        for _ in 0..40 {
            open = stats(&gw).await["activeConnections"].as_i64().unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(open, 0, "{mode}: the session ended");
    }
    // Sending into a session that does not exist, or a body that is not SockJS, is refused.
    let url = |path: &str| format!("{}/ws/000/{path}", gw.running.url);
    let missing = gw.client.post(url("nosuchsession/xhr_send")).body(r#"["x"]"#).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let opened = gw.client.post(url("probe/xhr")).send().await.unwrap().text().await.unwrap();
    assert_eq!(opened, "o\n", "a new polling session opens");
    let broken = gw.client.post(url("probe/xhr_send")).body("not json").send().await.unwrap();
    assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(broken.text().await.unwrap(), "Broken JSON encoding.");
    let dotted = gw.client.post(url("a.b/xhr")).send().await.unwrap();
    assert_eq!(dotted.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn upload_progress_reaches_the_owners_queue_and_the_job_topic() {
    let gw = gateway().await;
    let token = gw.token("alice", &["user"]);
    let (client, base) = (&gw.client, gw.running.url.as_str());
    let id = support::initiate(client, base, &token, 20, 10).await;
    let job_topic = format!("/topic/jobs/{id}");
    let mut alice = StompClient::start("ws", &ws_url(&gw, "/ws"), Some(&token), &["/user/queue/upload-progress"]);
    alice.ready().await;
    // Mallory knows the session id but not the token that owns it.
    let mallory_token = gw.token("mallory", &["user"]);
    let mut mallory =
        StompClient::start("ws", &ws_url(&gw, "/ws"), Some(&mallory_token), &[&job_topic, "/topic/uploads"]);
    mallory.ready().await;
    let admin_token = gw.token("root", &["user", "admin"]);
    let mut admin = StompClient::start("ws", &ws_url(&gw, "/ws"), Some(&admin_token), &[&job_topic]);
    admin.ready().await;

    for n in 0..2 {
        support::put_chunk(client, base, &token, &id, n, vec![b'x'; 10]).await;
        let update = alice.message().await;
        assert_eq!(update["destination"], "/user/queue/upload-progress");
        assert_eq!(update["body"]["type"], "job_status_update");
        assert_eq!(update["body"]["jobId"], id.as_str());
        assert_eq!(update["body"]["data"]["uploadedChunks"], n + 1);
        let watched = admin.message().await;
        assert_eq!(watched["destination"], job_topic.as_str());
        assert_eq!(watched["body"], update["body"]);
    }
    support::complete(client, base, &token, &id).await;
    let completed = alice.message().await;
    assert_eq!(completed["body"]["type"], "job_completed");
    assert_eq!(completed["body"]["result"]["filename"], "big.bin");
    // Mallory got nothing but the end of her connection.
    let rest = mallory.stop().await;
    assert!(rest.iter().all(|line| line.get("message").is_none()), "{rest:?}");
    alice.stop().await;
    admin.stop().await;
}

/// Seed 003's client subscribes to its status topics beside the document topic, and seed
/// 001's to its queues without `/user`: every subscription is accepted, as a Spring simple
/// broker accepts them, and the document events still arrive.
#[tokio::test]
async fn the_seeds_topics_and_queues_are_all_accepted() {
    let gw = gateway().await;
    let token = gw.token("alice", &["user"]);
    let destinations =
        ["/topic/extractions", "/topic/migrations", "/topic/data-quality", "/topic/documents", "/queue/sync"];
    let mut alice = StompClient::start("sockjs", &format!("{}/ws", gw.running.url), Some(&token), &destinations);
    alice.ready().await;
    gw.upload("alice", "status.txt").await;
    let mut arrived = Vec::new();
    while arrived.len() < 2 {
        let message = alice.message().await;
        assert_eq!(message["body"]["data"]["filename"], "status.txt", "{message}");
        arrived.push(message["destination"].as_str().unwrap().to_owned());
    }
    arrived.sort();
    assert_eq!(arrived, ["/queue/sync", "/topic/documents"]);
}

#[tokio::test]
async fn bad_tokens_unknown_destinations_and_bad_frames_get_an_error_frame() {
    let gw = gateway().await;
    // No token anywhere.
    let mut anonymous = StompClient::start("ws", &ws_url(&gw, "/ws"), None, &[]);
    let error = anonymous.next().await;
    assert_eq!(error["error"], "authentication required", "{error}");
    // A token that is not ours: the reason, never the token.
    let mut forged = StompClient::start("ws", &ws_url(&gw, "/ws"), Some("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"), &[]);
    let error = forged.next().await;
    assert_eq!(error["error"], "authentication failed");
    assert!(!error["body"].as_str().unwrap().contains("c2ln"));
    // A destination outside the broker's prefixes (an application destination).
    let token = gw.token("alice", &["user"]);
    let mut lost = StompClient::start("ws", &ws_url(&gw, "/ws"), Some(&token), &["/app/extractions"]);
    assert!(lost.next().await.get("connected").is_some());
    let error = lost.next().await;
    assert_eq!(error["error"], "unknown destination");
    assert!(error["body"].as_str().unwrap().contains("/topic/documents"), "the error lists the destinations");

    // By hand: a token on the upgrade is enough, SEND is refused, garbage ends the connection.
    let (mut ws, response) = tokio_tungstenite::connect_async({
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url(
            &gw,
            &format!("/ws?token={token}"),
        ))
        .unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "v11.stomp".parse().unwrap());
        request
    })
    .await
    .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "v11.stomp");
    let frame = |s: &str| Message::Text(s.to_owned().into());
    ws.send(frame("CONNECT\naccept-version:1.1\nhost:x\n\n\0")).await.unwrap();
    let connected = text(&mut ws).await;
    assert!(connected.starts_with("CONNECTED\nversion:1.1\n"), "{connected}");
    ws.send(frame("SEND\ndestination:/app/x\n\nhi\0")).await.unwrap();
    let error = text(&mut ws).await;
    assert!(error.starts_with("ERROR\n") && error.contains("message:SEND is not accepted"), "{error}");

    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_url(&gw, &format!("/ws/websocket?token={token}"))).await.unwrap();
    ws.send(frame("CONNECT\naccept-version:1.2\n\n\0")).await.unwrap();
    assert!(text(&mut ws).await.starts_with("CONNECTED\n"));
    ws.send(frame("SUBSCRIBE\nid:1\ndestination:/topic/documents\nreceipt:r\\t\n\n\0")).await.unwrap();
    let error = text(&mut ws).await;
    assert!(error.contains("message:malformed frame") && error.contains("undefined escape"), "{error}");
    // STOMP 1.0 only: refused with the versions we speak.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_url(&gw, &format!("/ws/websocket?token={token}"))).await.unwrap();
    ws.send(frame("CONNECT\n\n\0")).await.unwrap();
    assert!(text(&mut ws).await.contains("version:1.1,1.2"));
}

/// The next text message, skipping heart-beats.
async fn text(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message").unwrap().unwrap() {
            Message::Text(text) if text.as_str() != "\n" => return text.to_string(),
            Message::Close(_) => panic!("closed"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn sockjs_info_answers_as_the_protocol_says() {
    let gw = gateway().await;
    let info: Value = gw.client.get(format!("{}/ws/info", gw.running.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["websocket"], true);
    assert_eq!(info["cookie_needed"], false);
    assert!(info["entropy"].is_u64());
}

/// Seed 003's client subscribes to `/topic/migrations`: a resharding's progress reaches an
/// admin there as its `StatusUpdateEvent`; a user's subscription is accepted and gets none.
#[tokio::test]
async fn a_reshardings_progress_reaches_admins_on_topic_migrations() {
    let gw = gateway().await;
    let root_token = gw.token("root", &["user", "admin"]);
    let mut root = StompClient::start("ws", &ws_url(&gw, "/ws"), Some(&root_token), &["/topic/migrations"]);
    root.ready().await;
    let alice_token = gw.token("alice", &["user"]);
    let mut alice = StompClient::start(
        "sockjs",
        &format!("{}/ws", gw.running.url),
        Some(&alice_token),
        &["/topic/migrations", "/topic/notifications"],
    );
    alice.ready().await;
    let update = json!({"type": "status_update", "eventType": "completed", "entityType": "migration",
        "entityId": "shard-move/v3", "status": "COMPLETED", "progress": 100, "recordsProcessed": 7,
        "totalRecords": 7, "phase": "Moving", "message": "7 documents moved", "timestamp": "2026-12-05T00:00:00Z"});
    gw.running.state.hub.publish(vellum_gateway::realtime::Notice {
        seq: None,
        audience: vellum_gateway::realtime::Audience::Admins,
        channel: "migrations",
        job_id: None,
        job_kind: None,
        kind: "status_update".into(),
        message: update.clone(),
        data: update.clone(),
    });
    let got = root.message().await;
    assert_eq!(got["destination"], "/topic/migrations");
    assert_eq!(got["body"], update);
    // Alice's next message is the broadcast that follows, not the move's progress.
    let sent = gw
        .client
        .post(format!("{}/api/v1/websocket/broadcast/system", gw.running.url))
        .bearer_auth(&root_token)
        .json(&json!({"message": "after the move"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    let next = alice.message().await;
    assert_eq!(
        (next["destination"].as_str(), next["body"]["message"].as_str()),
        (Some("/topic/notifications"), Some("after the move"))
    );
    root.stop().await;
    alice.stop().await;
}
