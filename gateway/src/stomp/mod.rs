//! STOMP 1.1/1.2 over WebSocket, for the seed front ends built on `@stomp/stompjs`: on `/ws`
//! when the client asks for a `v1x.stomp` subprotocol, on SockJS's `/ws/websocket`, and inside
//! SockJS sessions (see [`crate::sockjs`]).
//!
//! The gateway is a publishing broker: clients `CONNECT` (the JWT in an `Authorization`
//! header, or already on the upgrade request), `SUBSCRIBE` to the destinations below and
//! receive `MESSAGE`s whose body is the same JSON the WebSocket JSON protocol sends. A client
//! never sees more than the JSON protocol would show it: document events of its own
//! documents (admins: all), its own jobs, broadcasts.
//!
//! | destination | what arrives |
//! |---|---|
//! | `/topic/documents`, `/topic/file-changes` | document events |
//! | `/topic/notifications` | system and maintenance notices |
//! | `/topic/webhooks` | webhook deactivations (admins) |
//! | `/topic/migrations` | the progress of reshardings, tier drains and retention runs (tier migrations), as seed 003's `StatusUpdateEvent` (admins) |
//! | `/topic/uploads` | progress and completion of upload sessions |
//! | `/topic/jobs/{jobId}` | one job's progress and completion |
//! | `/topic/data-quality` | integrity scrubs' progress and each blob they quarantine, as seed 003's `StatusUpdateEvent` (admins) |
//! | `/topic/extractions` | the progress of the user's export jobs, as seed 003's `StatusUpdateEvent` |
//! | `/topic/{channel}` (any other) | the events of that channel, if any |
//! | `/user/queue/notifications` | everything addressed to the user: own document events, own jobs, broadcasts |
//! | `/user/queue/upload-progress` | the user's upload sessions |
//! | `/user/queue/sync` | events of the user's own documents |
//! | `/user/queue/{channel}` (any other) | the user's own events of that channel |
//!
//! As a Spring simple broker does, any destination under `/topic/` and `/queue/` is
//! accepted (nothing may arrive on one no event is sent to); `/queue/…` is the user's own,
//! as `/user/queue/…` is.
//!
//! Messages of events carry a `sequence` header, their place in the event history. A client
//! that reconnects sends the last one it saw as `last-event-id` on `SUBSCRIBE` (or once on
//! `CONNECT`, for every subscription): what it missed for that destination arrives first, in
//! order, then live messages, none twice, from whichever replica it reached.

pub mod frame;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use vellum_core::documents::Actor;

use self::frame::{Decoder, Frame, Item, negotiate, parse_heart_beat};
use crate::auth::Auth;
use crate::realtime::{Audience, Hub, Notice, replayed_already};

/// The WebSocket subprotocols of STOMP, in our order of preference.
pub const SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];
/// The largest frame a client may send (it only sends commands).
pub const MAX_FRAME: usize = 64 * 1024;
/// Heart-beats the server offers: it can send every 10 s and wants one every 10 s.
const SERVER_HEART_BEAT: (u64, u64) = (10_000, 10_000);
/// How long a client has to send `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriptions one connection may hold.
const MAX_SUBSCRIPTIONS: usize = 64;

/// What a subscription receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Documents,
    Notifications,
    Webhooks,
    Migrations,
    /// Every job of one kind (`/topic/uploads`).
    Jobs(&'static str),
    Job(String),
    UserNotifications,
    UserUploadProgress,
    UserSync,
    /// Any other topic: the notices of the channel of that name.
    Topic(String),
    /// Any other queue of the user's: the user's own notices of the channel of that name.
    UserQueue(String),
}

/// Job kinds with a topic of their own.
pub(crate) const JOB_KINDS: [&str; 1] = [crate::uploads::UPLOAD_JOBS];

