//! The Vellum gateway: the HTTP API application clients use. [`app`] builds the router
//! (tests call it without a socket); [`standalone`] runs it on the embedded defaults.
#![warn(clippy::unwrap_used)]

pub mod auth;
pub mod bulk;
pub mod cache;
pub mod cluster;
pub mod content;
pub mod cors;
pub mod documents;
pub mod error;
pub mod extract;
pub mod fault;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod realtime;
pub mod replica;
pub mod serve;
pub mod sockjs;
pub mod standalone;
pub mod stomp;
pub mod storage;
pub mod tus;
pub mod uploads;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::IntoResponse;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use vellum_core::documents::Library;

use crate::auth::Auth;
use crate::error::ApiError;

/// Everything a handler needs: one shared allocation, so that the clones axum makes for
/// every request (each extractor and middleware takes its own) are one reference count,
/// not one per field.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
#[derive(Debug)]
pub struct Shared {
    /// The documents on every shard, swapped whole when the routing changes (a resharding
    /// begins or flips): a request keeps the library it started with.
    pub library: Arc<std::sync::RwLock<Arc<Library>>>,
    pub auth: Arc<Auth>,
    /// Key of the HMAC that signs download links.
    pub link_key: Arc<[u8]>,
    /// The URL clients reach this gateway at, for the links it hands out.
    pub public_url: Arc<str>,
    pub metrics: Arc<metrics::Metrics>,
    pub webhooks: Arc<webhooks::WebhookService>,
    /// Real-time notifications: what WebSocket and SSE clients read.
    pub hub: Arc<realtime::Hub>,
    /// The platform config in use, swapped whole when it changes.
    pub platform: Arc<std::sync::RwLock<Arc<vellum_core::config::PlatformConfig>>>,
    /// SockJS HTTP sessions (the streaming and polling fallbacks).
    pub sockjs: Arc<sockjs::Sessions>,
    /// Upload places and the failed-token budget of client addresses.
    pub admission: Arc<limits::Admission>,
    /// `/metrics` has a listen address of its own, and the API's answers it 404.
    pub metrics_elsewhere: bool,
    /// Origins whose pages may call the API from a browser (none: no CORS headers).
    pub cors_origins: Vec<axum::http::HeaderValue>,
    /// Wakes this replica's bulk job runner when a job is started here.
    pub bulk: Arc<tokio::sync::Notify>,
    /// The documents and version lists this gateway answered lately.
    pub cache: Arc<cache::MetadataCache>,
}

impl Shared {
    /// The documents as they are routed now.
    pub fn docs(&self) -> Arc<Library> {
        Arc::clone(&self.library.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Replaces the library, after the routing changed.
    pub fn set_docs(&self, library: Library) {
        *self.library.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(library);
    }

    /// The platform config as it is now.
    pub fn platform(&self) -> Arc<vellum_core::config::PlatformConfig> {
        Arc::clone(&self.platform.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Replaces the platform config, after a reload.
    pub fn set_platform(&self, config: vellum_core::config::PlatformConfig) {
        *self.platform.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole HTTP API.
pub fn app(state: AppState) -> Router {
    let (api, mut spec) = openapi::routes().split_for_parts();
    openapi::complete(&mut spec, state.docs().max_upload());
    let spec = Arc::new(spec);
    let cors_origins = state.cors_origins.clone();
    let router = Router::new()
        .merge(api)
        // The seed's clients call `/api/documents/...`; the same routes answer there.
        .nest("/api/documents", documents::router().into())
        .nest("/api/webhooks", webhooks::router().into())
        // SockJS's session transports (its entry points, /ws and the job-status endpoints
        // are documented routes, in openapi::routes).
        .route("/ws/{server}/{session}/websocket", axum::routing::get(sockjs::websocket))
        .route("/ws/{server}/{session}/xhr_streaming", axum::routing::post(sockjs::xhr_streaming))
        .route("/ws/{server}/{session}/xhr", axum::routing::post(sockjs::xhr_polling))
        .route("/ws/{server}/{session}/xhr_send", axum::routing::post(sockjs::xhr_send))
        .route("/openapi.json", axum::routing::get(move || std::future::ready(axum::Json(Arc::clone(&spec)))))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), per_route))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state.admission), limits::guard))
        .with_state(state);
    // The layers every request passes, stacked around the router as one service rather
    // than each wrapped around every route (each of those costs an allocation and a boxed
    // future per request).
    let stack = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .layer(axum::extract::DefaultBodyLimit::max(limits::MAX_JSON_BYTES))
        .service(router);
    let router = Router::new().fallback_service(stack);
    // Outermost: an answer refused by a layer above (429, 503) still reaches the page.
    cors::allow(router, cors_origins)
}

/// Middleware on every matched route: records the request in the metrics, answers the
/// injected faults of debug builds (counted like any other answer), and drops a document
/// the request may have changed from the metadata cache once it is answered.
async fn per_route(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let timing = metrics::Timing::start(&request);
    let response = if let Some(refused) = fault::refusal(&request) {
        refused
    } else {
        let changed = documents::changed_document(&request);
        let response = next.run(request).await;
        if let Some(id) = changed {
            state.cache.forget(id);
        }
        response
    };
    timing.finish(&state.metrics, &response);
    response
}

/// How long graceful shutdown waits for in-flight requests (uploads) to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
