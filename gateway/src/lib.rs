//! The gateway application clients use: the documents API, the webhook façade and real-time
//! notifications over WebSocket and SSE, authenticated by JWT.
//!
//! Nothing is served yet; the documents API comes first.
#![warn(clippy::unwrap_used)]
