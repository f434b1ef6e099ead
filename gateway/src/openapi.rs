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

/// Adds to every operation the answers the server gives it whatever the route: 401 and 429
/// where a token is needed, 400 for malformed parameters or bodies, 404 where the path
/// names something, 413/415/422 for JSON bodies, 413/503 for uploads, 412 for tus. A
/// route's own description of one of them is kept.
pub fn complete(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    for (path, item) in &mut spec.paths.paths {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.head,
            &mut item.patch,
            &mut item.options,
        ];
        for operation in operations.into_iter().flatten() {
            let secured = operation.security.as_ref().is_none_or(|requirements| {
                requirements.iter().any(|r| serde_json::to_value(r).is_ok_and(|v| v != serde_json::json!({})))
            });
            let body_types: Vec<String> = match &operation.request_body {
                Some(utoipa::openapi::RefOr::T(body)) => body.content.keys().cloned().collect(),
                _ => Vec::new(),
            };
            let json_body = body_types.iter().any(|t| t == "application/json");
            let upload = body_types.iter().any(|t| t != "application/json");
            let mut answers: Vec<(&str, &str)> = Vec::new();
            if secured {
                answers.push(("401", "No token, or one that does not verify"));
                answers.push((
                    "429",
                    "Over the user's rate limit, or too many failed token checks from this address; see Retry-After",
                ));
            }
            if operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
                || !body_types.is_empty()
                || path.contains('{')
            {
                answers.push(("400", "A malformed parameter or body"));
            }
            if path.contains('{') {
                answers.push(("404", "No such thing, or not the caller's"));
            }
            if json_body {
                answers.push(("413", "The body is larger than 1 MiB"));
                answers.push(("415", "The body is not JSON (Content-Type: application/json)"));
                answers.push(("422", "The JSON does not have the expected shape"));
            }
            if upload {
                answers.push(("413", "Larger than the upload limit"));
                answers.push(("503", "The replica is taking as many uploads as it may; see Retry-After"));
            }
            if path.starts_with("/api/v1/tus") {
                answers.push(("412", "Tus-Resumable names another protocol version"));
            }
            for (status, description) in answers {
                operation.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            }
        }
    }
}
