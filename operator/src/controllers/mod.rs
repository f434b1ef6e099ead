//! One kube-runtime controller per resource. Each reconcile builds the desired objects with
//! the pure functions of [`crate::builders`], applies them with server-side apply under the
//! controller's field manager, and writes status through the status subresource.

pub mod release;
pub mod retention;
pub mod shards;
pub mod tier;
pub mod webhook;