impl Destination {
    pub fn parse(destination: &str) -> Result<Self, String> {
        let queue = destination.strip_prefix("/user/queue/").or_else(|| destination.strip_prefix("/queue/"));
        Ok(match (destination, queue) {
            ("/topic/documents" | "/topic/file-changes", _) => Self::Documents,
            ("/topic/notifications", _) => Self::Notifications,
            ("/topic/webhooks", _) => Self::Webhooks,
            ("/topic/migrations", _) => Self::Migrations,
            (_, Some("notifications")) => Self::UserNotifications,
            (_, Some("upload-progress")) => Self::UserUploadProgress,
            (_, Some("sync")) => Self::UserSync,
            (_, Some(name)) if valid_name(name) => Self::UserQueue(name.to_owned()),
            (other, _) => {
                if let Some(job) = other.strip_prefix("/topic/jobs/").filter(|j| !j.is_empty() && !j.contains('/')) {
                    Self::Job(job.to_owned())
                } else if let Some(kind) =
                    other.strip_prefix("/topic/").and_then(|k| JOB_KINDS.into_iter().find(|j| *j == k))
                {
                    Self::Jobs(kind)
                } else if let Some(name) =
                    other.strip_prefix("/topic/").filter(|n| valid_name(n) && !n.starts_with("jobs/") && *n != "jobs")
                {
                    Self::Topic(name.to_owned())
                } else {
                    return Err(format!(
                        "no destination {other:?}; subscribe to /topic/documents, /topic/file-changes, \
                         /topic/notifications, /topic/webhooks, /topic/migrations, /topic/uploads, \
                         /topic/jobs/{{jobId}}, another /topic/{{name}}, /user/queue/notifications, \
                         /user/queue/upload-progress, /user/queue/sync or another /user/queue/{{name}}"
                    ));
                }
            }
        })
    }

    /// Whether a subscriber of this destination receives `notice` (which `actor` may see).
    pub fn wants(&self, notice: &Notice, actor: &Actor) -> bool {
        let personal = match &notice.audience {
            Audience::User(user) => *user == actor.user,
            Audience::Everyone => true,
            Audience::Admins => actor.admin,
        };
        match self {
            Self::Documents => notice.channel == "documents",
            Self::Notifications => notice.channel == "notifications" && notice.job_id.is_none(),
            Self::Webhooks => notice.channel == "webhooks",
            Self::Migrations => notice.channel == "migrations",
            Self::Jobs(kind) => notice.job_kind == Some(kind),
            Self::Job(id) => notice.job_id.as_ref() == Some(id),
            Self::UserNotifications => personal,
            Self::UserUploadProgress => personal && notice.job_kind == Some(crate::uploads::UPLOAD_JOBS),
            Self::UserSync => personal && notice.channel == "documents",
            Self::Topic(channel) => notice.channel == channel.as_str(),
            Self::UserQueue(channel) => personal && notice.channel == channel.as_str(),
        }
    }
}

/// A destination's name under `/topic/` or `/queue/`: path segments of letters, digits,
/// `-`, `_` and `.`, none empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|segment| {
            !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
}

/// How STOMP frames travel in WebSocket messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One or more frames per message, as `@stomp/stompjs` sends over a plain WebSocket.
    Raw,
    /// SockJS's websocket transport: `o` on open, `a["..."]` arrays of strings, `c[code,"reason"]`.
    SockJs,
}

struct Subscription {
    id: String,
    destination: String,
    parsed: Destination,
    /// `client` or `client-individual` acknowledgement: messages carry an `ack` header.
    acks: bool,
    /// The last event a resumed subscription's replay sent: live events up to it are not
    /// sent again.
    replayed: Option<i64>,
}

/// What a STOMP connection runs over: a WebSocket, or the two channels of a SockJS HTTP
/// session (what `xhr_send` posted in, and what the receiving requests stream out), each
/// message a SockJS frame.
pub enum Link {
    WebSocket(Box<WebSocket>),
    Channels { inbound: mpsc::Receiver<String>, outbound: mpsc::Sender<String> },
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::WebSocket(_) => "Link::WebSocket",
            Link::Channels { .. } => "Link::Channels",
        })
    }
}

/// The sending half of a link.
enum Out {
    WebSocket(SplitSink<WebSocket, Message>),
    Channel(mpsc::Sender<String>),
}

/// The receiving half of a link.
enum In {
    WebSocket(SplitStream<WebSocket>),
    Channel(mpsc::Receiver<String>),
}

