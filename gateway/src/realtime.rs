//! Real-time notifications: the WebSocket JSON protocol of the seed clients at `/ws`, and
//! Server-Sent Events at `/api/v1/events/stream` with `Last-Event-ID` resume from the event
//! history. Both are authenticated by the same JWTs as the API (`Authorization` header or
//! `token` query parameter, since browsers cannot set headers on either).
//!
//! Every connection reads from one bounded broadcast of the [`Hub`]; a client that cannot
//! keep up is disconnected with a reason rather than allowed to hold the others back (an
//! SSE client then resumes from the history with its `Last-Event-ID`).
//!
//! Who sees what: a document event reaches the document's owner and admins; webhook
//! deactivations reach admins; system and maintenance notices reach everyone.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::clock::Clock;
use vellum_core::crds::webhook::EventType;
use vellum_core::documents::Actor;
use vellum_core::events::{Bus, Pending, outbox, type_name};
use vellum_core::store::Metadata;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonBody;
use crate::stomp::{self, Framing};

/// Notices buffered for the slowest client before it is disconnected.
pub const CLIENT_BUFFER: usize = 1024;

/// The events a resuming client missed, read from the history a page at a time.
pub(crate) struct Replay<'a> {
    hub: &'a Hub,
    actor: &'a Actor,
    after: i64,
}

impl Replay<'_> {
    /// The next page of missed events the client may see, oldest first; `None` once every
    /// one was read. `Err` when the history could not be read (logged).
    pub(crate) async fn next_page(&mut self) -> Result<Option<Vec<Notice>>, ()> {
        loop {
            let page = self.hub.history(self.after, HISTORY_PAGE).await.map_err(|e| {
                tracing::warn!(error = %e, "reading the event history");
                self.hub.recovered(false);
            })?;
            let Some(tail) = page.last() else {
                self.hub.recovered(true);
                return Ok(None);
            };
            self.after = tail.seq;
            let notices: Vec<Notice> =
                page.iter().map(Notice::of_event).filter(|n| n.audience.admits(self.actor)).collect();
            if !notices.is_empty() {
                return Ok(Some(notices));
            }
        }
    }

    /// The sequence of the last event read: live events up to it were replayed.
    pub(crate) fn upto(&self) -> i64 {
        self.after
    }
}

/// Whether a live event was sent already by a replay that went up to `replayed`.
pub(crate) fn replayed_already(notice: &Notice, replayed: Option<i64>) -> bool {
    notice.seq.zip(replayed).is_some_and(|(seq, upto)| seq <= upto)
}

/// Who may see a notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    Everyone,
    Admins,
    /// One user (and admins).
    User(String),
}

impl Audience {
    pub(crate) fn admits(&self, actor: &Actor) -> bool {
        match self {
            Self::Everyone => true,
            Self::Admins => actor.admin,
            Self::User(user) => actor.admin || *user == actor.user,
        }
    }
}

/// Something connected clients are told.
#[derive(Clone, Debug)]
pub struct Notice {
    /// The event's place in the history (the SSE id), for events that have one.
    pub seq: Option<i64>,
    pub audience: Audience,
    /// `documents`, `notifications`, `webhooks`, `migrations` (admins: what moves stored
    /// data) or `data-quality` (admins: integrity scrubs): what a client may subscribe to.
    pub channel: &'static str,
    /// The job this notice is about, for `subscribe_job` clients.
    pub job_id: Option<String>,
    /// The kind of that job (`uploads`): the STOMP topic `/topic/<kind>` carries it.
    pub job_kind: Option<&'static str>,
    /// The message's `type` (`DOCUMENT_UPLOADED`, `system_notification`, ...).
    pub kind: String,
    /// The JSON message sent over the WebSocket JSON protocol.
    pub message: Value,
    /// The data of the SSE event.
    pub data: Value,
}

