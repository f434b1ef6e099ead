//! `/api/v1/tus`: the tus 1.0 resumable upload protocol, so that unmodified tus clients
//! upload to Vellum. Core protocol plus the creation (and creation-with-upload),
//! termination, checksum (`sha256`) and expiration extensions.
//!
//! `POST /api/v1/tus` creates an upload (`Upload-Length`, optional `Upload-Metadata` with
//! `filename`, `filetype`, `title`, `description`, `tags`), `HEAD /api/v1/tus/{id}` tells its
//! offset, `PATCH` appends at `Upload-Offset`, `DELETE` terminates. The request that brings
//! the last byte creates the document; its id is in the `Vellum-Document-Id` header, then
//! on every `HEAD`. `X-HTTP-Method-Override` is honoured on `POST`.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::documents::{Actor, DocError};
use vellum_core::uploads::tus::{self, TusUpload};

use crate::AppState;
use crate::auth::User;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::limits::UploadPlace;

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
const UPLOAD_CHECKSUM: HeaderName = HeaderName::from_static("upload-checksum");
const DOCUMENT_ID: HeaderName = HeaderName::from_static("vellum-document-id");
const OFFSET_STREAM: &str = "application/offset+octet-stream";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, options))
        .routes(routes!(overridden, head, patch, terminate, upload_options))
        .layer(axum::middleware::map_response(|mut response: Response| async move {
            response.headers_mut().insert(TUS_RESUMABLE, HeaderValue::from_static(tus::VERSION));
            response
        }))
        .layer(DefaultBodyLimit::disable())
}

/// The protocol version every tus request but `OPTIONS` names: the only one spoken here.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described, never built: requests are checked by `check_version`
enum TusResumable {
    #[serde(rename = "1.0.0")]
    V1,
}

/// The methods a `POST` may stand for.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)] // described, never built
enum MethodOverride {
    PATCH,
    HEAD,
    DELETE,
}

/// What a tus client's checksum mismatch answers (the checksum extension's own status).
fn tus_error(e: DocError) -> ApiError {
    match e {
        DocError::ChecksumMismatch(message) => {
            ApiError::new(StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST), message)
        }
        other => other.into(),
    }
}

/// Every request but `OPTIONS` names the protocol version; another one answers 412.
fn check_version(headers: &HeaderMap) -> ApiResult<()> {
    match headers.get(&TUS_RESUMABLE).map(HeaderValue::as_bytes) {
        Some(v) if v == tus::VERSION.as_bytes() => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("this server speaks tus {}; Tus-Resumable named another version", tus::VERSION),
        )
        .with_header(HeaderName::from_static("tus-version"), tus::VERSION)),
        None => Err(ApiError::bad_request(format!("a tus request carries Tus-Resumable: {}", tus::VERSION))),
    }
}

fn number(headers: &HeaderMap, name: &HeaderName) -> ApiResult<Option<u64>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request(format!("{name} must be a non-negative integer")))
        })
        .transpose()
}

fn text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> ApiResult<Option<&'h str>> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| ApiError::bad_request(format!("{name} is not valid text"))))
        .transpose()
}

fn expires(upload: &TusUpload) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(upload.expires_at_ms).unwrap_or(0));
    httpdate::fmt_http_date(at)
}

/// The headers that describe an upload's progress.
fn progress(upload: &TusUpload, response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(upload.offset));
    if let Some(id) = upload.document_id {
        headers.insert(DOCUMENT_ID, HeaderValue::from(id));
    } else if let Ok(v) = HeaderValue::from_str(&expires(upload)) {
        headers.insert(UPLOAD_EXPIRES, v);
    }
}

/// Whether a request's body is upload bytes (`Content-Type: application/offset+octet-stream`).
fn carries_bytes(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == OFFSET_STREAM.as_bytes())
}

fn body_stream(body: Body) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin + Send {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

const TAG: &str = "tus uploads";

#[utoipa::path(options, path = "/{id}", tag = TAG, summary = "What this server supports", security(()),
    params(("id" = String, Path)), responses((status = 204)))]
