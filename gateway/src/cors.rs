//! Cross-origin requests from browser front ends served from another origin (a React or
//! plain JavaScript page on `http://localhost:3000` calling the API and SockJS): the
//! origins allowed are configuration (`--cors-origin`), none by default.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower::ServiceExt as _;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Request headers the API reads, beyond those a browser always allows.
const ALLOWED: [&str; 17] = [
    "authorization",
    "content-type",
    "if-match",
    "if-none-match",
    "last-event-id",
    "range",
    "x-request-id",
    "x-requested-with",
    "x-filename",
    "x-chunk-checksum",
    "x-http-method-override",
    "tus-resumable",
    "upload-length",
    "upload-offset",
    "upload-metadata",
    "upload-defer-length",
    "upload-checksum",
];

/// Response headers a page's script may read: the tus protocol's, where a new document is,
/// and what a retry or a conditional write needs.
const EXPOSED: [&str; 14] = [
    "location",
    "etag",
    "retry-after",
    "content-disposition",
    "x-request-id",
    "vellum-document-id",
    "upload-offset",
    "upload-length",
    "upload-expires",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "tus-checksum-algorithm",
];

/// How long a browser may keep a preflight's answer.
const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Why an allowed origin was refused.
#[derive(Debug, thiserror::Error)]
#[error("--cors-origin {origin:?}: {reason}")]
pub struct OriginError {
    origin: String,
    reason: &'static str,
}

/// The origins, checked: each `http` or `https`, a host and an optional port, nothing
/// after (a trailing `/` is dropped), compared as browsers send them (lower case).
///
/// # Errors
/// An origin that is not one, or `*` (credentials are allowed, which no wildcard may be).
pub fn parse_origins(origins: &[String]) -> Result<Vec<HeaderValue>, OriginError> {
    origins.iter().map(|origin| parse_origin(origin)).collect()
}

fn parse_origin(origin: &str) -> Result<HeaderValue, OriginError> {
    let refuse = |reason| OriginError { origin: origin.to_owned(), reason };
    if origin.trim() == "*" {
        return Err(refuse("a wildcard cannot be allowed with credentials: list the origins"));
    }
    let trimmed = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, authority)) = trimmed.split_once("://") else {
        return Err(refuse("an origin is scheme://host[:port], such as http://localhost:3000"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(refuse("the scheme must be http or https"));
    }
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(refuse("an origin is scheme://host[:port], with no path, query or user"));
    }
    let uri: axum::http::Uri = trimmed.parse().map_err(|_| refuse("not a valid origin"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(refuse("the origin has no host"));
    }
    HeaderValue::from_str(&trimmed).map_err(|_| refuse("not a valid header value"))
}

/// The CORS layer for `origins` (already checked).
fn layer(origins: Vec<HeaderValue>) -> CorsLayer {
    let names = |list: &[&'static str]| list.iter().map(|h| HeaderName::from_static(h)).collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(names(&ALLOWED))
        .expose_headers(names(&EXPOSED))
        .max_age(MAX_AGE)
}

/// `router` answering the `origins` cross-origin: preflights, and the CORS headers on
/// every answer to an allowed origin. An `OPTIONS` request that is not a preflight (a tus
/// client asking what the server supports) still reaches the API.
pub fn allow(router: Router, origins: Vec<HeaderValue>) -> Router {
    if origins.is_empty() {
        return router;
    }
    let with_cors = router.clone().layer(layer(origins));
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let cross_origin = request.method() != Method::OPTIONS
            || request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let service = if cross_origin { with_cors.clone() } else { router.clone() };
        async move { service.oneshot(request).await }
    }))
}
