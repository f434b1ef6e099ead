//! Smoke checks of a new color, sent to its preview Service before any user's request
//! reaches it: the built-in ones exercise the real API — `/readyz`, an authenticated upload,
//! download and purge of a small document, and a WebSocket session — and the spec's are
//! plain HTTP requests with an expected status.
//!
//! The built-in checks act as [`SMOKE_USER`] with a token signed by the smoke key derived
//! from the platform's link key (HS256 whatever algorithm users' tokens use, since the
//! operator holds no user's signing key). The gateway lets that user see only its own
//! documents, emits no event for its changes and leaves its documents out of admins'
//! listings; the purge removes the rows and the bytes, so nothing is left behind.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use vellum_core::documents::SMOKE_USER;
use vellum_core::signing::{SMOKE_KEY_ID, smoke_token_key};
use vellum_crds::BlueGreenRelease;
use vellum_crds::blue_green_release::SmokeResult;

/// How long a built-in check waits for each answer.
const BUILT_IN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a smoke-check token lives.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// One check's outcome before it is stamped: passed, the status code last seen, and why
/// it failed.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub passed: bool,
    pub status_code: Option<u16>,
    pub message: Option<String>,
}

impl Outcome {
    fn pass(status_code: u16) -> Self {
        Self { passed: true, status_code: Some(status_code), message: None }
    }

    fn fail(status_code: Option<u16>, message: String) -> Self {
        Self { passed: false, status_code, message: Some(message) }
    }
}

/// Runs the built-in checks and the spec's against the gateway at `base`
/// (`http://host:port`), in order, and returns every result.
pub async fn run(http: &reqwest::Client, release: &BlueGreenRelease, link_key: &[u8], base: &str) -> Vec<SmokeResult> {
    let token = token(link_key);
    let mut results = Vec::with_capacity(3 + release.spec.smoke_checks.len());
    results.push(timed("readyz", expect_status(http, &format!("{base}/readyz"), 200, BUILT_IN_TIMEOUT)).await);
    results.push(timed("round-trip", round_trip(http, base, &token)).await);
    results.push(timed("websocket", websocket(base, &token)).await);
    for check in &release.spec.smoke_checks {
        let timeout = Duration::from_secs(u64::from(check.timeout_seconds));
        let url = format!("{base}{}", check.path);
        results.push(timed(&check.name, expect_status(http, &url, check.expect_status, timeout)).await);
    }
    results
}

async fn timed(name: &str, check: impl Future<Output = Outcome>) -> SmokeResult {
    let started = Instant::now();
    let outcome = check.await;
    SmokeResult {
        name: name.to_owned(),
        passed: outcome.passed,
        status_code: outcome.status_code.map(i32::from),
        message: outcome.message,
        duration_ms: u64::try_from(started.elapsed().as_millis()).ok(),
        time: Some(Time(Timestamp::now())),
    }
}

#[derive(Serialize)]
struct SmokeClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// A short-lived token acting as [`SMOKE_USER`], signed with the smoke key of `link_key`.
pub fn token(link_key: &[u8]) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = SmokeClaims { sub: SMOKE_USER, exp: now + TOKEN_LIFETIME.as_secs(), iat: now };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(SMOKE_KEY_ID.to_owned());
    let key = jsonwebtoken::EncodingKey::from_secret(&smoke_token_key(link_key));
    // HS256 over serializable claims does not fail.
    jsonwebtoken::encode(&header, &claims, &key).unwrap_or_default()
}

/// A GET of `url` answered with `expect` within `timeout`.
async fn expect_status(http: &reqwest::Client, url: &str, expect: u16, timeout: Duration) -> Outcome {
    match http.get(url).timeout(timeout).send().await {
        Ok(response) if response.status().as_u16() == expect => Outcome::pass(expect),
        Ok(response) => {
            let code = response.status().as_u16();
            Outcome::fail(Some(code), format!("answered {code}, expected {expect}"))
        }
        Err(e) => Outcome::fail(None, request_failed(&e, timeout)),
    }
}

fn request_failed(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() { format!("no answer within {} s", timeout.as_secs()) } else { format!("request failed: {e}") }
}

