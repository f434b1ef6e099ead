//! The JetStream contract the gateway and the workers share: the stream every document
//! event goes to, its subjects, how an event is encoded on it and read back, the client
//! both connect with, and the outbox relay's sink that publishes to it.
//!
//! Every event is published to `vellum.events.<EVENT_TYPE>` in the `VELLUM_EVENTS` stream
//! with its id as `Nats-Msg-Id`, so that a batch published again after a crash (accepted,
//! but not yet marked published in the outbox) is dropped by the stream's duplicate window.
#![warn(clippy::unwrap_used)]

pub mod notices;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use vellum_core::events::{Event, Pending, Sink, type_name};

/// The stream holding every document event.
pub const STREAM: &str = "VELLUM_EVENTS";
/// Subjects of the stream: `vellum.events.<EVENT_TYPE>`.
pub const SUBJECTS: &str = "vellum.events.>";

/// A client that connects in the background, so that its process starts even while NATS
/// is away (events wait in the outbox until it is back). `name` shows in NATS's monitoring.
/// With `VELLUM_NATS_CREDENTIALS` naming a `.creds` file, it authenticates with it.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new();
    // A `.creds` file (JWT and NKey seed), as the operator mounts it from the platform Secret.
    if let Some(path) = std::env::var_os("VELLUM_NATS_CREDENTIALS").filter(|p| !p.is_empty()) {
        let shown = std::path::Path::new(&path).display().to_string();
        options =
            options.credentials_file(&path).await.map_err(|e| format!("reading NATS credentials {shown}: {e}"))?;
    }
    options
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .name(name)
        .connect(url)
        .await
        .map_err(|e| format!("connecting to NATS at {url}: {e}"))
}

/// The subject an event is published on.
pub fn subject(event: &Event) -> String {
    format!("vellum.events.{}", type_name(event.event_type))
}

/// How long the stream keeps events, which bounds how far back an SSE client can resume.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Creates the events stream if it does not exist.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<stream::Stream, String> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        max_age: RETENTION,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("creating the JetStream stream {STREAM}: {e}"))
}

/// The relay's sink in a cluster: publishes a batch and waits for JetStream to acknowledge
/// every event of it.
#[derive(Clone, Debug)]
pub struct JetStreamSink {
    js: jetstream::Context,
}

impl JetStreamSink {
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }
}

impl Sink for JetStreamSink {
    fn publish<'a>(&'a self, batch: &'a [Pending]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut acks = Vec::with_capacity(batch.len());
            for pending in batch {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(pending.event.payload.to_string().into())
                    .message_id(&pending.event.id);
                let ack = self
                    .js
                    .send_publish(subject(&pending.event), publish)
                    .await
                    .map_err(|e| format!("publishing event {}: {e}", pending.event.id))?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(|e| format!("JetStream did not acknowledge an event: {e}"))?;
            }
            Ok(())
        })
    }
}

/// Parses an event from a stream message.
pub fn event_of(payload: &[u8]) -> Result<Event, String> {
    let payload: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let id = payload["eventId"].as_str().ok_or("no eventId")?.to_owned();
    let event_type = serde_json::from_value(payload["eventType"].clone()).map_err(|e| format!("eventType: {e}"))?;
    Ok(Event { id, event_type, payload })
}
