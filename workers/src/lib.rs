//! Vellum's asynchronous work: the outbox relay, webhook delivery, and (to come) tier
//! migration, retention runs and shard rebalancing.
//!
//! The delivery engine is a library so that standalone mode runs it inside the gateway
//! process, on the same code path as `vellum-workers run` in a cluster.
#![warn(clippy::unwrap_used)]

pub mod delivery;
pub mod metrics;
pub mod nats;
pub mod retention;
pub mod run;
pub mod sender;

use futures::future::BoxFuture;
use vellum_core::config::{PlatformConfig, SecretBundle};
use vellum_core::events::{Pending, Sink};
use vellum_core::signing::parse_signing_key;

pub use delivery::{Configured, Engine, Settings};
pub use sender::Sender;

/// The endpoints of a compiled platform config, with their signing keys.
pub fn configured_endpoints(config: &PlatformConfig, secrets: &SecretBundle) -> Vec<Configured> {
    config
        .webhooks
        .iter()
        .filter_map(|(name, webhook)| {
            // The compiler has checked that the key is present and parses.
            let key = secrets.get(&webhook.signing_key).and_then(|v| parse_signing_key(v.expose()).ok())?;
            Some(Configured { name: name.clone(), config: webhook.clone(), key })
        })
        .collect()
}

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
