//! `/api/v1/documents`: uploads (multipart or raw body), metadata, listing, versions,
//! downloads, deletion, legal hold and signed links.

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::clock::{parse_rfc3339, rfc3339};
use vellum_core::documents::{
    Actor, DocError, Document, Documents, Library, ListQuery, MetadataPatch, NewDocument, NewVersion, Page, Restored,
    Upload, Uploaded, VersionHistory,
};

use crate::AppState;
use crate::auth::User;
use crate::content::serve;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{DocId, JsonBody, QueryParams, VersionNo};
use crate::limits::UploadPlace;

pub fn router() -> OpenApiRouter<AppState> {
    let uploads = OpenApiRouter::new()
        .routes(routes!(upload, list))
        .routes(routes!(upload_version, versions))
        // Upload sizes are bounded by the service's own limit, checked as bytes stream in.
        .layer(DefaultBodyLimit::disable());
    OpenApiRouter::new()
        .routes(routes!(get_document, update, delete))
        .routes(routes!(update_metadata))
        .routes(routes!(download))
        .routes(routes!(download_alias))
        .routes(routes!(download_version))
        .routes(routes!(restore))
        .routes(routes!(hold, release))
        .routes(routes!(create_link))
        .merge(crate::storage::document_router())
        .merge(crate::bulk::router())
        .merge(uploads)
}

/// `/api/v1/links/{token}`: downloads through a signed link, without a token.
pub fn links_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(follow_link))
}

const TAG: &str = "documents";

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Upload options given as query parameters (raw-body uploads) or form fields (multipart).
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UploadParams {
    filename: Option<String>,
    title: Option<String>,
    description: Option<String>,
    /// Comma-separated.
    tags: Option<String>,
    /// A JSON object.
    metadata: Option<String>,
    change_description: Option<String>,
}

/// The multipart form of an upload, as `/openapi.json` describes it to generated clients:
/// the file and what describes it, in any order.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // read part by part by `take`; this is its description
struct UploadForm {
    /// The bytes; the part's file name names the document.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    title: Option<String>,
    description: Option<String>,
    /// Comma-separated.
    tags: Option<String>,
    /// A JSON object.
    metadata: Option<String>,
}

/// The multipart form of a new version.
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // read part by part by `take`; this is its description
struct VersionForm {
    /// The bytes; the part's file name becomes the document's, if given.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    change_description: Option<String>,
}

