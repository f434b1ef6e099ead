//! The OpenAPI document of the API, served at `/openapi.json`. It is built from the same
//! route registrations that serve requests (`utoipa_axum`'s `OpenApiRouter`), so a route
//! cannot be served without being documented, nor documented without being served.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, documents, health, lifecycle, metrics, realtime, tus, uploads, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Vellum gateway API",
        description = "Documents: upload (one request, chunked sessions or tus 1.0), version, download with \
            Range and ETag, search, delete, legal hold, signed links. Errors answer a JSON body with status, \
            error and message. The same document and webhook routes also answer under /api/documents and /api/webhooks.",
    ),
    modifiers(&BearerJwt),
    security(("bearer" = [])),
    components(schemas(crate::error::ErrorBody)),
)]
struct ApiDoc;

/// JWT bearer tokens (HS256, RS256 or ES256) with `sub`, `exp` and `roles`.
struct BearerJwt;

impl Modify for BearerJwt {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// Every documented route, with the OpenAPI document they make.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1/documents", documents::router())
        .nest("/api/v1/links", documents::links_router())
        .nest("/api/v1/storage", lifecycle::storage_router())
        .nest("/api/v1/upload", uploads::router())
        .nest("/api/v1/tus", tus::router())
        .nest("/api/v1/webhooks", webhooks::router())
        .nest("/api/v1/websocket", realtime::router())
        .routes(utoipa_axum::routes!(realtime::sse))
        .merge(health::router())
        .merge(metrics::router())
}
