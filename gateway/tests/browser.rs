//! Browser front ends served from another origin: the CORS answers a browser checks
//! (preflights, credentials, the headers a page may read), for the origins configured
//! and no other.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use vellum_gateway::standalone;

mod support;

const PAGE: &str = "http://localhost:3000";

async fn gateway_for(origins: &[&str]) -> (standalone::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = support::options(dir.path(), support::MEMORY_TIER, b"browser-secret");
    options.cors_origins = origins.iter().map(|o| (*o).to_owned()).collect();
    (standalone::start(options).await.unwrap(), dir)
}

fn listed(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(',').map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .collect()
}

/// A preflight as a browser sends it before a cross-origin request with `headers`.
async fn preflight(
    client: &reqwest::Client,
    url: &str,
    origin: &str,
    method: &str,
    headers: &str,
) -> reqwest::Response {
    client
        .request(reqwest::Method::OPTIONS, url)
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn pages_of_the_configured_origins_may_call_the_api_and_others_may_not() {
    let (gw, _dir) = gateway_for(&["http://LOCALHOST:3000/", "https://app.example.com"]).await;
    let client = reqwest::Client::new();
    let token = gw.state.auth.mint("alice", &["user"], Duration::from_secs(600)).unwrap();
    let documents = format!("{}/api/v1/documents", gw.url);

    // A tus upload's preflight: the method, its headers and credentials are allowed.
    let tus = format!("{}/api/v1/tus", gw.url);
    let answer =
        preflight(&client, &tus, PAGE, "POST", "authorization,tus-resumable,upload-length,upload-metadata").await;
    assert!(answer.status().is_success(), "{}", answer.status());
    let h = answer.headers();
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], PAGE, "the origin is echoed, as credentials need");
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    let allowed = listed(h, header::ACCESS_CONTROL_ALLOW_HEADERS);
    for name in ["authorization", "tus-resumable", "upload-length", "upload-metadata", "upload-offset", "if-match"] {
        assert!(allowed.contains(&name.to_owned()), "{name} not in {allowed:?}");
    }
    let methods = listed(h, header::ACCESS_CONTROL_ALLOW_METHODS);
    for method in ["get", "post", "patch", "delete", "head"] {
        assert!(methods.contains(&method.to_owned()), "{method} not in {methods:?}");
    }
    assert!(h.contains_key(header::ACCESS_CONTROL_MAX_AGE));

    // Another origin's page gets no permission (the browser then refuses the request).
    let other = preflight(&client, &documents, "http://evil.example", "GET", "authorization").await;
    assert!(!other.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN), "{:?}", other.headers());
    let other = client.get(&documents).header(header::ORIGIN, "http://localhost:3001").bearer_auth(&token);
    let other = other.send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK, "CORS is the browser's check: the server still answers");
    assert!(!other.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));

    // The actual request: answered with the origin, and the headers a page may read.
    let listing = client.get(&documents).header(header::ORIGIN, PAGE).bearer_auth(&token).send().await.unwrap();
    assert_eq!(listing.status(), StatusCode::OK);
    let h = listing.headers();
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], PAGE);
    assert!(listed(h, header::VARY).contains(&"origin".to_owned()), "caches keep answers per origin: {h:?}");
    let exposed = listed(h, header::ACCESS_CONTROL_EXPOSE_HEADERS);
    for name in
        ["upload-offset", "upload-length", "location", "tus-resumable", "tus-version", "vellum-document-id", "etag"]
    {
        assert!(exposed.contains(&name.to_owned()), "{name} not in {exposed:?}");
    }
    // A refusal reaches the page too, so it can tell the user why.
    let refused = client.get(&documents).header(header::ORIGIN, "https://app.example.com").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");

    // SockJS asks /ws/info with credentials before it connects.
    let info = client.get(format!("{}/ws/info", gw.url)).header(header::ORIGIN, PAGE).send().await.unwrap();
    assert_eq!(info.status(), StatusCode::OK);
    assert_eq!(info.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], PAGE);
    assert_eq!(info.headers()[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");

    // A tus client's OPTIONS (not a preflight) still learns what the server supports.
    let discovery = client.request(reqwest::Method::OPTIONS, &tus).send().await.unwrap();
    assert_eq!(discovery.status(), StatusCode::NO_CONTENT);
    assert_eq!(discovery.headers()["tus-version"], "1.0.0");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_origins_no_page_of_another_origin_is_allowed() {
    let (gw, _dir) = gateway_for(&[]).await;
    let client = reqwest::Client::new();
    let answer = preflight(&client, &format!("{}/api/v1/documents", gw.url), PAGE, "GET", "authorization").await;
    assert!(!answer.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN), "{:?}", answer.headers());
    let info = client.get(format!("{}/ws/info", gw.url)).header(header::ORIGIN, PAGE).send().await.unwrap();
    assert!(!info.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_origin_that_is_not_one_is_refused_at_start() {
    for (origin, why) in [
        ("*", "wildcard"),
        ("localhost:3000", "scheme://host"),
        ("ftp://example.com", "http or https"),
        ("http://example.com/app", "no path"),
        ("http://user@example.com", "no path, query or user"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = support::options(dir.path(), support::MEMORY_TIER, b"browser-secret");
        options.cors_origins = vec![origin.to_owned()];
        let error = standalone::start(options).await.expect_err(origin).to_string();
        assert!(error.contains("--cors-origin") && error.contains(why), "{origin}: {error}");
    }
}

/// The page's own origin: a server of the page and the clients' browser bundles (from the
/// pinned `node_modules`), as a front end's dev server would serve them.
async fn serve_page() -> (String, tokio::task::JoinHandle<()>) {
    let modules = vellum_testkit::node_modules();
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let files = [
        ("/", here.join("page.html"), "text/html; charset=utf-8"),
        ("/sockjs.min.js", modules.join("sockjs-client/dist/sockjs.min.js"), "text/javascript"),
        ("/stomp.umd.min.js", modules.join("@stomp/stompjs/bundles/stomp.umd.min.js"), "text/javascript"),
        ("/tus.min.js", modules.join("tus-js-client/dist/tus.min.js"), "text/javascript"),
    ];
    let mut router = axum::Router::new();
    for (path, file, kind) in files {
        let body = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        router = router.route(
            path,
            axum::routing::get(move || std::future::ready(([(header::CONTENT_TYPE, kind)], body.clone()))),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    (origin, tokio::spawn(async move { axum::serve(listener, router).await.unwrap() }))
}

/// The Playwright driver of the page (`tests/browser/driver.js`), line by line.
struct Driver {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Driver {
    fn open(url: &str) -> Self {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/driver.js");
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .arg(url)
            .arg(vellum_testkit::chromium())
            .env("NODE_PATH", vellum_testkit::node_modules())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (scripts/test installs it)");
        let stdin = child.stdin.take().unwrap();
        let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
        Self { _child: child, stdin, lines }
    }

    async fn line(&mut self) -> String {
        let line = tokio::time::timeout(Duration::from_secs(90), self.lines.next_line()).await;
        line.expect("the driver answers within 90 s").unwrap().expect("the driver is running")
    }

    async fn ask(&mut self, line: &str) -> serde_json::Value {
        tokio::io::AsyncWriteExt::write_all(&mut self.stdin, format!("{line}\n").as_bytes()).await.unwrap();
        let answer: serde_json::Value = serde_json::from_str(&self.line().await).unwrap();
        assert!(answer.get("error").is_none(), "{answer:#}");
        answer
    }
}

/// Headless Chromium loads a page of another origin that runs the seed 000 vanilla
/// JavaScript client (SockJS and `@stomp/stompjs`), the seed 002 JSON WebSocket client, an
/// `EventSource` and a `tus-js-client` upload with a progress bar: an upload through the
/// API and one through the page each show in every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_browser_clients_in_a_page_of_another_origin_see_every_upload() {
    let (origin, _page_server) = serve_page().await;
    let (gw, _dir) = gateway_for(&[&origin]).await;
    let token = gw.state.auth.mint("alice", &["user"], Duration::from_secs(600)).unwrap();
    let page = format!("{origin}/?gateway={}&token={token}", gw.url);
    let mut driver = Driver::open(&page);
    let ready = driver.line().await;
    assert_eq!(ready, "ready", "the page's clients connect");

    let client = reqwest::Client::new();
    let through_api = support::upload(&client, &gw.url, &token, "from-the-test.txt").await;
    assert_eq!(through_api["filename"], "from-the-test.txt");
    let uploaded = driver.ask("upload from-the-page.txt").await;
    let id = uploaded["uploaded"].as_str().expect("the page read Vellum-Document-Id").to_owned();

    let seen = driver.ask("wait from-the-test.txt,from-the-page.txt").await;
    for client in ["stomp", "websocket", "sse"] {
        let shown = seen["shown"][client].as_array().unwrap();
        for name in ["from-the-test.txt", "from-the-page.txt"] {
            assert!(
                shown
                    .iter()
                    .any(|s| s.as_str().unwrap().contains("DOCUMENT_UPLOADED") && s.as_str().unwrap().contains(name)),
                "{client} shows no upload of {name}: {seen:#}"
            );
        }
    }
    assert!(seen["state"]["errors"].as_array().unwrap().is_empty(), "{seen:#}");
    let progress: Vec<u64> =
        seen["state"]["progress"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    assert!(progress.len() >= 4 && progress.windows(2).all(|w| w[0] <= w[1]), "the bar moves up: {progress:?}");
    assert_eq!((progress.last(), seen["bar"].as_u64()), (Some(&100), Some(100)), "{seen:#}");

    // The page's upload is the document it named, byte for byte.
    let content = client.get(format!("{}/api/v1/documents/{id}/content", gw.url)).bearer_auth(&token).send().await;
    let content = content.unwrap().bytes().await.unwrap();
    let expected: Vec<u8> = (0..200_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
    assert!(content[..] == expected[..], "{} bytes downloaded", content.len());
    gw.shutdown().await.unwrap();
}
