//! vellum-node: a node of a real Kubernetes control plane, for a machine without a container
//! runtime. It is the kubelet ([`kubelet`]) that runs the pods the scheduler binds to it as
//! local processes, a client of the API server as `system:node:<name>` ([`node`]), and the
//! service proxy ([`services`]) that forwards each Service's cluster IP to its ready
//! endpoints. `scripts/cluster up` starts one beside the control plane it builds from the
//! Kubernetes sources; the end-to-end suite runs on that cluster.

pub mod kubelet;
pub mod meta;
pub mod network;
pub mod node;
pub mod services;
pub mod status;

pub use kubelet::{ImageRule, Kubelet, Runtime};
