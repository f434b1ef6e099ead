//! Real-time notifications over a socket: the WebSocket JSON protocol of the seed clients,
//! SSE with Last-Event-ID resume, admin broadcasts and statistics, and a slow client
//! disconnected with a reason instead of holding the others back.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use vellum_gateway::realtime::Notice;

mod support;

use support::{Gateway, gateway};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Gateway {
    async fn ws(&self, user: &str, roles: &[&str]) -> Ws {
        let url = format!("{}/ws?token={}", self.running.url.replace("http://", "ws://"), self.token(user, roles));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "connection_established");
        assert_eq!(hello["userId"], user);
        ws
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let message =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message").unwrap().unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into())).await.unwrap();
}

#[tokio::test]
async fn the_json_protocol_delivers_each_user_their_events_and_broadcasts_to_all() {
    let gw = gateway().await;
    let mut alice = gw.ws("alice", &["user"]).await;
    let mut bob = gw.ws("bob", &["user"]).await;
    let mut admin = gw.ws("root", &["user", "admin"]).await;

    send(&mut alice, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut alice).await["type"], "pong");
    send(&mut alice, json!({"type": "subscribe_channel", "channel": "nope"})).await;
    let error = next_json(&mut alice).await;
    assert_eq!(error["type"], "error");
    assert!(error["message"].as_str().unwrap().contains("documents"));
    send(&mut alice, json!({"type": "dance"})).await;
    assert_eq!(next_json(&mut alice).await["type"], "error", "an unknown message is answered, not fatal");
    send(&mut alice, json!({"type": "subscribe_job", "jobId": "job-123"})).await;
    assert_eq!(next_json(&mut alice).await["type"], "subscribed");

    let doc = gw.upload("alice", "alice.txt").await;
    let event = next_json(&mut alice).await;
    assert_eq!(event["type"], "DOCUMENT_UPLOADED");
    assert_eq!(event["data"]["documentId"], doc["id"]);
    assert_eq!(event["data"]["filename"], "alice.txt");
    assert!(event["eventId"].is_string());
    assert_eq!(next_json(&mut admin).await["data"]["filename"], "alice.txt", "admins see every event");
    // Bob does not see Alice's documents: his first event is his own upload.
    gw.upload("bob", "bob.txt").await;
    assert_eq!(next_json(&mut bob).await["data"]["filename"], "bob.txt");

    // Statistics and an admin broadcast.
    let admin_token = gw.token("root", &["user", "admin"]);
    let stats: Value = gw
        .client
        .get(format!("{}/api/v1/websocket/stats", gw.running.url))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["data"]["activeConnections"], 3);
    assert_eq!(stats["data"]["activeJobSubscriptions"], 1);
    let user_status: Value = gw
        .client
        .get(format!("{}/api/v1/websocket/user/alice/status", gw.running.url))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(user_status["connected"], true);
    let sent = gw
        .client
        .post(format!("{}/api/v1/websocket/broadcast/system", gw.running.url))
        .bearer_auth(&admin_token)
        .json(&json!({"message": "System maintenance in 30 minutes", "level": "warning"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    for ws in [&mut alice, &mut bob] {
        let notice = next_json(ws).await;
        assert_eq!(notice["type"], "system_notification");
        assert_eq!(notice["message"], "System maintenance in 30 minutes");
        assert_eq!(notice["level"], "warning");
    }
    let forbidden = gw
        .client
        .post(format!("{}/api/v1/websocket/broadcast/system", gw.running.url))
        .bearer_auth(gw.token("bob", &["user"]))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);

    // No token, or a bad one: refused before the upgrade.
    let ws_base = gw.running.url.replace("http://", "ws://");
    for url in [format!("{ws_base}/ws"), format!("{ws_base}/ws?token=not-a-jwt")] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            other => panic!("expected 401, got {other:?}"),
        }
    }
    drop(gw);
}

/// Reads SSE events (id, event, data) from a streaming response until `n` have arrived.
async fn read_events(
    response: &mut reqwest::Response,
    buffer: &mut String,
    n: usize,
) -> Vec<(Option<i64>, String, Value)> {
    let mut events = Vec::new();
    while events.len() < n {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse().unwrap());
                } else if let Some(v) = line.strip_prefix("event:") {
                    v.trim().clone_into(&mut event);
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !data.is_empty() {
                events.push((id, event, serde_json::from_str(&data).unwrap()));
            }
        }
        if events.len() >= n {
            break;
        }
        let chunk =
            tokio::time::timeout(Duration::from_secs(10), response.chunk()).await.expect("SSE data").unwrap().unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    events
}

