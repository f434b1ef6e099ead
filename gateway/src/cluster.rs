//! Cluster mode: one gateway replica among several, sharing Postgres and NATS. Every
//! replica's [`Hub`] is fed from the same places, so a client on one replica sees what
//! happened through another:
//!
//! - document and platform events from the JetStream stream (an ordered consumer per
//!   replica, resumed after the last stream sequence it saw whenever NATS comes back, so a
//!   client is told each event once); the stream sequence is the SSE event id, and
//!   `Last-Event-ID` resumes from the stream;
//! - notices that are not events (job progress, admin broadcasts) over a core NATS subject,
//!   tagged with the replica that sent them: the sender has already told its own clients.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::mpsc;
use vellum_core::events::Pending;
use vellum_jetstream::notices::{SUBJECT, WireAudience, WireNotice};
use vellum_jetstream::{STREAM, ensure_stream, event_of};

use crate::realtime::{Audience, CHANNELS, Hub, Notice};
use crate::stomp::JOB_KINDS;

/// Notices waiting to be sent to NATS before new ones are dropped (they are progress
/// reports: the next one supersedes a lost one).
const OUTGOING: usize = 4096;

/// `notice` on the wire, sent by `origin`.
fn wire_of(origin: &str, notice: &Notice) -> WireNotice {
    WireNotice {
        origin: origin.to_owned(),
        audience: match &notice.audience {
            Audience::Everyone => WireAudience::Everyone,
            Audience::Admins => WireAudience::Admins,
            Audience::User(u) => WireAudience::User(u.clone()),
        },
        channel: notice.channel.to_owned(),
        job_id: notice.job_id.clone(),
        job_kind: notice.job_kind.map(str::to_owned),
        kind: notice.kind.clone(),
        message: notice.message.clone(),
        data: notice.data.clone(),
    }
}

/// The notice, if its channel and job kind are ones this replica knows.
fn notice_of(wire: WireNotice) -> Option<Notice> {
    let channel = CHANNELS.into_iter().find(|c| *c == wire.channel)?;
    let job_kind = match wire.job_kind {
        Some(kind) => Some(JOB_KINDS.into_iter().find(|k| *k == kind)?),
        None => None,
    };
    Some(Notice {
        seq: None,
        audience: match wire.audience {
            WireAudience::Everyone => Audience::Everyone,
            WireAudience::Admins => Audience::Admins,
            WireAudience::User(u) => Audience::User(u),
        },
        channel,
        job_id: wire.job_id,
        job_kind,
        kind: wire.kind,
        message: wire.message,
        data: wire.data,
    })
}

/// Connects `hub` to the other replicas through NATS until the tasks are aborted: it is fed
/// from the stream and the notices subject, sends its own notices there, and resumes SSE
/// clients from the stream.
pub fn connect(hub: &Arc<Hub>, client: &async_nats::Client) -> Vec<tokio::task::JoinHandle<()>> {
    let js = jetstream::new(client.clone());
    hub.use_stream_history(js.clone());
    let origin = uuid::Uuid::new_v4().to_string();
    let (outgoing, mut queue) = mpsc::channel::<Arc<Notice>>(OUTGOING);
    hub.set_remote(outgoing);
    let send = tokio::spawn({
        let (client, origin) = (client.clone(), origin.clone());
        async move {
            while let Some(notice) = queue.recv().await {
                let Ok(bytes) = serde_json::to_vec(&wire_of(&origin, &notice)) else { continue };
                if let Err(e) = client.publish(SUBJECT, bytes.into()).await {
                    tracing::warn!(error = %e, "sending a notice to the other gateways");
                }
            }
        }
    });
    let receive = tokio::spawn({
        let (hub, client) = (Arc::clone(hub), client.clone());
        async move {
            loop {
                match client.subscribe(SUBJECT).await {
                    Ok(mut subscription) => {
                        while let Some(message) = subscription.next().await {
                            match serde_json::from_slice::<WireNotice>(&message.payload) {
                                Ok(wire) if wire.origin == origin => {}
                                Ok(wire) => {
                                    if let Some(notice) = notice_of(wire) {
                                        hub.publish_local(notice);
                                    } else {
                                        tracing::debug!("a notice of a kind this gateway does not know");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "an unreadable notice from another gateway"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "subscribing to the other gateways' notices"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let events = tokio::spawn(feed_events(Arc::clone(hub), js));
    vec![send, receive, events]
}

/// Feeds the hub from the event stream, from the events published after it started;
/// after any failure it resumes right after the last stream sequence it passed on.
async fn feed_events(hub: Arc<Hub>, js: jetstream::Context) {
    let mut last: Option<u64> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow(&hub, &js, &mut last).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "following the event stream");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn follow(hub: &Hub, js: &jetstream::Context, last: &mut Option<u64>) -> Result<(), String> {
    let stream = ensure_stream(js).await?;
    let deliver_policy = match *last {
        Some(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
        None => consumer::DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig { deliver_policy, ..Default::default() })
        .await
        .map_err(|e| format!("creating an ordered consumer: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| format!("reading the stream: {e}"))?;
    // What was published while no consumer read the stream dropped nothing from the cache.
    hub.lost_track();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("reading the stream: {e}"))?;
        let (seq, pending) = pending_of(&message)?;
        if last.is_some_and(|l| seq <= l) {
            continue;
        }
        *last = Some(seq);
        if let Some(pending) = pending {
            hub.relayed(&pending);
        }
    }
    Err("the stream ended".into())
}

/// A stream message's sequence, and its event with the sequence as its place in the
/// history (`None`, logged, for a message that is not an event).
fn pending_of(message: &jetstream::Message) -> Result<(u64, Option<Pending>), String> {
    let seq = message.info().map_err(|e| format!("a message without metadata: {e}"))?.stream_sequence;
    let pending = event_of(&message.payload)
        .map(|event| Pending { seq: i64::try_from(seq).unwrap_or(i64::MAX), event })
        .inspect_err(|e| tracing::warn!(error = %e, seq, "an unreadable event in the stream"))
        .ok();
    Ok((seq, pending))
}

/// Events of the stream after `after`, at most `limit`: what an SSE client missed.
pub async fn history(js: &jetstream::Context, after: i64, limit: usize) -> Result<Vec<Pending>, String> {
    let start = u64::try_from(after).unwrap_or(0) + 1;
    let stream = js.get_stream(STREAM).await.map_err(|e| format!("the event stream: {e}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading the event history: {e}"))?;
    let mut batch =
        consumer.fetch().max_messages(limit).messages().await.map_err(|e| format!("reading the event history: {e}"))?;
    let mut events = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.map_err(|e| format!("reading the event history: {e}"))?;
        events.extend(pending_of(&message)?.1);
    }
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn notices_cross_the_wire_unchanged_and_unknown_kinds_are_dropped() {
        let notice = Notice::job_update("uploads", "alice", "s1", 5, &json!({"uploadedChunks": 1}));
        let wire = serde_json::to_vec(&wire_of("me", &notice)).unwrap();
        let back: WireNotice = serde_json::from_slice(&wire).unwrap();
        assert_eq!(back.origin, "me");
        let back = notice_of(back).unwrap();
        assert_eq!(back.audience, Audience::User("alice".into()));
        assert_eq!(
            (back.channel, back.job_kind, back.job_id.as_deref()),
            ("notifications", Some("uploads"), Some("s1"))
        );
        assert_eq!(back.message, notice.message);
        let mut odd = wire_of("me", &notice);
        odd.job_kind = Some("teleports".into());
        assert!(notice_of(odd).is_none());
    }
}