impl Notice {
    /// The notice for a relayed document or platform event.
    pub fn of_event(pending: &Pending) -> Self {
        let event = &pending.event;
        let kind = type_name(event.event_type);
        // A document's owner, or the user who started a bulk job.
        let owner = ["uploadedBy", "requestedBy"]
            .iter()
            .find_map(|key| event.payload.get(*key).and_then(Value::as_str))
            .map(str::to_owned);
        let (audience, channel) = match event.event_type {
            EventType::WebhookDeactivated => (Audience::Admins, "webhooks"),
            _ => (owner.map_or(Audience::Admins, Audience::User), "documents"),
        };
        let timestamp = event.payload.get("timestamp").cloned().unwrap_or(Value::Null);
        Self {
            seq: Some(pending.seq),
            audience,
            channel,
            // A bulk job's events go to every client of its starter, as seed 000's client
            // handles them (its job subscribers get job_status_update besides).
            job_id: match event.event_type {
                EventType::BulkOperationProgress | EventType::BulkOperationCompleted => None,
                _ => event.payload.get("jobId").and_then(Value::as_str).map(str::to_owned),
            },
            job_kind: None,
            message: json!({"type": kind, "eventId": event.id, "sequence": pending.seq, "timestamp": timestamp,
                "data": event.payload}),
            data: event.payload.clone(),
            kind,
        }
    }

    /// The progress of a retention run (its `BULK_OPERATION_PROGRESS` and
    /// `BULK_OPERATION_COMPLETED` events), as seed 003's `StatusUpdateEvent` on the
    /// `migrations` channel (`/topic/migrations`, admins): a run moves documents between
    /// tiers. Not for other events, nor for dry runs, which move nothing.
    pub fn migration_of(pending: &Pending) -> Option<Self> {
        let event = &pending.event;
        let p = &event.payload;
        let policy = p.get("operation").and_then(Value::as_str)?.strip_prefix("retention:")?;
        if p.get("dryRun").and_then(Value::as_bool).unwrap_or(false) {
            return None;
        }
        let count = |key: &str| p.get(key).and_then(Value::as_i64).unwrap_or(0);
        let (transitioned, expired) = (count("transitioned"), count("expired"));
        let (event_type, status, done, total) = match event.event_type {
            EventType::BulkOperationProgress => ("progress_updated", "RUNNING", count("processed"), count("total")),
            EventType::BulkOperationCompleted => {
                ("completed", "COMPLETED", count("totalDocuments"), count("totalDocuments"))
            }
            _ => return None,
        };
        // Whole percents, as integers: the JSON reads back the same in JavaScript.
        let progress = if total > 0 { (done.min(total) * 100) / total } else { 100 };
        let message = json!({
            "type": "status_update",
            "eventType": event_type,
            "entityType": "migration",
            "entityId": format!("retention/{policy}/{}", count("runId")),
            "status": status,
            "progress": progress,
            "recordsProcessed": done,
            "totalRecords": total,
            "phase": "Migrating",
            "message": format!("retention policy {policy}: {transitioned} documents moved between tiers, {expired} expired"),
            "timestamp": p.get("timestamp").and_then(Value::as_i64).map(vellum_core::clock::rfc3339),
        });
        Some(Self {
            seq: None,
            audience: Audience::Admins,
            channel: "migrations",
            job_id: None,
            job_kind: None,
            kind: "status_update".to_owned(),
            data: message.clone(),
            message,
        })
    }

    /// A system or maintenance notice for everyone.
    pub fn system(kind: &str, message: &str, level: &str, now_ms: i64, extra: Value) -> Self {
        let mut body = json!({"type": kind, "message": message, "level": level, "timestamp": now_ms});
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
            body.extend(extra);
        }
        Self {
            seq: None,
            audience: Audience::Everyone,
            channel: "notifications",
            job_id: None,
            job_kind: None,
            kind: kind.to_owned(),
            data: body.clone(),
            message: body,
        }
    }
}

impl Notice {
    /// A job's progress, for the user who owns it and clients subscribed to the job (the
    /// seed's `job_status_update`). Upload sessions are jobs of kind `uploads` whose id is
    /// the session id.
    pub fn job_update(job_kind: &'static str, user: &str, job_id: &str, now_ms: i64, data: &Value) -> Self {
        Self::job(job_kind, "job_status_update", user, job_id, json!({"timestamp": now_ms, "data": data}))
    }

    /// A job's end (the seed's `job_completed`).
    pub fn job_completed(job_kind: &'static str, user: &str, job_id: &str, now_ms: i64, result: &Value) -> Self {
        Self::job(job_kind, "job_completed", user, job_id, json!({"timestamp": now_ms, "result": result}))
    }

    /// A job message of `kind`: `fields` with the type and the job id added.
    fn job(job_kind: &'static str, kind: &str, user: &str, job_id: &str, mut fields: Value) -> Self {
        fields["type"] = json!(kind);
        fields["jobId"] = json!(job_id);
        Self {
            seq: None,
            audience: Audience::User(user.to_owned()),
            channel: "notifications",
            job_id: Some(job_id.to_owned()),
            job_kind: Some(job_kind),
            kind: kind.to_owned(),
            data: fields.clone(),
            message: fields,
        }
    }
}