fn split_tags(tags: &str) -> Vec<String> {
    tags.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

fn parse_metadata(text: &str) -> ApiResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("metadata must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("metadata is not valid JSON: {e}"))),
    }
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// The raw-body upload's file name: `?filename=`, else `X-Filename`, else the
/// `Content-Disposition` header's.
fn raw_filename(params: &UploadParams, headers: &HeaderMap) -> ApiResult<Option<String>> {
    if let Some(name) = &params.filename {
        return Ok(Some(name.clone()));
    }
    if let Some(value) = headers.get("x-filename") {
        return value.to_str().map(|v| Some(v.to_owned())).map_err(|_| {
            ApiError::bad_request("X-Filename is not valid UTF-8 text; use ?filename= with percent-encoding")
        });
    }
    if let Some(value) = headers.get(header::CONTENT_DISPOSITION) {
        let text = value.to_str().map_err(|_| ApiError::bad_request("Content-Disposition is not valid text"))?;
        if let Some(name) = text.split(';').map(str::trim).find_map(|p| p.strip_prefix("filename=")) {
            return Ok(Some(name.trim_matches('"').to_owned()));
        }
    }
    Ok(None)
}

/// The options of an upload, taken in one pass with its bytes, which stream into the
/// default tier as they arrive, whatever the order of the form's fields.
struct Received {
    params: UploadParams,
    filename: Option<String>,
    content_type: Option<String>,
}

/// Text fields a multipart upload may carry beside its file.
const MAX_FORM_FIELDS: usize = 64;
/// The longest text field read; the document's own checks (title, description, metadata)
/// are stricter and say precisely what is wrong.
const MAX_FIELD_BYTES: usize = 64 << 10;

/// A form field's text, read as it arrives and refused once longer than any field may be.
async fn bounded_text(mut field: axum::extract::multipart::Field<'_>, name: &str) -> ApiResult<String> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| ApiError::bad_request(e.body_text()))? {
        if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(format!("form field {name:?} is longer than {MAX_FIELD_BYTES} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| ApiError::bad_request(format!("form field {name:?} is not UTF-8 text")))
}

/// Takes an upload's bytes into `target` and its options; on any error what was stored is
/// deleted.
async fn receive<'a, K>(
    state: &AppState,
    request: Request,
    default_content_type: Option<String>,
    mut target: Upload<'a, K>,
) -> ApiResult<(Received, Upload<'a, K>)> {
    match take(state, request, default_content_type, &mut target).await {
        Ok(received) => Ok((received, target)),
        Err(e) => {
            target.abandon().await;
            Err(e)
        }
    }
}

async fn take<K>(
    state: &AppState,
    request: Request,
    default_content_type: Option<String>,
    target: &mut Upload<'_, K>,
) -> ApiResult<Received> {
    if is_multipart(request.headers()) {
        let mut form =
            Multipart::from_request(request, state).await.map_err(|r| ApiError::bad_request(r.body_text()))?;
        let mut params = UploadParams::default();
        let mut part: Option<(Option<String>, Option<String>)> = None;
        let mut tags: Vec<String> = Vec::new();
        let mut fields = 0;
        while let Some(field) = form.next_field().await.map_err(|e| ApiError::bad_request(e.body_text()))? {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "file" {
                if target.is_stored() {
                    return Err(ApiError::bad_request("the form has more than one file field"));
                }
                let filename = field.file_name().map(str::to_owned);
                let content_type = field.content_type().map(str::to_owned);
                let decided = vellum_core::documents::content_type_for(
                    filename.as_deref().unwrap_or_default(),
                    content_type.as_deref(),
                );
                target.store(&decided, Box::pin(field.map_err(io_error))).await?;
                part = Some((filename, content_type));
                continue;
            }
            fields += 1;
            if fields > MAX_FORM_FIELDS {
                return Err(ApiError::bad_request(format!("the form has more than {MAX_FORM_FIELDS} fields")));
            }
            let value = bounded_text(field, &name).await?;
            let slot = match name.as_str() {
                "filename" => &mut params.filename,
                "title" => &mut params.title,
                "description" => &mut params.description,
                "tags" => {
                    tags.push(value);
                    continue;
                }
                "metadata" => &mut params.metadata,
                "changeDescription" => &mut params.change_description,
                other => return Err(ApiError::bad_request(format!("unknown form field {other:?}"))),
            };
            *slot = Some(value);
        }
        if !tags.is_empty() {
            params.tags = Some(tags.join(","));
        }
        let Some((part_filename, content_type)) = part else {
            return Err(ApiError::bad_request("the form has no file field"));
        };
        let filename = params.filename.clone().or(part_filename);
        return Ok(Received { params, filename, content_type });
    }
    let (mut parts, body) = request.into_parts();
    let QueryParams(params) =
        <QueryParams<UploadParams> as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, state)
            .await?;
    let filename = raw_filename(&params, &parts.headers)?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| ApiError::bad_request("Content-Type is not valid text")))
        .transpose()?
        .or(default_content_type);
    let decided =
        vellum_core::documents::content_type_for(filename.as_deref().unwrap_or_default(), content_type.as_deref());
    target.store(&decided, Box::pin(body.into_data_stream().map_err(io_error))).await?;
    Ok(Received { params, filename, content_type })
}

pub(crate) fn created(state: &AppState, uploaded: &Uploaded) -> Response {
    count_upload(state, uploaded);
    let location = format!("/api/v1/documents/{}", uploaded.document.id);
    (StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(uploaded)).into_response()
}

/// Counts the bytes a deduplicated upload did not store again.
pub(crate) fn count_upload(state: &AppState, uploaded: &Uploaded) {
    if uploaded.deduplicated {
        state.metrics.deduplicated_bytes.inc_by(u64::try_from(uploaded.document.size).unwrap_or_default());
    }
}