async fn upload_options(state: State<AppState>) -> Response {
    options(state).await
}

/// `OPTIONS`: what this server supports.
#[utoipa::path(options, path = "/", tag = TAG, summary = "What this server supports", security(()),
    responses((status = 204, headers(("Tus-Version" = String), ("Tus-Extension" = String), ("Tus-Max-Size" = u64),
        ("Tus-Checksum-Algorithm" = String)))))]
async fn options(State(state): State<AppState>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static("tus-version"), HeaderValue::from_static(tus::VERSION));
    headers.insert(HeaderName::from_static("tus-extension"), HeaderValue::from_static(tus::EXTENSIONS));
    headers.insert(HeaderName::from_static("tus-max-size"), HeaderValue::from(state.docs().max_upload()));
    headers
        .insert(HeaderName::from_static("tus-checksum-algorithm"), HeaderValue::from_static(tus::CHECKSUM_ALGORITHMS));
    response
}

/// `POST`: creates an upload; with an `application/offset+octet-stream` body, also takes
/// its first bytes.
#[utoipa::path(post, path = "/", tag = TAG, summary = "Create an upload (and, with a body, send its first bytes)",
    params(("Tus-Resumable" = inline(TusResumable), Header), ("Upload-Length" = u64, Header),
        ("Upload-Metadata" = Option<String>, Header, nullable = false,
            description = "filename, filetype, title, description, tags"),
        ("Upload-Checksum" = Option<String>, Header, nullable = false, description = "sha256 <base64>",
            pattern = r"^[Ss][Hh][Aa]256 +[A-Za-z0-9+/]{43}=$",
            example = "sha256 47DEQpj8HBSa+/TImW+5JFeuQeRkm5NMpJWZG3hSuFU=")),
    request_body(content = [u8], content_type = "application/offset+octet-stream"),
    responses((status = 201, description = "Location names the upload", headers(("Location" = String),
        ("Upload-Offset" = u64), ("Upload-Expires" = String))),
        (status = 400, body = ErrorBody), (status = 412, description = "Another tus version", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 460, description = "The first bytes do not match Upload-Checksum", body = ErrorBody)))]
async fn create(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    request: Request,
) -> ApiResult<Response> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    check_version(headers)?;
    if headers.contains_key(HeaderName::from_static("upload-defer-length")) {
        return Err(ApiError::bad_request("Upload-Defer-Length is not supported: send Upload-Length"));
    }
    let length = number(headers, &UPLOAD_LENGTH)?.ok_or_else(|| ApiError::bad_request("Upload-Length is required"))?;
    let metadata = text(headers, &UPLOAD_METADATA)?;
    let mut upload = state.docs().tus_create(&actor, length, metadata).await.map_err(tus_error)?;
    if carries_bytes(headers) && upload.offset < upload.length {
        let checksum = text(headers, &UPLOAD_CHECKSUM)?;
        upload =
            state.docs().tus_append(&actor, &upload.id, 0, checksum, body_stream(body)).await.map_err(tus_error)?;
    }
    let location = format!("/api/v1/tus/{}", upload.id);
    let mut response = (StatusCode::CREATED, [(header::LOCATION, location)]).into_response();
    progress(&upload, &mut response);
    count_created(&state, &upload);
    Ok(response)
}

/// `HEAD`: how far the upload got.
#[utoipa::path(head, path = "/{id}", tag = TAG, summary = "How far the upload got",
    params(("id" = String, Path), ("Tus-Resumable" = inline(TusResumable), Header)),
    responses((status = 200, headers(("Upload-Offset" = u64), ("Upload-Length" = u64), ("Upload-Expires" = String),
        ("Vellum-Document-Id" = i64))), (status = 404), (status = 410)))]