/// Connection statistics.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicI64,
    job_subscriptions: AtomicI64,
    channel_subscriptions: AtomicI64,
}

/// The fan-out point of this gateway: fed by the event relay (the in-process bus
/// standalone) and by admin broadcasts; read by every WebSocket and SSE connection.
#[derive(Debug)]
pub struct Hub {
    pub(crate) sender: broadcast::Sender<Arc<Notice>>,
    counters: Counters,
    users: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    meta: Metadata,
    clock: Clock,
    /// In a cluster: where notices that are not events go to reach the other replicas.
    remote: OnceLock<mpsc::Sender<Arc<Notice>>>,
    /// In a cluster: the event stream, the history SSE clients resume from (the outbox
    /// otherwise).
    stream: OnceLock<async_nats::jetstream::Context>,
    /// Where connections and stream recoveries are counted, once the metrics exist.
    seed: OnceLock<crate::metrics::SeedMetrics>,
    /// The metadata cache the relayed events keep right.
    cache: OnceLock<Arc<crate::cache::MetadataCache>>,
}

impl Hub {
    pub fn new(meta: Metadata, clock: Clock) -> Self {
        Self {
            sender: broadcast::channel(CLIENT_BUFFER).0,
            counters: Counters::default(),
            users: std::sync::Mutex::default(),
            meta,
            clock,
            remote: OnceLock::new(),
            stream: OnceLock::new(),
            seed: OnceLock::new(),
            cache: OnceLock::new(),
        }
    }

    /// Keeps `cache` right from the events relayed from now on.
    pub fn keep_right(&self, cache: Arc<crate::cache::MetadataCache>) {
        self.cache.set(cache).ok();
    }

    /// A relayed event: it drops what it changed from the cache, then reaches this
    /// replica's clients (every replica reads the events itself).
    pub(crate) fn relayed(&self, pending: &Pending) {
        if let Some(cache) = self.cache.get() {
            cache.observe(&pending.event);
        }
        // Each replica derives it from the events it relays: told here only.
        if let Some(migration) = Notice::migration_of(pending) {
            self.publish_local(migration);
        }
        self.publish_local(Notice::of_event(pending));
    }

    /// Events may have been missed (the feed fell behind, or reconnected): nothing cached
    /// can be trusted.
    pub(crate) fn lost_track(&self) {
        if let Some(cache) = self.cache.get() {
            cache.flush();
        }
    }

    /// Sends this replica's notices that are not events to the other replicas too.
    pub(crate) fn set_remote(&self, remote: mpsc::Sender<Arc<Notice>>) {
        let _ = self.remote.set(remote);
    }

    /// Resumes SSE clients from the event stream instead of the outbox.
    pub(crate) fn use_stream_history(&self, js: async_nats::jetstream::Context) {
        let _ = self.stream.set(js);
    }

    /// Events after `after` in the history, at most `limit`.
    async fn history(&self, after: i64, limit: i64) -> Result<Vec<Pending>, String> {
        match self.stream.get() {
            Some(js) => crate::cluster::history(js, after, usize::try_from(limit).unwrap_or(1)).await,
            None => outbox::published_after(&self.meta, after, limit).await.map_err(|e| e.to_string()),
        }
    }