impl Link {
    fn split(self) -> (Out, In) {
        match self {
            Link::WebSocket(socket) => {
                let (tx, rx) = (*socket).split();
                (Out::WebSocket(tx), In::WebSocket(rx))
            }
            Link::Channels { inbound, outbound } => (Out::Channel(outbound), In::Channel(inbound)),
        }
    }
}

/// The sending half of a connection, in its framing.
struct Wire {
    tx: Out,
    framing: Framing,
}

impl Wire {
    async fn send_text(&mut self, text: String) -> bool {
        match &mut self.tx {
            Out::WebSocket(tx) => tx.send(Message::Text(text.into())).await.is_ok(),
            Out::Channel(tx) => tx.send(text).await.is_ok(),
        }
    }

    async fn send_data(&mut self, data: &str) -> bool {
        let message = match self.framing {
            Framing::Raw => data.to_owned(),
            Framing::SockJs => format!("a{}", Value::from(vec![data])),
        };
        self.send_text(message).await
    }

    async fn send(&mut self, frame: &Frame) -> bool {
        self.send_data(&String::from_utf8_lossy(&frame.encode())).await
    }

    async fn close(&mut self, code: u16, reason: &str) {
        if self.framing == Framing::SockJs {
            let _ = self.send_text(format!("c{}", serde_json::json!([code, reason]))).await;
        }
        if let Out::WebSocket(tx) = &mut self.tx {
            let reason: String = reason.chars().take(120).collect();
            let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
        }
    }

    /// An `ERROR` frame, then the end of the connection, as the specification requires.
    async fn fail(&mut self, message: &str, detail: &str, code: u16) {
        let frame = Frame::new("ERROR").header("message", message).body("text/plain", detail.as_bytes().to_vec());
        self.send(&frame).await;
        self.close(code, message).await;
    }
}

/// Bytes from the next WebSocket message into the decoder; `Err` with a reason when the
/// connection is over or the message is not in this framing.
async fn read(rx: &mut In, framing: Framing, decoder: &mut Decoder) -> Result<(), Option<String>> {
    loop {
        let bytes = match rx {
            In::WebSocket(rx) => match rx.next().await {
                Some(Ok(Message::Text(text))) => text.as_str().as_bytes().to_vec(),
                Some(Ok(Message::Binary(bytes))) if framing == Framing::Raw => bytes.to_vec(),
                Some(Ok(Message::Binary(_))) => return Err(Some("SockJS messages are text".into())),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(None),
            },
            In::Channel(rx) => match rx.recv().await {
                Some(text) => text.into_bytes(),
                None => return Err(None),
            },
        };
        match framing {
            Framing::Raw => decoder.push(&bytes),
            Framing::SockJs => {
                if bytes.is_empty() {
                    continue;
                }
                let strings = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Array(items)) => items,
                    Ok(one @ Value::String(_)) => vec![one],
                    _ => return Err(Some("SockJS messages are JSON arrays of strings".into())),
                };
                for item in strings {
                    let Value::String(s) = item else {
                        return Err(Some("SockJS messages are JSON arrays of strings".into()));
                    };
                    decoder.push(s.as_bytes());
                }
            }
        }
        return Ok(());
    }
}

/// The bearer token of a `CONNECT` frame: `Authorization: Bearer ...`, or `token`/`passcode`.
fn token_of(connect: &Frame) -> Option<String> {
    let bearer = ["Authorization", "authorization"]
        .into_iter()
        .find_map(|h| connect.get(h))
        .map(|v| crate::auth::bearer(v).unwrap_or(v));
    bearer.or_else(|| connect.get("token")).or_else(|| connect.get("passcode")).map(|t| t.trim().to_owned())
}

