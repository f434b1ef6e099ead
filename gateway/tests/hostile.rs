//! The gateway keeps serving under careless and hostile clients: slow request heads and
//! idle sockets are cut off, sockets past the cap make room or are refused while
//! `/healthz` answers, oversized declarations get 413 before a byte of body is read,
//! huge form fields and JSON bodies are refused without being buffered, uploads in
//! progress are bounded and stalled ones released, refusals reach clients that are still
//! sending, and failed token checks are bounded per address.
//!
//! Each test runs a gateway in this process with small limits over raw sockets, so the
//! bytes on the wire are exactly what a misbehaving client sends.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vellum_gateway::limits::Limits;
use vellum_gateway::standalone::{self, Running};

mod support;

struct Gateway {
    running: Running,
    _dir: tempfile::TempDir,
}

async fn gateway(limits: Limits, rate_per_second: u32) -> Gateway {
    gateway_with(limits, rate_per_second, None).await
}

async fn gateway_with(limits: Limits, rate_per_second: u32, metrics_listen: Option<std::net::SocketAddr>) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let mut options = support::options(dir.path(), support::MEMORY_TIER, b"hostile-secret");
    options.auth.rate_per_second = rate_per_second;
    options.auth.rate_burst = rate_per_second;
    options.max_upload_bytes = 8 << 20;
    options.limits = limits;
    options.metrics_listen = metrics_listen;
    Gateway { running: standalone::start(options).await.unwrap(), _dir: dir }
}

impl Gateway {
    fn token(&self, user: &str) -> String {
        self.running.state.auth.mint(user, &["user"], Duration::from_secs(600)).unwrap()
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.running.addr).await.unwrap()
    }

    async fn healthz(&self) -> StatusCode {
        reqwest::get(format!("{}/healthz", self.running.url)).await.map_or(StatusCode::BAD_GATEWAY, |r| r.status())
    }
}

/// Whether the server closed `socket`: a read ends (or fails) within `within`.
async fn closed_within(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Reads one response head (up to the blank line) from `socket`.
async fn response_head(socket: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match socket.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            other => {
                panic!("the connection ended before a response head ({other:?}): {}", String::from_utf8_lossy(&head))
            }
        }
    }
    String::from_utf8(head).unwrap()
}

/// Bytes in MiB, for the figures the tests print.
#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn a_slow_request_head_and_an_idle_socket_are_cut_off_at_the_header_timeout() {
    let limits = Limits { header_timeout: Duration::from_secs(1), ..Limits::default() };
    let gw = gateway(limits, 0).await;
    let started = Instant::now();
    let mut slow = gw.connect().await;
    let mut idle = gw.connect().await;
    // One byte of a request head every 200 ms: it never completes within the timeout.
    let drip = async {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().cycle().take(40) {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    drip.await;
    assert!(closed_within(&mut slow, Duration::from_secs(1)).await, "the slow client was still connected");
    assert!(closed_within(&mut idle, Duration::from_secs(1)).await, "the idle socket was still open");
    assert!(started.elapsed() < Duration::from_secs(9), "cut off after {:?}", started.elapsed());
    // A client that sends its request in time is served on a kept-alive connection.
    assert_eq!(gw.healthz().await, StatusCode::OK);
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn sockets_beyond_the_cap_make_room_or_are_refused_while_healthz_answers() {
    let limits = Limits { max_connections: 40, ..Limits::default() };
    let gw = gateway(limits, 0).await;
    // 40 idle sockets fill the cap; 60 more each push out the longest-open idle one.
    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(gw.connect().await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    for socket in &mut sockets {
        if !closed_within(socket, Duration::from_millis(20)).await {
            open += 1;
        }
    }
    assert!(open <= 40, "{open} sockets are open past a cap of 40");
    assert!(open >= 30, "only {open} of the newest sockets were kept");
    for _ in 0..5 {
        assert_eq!(gw.healthz().await, StatusCode::OK, "/healthz with the cap full of idle sockets");
    }
    drop(sockets);

    // When every place is taken by a request in progress (event streams), a new socket is
    // refused at once rather than queued.
    let token = gw.token("alice");
    let mut streams = Vec::new();
    while streams.len() < 40 {
        let mut s = gw.connect().await;
        let request = format!("GET /api/v1/events/stream?token={token} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let head = response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        streams.push(s);
    }
    let mut refused = gw.connect().await;
    refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.ok();
    assert!(closed_within(&mut refused, Duration::from_secs(2)).await, "a socket past a cap of busy ones was kept");
    drop(streams);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.healthz().await, StatusCode::OK, "places come back when the streams close");
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_declarations_get_413_before_any_body_is_read() {
    let gw = gateway(Limits::default(), 0).await;
    let token = gw.token("alice");
    for (path, length) in
        [("/api/v1/documents?filename=big.iso", 6_000_000_000_u64), ("/api/v1/upload/initiate", 512 << 20)]
    {
        let started = Instant::now();
        let mut socket = gw.connect().await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), response_head(&mut socket)).await.expect("no answer");
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path}: answered after {:?}", started.elapsed());
    }
    gw.running.shutdown().await.unwrap();
}

/// Heads with too many or too large header fields get 431 with the JSON error body every
/// other refusal has; far past the limits the parser answers 431 itself.
#[tokio::test]
async fn oversized_request_heads_get_431_with_a_json_body() {
    let gw = gateway(Limits::default(), 0).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/documents", gw.running.url);
    let many = (0..150).fold(client.get(&url), |r, i| r.header(format!("x-field-{i}"), "v"));
    let long = client.get(&url).header("x-long", "v".repeat(70 << 10));
    for (what, request) in [("150 fields", many), ("a 70 KiB field", long)] {
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{what}");
        assert_eq!(answer.headers()["content-type"], "application/json", "{what}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["status"], 431, "{what}");
        assert!(body["message"].as_str().unwrap().contains("at most 100 fields and 65536 bytes"), "{what}: {body}");
    }
    let absurd = (0..600).fold(client.get(&url), |r, i| r.header(format!("x-field-{i}"), "v"));
    assert_eq!(absurd.send().await.unwrap().status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(gw.healthz().await, StatusCode::OK);
    gw.running.shutdown().await.unwrap();
}

/// A body of `len` bytes of `fill`, produced as it is sent.
fn generated(len: u64, fill: u8) -> reqwest::Body {
    let chunk = bytes::Bytes::from(vec![fill; 64 << 10]);
    let chunks = len.div_ceil(chunk.len() as u64);
    reqwest::Body::wrap_stream(futures::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone()))))
}

