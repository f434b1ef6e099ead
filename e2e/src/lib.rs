//! End-to-end tests of Vellum, driven the way a platform team drives it: `kubectl apply`
//! of the YAML in `manifests/` against the cluster `KUBECONFIG` names. They arrive with
//! the Kubernetes API simulator that lets them run on a machine without a cluster; the test
//! kit they and every integration test use lives in `e2e/testkit`.
#![warn(clippy::unwrap_used)]