    /// What a client that saw the events up to `after` missed, for [`Replay::next_page`].
    pub(crate) fn replay<'a>(&'a self, actor: &'a Actor, after: i64) -> Replay<'a> {
        Replay { hub: self, actor, after }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Tells this replica's clients, and in a cluster the other replicas' (events reach
    /// those through the stream instead).
    pub fn publish(&self, notice: Notice) {
        let notice = Arc::new(notice);
        if notice.seq.is_none()
            && let Some(remote) = self.remote.get()
            && remote.try_send(Arc::clone(&notice)).is_err()
        {
            tracing::warn!(kind = %notice.kind, "notices to the other gateways are backed up; one was dropped");
        }
        let _ = self.sender.send(notice);
    }

    /// Tells this replica's clients only.
    pub(crate) fn publish_local(&self, notice: Notice) {
        let _ = self.sender.send(Arc::new(notice));
    }

    /// Forwards the bus's events until the bus closes.
    pub fn feed_from(self: &Arc<Self>, bus: &Bus) -> JoinHandle<()> {
        let mut events = bus.subscribe();
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(pending) => hub.relayed(&pending),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(dropped = n, "the notification hub fell behind the event bus");
                        hub.lost_track();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    pub(crate) fn connected(&self, user: &str) -> Connection<'_> {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        *self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(user.to_owned()).or_default() += 1;
        Connection { hub: self, user: user.to_owned(), jobs: 0, channels: 0, socket: false }
    }

    /// [`Self::connected`] for a WebSocket (JSON, STOMP or SockJS), counted as one.
    pub(crate) fn socket_connected(&self, user: &str) -> Connection<'_> {
        if let Some(seed) = self.seed.get() {
            crate::metrics::SeedMetrics::count(&seed.websocket_connections, true);
            seed.websocket_active_connections.inc();
        }
        let mut connection = self.connected(user);
        connection.socket = true;
        connection
    }

    /// Counts a WebSocket connection refused (no token, a bad one, a failed handshake).
    pub(crate) fn socket_refused(&self) {
        if let Some(seed) = self.seed.get() {
            crate::metrics::SeedMetrics::count(&seed.websocket_connections, false);
        }
    }

    /// Counts a stream resumed from a `Last-Event-ID`, or one that could not be.
    fn recovered(&self, success: bool) {
        if let Some(seed) = self.seed.get() {
            crate::metrics::SeedMetrics::count(&seed.recovery_attempts, success);
        }
    }

    /// Counts connections and recoveries in `seed` from now on.
    pub fn count_in(&self, seed: crate::metrics::SeedMetrics) {
        self.seed.set(seed).ok();
    }
}

/// Keeps the statistics right however a connection ends.
pub(crate) struct Connection<'a> {
    hub: &'a Hub,
    user: String,
    jobs: i64,
    channels: i64,
    /// A WebSocket, counted among the sockets.
    socket: bool,
}

impl Connection<'_> {
    pub(crate) fn jobs(&mut self, delta: i64) {
        self.jobs += delta;
        self.hub.counters.job_subscriptions.fetch_add(delta, Ordering::Relaxed);
    }
    pub(crate) fn channels(&mut self, delta: i64) {
        self.channels += delta;
        self.hub.counters.channel_subscriptions.fetch_add(delta, Ordering::Relaxed);
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let c = &self.hub.counters;
        c.connections.fetch_sub(1, Ordering::Relaxed);
        if self.socket
            && let Some(seed) = self.hub.seed.get()
        {
            seed.websocket_disconnections.inc();
            seed.websocket_active_connections.dec();
        }
        c.job_subscriptions.fetch_sub(self.jobs, Ordering::Relaxed);
        c.channel_subscriptions.fetch_sub(self.channels, Ordering::Relaxed);
        let mut users = self.hub.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n <= 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// The caller of a streaming endpoint: a bearer token in `Authorization` or in `?token=`.
#[derive(Debug)]
pub struct StreamUser(pub Actor);

impl FromRequestParts<AppState> for StreamUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        required_actor(state, &parts.headers, &parts.uri).map(Self)
    }
}

/// The bearer token of a request: the `Authorization` header, else the `token` query parameter.
pub(crate) fn bearer_token(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .map(str::to_owned);
    let from_query = || {
        uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned())
        })
    };
    from_header.or_else(from_query).map(|t| t.trim().to_owned())
}

/// The caller named by a request's token: `None` without a token, 401 for a bad one. (A
/// STOMP client may instead authenticate in `CONNECT`.)
pub(crate) fn optional_actor(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<Option<Actor>, ApiError> {
    bearer_token(headers, uri)
        .map(|token| state.auth.verify(&token).map_err(|m| ApiError::new(StatusCode::UNAUTHORIZED, m)))
        .transpose()
}

/// The caller named by a request's token; 401 without one or for a bad one.
fn required_actor(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<Actor, ApiError> {
    optional_actor(state, headers, uri)?
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "a token is required (Authorization header or ?token=)"))
}

/// Clients send short commands, so a small read buffer (tungstenite's default is 128 KiB
/// per connection, most of an idle connection's memory) and a bounded message size.
pub(crate) fn sized(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.read_buffer_size(READ_BUFFER).max_message_size(stomp::MAX_FRAME)
}

/// The read buffer of a WebSocket connection.
const READ_BUFFER: usize = 4 * 1024;