#[tokio::test]
async fn a_huge_form_field_and_a_huge_json_body_are_refused_unbuffered() {
    let gw = gateway(Limits::default(), 0).await;
    let token = gw.token("alice");
    let client = reqwest::Client::new();
    let before = rss_bytes();

    // A 1 GiB `title` field, streamed without a declared length: refused once it passes
    // the field limit.
    let form = reqwest::multipart::Form::new()
        .part("title", reqwest::multipart::Part::stream(generated(1 << 30, b'a')))
        .part("file", reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x.txt"));
    let started = Instant::now();
    let answer =
        client.post(format!("{}/api/v1/documents", gw.running.url)).bearer_auth(&token).multipart(form).send().await;
    if let Ok(response) = answer {
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("longer than"), "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());

    // A 512 MiB JSON body without a declared length: read up to the JSON limit only.
    let answer = client
        .post(format!("{}/api/v1/upload/initiate", gw.running.url))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(generated(512 << 20, b' '))
        .send()
        .await;
    if let Ok(response) = answer {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let grown = rss_bytes().saturating_sub(before);
    println!("RSS growth over a 1 GiB field and a 512 MiB JSON body: {:.1} MiB", mib(grown));
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    // Repeated tag fields are bounded in number, not joined quadratically.
    // (Written by hand: reqwest nests one stream per part, too deep for 20,000 parts.)
    let mut form = String::new();
    for i in 0..20_000 {
        write!(form, "--b\r\nContent-Disposition: form-data; name=\"tags\"\r\n\r\nt{i}\r\n").unwrap();
    }
    form.push_str("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.txt\"\r\n\r\nx\r\n--b--\r\n");
    let started = Instant::now();
    let response = client
        .post(format!("{}/api/v1/documents", gw.running.url))
        .bearer_auth(&token)
        .header("content-type", "multipart/form-data; boundary=b")
        .body(form)
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "20,000 tag fields took {:?}", started.elapsed());
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn uploads_in_progress_are_bounded_and_stalled_ones_released() {
    let limits = Limits { max_uploads: 4, body_timeout: Duration::from_secs(1), ..Limits::default() };
    let gw = gateway(limits, 0).await;
    let token = gw.token("alice");
    let before = rss_bytes();
    // 40 uploads that send part of their body and stall.
    let mut stalled = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let mut socket = gw.connect().await;
        let head = format!(
            "POST /api/v1/documents?filename=s{i}.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            4 << 20
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(&vec![b'x'; 256 << 10]).await.unwrap();
        stalled.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for socket in &mut stalled {
        let answered = tokio::time::timeout(Duration::from_millis(50), response_head(socket)).await;
        if let Ok(head) = answered {
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
            refused += 1;
        }
    }
    assert_eq!(refused, 36, "4 places: the other 36 uploads are refused with 503");
    let grown = rss_bytes().saturating_sub(before);
    println!("RSS growth with 40 stalled uploads (4 admitted): {:.1} MiB", mib(grown));
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    // The stalled ones fail at the body timeout, and their places come back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/documents?filename=after.txt", gw.running.url))
        .bearer_auth(&token)
        .body("after the stall")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{:?}", response.text().await);
    drop(stalled);
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rate_limited_upload_sees_its_429_while_still_sending() {
    let gw = gateway(Limits::default(), 1).await;
    let token = gw.token("alice");
    let body = vec![b'z'; 600 << 10];
    let mut statuses = Vec::new();
    for i in 0..3 {
        // A small send buffer, so that the body does not vanish into the kernel's buffers
        // when the server reads none of it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(16 << 10).unwrap();
        let mut socket = socket.connect(gw.running.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/documents?filename=r{i}.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // The whole request is written before the answer is read, as simple clients do.
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(&body).await.expect("the server closed the connection while the body was being sent");
        let answer = response_head(&mut socket).await;
        statuses.push(answer.lines().next().unwrap().to_owned());
        if answer.starts_with("HTTP/1.1 429") {
            assert!(answer.to_ascii_lowercase().contains("retry-after:"), "{answer}");
        }
    }
    assert!(statuses[0].starts_with("HTTP/1.1 201"), "{statuses:?}");
    assert!(statuses[1..].iter().all(|s| s.starts_with("HTTP/1.1 429")), "{statuses:?}");
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn failed_token_checks_are_bounded_per_address_and_users_are_pruned() {
    let limits = Limits { auth_failures_per_second: 2, ..Limits::default() };
    let gw = gateway(limits, 50).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/documents", gw.running.url);
    // A 20 KiB token is refused unread.
    let huge = "a".repeat(20 << 10);
    let response = client.get(&url).bearer_auth(&huge).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("longer than"), "{body}");
    // Bad tokens from one address: 401 within the budget (burst 4), then 429 unchecked,
    // even for a good token, until the budget refills.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(client.get(&url).bearer_auth("not.a.jwt").send().await.unwrap().status());
    }
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    let blocked = client.get(&url).bearer_auth(gw.token("alice")).send().await.unwrap();
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(blocked.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(client.get(&url).bearer_auth(gw.token("alice")).send().await.unwrap().status(), StatusCode::OK);
    // Bad tokens in `?token=` (event streams, WebSocket upgrades) count the same way.
    let stream = format!("{}/api/v1/events/stream?token=not.a.jwt", gw.running.url);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(client.get(&stream).send().await.unwrap().status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    // The probes stay open to a blocked address.
    assert_eq!(gw.healthz().await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Every distinct user has a limiter entry while active; pruning forgets the idle ones.
    for i in 0..200 {
        let response = client.get(&url).bearer_auth(gw.token(&format!("user-{i}"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert!(gw.running.state.auth.limited_users() >= 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    gw.running.state.auth.prune();
    gw.running.state.admission.prune();
    assert_eq!(gw.running.state.auth.limited_users(), 0, "idle users are still held");
    assert_eq!(gw.running.state.admission.tracked_addresses(), 0, "recovered addresses are still held");
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn stored_types_are_not_sniffed_and_reordering_file_names_are_refused() {
    let gw = gateway(Limits::default(), 0).await;
    let token = gw.token("alice");
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/api/v1/documents?filename=page.html", gw.running.url))
        .bearer_auth(&token)
        .header("content-type", "text/html")
        .body("<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response.json::<serde_json::Value>().await.unwrap()["id"].as_i64().unwrap();
    let download = client
        .get(format!("{}/api/v1/documents/{id}/content", gw.running.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.headers()["x-content-type-options"], "nosniff");
    let spoofed = client
        .post(format!("{}/api/v1/documents?filename=invoice%E2%80%AEfdp.exe", gw.running.url))
        .bearer_auth(&token)
        .body("MZ")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = spoofed.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("bidirectional"), "{body}");
    gw.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_can_have_an_address_of_their_own() {
    let gw = gateway_with(Limits::default(), 0, Some("127.0.0.1:0".parse().unwrap())).await;
    let on_api = reqwest::get(format!("{}/metrics", gw.running.url)).await.unwrap();
    assert_eq!(on_api.status(), StatusCode::NOT_FOUND);
    let own = gw.running.metrics_addr.expect("the metrics address");
    let scraped = reqwest::get(format!("http://{own}/metrics")).await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("vellum_gateway_http_requests"));
    // Actuator's name for them moves with them.
    let on_api = reqwest::get(format!("{}/actuator/prometheus", gw.running.url)).await.unwrap();
    assert_eq!(on_api.status(), StatusCode::NOT_FOUND);
    let scraped = reqwest::get(format!("http://{own}/actuator/prometheus")).await.unwrap();
    assert!(scraped.text().await.unwrap().contains("vellum_gateway_http_requests"));
    // The API itself is not served there.
    let api = reqwest::get(format!("http://{own}/healthz")).await.unwrap();
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
    gw.running.shutdown().await.unwrap();
}
