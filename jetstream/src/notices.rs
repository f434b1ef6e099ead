//! Notices that are not events (job progress, admin broadcasts, a resharding's progress),
//! on a core NATS subject every gateway replica listens to and relays to its WebSocket,
//! STOMP and SSE clients. Any process may send one: a gateway tags its own (it has already
//! told its clients), the workers' commands send theirs under an origin of their own.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The core NATS subject of notices.
pub const SUBJECT: &str = "vellum.notices";

/// A notice on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireNotice {
    /// Who sent it: a gateway drops its own.
    pub origin: String,
    pub audience: WireAudience,
    /// `documents`, `notifications`, `webhooks` or `migrations`: what a client subscribes to.
    pub channel: String,
    pub job_id: Option<String>,
    pub job_kind: Option<String>,
    /// The message's `type`.
    pub kind: String,
    /// The JSON the WebSocket JSON protocol sends (and a STOMP `MESSAGE`'s body).
    pub message: Value,
    pub data: Value,
}

/// Who may receive a notice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "to", content = "user")]
pub enum WireAudience {
    Everyone,
    Admins,
    User(String),
}

/// Sends `notice` to every gateway replica.
///
/// # Errors
/// When the notice cannot be encoded or NATS does not take it.
pub async fn send(client: &async_nats::Client, notice: &WireNotice) -> Result<(), String> {
    let bytes = serde_json::to_vec(notice).map_err(|e| e.to_string())?;
    client.publish(SUBJECT, bytes.into()).await.map_err(|e| e.to_string())
}
