//! SockJS under `/ws`, as the seed front ends open it (`new SockJS('/ws')` carrying STOMP):
//! the `info` answer, the websocket transports (`/ws/{server}/{session}/websocket` with
//! SockJS framing, `/ws/websocket` without), and the HTTP fallbacks a client uses where
//! WebSockets do not pass (a proxy that strips the upgrade): `xhr_streaming` and `xhr`
//! (polling) to receive, `xhr_send` to send. See <https://github.com/sockjs/sockjs-protocol>.
//!
//! An HTTP session is the same STOMP connection as a WebSocket one, over two channels: what
//! `xhr_send` posts goes in, the frames the connection sends wait for the one receiving
//! request at a time. A session nobody has received from for five seconds is closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::AppState;
use crate::error::ApiError;
use crate::realtime::{optional_actor, sized};
use crate::stomp::{self, Framing};

/// `GET /ws/info`: what the client may use.
#[utoipa::path(get, path = "/ws/info", tag = "real-time", security(()),
    summary = "SockJS: what the client may use (its first request; then /ws/{server}/{session}/…)",
    responses((status = 200, body = Object)))]
pub async fn info() -> Response {
    let body = json!({
        "websocket": true,
        "origins": ["*:*"],
        "cookie_needed": false,
        "entropy": rand::random::<u32>(),
    });
    ([(header::CACHE_CONTROL, "no-store, no-cache, no-transform, must-revalidate, max-age=0")], Json(body))
        .into_response()
}

/// `GET /ws/{server}/{session}/websocket`: STOMP in SockJS frames.
pub async fn websocket(
    State(state): State<AppState>,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // The protocol's ids: no dots, not empty.
    if [&server, &session].iter().any(|id| id.is_empty() || id.contains('.')) {
        return Err(ApiError::not_found("no such SockJS session address"));
    }
    upgraded(&state, &headers, &uri, upgrade, Framing::SockJs)
}

/// `GET /ws/websocket`: STOMP over a plain WebSocket, the SockJS "raw" endpoint.
#[utoipa::path(get, path = "/ws/websocket", tag = "real-time", security((), ("bearer" = [])),
    summary = "STOMP over a plain WebSocket (SockJS's raw endpoint)",
    params(("token" = Option<String>, Query, description = "The JWT, or send it in CONNECT")),
    responses((status = 101, description = "Switched to the WebSocket protocol"),
        (status = 401, description = "A bad token", body = crate::error::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade request", body = crate::error::ErrorBody)))]
pub async fn raw_websocket(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    upgraded(&state, &headers, &uri, upgrade.map_err(crate::realtime::not_an_upgrade)?, Framing::Raw)
}

fn upgraded(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    upgrade: WebSocketUpgrade,
    framing: Framing,
) -> Result<Response, ApiError> {
    let actor = optional_actor(state, headers, uri)?;
    let (hub, auth) = (Arc::clone(&state.hub), Arc::clone(&state.auth));
    Ok(sized(upgrade)
        .on_upgrade(move |socket| stomp::session(stomp::Link::WebSocket(Box::new(socket)), framing, hub, auth, actor)))
}

/// Frames a session holds for its next receiving request before the connection waits.
const OUTBOUND: usize = 256;
/// Messages `xhr_send` may queue before it waits for the connection to take them.
const INBOUND: usize = 64;
/// A streaming response ends after this many bytes; the client opens the next one.
const STREAM_LIMIT: usize = 128 * 1024;
/// How long a receiving request waits for a frame before it sends a heartbeat (`h`).
const HEARTBEAT: Duration = Duration::from_secs(25);
/// How long a session may go without a receiving request before it is closed.
const DISCONNECT_DELAY: Duration = Duration::from_secs(5);

/// The HTTP sessions of this gateway.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<HttpSession>>>,
}

#[derive(Debug)]
struct HttpSession {
    inbound: mpsc::Sender<String>,
    /// Held by the one request receiving at a time.
    outbound: Arc<tokio::sync::Mutex<mpsc::Receiver<String>>>,
    /// When the last receiving request ended.
    idle_since: Mutex<Instant>,
}

/// A receiving request's hold on its session; when it ends, the session's idle time starts.
struct Receiving {
    frames: tokio::sync::OwnedMutexGuard<mpsc::Receiver<String>>,
    session: Arc<HttpSession>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        *self.session.idle_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    fn get(&self, key: &str) -> Option<Arc<HttpSession>> {
        lock(&self.map).get(key).cloned()
    }

    /// The session `key`, opened (with its STOMP connection) when new.
    fn open(self: &Arc<Self>, key: &str, state: &AppState) -> Arc<HttpSession> {
        let mut map = lock(&self.map);
        if let Some(session) = map.get(key) {
            return Arc::clone(session);
        }
        let (inbound, inbound_rx) = mpsc::channel(INBOUND);
        let (outbound_tx, outbound) = mpsc::channel(OUTBOUND);
        let session = Arc::new(HttpSession {
            inbound,
            outbound: Arc::new(tokio::sync::Mutex::new(outbound)),
            idle_since: Mutex::new(Instant::now()),
        });
        map.insert(key.to_owned(), Arc::clone(&session));
        let (hub, auth) = (Arc::clone(&state.hub), Arc::clone(&state.auth));
        let link = stomp::Link::Channels { inbound: inbound_rx, outbound: outbound_tx };
        tokio::spawn(stomp::session(link, Framing::SockJs, hub, auth, None));
        // Closed once nobody has received from it for a while, or once its connection ended.
        let (sessions, key, watched) = (Arc::clone(self), key.to_owned(), Arc::clone(&session));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let idle =
                    watched.outbound.try_lock().is_ok() && lock(&watched.idle_since).elapsed() >= DISCONNECT_DELAY;
                if idle || watched.inbound.is_closed() {
                    lock(&sessions.map).remove(&key);
                    return;
                }
            }
        });
        session
    }

    /// A receiving request's hold on the session `key` (opened when new); `None` while
    /// another request receives from it.
    fn receive(self: &Arc<Self>, key: &str, state: &AppState) -> Option<Receiving> {
        let session = self.open(key, state);
        let frames = Arc::clone(&session.outbound).try_lock_owned().ok()?;
        Some(Receiving { frames, session })
    }
}