/// `GET /ws`: STOMP when the client asks for a `v1x.stomp` subprotocol (the token may then
/// come in `CONNECT`), otherwise the WebSocket JSON protocol.
#[utoipa::path(get, path = "/ws", tag = "real-time", security((), ("bearer" = [])),
    summary = "WebSocket: the JSON protocol, or STOMP when a v1x.stomp subprotocol is asked for",
    description = "Upgrade with the token in `?token=` or `Authorization` (STOMP may send it in CONNECT \
        instead). JSON messages: `ping`, `subscribe_job`, `unsubscribe_job`, `subscribe_channel`, \
        `unsubscribe_channel`; STOMP destinations as the README lists them. Each event message carries its \
        `sequence` (STOMP: a `sequence` header); reconnect with `?lastEventId=` the last one seen (STOMP: a \
        `last-event-id` header on CONNECT or SUBSCRIBE) to receive what was missed first, in order, none twice.",
    params(("token" = Option<String>, Query, description = "The JWT, where a header cannot be set"),
        ("lastEventId" = Option<i64>, Query, description = "The `sequence` of the last event received: resume after it")),
    responses((status = 101, description = "Switched to the WebSocket protocol"),
        (status = 401, description = "No token (JSON protocol) or a bad one", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade request", body = ErrorBody)))]
pub async fn websocket(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // A bad position is the request's own fault, whatever else is wrong with it.
    let resume = last_event_id(&headers, &uri)?;
    let upgrade = sized(upgrade.map_err(not_an_upgrade)?.protocols(stomp::SUBPROTOCOLS));
    let hub = Arc::clone(&state.hub);
    if upgrade.selected_protocol().is_some() {
        let actor = optional_actor(&state, &headers, &uri).inspect_err(|_| hub.socket_refused())?;
        let auth = Arc::clone(&state.auth);
        return Ok(upgrade.on_upgrade(move |socket| {
            stomp::session(stomp::Link::WebSocket(Box::new(socket)), Framing::Raw, hub, auth, actor)
        }));
    }
    let actor = required_actor(&state, &headers, &uri).inspect_err(|_| hub.socket_refused())?;
    Ok(upgrade.on_upgrade(move |socket| json_session(socket, hub, actor, resume)))
}

/// The answer to a plain HTTP request at a WebSocket endpoint: 426 with the JSON error
/// body, saying what was missing (taken by value, as `map_err` hands it over).
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn not_an_upgrade(rejection: WebSocketUpgradeRejection) -> ApiError {
    ApiError::new(StatusCode::UPGRADE_REQUIRED, format!("connect with a WebSocket client: {}", rejection.body_text()))
        .with_header(header::UPGRADE, "websocket")
}

#[utoipa::path(get, path = "/ws/job-status", tag = "real-time", security((), ("bearer" = [])),
    summary = "WebSocket: the JSON protocol at seed 002's path (as /ws)",
    params(("token" = Option<String>, Query, description = "The JWT, where a header cannot be set")),
    responses((status = 101, description = "Switched to the WebSocket protocol"),
        (status = 401, body = ErrorBody), (status = 426, description = "Not a WebSocket upgrade request", body = ErrorBody)))]
pub async fn job_status(
    state: State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    websocket(state, headers, uri, upgrade).await
}

#[utoipa::path(get, path = "/ws/job-status-native", tag = "real-time", security((), ("bearer" = [])),
    summary = "WebSocket: the JSON protocol at seed 002's native path (as /ws)",
    params(("token" = Option<String>, Query, description = "The JWT, where a header cannot be set")),
    responses((status = 101, description = "Switched to the WebSocket protocol"),
        (status = 401, body = ErrorBody), (status = 426, description = "Not a WebSocket upgrade request", body = ErrorBody)))]
pub async fn job_status_native(
    state: State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    websocket(state, headers, uri, upgrade).await
}

/// The WebSocket and SockJS entry points, documented: the SockJS session transports under
/// `/ws/{server}/{session}/…` are the SockJS protocol's own, which its clients find from
/// `/ws/info`.
pub fn sockets_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(websocket))
        .routes(routes!(job_status))
        .routes(routes!(job_status_native))
        .routes(routes!(crate::sockjs::info))
        .routes(routes!(crate::sockjs::raw_websocket))
}

