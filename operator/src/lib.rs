//! The Vellum operator: kube-runtime controllers for the five Vellum resources, and the
//! generators of the manifests that install it.
//!
//! Only the manifest generators exist so far; the controllers follow.
#![warn(clippy::unwrap_used)]

pub mod manifests;
