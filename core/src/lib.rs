//! Vellum's shared domain, used by the gateway, the workers and the operator alike: the
//! platform config model and its compiler, the metadata store, the event model and bus,
//! storage tiers over `object_store`, and signing. It knows no HTTP server and no
//! Kubernetes client.
//!
//! The API types it builds on live in `vellum-crds`, re-exported here as [`crds`].
#![warn(clippy::unwrap_used)]

pub use vellum_crds as crds;

pub mod blob;
pub mod bulk;
pub mod clock;
pub mod config;
pub mod documents;
pub mod events;
pub mod js_json;
pub mod process;
pub mod resharding;
pub mod retention;
pub mod routing;
pub mod signing;
pub mod store;
pub mod uploads;
pub mod webhooks;