/// What a JSON-protocol client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Ping,
    SubscribeJob {
        #[serde(rename = "jobId")]
        job_id: String,
    },
    UnsubscribeJob {
        #[serde(rename = "jobId")]
        job_id: String,
    },
    SubscribeChannel {
        channel: String,
    },
    UnsubscribeChannel {
        channel: String,
    },
}

pub(crate) const CHANNELS: [&str; 6] =
    ["documents", "notifications", "webhooks", "migrations", "data-quality", "extractions"];

/// Whether a JSON-protocol client with these subscriptions wants `notice` (audience
/// aside): a job's notices go to that job's subscribers; without channel subscriptions a
/// client gets every channel it may see.
fn json_wants(notice: &Notice, jobs: &HashSet<String>, channels: &HashSet<String>) -> bool {
    if let Some(job) = &notice.job_id {
        jobs.contains(job)
    } else {
        channels.is_empty() || channels.contains(notice.channel)
    }
}

/// One JSON-protocol connection. With `resume` (the last `sequence` the client saw), the
/// events it missed since are sent first, in order, then live ones, none twice.
async fn json_session(socket: WebSocket, hub: Arc<Hub>, actor: Actor, resume: Option<i64>) {
    let mut notices = hub.sender.subscribe();
    let mut connection = hub.socket_connected(&actor.user);
    let (mut tx, mut rx) = socket.split();
    let now = || hub.clock.now_ms();
    let hello = json!({
        "type": "connection_established",
        "userId": actor.user,
        "username": actor.user,
        "timestamp": now(),
        "message": "WebSocket connection established successfully",
    });
    if tx.send(Message::Text(hello.to_string().into())).await.is_err() {
        return;
    }
    let mut jobs: HashSet<String> = HashSet::new();
    let mut channels: HashSet<String> = HashSet::new();
    let mut replayed = None;
    if let Some(after) = resume {
        // Live notices wait in `notices`, subscribed before the history is read.
        let mut replay = hub.replay(&actor, after);
        loop {
            match replay.next_page().await {
                Ok(Some(page)) => {
                    for notice in page.iter().filter(|n| json_wants(n, &jobs, &channels)) {
                        if tx.send(Message::Text(notice.message.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    let reason = "the event history could not be read; reconnect with the same lastEventId";
                    let _ = tx.send(Message::Close(Some(CloseFrame { code: 1011, reason: reason.into() }))).await;
                    return;
                }
            }
        }
        replayed = Some(replay.upto());
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
    heartbeat.tick().await;
    loop {
        let reply = tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => Some(match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(ClientMessage::Ping) => json!({"type": "pong", "timestamp": now()}),
                    Ok(ClientMessage::SubscribeJob { job_id }) => {
                        if jobs.insert(job_id.clone()) { connection.jobs(1); }
                        json!({"type": "subscribed", "jobId": job_id, "timestamp": now()})
                    }
                    Ok(ClientMessage::UnsubscribeJob { job_id }) => {
                        if jobs.remove(&job_id) { connection.jobs(-1); }
                        json!({"type": "unsubscribed", "jobId": job_id, "timestamp": now()})
                    }
                    Ok(ClientMessage::SubscribeChannel { channel }) if CHANNELS.contains(&channel.as_str()) => {
                        if channels.insert(channel.clone()) { connection.channels(1); }
                        json!({"type": "subscribed", "channel": channel, "timestamp": now()})
                    }
                    Ok(ClientMessage::SubscribeChannel { channel }) => json!({"type": "error", "timestamp": now(),
                        "message": format!("no channel {channel:?}; channels are {}", CHANNELS.join(", "))}),
                    Ok(ClientMessage::UnsubscribeChannel { channel }) => {
                        if channels.remove(&channel) { connection.channels(-1); }
                        json!({"type": "unsubscribed", "channel": channel, "timestamp": now()})
                    }
                    Err(e) => json!({"type": "error", "timestamp": now(), "message": format!("unreadable message: {e}")}),
                }),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => None,
            },
            notice = notices.recv() => match notice {
                Ok(notice) => {
                    let wanted = json_wants(&notice, &jobs, &channels) && !replayed_already(&notice, replayed);
                    (wanted && notice.audience.admits(&actor)).then(|| notice.message.clone())
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let reason = format!(
                        "client cannot keep up: {n} notifications dropped; reconnect with ?lastEventId= the last sequence"
                    );
                    let _ = tx.send(Message::Close(Some(CloseFrame { code: 1013, reason: reason.into() }))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = heartbeat.tick() => {
                if tx.send(Message::Ping(Vec::new().into())).await.is_err() { return; }
                None
            }
        };
        if let Some(reply) = reply
            && tx.send(Message::Text(reply.to_string().into())).await.is_err()
        {
            return;
        }
    }
}

fn sse_event(notice: &Notice) -> SseEvent {
    let event = SseEvent::default().event(notice.kind.clone()).data(notice.data.to_string());
    match notice.seq {
        Some(seq) => event.id(seq.to_string()),
        None => event,
    }
}

/// Where a reconnecting client resumes: the `Last-Event-ID` header, else the `lastEventId`
/// query parameter (browsers cannot set headers on an `EventSource` or a WebSocket).
fn last_event_id(headers: &HeaderMap, uri: &Uri) -> Result<Option<i64>, ApiError> {
    let from_query = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "lastEventId").map(|(_, v)| v.into_owned())
    });
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(from_query)
        .map(|v| v.trim().parse::<i64>().map_err(|_| ApiError::bad_request("Last-Event-ID must be an event id")))
        .transpose()
}

/// Events of the history a resuming client missed, read in pages.
const HISTORY_PAGE: i64 = 500;

#[utoipa::path(get, path = "/api/v1/events/stream", tag = "notifications",
    summary = "Server-Sent Events: document and platform events as they happen",
    description = "Each event has the event type as `event`, the JSON payload as `data` and its place in the history \
        as `id`. Reconnect with `Last-Event-ID` (or `?lastEventId=`) to receive exactly what was missed first. \
        The token may be given as `?token=` since EventSource cannot set headers.",
    params(("token" = Option<String>, Query), ("lastEventId" = Option<i64>, Query)),
    responses((status = 200, content_type = "text/event-stream"), (status = 401, body = ErrorBody)))]