#[utoipa::path(post, path = "/", tag = TAG,
    summary = "Upload a document",
    description = "Multipart (`file` plus optional `title`, `description`, `tags` (comma-separated), `metadata` \
        (a JSON object), in any order) or a raw body named by `?filename=`, `X-Filename` or Content-Disposition, \
        with the same options as query parameters. The bytes stream through SHA-256; bytes stored before are \
        deduplicated.",
    request_body(description = "The file", content((UploadForm = "multipart/form-data"), ("application/octet-stream"))),
    params(
        ("filename" = Option<String>, Query, description = "Raw-body uploads: the file name"),
        ("title" = Option<String>, Query),
        ("description" = Option<String>, Query),
        ("tags" = Option<String>, Query, description = "Comma-separated"),
        ("metadata" = Option<String>, Query, description = "A JSON object"),
    ),
    responses(
        (status = 201, description = "Stored; Location names the document", body = Uploaded),
        (status = 400, description = "No file name, bad metadata, bad file name", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
    ))]
async fn upload(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    request: Request,
) -> ApiResult<Response> {
    let docs = state.docs();
    let (received, upload) = receive(&state, request, None, docs.begin_document()).await?;
    let prepared = (|| {
        let params = &received.params;
        let Some(filename) = received.filename.clone() else {
            return Err(ApiError::bad_request(
                "the upload has no file name: give ?filename=, an X-Filename header, or a multipart file name",
            ));
        };
        let new = NewDocument {
            filename,
            content_type: received.content_type.clone().filter(|ct| !ct.is_empty()),
            title: params.title.clone(),
            description: params.description.clone(),
            tags: params.tags.as_deref().map(split_tags).unwrap_or_default(),
            // An empty value is no metadata, as an absent one is.
            metadata: params
                .metadata
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(parse_metadata)
                .transpose()?
                .unwrap_or_default(),
        };
        if params.change_description.is_some() {
            return Err(ApiError::bad_request("changeDescription belongs to a new version, not a new document"));
        }
        Documents::prepare(new).map_err(ApiError::from)
    })();
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            upload.abandon().await;
            return Err(e);
        }
    };
    let uploaded = upload.finish(&actor, &prepared).await?;
    Ok(created(&state, &uploaded))
}

#[utoipa::path(post, path = "/{id}/versions", tag = TAG,
    summary = "Upload a new version",
    description = "Multipart (`file`, optional `changeDescription`) or a raw body; the new version becomes current.",
    request_body(description = "The file", content((VersionForm = "multipart/form-data"), ("application/octet-stream"))),
    params(("id" = i64, Path), ("changeDescription" = Option<String>, Query), ("filename" = Option<String>, Query),
        ("If-Match" = Option<String>, Header, nullable = false,
            description = "The ETag the change is based on (or *): refused with 412 when the document changed since")),
    responses(
        (status = 201, body = Uploaded),
        (status = 400, body = ErrorBody),
        (status = 404, description = "No such document (or not yours)", body = ErrorBody),
        (status = 412, description = "The document changed since the If-Match ETag", body = ErrorBody),
        (status = 413, body = ErrorBody),
    ))]
async fn upload_version(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    request: Request,
) -> ApiResult<Response> {
    // Access, existence and the precondition are checked before the bytes are taken (and
    // the precondition again where the version is recorded).
    let if_match = if_match(request.headers())?;
    let docs = state.docs();
    let upload = docs.begin_version(&actor, id).await?;
    vellum_core::documents::precondition(upload.current(), if_match.as_deref())?;
    let content_type = Some(upload.current().content_type.clone());
    let (received, upload) = receive(&state, request, content_type, upload).await?;
    let params = &received.params;
    if params.title.is_some() || params.tags.is_some() || params.metadata.is_some() || params.description.is_some() {
        upload.abandon().await;
        return Err(ApiError::bad_request(
            "a new version takes only file, filename and changeDescription; change metadata with PATCH",
        ));
    }
    let new = NewVersion {
        filename: received.filename.clone(),
        content_type: received.content_type.clone(),
        change_description: params.change_description.clone(),
        if_match,
    };
    let uploaded = upload.finish(&actor, new).await?;
    Ok(created(&state, &uploaded))
}

/// The `If-Match` header of a request, if it has one.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<String>> {
    headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| ApiError::bad_request("If-Match is not valid text")))
        .transpose()
}

