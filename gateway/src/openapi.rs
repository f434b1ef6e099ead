//! The OpenAPI document of the API, served at `/openapi.json`. It is built from the same
//! route registrations that serve requests (`utoipa_axum`'s `OpenApiRouter`), so a route
//! cannot be served without being documented, nor documented without being served.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, documents, health, metrics, realtime, storage, tus, uploads, webhooks};

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
        .nest("/api/v1/storage", storage::storage_router())
        .nest("/api/v1/upload", uploads::router())
        .nest("/api/v1/tus", tus::router())
        .nest("/api/v1/webhooks", webhooks::router())
        .nest("/api/v1/websocket", realtime::router())
        .routes(utoipa_axum::routes!(realtime::sse))
        .merge(realtime::sockets_router())
        .merge(health::router())
        .merge(metrics::router())
}

/// Adds to every operation the answers the server gives it whatever the route: 431 for an
/// oversized head, 401 and 429 where a token is needed, 400 for malformed parameters or bodies, 404 where the path
/// names something, 503 where it names a document (a resharding may be moving it),
/// 413/415/422 for JSON bodies, 413/503 for uploads, 412 for tus. A
/// route's own description of one of them is kept.
pub fn complete(spec: &mut utoipa::openapi::OpenApi, max_upload: u64) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    name_rules(spec);
    upload_limit(spec, max_upload);
    seed_paths(spec);
    unique_operation_ids(spec);
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    for (path, item) in &mut spec.paths.paths {
        for operation in operations(item) {
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
            }
            // Every route but the probes refuses an address past its budget of failed token
            // checks (limits::guard); a token's user has a rate limit too.
            answers.push(("431", "More than 100 header fields, or more than 64 KiB of them"));
            if !crate::health::PROBES.contains(&path.as_str()) {
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
            if (path.contains("{id}") && (path.contains("/documents/") || path.contains("/storage/")))
                || (path.contains('{') && path.contains("/links/"))
            {
                answers.push((
                    "503",
                    "The document is being handed over between metadata shards, or was handed to a shard this \
                     replica has not loaded yet; see Retry-After",
                ));
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
                answers.push(("415", "Bytes not sent as application/offset+octet-stream"));
            }
            for (status, description) in answers {
                operation.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            }
        }
    }
}

/// The seed's path prefixes, which the same document and webhook routes answer under
/// (`/api/documents/…`, `/api/webhooks/…`, as the README uses them): documented there too,
/// each operation under an id of its own.
fn seed_paths(spec: &mut utoipa::openapi::OpenApi) {
    let aliases: Vec<(String, utoipa::openapi::PathItem)> = spec
        .paths
        .paths
        .iter()
        .filter_map(|(path, item)| {
            let alias = path
                .strip_prefix("/api/v1/documents")
                .map(|rest| format!("/api/documents{rest}"))
                .or_else(|| path.strip_prefix("/api/v1/webhooks").map(|rest| format!("/api/webhooks{rest}")))?;
            let mut item = item.clone();
            for operation in operations(&mut item) {
                if let Some(id) = operation.operation_id.as_mut() {
                    id.push_str("_seed_path");
                }
            }
            Some((alias, item))
        })
        .collect();
    spec.paths.paths.extend(aliases);
}

/// Gives each operation an id of its own, as OpenAPI requires: a handler serving several
/// methods (`PUT` and `POST` of a chunk) names all its operations alike, and the later ones
/// get the method appended.
fn unique_operation_ids(spec: &mut utoipa::openapi::OpenApi) {
    let mut seen = std::collections::HashSet::new();
    for item in spec.paths.paths.values_mut() {
        for (method, operation) in named_operations(item) {
            if let Some(id) = operation.operation_id.as_mut()
                && !seen.insert(id.clone())
            {
                id.push('_');
                id.push_str(method);
                seen.insert(id.clone());
            }
        }
    }
}

/// Says the replica's upload limit where a size is declared up front: a chunked session's
/// `totalSize` and tus' `Upload-Length`.
fn upload_limit(spec: &mut utoipa::openapi::OpenApi, max_upload: u64) {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::{RefOr, path::ParameterIn};
    let limit = Some(utoipa::Number::UInt(usize::try_from(max_upload).unwrap_or(usize::MAX)));
    if let Some(RefOr::T(Schema::Object(initiate))) =
        spec.components.as_mut().and_then(|c| c.schemas.get_mut("Initiate"))
        && let Some(RefOr::T(Schema::Object(total))) = initiate.properties.get_mut("totalSize")
    {
        total.maximum.clone_from(&limit);
    }
    for parameter in parameters(spec) {
        if parameter.name == "Upload-Length"
            && parameter.parameter_in == ParameterIn::Header
            && let Some(RefOr::T(Schema::Object(length))) = parameter.schema.as_mut()
        {
            length.maximum.clone_from(&limit);
        }
    }
}

/// Gives every `filename` property the pattern of the rule core checks file names with, and
/// every `tags` list the pattern of the tag rule: one rule, written once, in core.
fn name_rules(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::{ArrayItems, Schema};
    use utoipa::openapi::{RefOr, Type};
    use vellum_core::documents::{FILENAME_PATTERN, TAG_PATTERN};
    fn visit(schema: &mut RefOr<Schema>) {
        let RefOr::T(Schema::Object(object)) = schema else { return };
        for (name, property) in &mut object.properties {
            match (name.as_str(), property) {
                ("filename", RefOr::T(Schema::Object(text))) => text.pattern = Some(FILENAME_PATTERN.to_owned()),
                ("tags", RefOr::T(Schema::Array(list))) => {
                    if let ArrayItems::RefOrSchema(item) = &mut list.items
                        && let RefOr::T(Schema::Object(tag)) = item.as_mut()
                        && tag.schema_type == Type::String.into()
                    {
                        tag.pattern = Some(TAG_PATTERN.to_owned());
                    }
                }
                (_, property) => visit(property),
            }
        }
    }
    if let Some(components) = spec.components.as_mut() {
        components.schemas.values_mut().for_each(visit);
    }
    // File names given as query parameters (raw-body uploads and versions).
    for parameter in parameters(spec) {
        if parameter.name == "filename"
            && let Some(RefOr::T(Schema::Object(text))) = parameter.schema.as_mut()
        {
            text.pattern = Some(FILENAME_PATTERN.to_owned());
        }
    }
}

/// The operations of a path.
fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    named_operations(item).map(|(_, operation)| operation)
}

/// The operations of a path, each with its method's name.
fn named_operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("options", &mut item.options),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|operation| (method, operation)))
}

/// Every parameter the document describes inline, of every operation.
fn parameters(spec: &mut utoipa::openapi::OpenApi) -> impl Iterator<Item = &mut utoipa::openapi::path::Parameter> {
    spec.paths.paths.values_mut().flat_map(operations).flat_map(|op| op.parameters.iter_mut().flatten()).filter_map(
        |parameter| match parameter {
            utoipa::openapi::RefOr::T(parameter) => Some(parameter),
            utoipa::openapi::RefOr::Ref(_) => None,
        },
    )
}