pub async fn sse(
    State(state): State<AppState>,
    StreamUser(actor): StreamUser,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let last = last_event_id(&headers, &uri)?;
    let hub = Arc::clone(&state.hub);
    // Subscribe before reading the history, so nothing falls between the two.
    let mut live = hub.sender.subscribe();
    let (mut out, stream) = futures::channel::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _connection = hub.connected(&actor.user);
        let mut replayed = None;
        if let Some(after) = last {
            let mut replay = hub.replay(&actor, after);
            while let Ok(page) = replay.next_page().await {
                let Some(page) = page else { break };
                for notice in &page {
                    if out.send(Ok(sse_event(notice))).await.is_err() {
                        return;
                    }
                }
            }
            replayed = Some(replay.upto());
        }
        loop {
            match live.recv().await {
                Ok(notice) => {
                    if replayed_already(&notice, replayed) || !notice.audience.admits(&actor) {
                        continue;
                    }
                    if out.send(Ok(sse_event(&notice))).await.is_err() {
                        return;
                    }
                }
                // The client reconnects with its Last-Event-ID and reads what it missed
                // from the history.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A notice an admin sends to everyone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Broadcast {
    /// 1 to 4096 characters, not all white space.
    #[schema(
        max_length = 4096,
        pattern = r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub message: String,
    /// info, warning or error (default info).
    #[schema(pattern = "^(info|warning|error)$")]
    pub level: Option<String>,
    /// For maintenance notices: when it starts (free text, as the sender writes it).
    pub scheduled_at: Option<String>,
}

fn broadcast_notice(state: &AppState, kind: &str, request: Broadcast) -> Result<Json<Value>, ApiError> {
    if request.message.trim().is_empty() || request.message.chars().count() > 4096 {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "message must have 1 to 4096 characters"));
    }
    let level =
        request.level.unwrap_or_else(|| if kind == "maintenance_notification" { "warning" } else { "info" }.into());
    if !["info", "warning", "error"].contains(&level.as_str()) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "level must be info, warning or error"));
    }
    let extra = request.scheduled_at.map_or(json!({}), |at| json!({"scheduledAt": at}));
    let receivers = state.hub.sender.receiver_count();
    state.hub.publish(Notice::system(kind, &request.message, &level, state.hub.clock.now_ms(), extra));
    Ok(Json(json!({"errorMessage": "Notification sent", "data": {"type": kind, "receivers": receivers}})))
}

