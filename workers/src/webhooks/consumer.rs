//! The durable consumer that turns the event stream (see `vellum_jetstream`) into webhook
//! deliveries. It acknowledges an event only once its deliveries are in the log; an event
//! it never acknowledges is redelivered.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use vellum_jetstream::{ensure_stream, event_of};

use super::delivery::Engine;

/// The durable consumer webhook workers share.
pub const WEBHOOK_CONSUMER: &str = "vellum-webhooks";

/// Consumes the stream durably into the webhook delivery log until `stop` resolves,
/// reconnecting (with backoff) whenever NATS goes away.
pub async fn consume_into_webhooks(
    js: jetstream::Context,
    engine: Engine,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let run = consume_once(&js, &engine);
        tokio::select! {
            () = &mut stop => return,
            result = run => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, retry_in = ?backoff, "consuming events for webhooks");
                }
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn consume_once(js: &jetstream::Context, engine: &Engine) -> Result<(), String> {
    let stream = ensure_stream(js).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            WEBHOOK_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(WEBHOOK_CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("creating the consumer {WEBHOOK_CONSUMER}: {e}"))?;
    let mut messages = consumer
        .stream()
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| format!("pulling from {WEBHOOK_CONSUMER}: {e}"))?;
    tracing::info!(consumer = WEBHOOK_CONSUMER, "consuming events for webhooks");
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("reading from {WEBHOOK_CONSUMER}: {e}"))?;
        match event_of(&message.payload) {
            Ok(event) => {
                // Not acknowledged on failure: JetStream redelivers after ack_wait.
                engine.ingest(&event).await.map_err(|e| format!("queueing webhook deliveries: {e}"))?;
            }
            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "skipping a malformed event"),
        }
        message.ack().await.map_err(|e| format!("acknowledging an event: {e}"))?;
    }
    Err("the message stream ended".into())
}
