//! End-to-end tests and the test kit.