#[tokio::test]
async fn an_sse_client_resuming_with_last_event_id_gets_exactly_what_it_missed() {
    let gw = gateway().await;
    let url = format!("{}/api/v1/events/stream?token={}", gw.running.url, gw.token("alice", &["user"]));
    let mut stream = gw.client.get(&url).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut buffer = String::new();
    for n in 0..3 {
        gw.upload("alice", &format!("first-{n}.txt")).await;
    }
    gw.upload("bob", "not-for-alice.txt").await;
    let first = read_events(&mut stream, &mut buffer, 3).await;
    assert_eq!(
        first.iter().map(|e| e.2["filename"].as_str().unwrap()).collect::<Vec<_>>(),
        ["first-0.txt", "first-1.txt", "first-2.txt"]
    );
    assert!(first.iter().all(|e| e.1 == "DOCUMENT_UPLOADED"));
    let last_id = first[2].0.unwrap();
    drop(stream);

    // Missed while away.
    gw.upload("alice", "missed-0.txt").await;
    gw.upload("bob", "still-not-for-alice.txt").await;
    gw.upload("alice", "missed-1.txt").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut resumed = gw
        .client
        .get(format!("{}/api/v1/events/stream", gw.running.url))
        .bearer_auth(gw.token("alice", &["user"]))
        .header("Last-Event-ID", last_id.to_string())
        .send()
        .await
        .unwrap();
    let mut buffer = String::new();
    let missed = read_events(&mut resumed, &mut buffer, 2).await;
    assert_eq!(
        missed.iter().map(|e| e.2["filename"].as_str().unwrap()).collect::<Vec<_>>(),
        ["missed-0.txt", "missed-1.txt"]
    );
    assert!(missed.iter().all(|e| e.0.unwrap() > last_id));
    // Then live, without repeating anything.
    gw.upload("alice", "live.txt").await;
    let live = read_events(&mut resumed, &mut buffer, 1).await;
    assert_eq!(live[0].2["filename"], "live.txt");
    assert!(live[0].0.unwrap() > missed[1].0.unwrap());

    let bad = gw
        .client
        .get(format!("{}/api/v1/events/stream", gw.running.url))
        .bearer_auth(gw.token("alice", &["user"]))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

/// A raw STOMP 1.2 connection over `/ws`, CONNECT sent with `headers`.
async fn stomp_connect(gw: &Gateway, headers: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{}/ws", gw.running.url.replace("http://", "ws://")).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "v12.stomp".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let token = gw.token("alice", &["user"]);
    let connect = format!("CONNECT\naccept-version:1.2\nAuthorization:Bearer {token}\n{headers}\n\0");
    ws.send(Message::Text(connect.into())).await.unwrap();
    assert!(next_frame(&mut ws).await.starts_with("CONNECTED\n"));
    ws
}

/// The next STOMP frame (heart-beats skipped).
async fn next_frame(ws: &mut Ws) -> String {
    loop {
        let message =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame").unwrap().unwrap();
        if let Message::Text(text) = message
            && text.trim() != ""
        {
            return text.to_string();
        }
    }
}

/// A MESSAGE frame's `sequence` header and the `filename` of its body's document.
fn sequence_and_filename(frame: &str) -> (i64, String) {
    let (head, body) = frame.split_once("\n\n").unwrap();
    assert!(head.starts_with("MESSAGE\n"), "{frame}");
    let sequence = head.lines().find_map(|l| l.strip_prefix("sequence:")).expect("a sequence header");
    let body: Value = serde_json::from_str(body.trim_end_matches('\0')).unwrap();
    (sequence.parse().unwrap(), body["data"]["filename"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn websocket_clients_resuming_from_the_last_sequence_get_exactly_what_they_missed() {
    let gw = gateway().await;
    let mut ws = gw.ws("alice", &["user"]).await;
    for n in 0..2 {
        gw.upload("alice", &format!("first-{n}.txt")).await;
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = next_json(&mut ws).await;
        seen.push((
            event["sequence"].as_i64().expect("each event carries its sequence"),
            event["data"]["filename"].clone(),
        ));
    }
    assert_eq!(seen.iter().map(|s| s.1.as_str().unwrap()).collect::<Vec<_>>(), ["first-0.txt", "first-1.txt"]);
    assert!(seen[0].0 < seen[1].0);
    let last = seen[1].0;
    drop(ws);

    // Missed while away.
    gw.upload("alice", "missed-0.txt").await;
    gw.upload("bob", "not-for-alice.txt").await;
    gw.upload("alice", "missed-1.txt").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The JSON protocol: `?lastEventId=`.
    let url = format!(
        "{}/ws?token={}&lastEventId={last}",
        gw.running.url.replace("http://", "ws://"),
        gw.token("alice", &["user"])
    );
    let (mut json, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut json).await["type"], "connection_established");
    // STOMP: `last-event-id` on CONNECT applies to each subscription.
    let mut stomp = stomp_connect(&gw, &format!("last-event-id:{last}\n")).await;
    stomp.send(Message::Text("SUBSCRIBE\nid:0\ndestination:/topic/documents\n\n\0".into())).await.unwrap();
    let mut missed = Vec::new();
    for _ in 0..2 {
        let event = next_json(&mut json).await;
        missed.push((event["sequence"].as_i64().unwrap(), event["data"]["filename"].as_str().unwrap().to_owned()));
    }
    assert_eq!(missed.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(), ["missed-0.txt", "missed-1.txt"]);
    assert!(last < missed[0].0 && missed[0].0 < missed[1].0);
    let over_stomp =
        [sequence_and_filename(&next_frame(&mut stomp).await), sequence_and_filename(&next_frame(&mut stomp).await)];
    assert_eq!(over_stomp.to_vec(), missed, "STOMP replays the same events with the same sequences");
    // Then live, nothing repeated.
    gw.upload("alice", "live.txt").await;
    let live = next_json(&mut json).await;
    assert_eq!(
        (live["data"]["filename"].as_str(), live["sequence"].as_i64() > Some(missed[1].0)),
        (Some("live.txt"), true)
    );
    assert_eq!(sequence_and_filename(&next_frame(&mut stomp).await).1, "live.txt");

    // A position that is not a sequence: 400 with the JSON error body before the upgrade;
    // an ERROR frame over STOMP.
    let url = format!(
        "{}/ws?token={}&lastEventId=yesterday",
        gw.running.url.replace("http://", "ws://"),
        gw.token("alice", &["user"])
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let mut bad = stomp_connect(&gw, "").await;
    bad.send(Message::Text("SUBSCRIBE\nid:0\ndestination:/topic/documents\nlast-event-id:soon\n\n\0".into()))
        .await
        .unwrap();
    let error = next_frame(&mut bad).await;
    assert!(error.starts_with("ERROR\n") && error.contains("last-event-id"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_keep_up_is_closed_with_a_reason_and_others_are_not_held_back() {
    const NOTICES: usize = 10_000;
    let gw = gateway().await;
    let mut slow = gw.ws("slow", &["user"]).await;
    let mut fine = gw.ws("fine", &["user"]).await;
    // The fine client reads as notices come.
    let reader = tokio::spawn(async move {
        let mut received = 0;
        while received < NOTICES {
            match tokio::time::timeout(Duration::from_secs(20), fine.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => received += 1,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("the fine client was cut off after {received}: {other:?}"),
            }
        }
        received
    });
    // 20 MB of notices (more than the socket buffers hold), paced so that a client reading
    // along keeps up, while the slow client reads nothing and its socket fills.
    let hub = &gw.running.state.hub;
    let padding = "x".repeat(2000);
    for batch in 0..NOTICES / 20 {
        for n in 0..20 {
            hub.publish(Notice::system(
                "system_notification",
                &format!("{} {padding}", batch * 20 + n),
                "info",
                0,
                json!({}),
            ));
        }
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    assert_eq!(reader.await.unwrap(), NOTICES, "the fine client got every notice");
    // The slow client reads only now: what it was sent, then a close with the reason.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await.expect("progress") {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a reason"),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1013);
    assert!(close.reason.contains("cannot keep up"), "{}", close.reason);
}

#[tokio::test]
async fn upload_progress_reaches_the_owner_subscribed_to_the_session_as_job_updates() {
    let gw = gateway().await;
    let token = gw.token("alice", &["user"]);
    let (client, base) = (&gw.client, gw.running.url.as_str());
    let id = support::initiate(client, base, &token, 20, 10).await;
    let mut alice = gw.ws("alice", &["user"]).await;
    let mut bob = gw.ws("bob", &["user"]).await;
    for ws in [&mut alice, &mut bob] {
        send(ws, json!({"type": "subscribe_job", "jobId": id})).await;
        assert_eq!(next_json(ws).await["type"], "subscribed");
    }
    for n in 0..2 {
        support::put_chunk(client, base, &token, &id, n, vec![b'x'; 10]).await;
        let update = next_json(&mut alice).await;
        assert_eq!(update["type"], "job_status_update");
        assert_eq!(update["jobId"], id.as_str());
        assert_eq!(update["data"]["uploadedChunks"], n + 1);
    }
    support::complete(client, base, &token, &id).await;
    let mut completed = next_json(&mut alice).await;
    if completed["type"] == "DOCUMENT_UPLOADED" {
        completed = next_json(&mut alice).await;
    }
    assert_eq!(completed["type"], "job_completed");
    assert_eq!(completed["result"]["success"], true);
    assert_eq!(completed["result"]["filename"], "big.bin");
    // Bob subscribed to Alice's session but sees none of it: his next message is his pong.
    send(&mut bob, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut bob).await["type"], "pong");
}

/// The seed's dashboard meters (seed 004), under their own names on `/metrics`:
/// WebSocket connections by outcome, disconnections, connections open now, token checks by
/// outcome, and streams resumed from a `Last-Event-ID`.
#[tokio::test]
async fn the_seeds_connection_and_authentication_meters_count() {
    let gw = gateway().await;
    let scrape = || async {
        let url = format!("{}/metrics", gw.running.url);
        gw.client.get(url).send().await.unwrap().text().await.unwrap()
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
    };
    let mut alice = gw.ws("alice", &["user"]).await;
    let refused = format!("{}/ws?token=not-a-token", gw.running.url.replace("http://", "ws://"));
    assert!(tokio_tungstenite::connect_async(refused).await.is_err(), "a bad token is refused");
    let open = scrape().await;
    assert_eq!(value(&open, r#"websocket_connections_total{outcome="success"}"#), Some(1.0), "{open}");
    assert_eq!(value(&open, r#"websocket_connections_total{outcome="failure"}"#), Some(1.0), "{open}");
    assert_eq!(value(&open, "websocket_active_connections "), Some(1.0), "{open}");
    assert_eq!(value(&open, r#"authentication_attempts_total{outcome="failure"}"#), Some(1.0), "{open}");
    assert!(value(&open, r#"authentication_attempts_total{outcome="success"}"#) >= Some(1.0), "{open}");

    alice.close(None).await.unwrap();
    while alice.next().await.is_some() {}
    // An SSE client resumes from an event id, once the event is in the history (relayed:
    // until then it is neither in the history nor, for a stream opened after it was
    // broadcast, live).
    gw.upload("alice", "a.txt").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = gw
        .client
        .get(format!("{}/api/v1/events/stream", gw.running.url))
        .bearer_auth(gw.token("alice", &["user"]))
        .header("Last-Event-ID", "0")
        .send()
        .await
        .unwrap();
    let mut body = resumed.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("a.txt"), "the missed event comes first");
    // The disconnection and the resumed stream are counted as they finish: the history is
    // read to its end (one read past the missed event) after that event was sent.
    let mut closed = String::new();
    for _ in 0..100 {
        closed = scrape().await;
        if value(&closed, "websocket_active_connections ") == Some(0.0)
            && value(&closed, r#"recovery_attempts_total{outcome="success"}"#).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value(&closed, "websocket_active_connections "), Some(0.0), "{closed}");
    assert_eq!(value(&closed, "websocket_disconnections_total "), Some(1.0), "{closed}");
    assert_eq!(value(&closed, r#"recovery_attempts_total{outcome="success"}"#), Some(1.0), "{closed}");
    assert!(closed.contains("vellum_gateway_http_requests_total"), "the gateway's own meters keep their prefix");
}

/// A plain HTTP request at a WebSocket endpoint is told, in the JSON error body, to upgrade.
#[tokio::test]
async fn a_plain_request_at_a_websocket_endpoint_gets_426_with_a_json_body() {
    let gw = gateway().await;
    for path in ["/ws", "/ws/job-status", "/ws/job-status-native", "/ws/websocket"] {
        let answer = gw.client.get(format!("{}{path}", gw.running.url)).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::UPGRADE_REQUIRED, "{path}");
        assert_eq!(answer.headers()["upgrade"], "websocket", "{path}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["status"], 426, "{path}");
        assert!(body["message"].as_str().unwrap().contains("WebSocket client"), "{path}: {body}");
    }
}
