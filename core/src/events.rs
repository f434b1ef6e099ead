//! Document events: written to the outbox in the transaction of the change they describe,
//! then relayed (to NATS JetStream in a cluster, to the in-process [`Bus`] standalone).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use sqlx::Row;
use tokio::sync::{Notify, broadcast};

use crate::clock::Clock;
use crate::crds::webhook::EventType;
use crate::store::{Metadata, StoreError, Tx};

/// One event, as subscribers receive it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique id (a UUID): the deduplication key downstream.
    pub id: String,
    pub event_type: EventType,
    /// The JSON payload subscribers receive, with `eventId`, `eventType` and `timestamp`.
    pub payload: Value,
}

/// The wire name of an event type (`DOCUMENT_UPLOADED`).
pub fn type_name(event_type: EventType) -> String {
    serde_json::to_value(event_type).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

impl Event {
    /// A new event of `event_type` at `timestamp_ms` with the given payload fields.
    pub fn new(event_type: EventType, timestamp_ms: i64, fields: Map<String, Value>) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        let mut payload = Map::new();
        payload.insert("eventId".into(), json!(id));
        payload.insert("eventType".into(), json!(type_name(event_type)));
        payload.insert("timestamp".into(), json!(timestamp_ms));
        payload.extend(fields);
        Self { id, event_type, payload: Value::Object(payload) }
    }

    /// Writes the event to the outbox, inside the caller's transaction.
    pub async fn enqueue(&self, tx: &mut Tx, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO outbox (id, event_type, payload, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&self.id)
            .bind(type_name(self.event_type))
            .bind(self.payload.to_string())
            .bind(now_ms)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// An outbox row not yet published.
#[derive(Clone, Debug)]
pub struct Pending {
    pub seq: i64,
    pub event: Event,
}

/// Reads and acknowledges the outbox.
pub mod outbox {
    use super::{Event, Metadata, Pending, Row, StoreError};

    /// The oldest unpublished events, in the order they were written.
    pub async fn pending(meta: &Metadata, limit: i64) -> Result<Vec<Pending>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, id, event_type, payload FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(meta.pool())
        .await?;
        rows.iter().map(pending_of).collect()
    }

    fn pending_of(row: &sqlx::any::AnyRow) -> Result<Pending, StoreError> {
        let event_type: String = row.try_get("event_type")?;
        let payload: String = row.try_get("payload")?;
        Ok(Pending {
            seq: row.try_get("seq")?,
            event: Event {
                id: row.try_get("id")?,
                event_type: serde_json::from_value(serde_json::Value::String(event_type.clone()))
                    .map_err(|_| StoreError::Corrupt(format!("outbox event type {event_type}")))?,
                payload: serde_json::from_str(&payload)
                    .map_err(|e| StoreError::Corrupt(format!("outbox payload: {e}")))?,
            },
        })
    }

    /// Marks events published, once their destination has acknowledged them.
    pub async fn mark_published(meta: &Metadata, seqs: &[i64], now_ms: i64) -> Result<(), StoreError> {
        for seq in seqs {
            sqlx::query("UPDATE outbox SET published_at = $1 WHERE seq = $2 AND published_at IS NULL")
                .bind(now_ms)
                .bind(seq)
                .execute(meta.pool())
                .await?;
        }
        Ok(())
    }

    /// Published events after sequence number `after`, oldest first: the history a client
    /// resuming a stream reads.
    pub async fn published_after(meta: &Metadata, after: i64, limit: i64) -> Result<Vec<Pending>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, id, event_type, payload FROM outbox WHERE seq > $1 AND published_at IS NOT NULL \
             ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(meta.pool())
        .await?;
        rows.iter().map(pending_of).collect()
    }

    /// How many events wait to be published.
    pub async fn depth(meta: &Metadata) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL").fetch_one(meta.pool()).await?)
    }

    /// How many events wait to be published, and when the oldest of them was written (ms):
    /// how far the relay lags behind. One statement, so the two agree (no age without a
    /// waiting event).
    pub async fn backlog(meta: &Metadata) -> Result<(i64, Option<i64>), StoreError> {
        Ok(sqlx::query_as("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE published_at IS NULL")
            .fetch_one(meta.pool())
            .await?)
    }
}

/// The in-process event bus of standalone mode: every subscriber sees every event relayed
/// from the outbox, in outbox order.
#[derive(Clone, Debug)]
pub struct Bus {
    sender: broadcast::Sender<Arc<Pending>>,
    /// Woken after a commit that wrote to the outbox, so the relay need not poll fast.
    pub wake: Arc<Notify>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self { sender: broadcast::channel(4096).0, wake: Arc::new(Notify::new()) }
    }

    /// Events as they are relayed, with their outbox sequence number.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Pending>> {
        self.sender.subscribe()
    }

    /// Relays the outbox to the bus until `stop` resolves. An event is marked published
    /// once it has been handed to the bus.
    pub async fn relay(&self, meta: Metadata, clock: Clock, stop: impl std::future::Future<Output = ()>) {
        relay(&meta, &clock, self, &self.wake, Duration::from_secs(1), stop).await;
    }
}

impl Sink for Bus {
    fn publish<'a>(&'a self, batch: &'a [Pending]) -> BoxFuture<'a, Result<(), String>> {
        for pending in batch {
            // No subscriber is not an error: the event is still delivered to everyone
            // listening, which is no one.
            let _ = self.sender.send(Arc::new(pending.clone()));
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Where the relay hands outbox events: NATS JetStream in a cluster, the in-process bus
/// (and the webhook queue) standalone. `publish` resolves once the destination has
/// accepted every event of the batch; only then are they marked published, so a crash or
/// an unreachable destination delays events and never loses one. Destinations must
/// tolerate an event twice (a crash between acceptance and marking): JetStream drops it
/// by its `Nats-Msg-Id`, the webhook queue by its event id.
pub trait Sink: Send + Sync {
    fn publish<'a>(&'a self, batch: &'a [Pending]) -> BoxFuture<'a, Result<(), String>>;
}

/// Events the relay reads from the outbox at a time.
const RELAY_BATCH: i64 = 256;

/// Relays the outbox to `sink`, in outbox order, until `stop` resolves. `wake` is notified
/// after commits that wrote events in this process; other processes' events are found by
/// polling every `idle`. A failing sink is retried with a backoff from 100 ms to 10 s.
pub async fn relay(
    meta: &Metadata,
    clock: &Clock,
    sink: &dyn Sink,
    wake: &Notify,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(100);
    loop {
        let pause = match outbox::pending(meta, RELAY_BATCH).await {
            Ok(batch) if !batch.is_empty() => match sink.publish(&batch).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    let seqs: Vec<i64> = batch.iter().map(|p| p.seq).collect();
                    match outbox::mark_published(meta, &seqs, clock.now_ms()).await {
                        Ok(()) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "marking relayed events published");
                            Some(backoff)
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), retry_in = ?backoff, "publishing outbox events");
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    Some(pause)
                }
            },
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox");
                Some(Duration::from_secs(1))
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(pause) => {}
            }
        } else {
            tokio::select! {
                () = &mut stop => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
        }
    }
}