/// `document` as JSON, with its entity tag.
fn with_etag(document: &vellum_core::documents::Document) -> Response {
    ([(header::ETAG, document.etag())], axum::Json(document)).into_response()
}

#[utoipa::path(get, path = "/{id}", tag = TAG, summary = "A document's metadata", params(("id" = i64, Path)),
    responses((status = 200, description = "The document; its ETag is what If-Match takes", body = Document,
        headers(("ETag" = String))), (status = 404, body = ErrorBody)))]
async fn get_document(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let entry = cached_document(&state, &state.docs(), &actor, id, no_cache(&headers)).await?;
    Ok(([(header::CONTENT_TYPE, JSON.clone()), (header::ETAG, entry.etag)], entry.json).into_response())
}

/// Document `id` as `actor` may see it, through the metadata cache.
async fn cached_document(
    state: &AppState,
    docs: &Library,
    actor: &Actor,
    id: i64,
    fresh: bool,
) -> Result<crate::cache::CachedDocument, DocError> {
    state.cache.document(actor, id, fresh, docs.at(id, |shard| Box::pin(shard.get(actor, id)))).await
}

const JSON: header::HeaderValue = header::HeaderValue::from_static("application/json");

/// Whether the request asks for an answer from the database rather than the metadata
/// cache (`Cache-Control: no-cache`, or `Pragma: no-cache`).
fn no_cache(headers: &HeaderMap) -> bool {
    let says = |name: header::HeaderName| {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| {
            v.split(',')
                .map(str::trim)
                .any(|d| d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("max-age=0"))
        })
    };
    says(header::CACHE_CONTROL) || says(header::PRAGMA)
}

/// The document that `request` may change, when it is answered: any method but the safe
/// ones, on a route with the document's id. Its entry in the metadata cache is dropped once
/// the answer is ready, so that its client reads its own change next, before the change's
/// event comes round.
pub(crate) fn changed_document(request: &Request) -> Option<i64> {
    if request.method().is_safe() { None } else { document_of(request) }
}

/// The document a request names: its id, on a documents route with `{id}`.
fn document_of(request: &Request) -> Option<i64> {
    let route = request.extensions().get::<axum::extract::MatchedPath>()?;
    if !route.as_str().contains("{id}") {
        return None;
    }
    let path = request.uri().path();
    let rest = ["/api/v1/documents/", "/api/documents/"].iter().find_map(|base| path.strip_prefix(base))?;
    rest.split('/').next()?.parse().ok()
}

#[utoipa::path(patch, path = "/{id}", tag = TAG,
    summary = "Change title, description, tags, custom metadata or file name",
    params(("id" = i64, Path), ("If-Match" = Option<String>, Header, nullable = false,
            description = "The ETag the change is based on (or *): refused with 412 when the document changed since")), request_body = MetadataPatch,
    responses((status = 200, description = "The document, with its new ETag", body = Document),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 412, description = "The document changed since the If-Match ETag; the answer carries the current one", body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<MetadataPatch>,
) -> ApiResult<Response> {
    let if_match = if_match(&headers)?;
    let if_match = if_match.as_deref();
    let updated = state.docs().at(id, |shard| Box::pin(shard.update_if(&actor, id, patch.clone(), if_match))).await?;
    Ok(with_etag(&updated))
}

#[utoipa::path(put, path = "/{id}/metadata", tag = TAG, summary = "Change metadata (the seed's path)",
    params(("id" = i64, Path), ("If-Match" = Option<String>, Header, nullable = false,
            description = "The ETag the change is based on (or *): refused with 412 when the document changed since")), request_body = MetadataPatch,
    responses((status = 200, description = "The document, with its new ETag", body = Document),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 412, description = "The document changed since the If-Match ETag", body = ErrorBody)))]
