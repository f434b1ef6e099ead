//! Webhook delivery: the durable consumer that turns the event stream into deliveries
//! (`consumer`), the engine that works the delivery log with one dispatcher per endpoint
//! (`delivery`), and the sender of one signed request (`sender`). The rules that pick the
//! endpoints of an event and the delivery log's store live in `vellum_core::webhooks`; the
//! webhook API is the gateway's.

pub mod consumer;
pub mod delivery;
pub mod sender;

use vellum_core::config::{PlatformConfig, SecretBundle};
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