async fn head(
    State(state): State<AppState>,
    User(actor): User,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_version(&headers)?;
    let upload = state.docs().tus_status(&actor, &id).await.map_err(tus_error)?;
    let mut response = StatusCode::OK.into_response();
    progress(&upload, &mut response);
    let out = response.headers_mut();
    out.insert(UPLOAD_LENGTH, HeaderValue::from(upload.length));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = upload.metadata.as_deref().and_then(|m| HeaderValue::from_str(m).ok()) {
        out.insert(UPLOAD_METADATA, v);
    }
    Ok(response)
}

async fn append(state: &AppState, actor: &Actor, id: &str, request: Request) -> ApiResult<Response> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    check_version(headers)?;
    if !carries_bytes(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a PATCH carries Content-Type: {OFFSET_STREAM}"),
        ));
    }
    let offset = number(headers, &UPLOAD_OFFSET)?.ok_or_else(|| ApiError::bad_request("Upload-Offset is required"))?;
    let checksum = text(headers, &UPLOAD_CHECKSUM)?;
    let upload = state.docs().tus_append(actor, id, offset, checksum, body_stream(body)).await.map_err(tus_error)?;
    count_created(state, &upload);
    let mut response = StatusCode::NO_CONTENT.into_response();
    progress(&upload, &mut response);
    Ok(response)
}

fn count_created(state: &AppState, upload: &TusUpload) {
    if let Some(uploaded) = &upload.completed {
        crate::documents::count_upload(state, uploaded);
    }
}

/// `PATCH`: appends bytes at `Upload-Offset`.
#[utoipa::path(patch, path = "/{id}", tag = TAG, summary = "Append bytes at Upload-Offset",
    description = "The request that brings the last byte creates the document; its id is in Vellum-Document-Id.",
    params(("id" = String, Path), ("Tus-Resumable" = inline(TusResumable), Header), ("Upload-Offset" = u64, Header),
        ("Upload-Checksum" = Option<String>, Header, nullable = false, description = "sha256 <base64>",
            pattern = r"^[Ss][Hh][Aa]256 +[A-Za-z0-9+/]{43}=$",
            example = "sha256 47DEQpj8HBSa+/TImW+5JFeuQeRkm5NMpJWZG3hSuFU=")),
    request_body(content = [u8], content_type = "application/offset+octet-stream"),
    responses((status = 204, headers(("Upload-Offset" = u64), ("Vellum-Document-Id" = i64))),
        (status = 409, description = "Upload-Offset mismatch", body = ErrorBody),
        (status = 410, description = "Expired or terminated", body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 460, description = "Checksum mismatch", body = ErrorBody)))]
async fn patch(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    append(&state, &actor, &id, request).await
}

/// `DELETE`: terminates the upload and deletes what it received.
#[utoipa::path(delete, path = "/{id}", tag = TAG, summary = "Terminate the upload",
    params(("id" = String, Path), ("Tus-Resumable" = inline(TusResumable), Header)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
async fn terminate(
    State(state): State<AppState>,
    User(actor): User,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_version(&headers)?;
    state.docs().tus_terminate(&actor, &id).await.map_err(tus_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST` with `X-HTTP-Method-Override`, for clients behind proxies that pass only GET and
/// POST.
#[utoipa::path(post, path = "/{id}", tag = TAG, summary = "PATCH, HEAD or DELETE through X-HTTP-Method-Override",
    params(("id" = String, Path), ("X-HTTP-Method-Override" = inline(MethodOverride), Header),
        ("Tus-Resumable" = inline(TusResumable), Header)),
    responses((status = 204), (status = 200), (status = 400, description = "No override, or another one", body = ErrorBody)))]
async fn overridden(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    let method = request
        .headers()
        .get(HeaderName::from_static("x-http-method-override"))
        .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
    match method {
        Some(Method::PATCH) => append(&state, &actor, &id, request).await,
        Some(Method::HEAD) => head(State(state), User(actor), Path(id), request.headers().clone()).await,
        Some(Method::DELETE) => terminate(State(state), User(actor), Path(id), request.headers().clone()).await,
        _ => Err(ApiError::bad_request("POST on an upload needs X-HTTP-Method-Override: PATCH, HEAD or DELETE")),
    }
}
