//! The progress of the long jobs on stored data, for admins, as seed 003's
//! `StatusUpdateEvent`: on the STOMP topic `/topic/migrations` (and the `migrations` channel
//! of the WebSocket JSON protocol) what moves data, a resharding (`shard-move/<routing
//! version>`, phase `Moving`) and a tier drain (`tier-drain/<tier>`, phase `Draining`); on
//! `/topic/data-quality` an integrity scrub (`integrity-scrub/<run>`, phase `Scrubbing`, and
//! each blob it quarantines). Sent as a notice to every gateway replica over NATS, at most
//! once a second, with the phase change at the start and the end (completed or failed)
//! always sent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use vellum_jetstream::notices::{WireAudience, WireNotice};

/// How often progress is sent at most.
const EVERY: Duration = Duration::from_secs(1);
/// How long the last notices may take to leave before the command exits anyway.
const FLUSH: Duration = Duration::from_secs(5);

/// What a status update is about: its `entityType`, `entityId` and `phase`.
#[derive(Clone, Copy, Debug)]
pub struct Entity<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub phase: &'a str,
}

/// One `StatusUpdateEvent` about `entity`.
pub fn status_update(
    event_type: &str,
    status: &str,
    entity: Entity<'_>,
    (moved, total): (i64, i64),
    message: &str,
    now_ms: i64,
) -> Value {
    // Percent to a tenth, whole numbers as integers: the JSON reads back the same in
    // JavaScript, which writes 50.0 as 50.
    let tenths = if total > 0 { moved * 1000 / total } else { 1000 };
    #[allow(clippy::cast_precision_loss)]
    let progress = if tenths % 10 == 0 { json!(tenths / 10) } else { json!(tenths as f64 / 10.0) };
    json!({
        "type": "status_update",
        "eventType": event_type,
        "entityType": entity.kind,
        "entityId": entity.id,
        "status": status,
        "progress": progress,
        "recordsProcessed": moved,
        "totalRecords": total,
        "phase": entity.phase,
        "message": message,
        "timestamp": vellum_core::clock::rfc3339(now_ms),
    })
}

/// Sends status updates to the gateways, when there is a NATS server to send them
/// through; without one it only logs.
#[derive(Debug)]
pub struct Announcer {
    outgoing: Option<mpsc::UnboundedSender<Value>>,
    task: Option<tokio::task::JoinHandle<()>>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Announcer {
    /// Connects to `nats_url`, if given, to announce on `channel` (`migrations`,
    /// `data-quality`).
    pub async fn connect(nats_url: Option<&str>, channel: &'static str) -> Self {
        let client = match nats_url {
            Some(url) => match vellum_jetstream::connect(url, "vellum-workers-announce").await {
                Ok(client) => Some(client),
                Err(e) => {
                    tracing::warn!(error = %e, "progress is not announced to the gateways");
                    None
                }
            },
            None => None,
        };
        let Some(client) = client else {
            return Self { outgoing: None, task: None, last: std::sync::Mutex::new(None) };
        };
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Value>();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let origin = format!("workers-announce-{}-{}", std::process::id(), started.as_nanos());
        let task = tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                let notice = WireNotice {
                    origin: origin.clone(),
                    audience: WireAudience::Admins,
                    channel: channel.into(),
                    job_id: None,
                    job_kind: None,
                    kind: "status_update".into(),
                    data: message.clone(),
                    message,
                };
                if let Err(e) = vellum_jetstream::notices::send(&client, &notice).await {
                    tracing::warn!(error = %e, "announcing progress");
                }
            }
            if let Err(e) = client.flush().await {
                tracing::warn!(error = %e, "announcing progress");
            }
        });
        Self { outgoing: Some(outgoing), task: Some(task), last: std::sync::Mutex::new(None) }
    }

    /// Sends `update` now.
    pub fn send(&self, update: Value) {
        if let Some(outgoing) = &self.outgoing {
            let _ = outgoing.send(update);
        }
    }

    /// Sends `update` unless one was sent less than a second ago.
    pub fn progress(&self, update: impl FnOnce() -> Value) {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= EVERY) {
            *last = Some(Instant::now());
            self.send(update());
        }
    }

    /// Waits (a few seconds at most) for what was sent to leave.
    pub async fn finish(mut self) {
        drop(self.outgoing.take());
        if let Some(task) = self.task.take()
            && tokio::time::timeout(FLUSH, task).await.is_err()
        {
            tracing::warn!("the last progress did not reach NATS in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_a_percent_to_a_tenth_and_whole_numbers_stay_integers() {
        let at = |moved, total| {
            let entity = Entity { kind: "migration", id: "shard-move/v", phase: "Moving" };
            status_update("progress_updated", "RUNNING", entity, (moved, total), "m", 0)["progress"].to_string()
        };
        assert_eq!(at(1, 2), "50");
        assert_eq!(at(1, 3), "33.3");
        assert_eq!(at(0, 0), "100");
        assert_eq!(at(7, 7), "100");
    }
}