/// Uploads a small document of random bytes, downloads it and compares, then purges it.
/// A document uploaded is purged even when the download fails.
pub async fn round_trip(http: &reqwest::Client, base: &str, token: &str) -> Outcome {
    let body: Vec<u8> = format!("vellum smoke check {}\n", hex::encode(rand::random::<[u8; 16]>())).into_bytes();
    let documents = format!("{base}/api/v1/documents");
    let upload = http
        .post(format!("{documents}?filename=vellum-smoke-check.txt"))
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "text/plain")
        .body(body.clone())
        .timeout(BUILT_IN_TIMEOUT)
        .send()
        .await;
    let id = match upload {
        Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
            let answer = response.bytes().await.ok();
            match answer.and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| v["id"].as_i64()) {
                Some(id) => id,
                None => return Outcome::fail(Some(201), "the upload's answer names no document id".into()),
            }
        }
        Ok(response) => return answered("the upload", response).await,
        Err(e) => return Outcome::fail(None, format!("the upload: {}", request_failed(&e, BUILT_IN_TIMEOUT))),
    };
    let document = format!("{documents}/{id}");
    let download =
        match http.get(format!("{document}/content")).bearer_auth(token).timeout(BUILT_IN_TIMEOUT).send().await {
            Ok(response) if response.status() == reqwest::StatusCode::OK => match response.bytes().await {
                Ok(bytes) if bytes[..] == body[..] => None,
                Ok(bytes) => Some(Outcome::fail(
                    Some(200),
                    format!("the download gave {} bytes that differ from the {} uploaded", bytes.len(), body.len()),
                )),
                Err(e) => Some(Outcome::fail(Some(200), format!("the download broke off: {e}"))),
            },
            Ok(response) => Some(answered("the download", response).await),
            Err(e) => Some(Outcome::fail(None, format!("the download: {}", request_failed(&e, BUILT_IN_TIMEOUT)))),
        };
    let purge =
        http.delete(format!("{document}?permanent=true")).bearer_auth(token).timeout(BUILT_IN_TIMEOUT).send().await;
    let purged = match purge {
        Ok(response) if response.status() == reqwest::StatusCode::NO_CONTENT => Outcome::pass(204),
        Ok(response) => answered("the purge", response).await,
        Err(e) => Outcome::fail(None, format!("the purge: {}", request_failed(&e, BUILT_IN_TIMEOUT))),
    };
    download.unwrap_or(purged)
}

/// A failed step's outcome: its status and the error body's message.
async fn answered(step: &str, response: reqwest::Response) -> Outcome {
    let code = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let said = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().or_else(|| v["error"].as_str()).map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect());
    Outcome::fail(Some(code), format!("{step} answered {code}: {said}"))
}

/// Opens a WebSocket session (the JSON protocol), waits for its greeting and a pong to a
/// ping, and closes it.
pub async fn websocket(base: &str, token: &str) -> Outcome {
    let url = format!("{}/ws?token={token}", base.replacen("http", "ws", 1));
    match tokio::time::timeout(BUILT_IN_TIMEOUT, websocket_session(&url)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::fail(None, format!("the session did not complete within {} s", BUILT_IN_TIMEOUT.as_secs())),
    }
}

async fn websocket_session(url: &str) -> Outcome {
    use tokio_tungstenite::tungstenite::Error;
    let (mut socket, response) = match tokio_tungstenite::connect_async(url).await {
        Ok(connected) => connected,
        Err(Error::Http(response)) => {
            let code = response.status().as_u16();
            return Outcome::fail(Some(code), format!("the upgrade was refused with {code}"));
        }
        Err(e) => return Outcome::fail(None, format!("connecting: {e}")),
    };
    let code = response.status().as_u16();
    if next_type(&mut socket).await.as_deref() != Some("connection_established") {
        return Outcome::fail(Some(code), "the session sent no connection_established greeting".into());
    }
    if socket.send(Message::Text(r#"{"type":"ping"}"#.into())).await.is_err() {
        return Outcome::fail(Some(code), "the session closed before the ping".into());
    }
    if next_type(&mut socket).await.as_deref() != Some("pong") {
        return Outcome::fail(Some(code), "the session did not answer the ping with a pong".into());
    }
    let _ = socket.close(None).await;
    Outcome::pass(code)
}

/// The `type` of the session's next text message; `None` once it closes or sends another
/// kind of message.
async fn next_type<S>(socket: &mut S) -> Option<String>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str::<Value>(&text).ok().and_then(|v| v["type"].as_str().map(str::to_owned));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            _ => return None,
        }
    }
}