/// Serves one STOMP connection. `actor` is set when the upgrade request carried a token.
pub async fn session(link: Link, framing: Framing, hub: Arc<Hub>, auth: Arc<Auth>, actor: Option<Actor>) {
    let (tx, mut rx) = link.split();
    let mut wire = Wire { tx, framing };
    if framing == Framing::SockJs && !wire.send_text("o".into()).await {
        return;
    }
    let mut decoder = Decoder::new(MAX_FRAME);
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match decoder.next_item() {
                Ok(Some(Item::HeartBeat)) => {}
                Ok(Some(Item::Frame(frame))) => return Ok(frame),
                Ok(None) => read(&mut rx, framing, &mut decoder).await.map_err(|e| e.map(|e| ("bad frame", e)))?,
                Err(e) => return Err(Some(("malformed frame", e.0))),
            }
        }
    })
    .await;
    let connect = match connect {
        Ok(Ok(frame)) => frame,
        Ok(Err(None)) => return,
        Ok(Err(Some((message, detail)))) => return wire.fail(message, &detail, 1002).await,
        Err(_) => return wire.fail("no CONNECT", "send CONNECT within 10 seconds of opening", 1008).await,
    };
    let Some((actor, heart_beat, version)) = accept(&mut wire, &connect, actor, &auth).await else {
        hub.socket_refused();
        return;
    };
    let mut notices = hub.sender.subscribe();
    let connection = hub.socket_connected(&actor.user);
    let (send_every, expect_every) = negotiate(heart_beat, SERVER_HEART_BEAT);
    let mut connected = Frame::new("CONNECTED")
        .header("version", version)
        .header("heart-beat", format!("{},{}", SERVER_HEART_BEAT.0, SERVER_HEART_BEAT.1))
        .header("server", concat!("Vellum/", env!("CARGO_PKG_VERSION")));
    if !actor.user.contains(['\n', '\r']) {
        connected = connected.header("user-name", actor.user.clone());
    }
    if let Some(receipt) = connect.get("receipt") {
        connected = connected.header("receipt-id", receipt);
    }
    if !wire.send(&connected).await {
        return;
    }
    let resume = match connect.get("last-event-id").map(parse_last_event_id).transpose() {
        Ok(resume) => resume,
        Err(detail) => return wire.fail("bad last-event-id header", &detail, 1002).await,
    };
    let mut state = Connected { wire, actor, hub: &hub, connection, subscriptions: Vec::new(), message_ids: 0, resume };
    let mut beat = (send_every > 0).then(|| {
        let period = Duration::from_millis(send_every);
        tokio::time::interval_at(Instant::now() + period, period)
    });
    // A client is given twice its interval (network delays) before it counts as gone.
    let grace = Duration::from_millis(expect_every.saturating_mul(2));
    let mut deadline = Instant::now() + grace;
    loop {
        tokio::select! {
            incoming = read(&mut rx, framing, &mut decoder) => {
                match incoming {
                    Ok(()) => deadline = Instant::now() + grace,
                    Err(None) => return,
                    Err(Some(detail)) => return state.wire.fail("bad frame", &detail, 1002).await,
                }
                loop {
                    match decoder.next_item() {
                        Ok(Some(Item::HeartBeat)) => {}
                        Ok(Some(Item::Frame(frame))) => {
                            if !state.handle(frame).await {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return state.wire.fail("malformed frame", &e.0, 1002).await,
                    }
                }
            }
            notice = notices.recv() => match notice {
                Ok(notice) => {
                    if !state.deliver(&notice).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let detail = format!("{n} notifications were dropped; reconnect");
                    return state.wire.fail("client cannot keep up", &detail, 1013).await;
                }
                Err(broadcast::error::RecvError::Closed) => return state.wire.close(1001, "gateway shutting down").await,
            },
            () = async { match beat.as_mut() { Some(b) => { b.tick().await; } None => std::future::pending().await } } => {
                if !state.wire.send_data("\n").await {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline), if expect_every > 0 => {
                let detail = format!("nothing received for {} ms (heart-beat {expect_every} ms)", grace.as_millis());
                return state.wire.fail("heart-beat timeout", &detail, 1001).await;
            }
        }
    }
}

/// Checks `CONNECT`: the command, the version and the token. Answers `ERROR` and `None`
/// when the client cannot be connected.
async fn accept(
    wire: &mut Wire,
    connect: &Frame,
    actor: Option<Actor>,
    auth: &Auth,
) -> Option<(Actor, (u64, u64), &'static str)> {
    if !matches!(connect.command.as_str(), "CONNECT" | "STOMP") {
        let detail = format!("the first frame must be CONNECT, not {}", connect.command);
        wire.fail("not connected", &detail, 1002).await;
        return None;
    }
    let versions: Vec<&str> = connect.get("accept-version").unwrap_or("1.0").split(',').map(str::trim).collect();
    let Some(version) = ["1.2", "1.1"].into_iter().find(|v| versions.contains(v)) else {
        let frame = Frame::new("ERROR")
            .header("version", "1.1,1.2")
            .header("message", "unsupported protocol version")
            .body("text/plain", b"this server speaks STOMP 1.1 and 1.2".to_vec());
        wire.send(&frame).await;
        wire.close(1002, "unsupported protocol version").await;
        return None;
    };
    let heart_beat = match parse_heart_beat(connect.get("heart-beat")) {
        Ok(hb) => hb,
        Err(e) => {
            wire.fail("bad heart-beat header", &e.0, 1002).await;
            return None;
        }
    };
    let actor = match (token_of(connect), actor) {
        (Some(token), _) => match auth.verify(&token) {
            Ok(actor) => actor,
            Err(message) => {
                wire.fail("authentication failed", &message, 1008).await;
                return None;
            }
        },
        (None, Some(actor)) => actor,
        (None, None) => {
            let detail = "send the JWT as an Authorization: Bearer header of CONNECT, or as ?token= on the URL";
            wire.fail("authentication required", detail, 1008).await;
            return None;
        }
    };
    Some((actor, heart_beat, version))
}

/// The sequence a `last-event-id` header names.
fn parse_last_event_id(value: &str) -> Result<i64, String> {
    value.trim().parse().map_err(|_| format!("last-event-id must be the sequence of an event, not {value:?}"))
}

/// A connection after `CONNECTED`.
struct Connected<'a> {
    wire: Wire,
    actor: Actor,
    hub: &'a Hub,
    connection: crate::realtime::Connection<'a>,
    subscriptions: Vec<Subscription>,
    message_ids: u64,
    /// CONNECT's `last-event-id`: where every subscription that names none of its own resumes.
    resume: Option<i64>,
}

impl Connected<'_> {
    /// Acts on a client frame; `false` when the connection is over.
    async fn handle(&mut self, frame: Frame) -> bool {
        let result = match frame.command.as_str() {
            "SUBSCRIBE" => self.subscribe(&frame).await,
            "UNSUBSCRIBE" => match frame.get("id") {
                Some(id) => {
                    if let Some(i) = self.subscriptions.iter().position(|s| s.id == id) {
                        let gone = self.subscriptions.swap_remove(i);
                        self.count(&gone.parsed, -1);
                    }
                    Ok(())
                }
                None => Err(("UNSUBSCRIBE needs an id header".to_owned(), String::new())),
            },
            // Messages are delivered once, at most; acknowledgements change nothing.
            "ACK" | "NACK" => match frame.get("id").or_else(|| frame.get("message-id")) {
                Some(_) => Ok(()),
                None => Err((format!("{} needs an id header", frame.command), String::new())),
            },
            "DISCONNECT" => {
                if let Some(receipt) = frame.get("receipt") {
                    self.wire.send(&Frame::new("RECEIPT").header("receipt-id", receipt)).await;
                }
                self.wire.close(1000, "disconnected").await;
                return false;
            }
            "SEND" | "BEGIN" | "COMMIT" | "ABORT" => Err((
                format!("{} is not accepted", frame.command),
                "this gateway only publishes: subscribe to destinations, and use the HTTP API to act".to_owned(),
            )),
            "CONNECT" | "STOMP" => Err(("already connected".to_owned(), String::new())),
            other => Err((format!("unknown command {other}"), String::new())),
        };
        match result {
            Ok(()) => match frame.get("receipt") {
                Some(receipt) => self.wire.send(&Frame::new("RECEIPT").header("receipt-id", receipt)).await,
                None => true,
            },
            Err((message, detail)) => {
                let detail = if detail.is_empty() { message.clone() } else { detail };
                self.wire.fail(&message, &detail, 1002).await;
                false
            }
        }
    }

    /// Adds a subscription; with a `last-event-id` (its own, or CONNECT's), the events for it
    /// since are sent first.
    async fn subscribe(&mut self, frame: &Frame) -> Result<(), (String, String)> {
        let (Some(id), Some(destination)) = (frame.get("id"), frame.get("destination")) else {
            return Err(("SUBSCRIBE needs id and destination headers".to_owned(), String::new()));
        };
        let acks = match frame.get("ack").unwrap_or("auto") {
            "auto" => false,
            "client" | "client-individual" => true,
            other => return Err((format!("unknown ack mode {other:?}"), String::new())),
        };
        if self.subscriptions.iter().any(|s| s.id == id) {
            return Err((format!("subscription id {id:?} is already in use"), String::new()));
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err((format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"), String::new()));
        }
        let parsed = Destination::parse(destination).map_err(|detail| ("unknown destination".to_owned(), detail))?;
        let resume = match frame.get("last-event-id") {
            Some(value) => Some(parse_last_event_id(value).map_err(|d| ("bad last-event-id header".to_owned(), d))?),
            None => self.resume,
        };
        self.count(&parsed, 1);
        let (id, destination) = (id.to_owned(), destination.to_owned());
        self.subscriptions.push(Subscription { id, destination, parsed, acks, replayed: None });
        let Some(after) = resume else { return Ok(()) };
        // Live notices wait in the connection's receiver until the replay is done.
        let (hub, actor, at) = (self.hub, self.actor.clone(), self.subscriptions.len() - 1);
        let mut replay = hub.replay(&actor, after);
        loop {
            match replay.next_page().await {
                Ok(Some(page)) => {
                    for notice in &page {
                        if self.subscriptions[at].parsed.wants(notice, &actor)
                            && !self.send_message(at, notice, None).await
                        {
                            // Nothing more can reach a client that went away.
                            return Ok(());
                        }
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    return Err((
                        "the event history could not be read".to_owned(),
                        "reconnect and subscribe with the same last-event-id".to_owned(),
                    ));
                }
            }
        }
        self.subscriptions[at].replayed = Some(replay.upto());
        Ok(())
    }

    /// Sends `notice` as a MESSAGE of the subscription at `at`; `false` when the client is gone.
    async fn send_message(&mut self, at: usize, notice: &Notice, body: Option<&[u8]>) -> bool {
        let sub = &self.subscriptions[at];
        self.message_ids += 1;
        let id = self.message_ids.to_string();
        let mut frame = Frame::new("MESSAGE")
            .header("destination", sub.destination.clone())
            .header("subscription", sub.id.clone())
            .header("message-id", id.clone());
        if let Some(seq) = notice.seq {
            frame = frame.header("sequence", seq.to_string());
        }
        if sub.acks {
            frame = frame.header("ack", id);
        }
        let body = body.map_or_else(|| notice.message.to_string().into_bytes(), <[u8]>::to_vec);
        self.wire.send(&frame.body("application/json", body)).await
    }

    fn count(&mut self, destination: &Destination, delta: i64) {
        match destination {
            Destination::Job(_) => self.connection.jobs(delta),
            _ => self.connection.channels(delta),
        }
    }

    /// Sends `notice` to every subscription that wants it; `false` when the client is gone.
    async fn deliver(&mut self, notice: &Notice) -> bool {
        if !notice.audience.admits(&self.actor) {
            return true;
        }
        let mut body: Option<Vec<u8>> = None;
        for i in 0..self.subscriptions.len() {
            let sub = &self.subscriptions[i];
            if !sub.parsed.wants(notice, &self.actor) || replayed_already(notice, sub.replayed) {
                continue;
            }
            let body = body.get_or_insert_with(|| notice.message.to_string().into_bytes()).clone();
            if !self.send_message(i, notice, Some(&body)).await {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn actor(user: &str, admin: bool) -> Actor {
        Actor { user: user.into(), admin }
    }

    #[test]
    fn destinations_are_parsed_or_refused_with_the_list() {
        assert_eq!(Destination::parse("/topic/file-changes"), Ok(Destination::Documents));
        assert_eq!(Destination::parse("/topic/uploads"), Ok(Destination::Jobs("uploads")));
        assert_eq!(Destination::parse("/topic/jobs/abc"), Ok(Destination::Job("abc".into())));
        assert_eq!(Destination::parse("/topic/migrations"), Ok(Destination::Migrations));
        // Seed 003's topics, and any other as a simple broker takes it.
        assert_eq!(Destination::parse("/topic/extractions"), Ok(Destination::Topic("extractions".into())));
        assert_eq!(Destination::parse("/topic/data-quality"), Ok(Destination::Topic("data-quality".into())));
        assert_eq!(Destination::parse("/topic/a/b.c"), Ok(Destination::Topic("a/b.c".into())));
        // Seed 001's queues are the user's own, with or without /user.
        assert_eq!(Destination::parse("/queue/sync"), Ok(Destination::UserSync));
        assert_eq!(Destination::parse("/queue/upload-progress"), Ok(Destination::UserUploadProgress));
        assert_eq!(Destination::parse("/user/queue/errors"), Ok(Destination::UserQueue("errors".into())));
        assert_eq!(Destination::parse("/queue/x"), Ok(Destination::UserQueue("x".into())));
        for bad in ["/topic/", "/topic/jobs/", "/topic/jobs/a/b", "/topic/a//b", "/queue/", "/app/x", "/topic/a b", ""]
        {
            let error = Destination::parse(bad).unwrap_err();
            assert!(error.contains("/topic/documents"), "{error}");
        }
    }

    #[test]
    fn each_destination_gets_its_share() {
        let alice = actor("alice", false);
        let admin = actor("root", true);
        let upload = Notice::job_update("uploads", "alice", "s1", 0, &json!({}));
        let system = Notice::system("system_notification", "hi", "info", 0, json!({}));
        let mut doc = Notice::system("DOCUMENT_UPLOADED", "", "info", 0, json!({}));
        doc.channel = "documents";
        doc.audience = Audience::User("alice".into());
        let wants = |d: &Destination, n: &Notice, a: &Actor| d.wants(n, a);
        assert!(wants(&Destination::Documents, &doc, &alice));
        assert!(!wants(&Destination::Documents, &upload, &alice));
        assert!(wants(&Destination::Jobs("uploads"), &upload, &alice));
        assert!(wants(&Destination::Job("s1".into()), &upload, &alice));
        assert!(!wants(&Destination::Job("s2".into()), &upload, &alice));
        assert!(wants(&Destination::Notifications, &system, &alice));
        assert!(!wants(&Destination::Notifications, &upload, &alice));
        for n in [&doc, &upload, &system] {
            assert!(wants(&Destination::UserNotifications, n, &alice));
        }
        // An admin sees alice's events on topics, but they are not the admin's own.
        assert!(wants(&Destination::Documents, &doc, &admin));
        assert!(!wants(&Destination::UserNotifications, &doc, &admin));
        assert!(!wants(&Destination::UserUploadProgress, &upload, &admin));
        assert!(wants(&Destination::UserUploadProgress, &upload, &alice));
        assert!(wants(&Destination::UserSync, &doc, &alice));
        assert!(!wants(&Destination::UserSync, &system, &alice));
        // Any other topic or queue is a channel's.
        assert!(wants(&Destination::Topic("documents".into()), &doc, &admin));
        assert!(!wants(&Destination::Topic("extractions".into()), &doc, &admin));
        assert!(wants(&Destination::UserQueue("documents".into()), &doc, &alice));
        assert!(!wants(&Destination::UserQueue("documents".into()), &doc, &admin), "not the admin's own");
    }

    #[test]
    fn connect_tokens_come_from_authorization_or_token_headers() {
        let frame = Frame::new("CONNECT").header("Authorization", "Bearer abc ");
        assert_eq!(token_of(&frame).as_deref(), Some("abc"));
        let frame = Frame::new("CONNECT").header("passcode", "xyz");
        assert_eq!(token_of(&frame).as_deref(), Some("xyz"));
        assert_eq!(token_of(&Frame::new("CONNECT")), None);
    }
}