#[utoipa::path(post, path = "/broadcast/system", tag = "notifications", summary = "Send a system notification to everyone connected",
    request_body = Broadcast, responses((status = 200), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn broadcast_system(
    State(state): State<AppState>,
    Admin(_): Admin,
    JsonBody(request): JsonBody<Broadcast>,
) -> Result<Json<Value>, ApiError> {
    broadcast_notice(&state, "system_notification", request)
}

#[utoipa::path(post, path = "/broadcast/maintenance", tag = "notifications", summary = "Send a maintenance notice to everyone connected",
    request_body = Broadcast, responses((status = 200), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn broadcast_maintenance(
    State(state): State<AppState>,
    Admin(_): Admin,
    JsonBody(request): JsonBody<Broadcast>,
) -> Result<Json<Value>, ApiError> {
    broadcast_notice(&state, "maintenance_notification", request)
}

#[utoipa::path(get, path = "/stats", tag = "notifications", summary = "Connection statistics of this gateway",
    responses((status = 200), (status = 403, body = ErrorBody)))]
async fn stats(State(state): State<AppState>, Admin(_): Admin) -> Json<Value> {
    let c = &state.hub.counters;
    Json(json!({
        "errorMessage": "WebSocket statistics retrieved successfully",
        "data": {
            "activeConnections": c.connections.load(Ordering::Relaxed),
            "activeJobSubscriptions": c.job_subscriptions.load(Ordering::Relaxed),
            "activeChannelSubscriptions": c.channel_subscriptions.load(Ordering::Relaxed),
        }
    }))
}

#[utoipa::path(get, path = "/user/{userId}/status", tag = "notifications", summary = "Whether a user is connected to this gateway",
    params(("userId" = String, Path)), responses((status = 200), (status = 403, body = ErrorBody)))]
async fn user_status(State(state): State<AppState>, Admin(_): Admin, Path(user): Path<String>) -> Json<Value> {
    let n = state.hub.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&user).copied().unwrap_or(0);
    Json(json!({"userId": user, "connected": n > 0, "connections": n}))
}

/// The management routes, under `/api/v1/websocket`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(broadcast_system))
        .routes(routes!(broadcast_maintenance))
        .routes(routes!(stats))
        .routes(routes!(user_status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: EventType, fields: Value) -> Pending {
        let Value::Object(fields) = fields else { unreachable!("an object") };
        Pending { seq: 7, event: vellum_core::events::Event::new(event_type, 1_767_225_600_000, fields) }
    }

    #[test]
    fn a_retention_runs_progress_is_a_status_update_on_the_migrations_channel() {
        let run = json!({"operation": "retention:cool-down", "policy": "cool-down", "runId": 3, "dryRun": false,
            "transitioned": 4, "expired": 1, "total": 8, "processed": 4, "progress": 50.0});
        let notice = Notice::migration_of(&event(EventType::BulkOperationProgress, run.clone())).unwrap();
        assert_eq!((notice.channel, notice.kind.as_str(), notice.seq), ("migrations", "status_update", None));
        assert!(matches!(notice.audience, Audience::Admins));
        let m = &notice.message;
        assert_eq!(
            (m["eventType"].as_str(), m["status"].as_str(), m["phase"].as_str()),
            (Some("progress_updated"), Some("RUNNING"), Some("Migrating"))
        );
        assert_eq!(m["entityId"], "retention/cool-down/3");
        assert_eq!(m["progress"].to_string(), "50", "a whole percent, written as JavaScript writes it");
        assert_eq!((m["recordsProcessed"].as_i64(), m["totalRecords"].as_i64()), (Some(4), Some(8)));
        assert!(m["message"].as_str().unwrap().contains("4 documents moved between tiers"));
        assert!(m["timestamp"].as_str().unwrap().starts_with("2026-01-01T"));
        let done = json!({"operation": "retention:cool-down", "runId": 3, "totalDocuments": 8, "successCount": 5});
        let notice = Notice::migration_of(&event(EventType::BulkOperationCompleted, done)).unwrap();
        assert_eq!(
            (notice.message["eventType"].as_str(), notice.message["progress"].as_i64()),
            (Some("completed"), Some(100))
        );
        // A dry run moves nothing; other operations and events are not migrations.
        let mut dry = run.clone();
        dry["dryRun"] = json!(true);
        assert!(Notice::migration_of(&event(EventType::BulkOperationProgress, dry)).is_none());
        let mut other = run;
        other["operation"] = json!("export");
        assert!(Notice::migration_of(&event(EventType::BulkOperationProgress, other)).is_none());
        assert!(Notice::migration_of(&event(EventType::DocumentUploaded, json!({"documentId": 1}))).is_none());
    }
}
