//! Vellum's asynchronous work: the outbox relay, webhook delivery, tier migration,
//! retention runs and shard rebalancing.
//!
//! None of it runs yet; the outbox relay and webhook delivery come first.
#![warn(clippy::unwrap_used)]
