//! One kube-runtime controller per resource, each in its own folder. A reconcile is a
//! pipeline: read what the object refers to, validate it, build the objects it produces
//! (pure `build_*` functions returning typed objects, in `build.rs`), apply them with
//! server-side apply under the controller's field manager, and write status through the
//! status subresource. A step that finds the object cannot progress returns
//! [`crate::context::Refused`], which the status step turns into a condition and an Event.

pub mod platform;
pub mod release;
pub mod retention;
pub mod shards;
pub mod shared;
pub mod tier;
pub mod webhook;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod testkit;
