//! Vellum's asynchronous work: the outbox relay, webhook delivery (`webhooks`), retention
//! runs and tier drains (`retention`).
//!
//! The delivery engine is a library so that standalone mode runs it inside the gateway
//! process, on the same code path as `vellum-workers run` in a cluster.
#![warn(clippy::unwrap_used)]

pub mod announce;
pub mod metrics;
pub mod retention;
pub mod run;
pub mod webhooks;

use futures::future::BoxFuture;
use vellum_core::events::{Pending, Sink};

pub use webhooks::{Configured, Engine, Sender, Settings, configured_endpoints};

/// The relay's sink in standalone mode: events become webhook deliveries (durably, before
/// the outbox marks them published) and then go to the in-process bus.
#[derive(Clone, Debug)]
pub struct LocalSink {
    pub engine: Engine,
    pub bus: vellum_core::events::Bus,
}

impl Sink for LocalSink {
    fn publish<'a>(&'a self, batch: &'a [Pending]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            for pending in batch {
                self.engine.ingest(&pending.event).await.map_err(|e| format!("queueing webhook deliveries: {e}"))?;
            }
            self.bus.publish(batch).await
        })
    }
}
