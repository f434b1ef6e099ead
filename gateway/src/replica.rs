//! `vellum-gateway serve`: one gateway replica of a cluster. It serves the HTTP API, fans
//! events out to its real-time clients from the JetStream stream (so every replica's clients
//! see every event), and reloads the platform config the operator compiles. It neither
//! relays the outbox nor delivers webhooks: `vellum-workers run` does both, once for the
//! whole platform (see [`crate::standalone`] for the one process that runs every role).

use crate::standalone::{Options, Role, Running, StartError, launch};

/// Starts a replica and returns once it serves; `options.nats_url` is required.
pub async fn start(options: Options) -> Result<Running, StartError> {
    launch(options, Role::Replica).await
}
