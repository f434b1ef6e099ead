//! The Vellum operator: kube-runtime controllers that provision a document platform from
//! its custom resources, and the generated manifests that install it.
#![warn(clippy::unwrap_used)]

pub mod context;
pub mod controllers;
pub mod manifests;
pub mod metrics;
pub mod run;