async fn update_metadata(
    state: State<AppState>,
    user: User,
    id: DocId,
    headers: HeaderMap,
    patch: JsonBody<MetadataPatch>,
) -> ApiResult<Response> {
    update(state, user, id, headers, patch).await
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListParams {
    tag: Option<String>,
    file_type: Option<String>,
    owner: Option<String>,
    /// RFC 3339: created at or after.
    from: Option<String>,
    /// RFC 3339: created before.
    to: Option<String>,
    q: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    page: Option<u32>,
    size: Option<u32>,
}

/// What the document list answers: a page of a cursor, or a numbered one.
#[derive(serde::Serialize, Debug, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the OpenAPI document's name for the two answers
enum Listing {
    Page(Page),
    Numbered(NumberedPage),
}

/// The furthest a `page`/`size` request reaches (pages walk the cursors from the start).
const MAX_PAGED: u64 = 10_000;

/// A page asked for by number, in the Spring shape the seed's clients read (beside the
/// cursor that goes on from it).
#[derive(serde::Serialize, Debug, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct NumberedPage {
    content: Vec<vellum_core::documents::Document>,
    /// From 0.
    page: u32,
    size: u32,
    number_of_elements: usize,
    first: bool,
    last: bool,
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/", tag = TAG, summary = "List and search documents, newest first",
    params(
        ("tag" = Option<String>, Query),
        ("fileType" = Option<String>, Query, description = "Extension, like pdf"),
        ("owner" = Option<String>, Query, description = "Admins: another user's documents"),
        ("from" = Option<String>, Query, format = DateTime, description = "RFC 3339: created at or after"),
        ("to" = Option<String>, Query, format = DateTime, description = "RFC 3339: created before"),
        ("q" = Option<String>, Query, description = "Words in file name, title or description"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 50"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
        ("page" = Option<u32>, Query, minimum = 0,
            description = "Instead of limit and cursor, as Spring clients page: the page number, from 0 \
                (the answer is then a NumberedPage; page × size at most 10000)"),
        ("size" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "With page: its size, default 20"),
    ),
    responses((status = 200, description = "A Page, or a NumberedPage when page or size is given",
        body = Listing), (status = 400, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    User(actor): User,
    QueryParams(p): QueryParams<ListParams>,
) -> ApiResult<Response> {
    let time = |name: &str, value: Option<String>| {
        value
            .map(|v| {
                parse_rfc3339(&v).ok_or_else(|| {
                    ApiError::bad_request(format!("{name} must be an RFC 3339 time, like 2025-01-13T10:00:00Z"))
                })
            })
            .transpose()
    };
    let numbered = p.page.is_some() || p.size.is_some();
    if numbered && (p.limit.is_some() || p.cursor.is_some()) {
        return Err(ApiError::bad_request("page and size, or limit and cursor: not both"));
    }
    let mut query = ListQuery {
        tag: p.tag,
        file_type: p.file_type,
        owner: p.owner,
        created_from: time("from", p.from)?,
        created_to: time("to", p.to)?,
        q: p.q,
        limit: p.limit,
        // An empty cursor is the first page, as no cursor is.
        cursor: p.cursor.filter(|c| !c.is_empty()),
    };
    if !numbered {
        return Ok(axum::Json(state.docs().list(&actor, &query).await?).into_response());
    }
    let (page, size) = (p.page.unwrap_or(0), p.size.unwrap_or(20));
    if !(1..=vellum_core::documents::MAX_PAGE).contains(&size) {
        return Err(ApiError::bad_request("size must be between 1 and 1000"));
    }
    if (u64::from(page) + 1) * u64::from(size) > MAX_PAGED {
        return Err(ApiError::bad_request(format!(
            "page and size reach at most {MAX_PAGED} documents; go further with limit and the nextCursor of each page"
        )));
    }
    // The pages before it, skipped along their cursors, a thousand documents at a time.
    let mut skip = u64::from(page) * u64::from(size);
    let mut past_the_end = false;
    while skip > 0 && !past_the_end {
        let step = u32::try_from(skip.min(u64::from(vellum_core::documents::MAX_PAGE))).unwrap_or(1);
        query.limit = Some(step);
        let skipped = state.docs().list(&actor, &query).await?;
        skip -= u64::from(step);
        past_the_end = skipped.next_cursor.is_none();
        query.cursor = skipped.next_cursor;
    }
    let found = if past_the_end {
        Page { items: Vec::new(), next_cursor: None }
    } else {
        query.limit = Some(size);
        state.docs().list(&actor, &query).await?
    };
    let body = NumberedPage {
        number_of_elements: found.items.len(),
        content: found.items,
        page,
        size,
        first: page == 0,
        last: found.next_cursor.is_none(),
        next_cursor: found.next_cursor,
    };
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct VersionParam {
    version: Option<i64>,
}

#[utoipa::path(get, path = "/{id}/content", tag = TAG, summary = "Download the bytes",
    description = "Streams the current (or `?version=`) bytes, with `Range`, `ETag` (the SHA-256), \
        `If-None-Match` and `If-Range`.",
    params(("id" = i64, Path), ("version" = Option<i64>, Query), ("Range" = Option<String>, Header, nullable = false),
        ("If-None-Match" = Option<String>, Header, nullable = false)),
    responses(
        (status = 200, description = "The bytes, with their stored Content-Type", content_type = "*/*", body = [u8]),
        (status = 206, description = "The range asked for", content_type = "*/*", body = [u8]),
        (status = 304, description = "Not modified"),
        (status = 404, body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
        (status = 502, description = "Quarantined: an integrity scrub found the stored bytes altered or gone", body = ErrorBody),
    ))]
async fn download(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    QueryParams(p): QueryParams<VersionParam>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let content = state.docs().at(id, |shard| Box::pin(shard.content(&actor, id, p.version))).await?;
    serve(&state, &content, &headers).await
}

#[utoipa::path(get, path = "/{id}/download", tag = TAG, summary = "Download the bytes (the seed's path)",
    params(("id" = i64, Path), ("version" = Option<i64>, Query)),
    responses((status = 200, content_type = "*/*", body = [u8]), (status = 206, content_type = "*/*", body = [u8]),
        (status = 304), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn download_alias(
    state: State<AppState>,
    user: User,
    id: DocId,
    params: QueryParams<VersionParam>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download(state, user, id, params, headers).await
}

#[utoipa::path(get, path = "/{id}/versions/{n}/content", tag = TAG, summary = "Download one version's bytes",
    params(("id" = i64, Path), ("n" = i64, Path)),
    responses((status = 200, content_type = "*/*", body = [u8]), (status = 206, content_type = "*/*", body = [u8]),
        (status = 304), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn download_version(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    VersionNo(n): VersionNo,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let content = state.docs().at(id, |shard| Box::pin(shard.content(&actor, id, Some(n)))).await?;
    serve(&state, &content, &headers).await
}

#[utoipa::path(get, path = "/{id}/versions", tag = TAG, summary = "A document's versions, newest first",
    params(("id" = i64, Path)), responses((status = 200, body = VersionHistory), (status = 404, body = ErrorBody)))]
async fn versions(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (docs, fresh) = (state.docs(), no_cache(&headers));
    // The document's own entry says whether the actor may see it.
    cached_document(&state, &docs, &actor, id, fresh).await?;
    let json = state.cache.versions(id, fresh, docs.at(id, |shard| Box::pin(shard.versions(&actor, id)))).await?;
    Ok(([(header::CONTENT_TYPE, JSON.clone())], json).into_response())
}

#[utoipa::path(post, path = "/{id}/versions/{n}/restore", tag = TAG,
    summary = "Restore version n as a new current version",
    params(("id" = i64, Path), ("n" = i64, Path)),
    responses((status = 200, body = Restored), (status = 404, body = ErrorBody)))]
async fn restore(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    VersionNo(n): VersionNo,
) -> ApiResult<Response> {
    Ok(axum::Json(state.docs().at(id, |shard| Box::pin(shard.restore_version(&actor, id, n))).await?).into_response())
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    #[serde(default)]
    permanent: bool,
}

#[utoipa::path(delete, path = "/{id}", tag = TAG, summary = "Delete (soft), or purge with ?permanent=true",
    params(("id" = i64, Path), ("permanent" = Option<bool>, Query)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "Under legal hold", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    QueryParams(p): QueryParams<DeleteParams>,
) -> ApiResult<Response> {
    if p.permanent {
        state.docs().at(id, |shard| Box::pin(shard.purge(&actor, id))).await?;
    } else {
        state.docs().at(id, |shard| Box::pin(shard.delete(&actor, id))).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(put, path = "/{id}/legal-hold", tag = TAG, summary = "Place a legal hold (admins)",
    params(("id" = i64, Path)),
    responses((status = 200, body = Document), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn hold(State(state): State<AppState>, User(actor): User, DocId(id): DocId) -> ApiResult<Response> {
    Ok(axum::Json(state.docs().at(id, |shard| Box::pin(shard.set_legal_hold(&actor, id, true))).await?).into_response())
}

#[utoipa::path(delete, path = "/{id}/legal-hold", tag = TAG, summary = "Release a legal hold (admins)",
    params(("id" = i64, Path)),
    responses((status = 200, body = Document), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn release(State(state): State<AppState>, User(actor): User, DocId(id): DocId) -> ApiResult<Response> {
    Ok(axum::Json(state.docs().at(id, |shard| Box::pin(shard.set_legal_hold(&actor, id, false))).await?)
        .into_response())
}

// Signed links: `<id>.<version>.<expiry ms>.<signature>`, the signature an HMAC-SHA256 of
// the rest under the gateway's link key.

const MAX_LINK_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Deserialize, Debug, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LinkRequest {
    /// Seconds the link works, 1 to 604800 (a week; default 3600).
    #[schema(minimum = 1, maximum = 604_800)]
    expires_in_seconds: Option<u64>,
    /// The version the link downloads (default: the current one).
    #[schema(minimum = 1)]
    version: Option<i64>,
}

fn link_mac(key: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    mac
}

#[utoipa::path(post, path = "/{id}/links", tag = TAG, summary = "A signed download link that expires",
    params(("id" = i64, Path)), request_body = LinkRequest,
    responses((status = 201, description = "url, path, documentId, versionNumber, expiresAt", body = Object),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_link(
    State(state): State<AppState>,
    User(actor): User,
    DocId(id): DocId,
    JsonBody(request): JsonBody<LinkRequest>,
) -> ApiResult<Response> {
    let seconds = request.expires_in_seconds.unwrap_or(3600);
    if seconds == 0 || seconds > MAX_LINK_SECONDS {
        return Err(ApiError::bad_request(format!("expiresInSeconds must be between 1 and {MAX_LINK_SECONDS}")));
    }
    let content = state.docs().at(id, |shard| Box::pin(shard.content(&actor, id, request.version))).await?;
    let expires = state.docs().clock().now_ms() + i64::try_from(seconds * 1000).unwrap_or(i64::MAX);
    let payload = format!("{id}.{}.{expires}", content.version);
    let signature = URL_SAFE_NO_PAD.encode(link_mac(&state.link_key, &payload).finalize().into_bytes());
    let token = format!("{payload}.{signature}");
    let path = format!("/api/v1/links/{token}");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "url": format!("{}{path}", state.public_url),
            "path": path,
            "documentId": id,
            "versionNumber": content.version,
            "expiresAt": rfc3339(expires),
        })),
    )
        .into_response())
}

#[utoipa::path(get, path = "/{token}", tag = TAG, summary = "Download through a signed link, without a token",
    params(("token" = String, Path)), security(()),
    responses((status = 200, content_type = "*/*", body = [u8]), (status = 403, description = "Forged", body = ErrorBody),
        (status = 410, description = "Expired", body = ErrorBody)))]
async fn follow_link(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let forged = || ApiError::new(StatusCode::FORBIDDEN, "the link is not valid");
    let (payload, signature) = token.rsplit_once('.').ok_or_else(forged)?;
    let given = URL_SAFE_NO_PAD.decode(signature).map_err(|_| forged())?;
    // verify_slice compares in constant time.
    link_mac(&state.link_key, payload).verify_slice(&given).map_err(|_| forged())?;
    let mut parts = payload.split('.');
    let (Some(id), Some(version), Some(expires), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(forged());
    };
    let (id, version, expires): (i64, i64, i64) = (
        id.parse().map_err(|_| forged())?,
        version.parse().map_err(|_| forged())?,
        expires.parse().map_err(|_| forged())?,
    );
    if state.docs().clock().now_ms() > expires {
        return Err(ApiError::new(StatusCode::GONE, format!("the link expired at {}", rfc3339(expires))));
    }
    // The signature is the permission: the link reads as its creator could.
    let reader = Actor { user: String::new(), admin: true };
    let content = state.docs().at(id, |shard| Box::pin(shard.content(&reader, id, Some(version)))).await?;
    serve(&state, &content, &headers).await
}
