//! SockJS under `/ws`, as the seed front ends open it (`new SockJS('/ws')` carrying STOMP):
//! the `info` answer and the websocket transports (`/ws/{server}/{session}/websocket` with
//! SockJS framing, `/ws/websocket` without). See <https://github.com/sockjs/sockjs-protocol>.
//! The HTTP streaming and polling fallbacks are not served: `info` says websocket is
//! available, and a client offered only those transports gets 404.

use std::sync::Arc;

use axum::Json;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::realtime::{optional_actor, sized};
use crate::stomp::{self, Framing};

/// `GET /ws/info`: what the client may use.
pub async fn info() -> Response {
    let body = json!({
        "websocket": true,
        "origins": ["*:*"],
        "cookie_needed": false,
        "entropy": rand::random::<u32>(),
    });
    ([(header::CACHE_CONTROL, "no-store, no-cache, no-transform, must-revalidate, max-age=0")], Json(body))
        .into_response()
}

/// `GET /ws/{server}/{session}/websocket`: STOMP in SockJS frames.
pub async fn websocket(
    State(state): State<AppState>,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // The protocol's ids: no dots, not empty.
    if [&server, &session].iter().any(|id| id.is_empty() || id.contains('.')) {
        return Err(ApiError::not_found("no such SockJS session address"));
    }
    upgraded(&state, &headers, &uri, upgrade, Framing::SockJs)
}

/// `GET /ws/websocket`: STOMP over a plain WebSocket, the SockJS "raw" endpoint.
pub async fn raw_websocket(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    upgraded(&state, &headers, &uri, upgrade, Framing::Raw)
}

fn upgraded(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    upgrade: WebSocketUpgrade,
    framing: Framing,
) -> Result<Response, ApiError> {
    let actor = optional_actor(state, headers, uri)?;
    let (hub, auth) = (Arc::clone(&state.hub), Arc::clone(&state.auth));
    Ok(sized(upgrade).on_upgrade(move |socket| stomp::session(socket, framing, hub, auth, actor)))
}