/// The session's address, or 404 for one the protocol does not allow (empty, or dotted).
fn session_key(server: &str, session: &str) -> Result<String, ApiError> {
    if [server, session].iter().any(|id| id.is_empty() || id.contains('.')) {
        return Err(ApiError::not_found("no such SockJS session address"));
    }
    Ok(format!("{server}/{session}"))
}

fn sockjs_response(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/javascript; charset=UTF-8"),
            (header::CACHE_CONTROL, "no-store, no-cache, no-transform, must-revalidate, max-age=0"),
        ],
        body,
    )
        .into_response()
}

/// What SockJS answers a second receiving request with.
fn busy() -> Response {
    sockjs_response(Body::from("c[2010,\"Another connection still open\"]\n"))
}

/// `POST /ws/{server}/{session}/xhr_streaming`: opens the session if new, then streams its
/// frames, one per line, after a 2 KiB prelude, until 128 KiB have been sent.
pub async fn xhr_streaming(
    State(state): State<AppState>,
    Path((server, session)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let key = session_key(&server, &session)?;
    let Some(receiving) = state.sockjs.receive(&key, &state) else { return Ok(busy()) };
    let prelude = futures::stream::once(async { Ok::<_, std::io::Error>(format!("{}\n", "h".repeat(2048))) });
    let frames = futures::stream::unfold((receiving, 0usize), |(mut receiving, sent)| async move {
        if sent >= STREAM_LIMIT {
            return None;
        }
        match tokio::time::timeout(HEARTBEAT, receiving.frames.recv()).await {
            Ok(Some(frame)) => {
                let line = format!("{frame}\n");
                let sent = sent + line.len();
                Some((Ok(line), (receiving, sent)))
            }
            Ok(None) => None,
            Err(_) => Some((Ok("h\n".to_owned()), (receiving, sent))),
        }
    });
    Ok(sockjs_response(Body::from_stream(prelude.chain(frames))))
}

/// `POST /ws/{server}/{session}/xhr`: opens the session if new, else answers with the frames
/// waiting (several messages in one `a` frame), or a heartbeat after 25 s.
pub async fn xhr_polling(
    State(state): State<AppState>,
    Path((server, session)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let key = session_key(&server, &session)?;
    let Some(mut receiving) = state.sockjs.receive(&key, &state) else { return Ok(busy()) };
    let Ok(first) = tokio::time::timeout(HEARTBEAT, receiving.frames.recv()).await else {
        return Ok(sockjs_response(Body::from("h\n")));
    };
    let Some(first) = first else { return Ok(sockjs_response(Body::from("c[3000,\"Go away!\"]\n"))) };
    // Messages waiting already go out together: `a[...]` frames merge into one.
    let Some(mut messages) = messages_of(&first) else { return Ok(sockjs_response(Body::from(format!("{first}\n")))) };
    while let Ok(next) = receiving.frames.try_recv() {
        let Some(more) = messages_of(&next) else {
            // Not a message frame (a close): it follows on its own line.
            let frame = format!("a{}\n{next}\n", Value::Array(messages));
            return Ok(sockjs_response(Body::from(frame)));
        };
        messages.extend(more);
    }
    Ok(sockjs_response(Body::from(format!("a{}\n", Value::Array(messages)))))
}

/// The messages of an `a[...]` frame.
fn messages_of(frame: &str) -> Option<Vec<Value>> {
    match serde_json::from_str::<Value>(frame.strip_prefix('a')?) {
        Ok(Value::Array(messages)) => Some(messages),
        _ => None,
    }
}

/// `POST /ws/{server}/{session}/xhr_send`: a JSON array of messages for the connection.
pub async fn xhr_send(
    State(state): State<AppState>,
    Path((server, session)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = session_key(&server, &session)?;
    let Some(session) = state.sockjs.get(&key) else {
        return Err(ApiError::not_found("no such SockJS session"));
    };
    if body.is_empty() {
        return Ok((StatusCode::INTERNAL_SERVER_ERROR, "Payload expected.").into_response());
    }
    let text = match String::from_utf8(body.to_vec()) {
        Ok(text) if matches!(serde_json::from_str::<Value>(&text), Ok(Value::Array(ref items)) if items.iter().all(Value::is_string)) => {
            text
        }
        _ => return Ok((StatusCode::INTERNAL_SERVER_ERROR, "Broken JSON encoding.").into_response()),
    };
    if session.inbound.send(text).await.is_err() {
        return Err(ApiError::not_found("the SockJS session is closed"));
    }
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")]).into_response())
}
