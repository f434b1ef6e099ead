//! `/api/v1/upload`: chunked, resumable upload sessions, in the seed's paths.
//!
//! Chunks are numbered from 0. A chunk's SHA-256 may be given as `X-Chunk-Checksum:
//! sha256:<hex>` (or `?checksum=`); the whole file's as `checksum` when initiating.

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::documents::Uploaded;
use vellum_core::uploads::{Chunk, Initiate, Session};

use crate::AppState;
use crate::auth::User;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{JsonBody, QueryParams};
use crate::limits::UploadPlace;
use crate::realtime::Notice;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(initiate))
        .routes(routes!(status, cancel))
        .routes(routes!(chunks))
        .routes(routes!(missing))
        .routes(routes!(complete))
        // A chunk streams to the tier, bounded by the session's chunk size as it arrives.
        .merge(OpenApiRouter::new().routes(routes!(put_chunk)).layer(DefaultBodyLimit::disable()))
}

const TAG: &str = "chunked uploads";

/// The job kind of upload sessions in real-time notices (STOMP topic `/topic/uploads`).
pub const UPLOAD_JOBS: &str = "uploads";

/// The uploaded chunks of a session.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct ChunkList {
    session_id: String,
    chunks: Vec<Chunk>,
}

/// The chunk numbers a session still needs.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct MissingChunks {
    session_id: String,
    missing_chunks: Vec<u64>,
}

#[utoipa::path(post, path = "/initiate", tag = TAG, summary = "Start a chunked upload session (24 h)",
    request_body = Initiate,
    responses((status = 201, body = Session), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn initiate(
    State(state): State<AppState>,
    User(actor): User,
    JsonBody(init): JsonBody<Initiate>,
) -> ApiResult<Response> {
    let session = state.docs().initiate_upload(&actor, init).await?;
    let location = format!("/api/v1/upload/{}", session.session_id);
    Ok((StatusCode::CREATED, [(axum::http::header::LOCATION, location)], axum::Json(session)).into_response())
}

#[utoipa::path(get, path = "/{session}", tag = TAG, summary = "A session's progress",
    params(("session" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = ErrorBody)))]
async fn status(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(state.docs().upload_status(&actor, &id).await?).into_response())
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ChunkParams {
    checksum: Option<String>,
}

#[utoipa::path(method(put, post), path = "/{session}/chunk/{n}", tag = TAG,
    summary = "Send chunk n (from 0), optionally with its SHA-256",
    params(("session" = String, Path), ("n" = u64, Path),
        ("X-Chunk-Checksum" = Option<String>, Header, nullable = false, description = "sha256:<hex>",
            pattern = r"^(sha256:)?[0-9a-fA-F]{64}$"),
        ("checksum" = Option<String>, Query, description = "sha256:<hex>", pattern = r"^(sha256:)?[0-9a-fA-F]{64}$")),
    request_body(content = [u8], content_type = "application/octet-stream"),
    responses((status = 200, body = Session), (status = 400, description = "Out of bounds or wrong length", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 410, description = "Expired or cancelled", body = ErrorBody),
        (status = 422, description = "Checksum mismatch", body = ErrorBody)))]
async fn put_chunk(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    Path((id, n)): Path<(String, String)>,
    QueryParams(params): QueryParams<ChunkParams>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let n: u64 =
        n.parse().map_err(|_| ApiError::bad_request(format!("chunk number {n:?} is not a non-negative integer")))?;
    let header = headers
        .get("x-chunk-checksum")
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| ApiError::bad_request("X-Chunk-Checksum is not valid text")))
        .transpose()?;
    let checksum = header.or(params.checksum);
    let body = Box::pin(request.into_body().into_data_stream().map_err(std::io::Error::other));
    let session = state.docs().put_chunk(&actor, &id, n, checksum.as_deref(), body).await?;
    let progress = json!({
        "status": "uploading",
        "progress": session.progress,
        "uploadedChunks": session.uploaded_chunks,
        "totalChunks": session.total_chunks,
        "uploadedBytes": session.uploaded_bytes,
        "message": format!("chunk {n} of {} received", session.total_chunks),
    });
    state.hub.publish(Notice::job_update(UPLOAD_JOBS, &actor.user, &id, state.hub.now_ms(), &progress));
    Ok(axum::Json(session).into_response())
}

#[utoipa::path(get, path = "/{session}/chunks", tag = TAG, summary = "The chunks received",
    params(("session" = String, Path)),
    responses((status = 200, body = ChunkList), (status = 404, body = ErrorBody)))]
async fn chunks(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    let chunks = state.docs().uploaded_chunks(&actor, &id).await?;
    Ok(axum::Json(ChunkList { session_id: id, chunks }).into_response())
}

#[utoipa::path(get, path = "/{session}/missing-chunks", tag = TAG, summary = "The chunks still to send",
    params(("session" = String, Path)),
    responses((status = 200, body = MissingChunks), (status = 404, body = ErrorBody)))]
async fn missing(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    let missing = state.docs().missing_chunks(&actor, &id).await?;
    Ok(axum::Json(MissingChunks { session_id: id, missing_chunks: missing }).into_response())
}

#[utoipa::path(post, path = "/{session}/complete", tag = TAG,
    summary = "Assemble the document (checked against the announced SHA-256)",
    params(("session" = String, Path)),
    responses((status = 201, body = Uploaded), (status = 400, description = "Chunks missing", body = ErrorBody),
        (status = 409, description = "Another replica is completing it", body = ErrorBody),
        (status = 422, description = "Checksum mismatch", body = ErrorBody)))]
async fn complete(
    _place: UploadPlace,
    State(state): State<AppState>,
    User(actor): User,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let uploaded = state.docs().complete_upload(&actor, &id).await?;
    let result = json!({"success": true, "documentId": uploaded.document.id, "filename": uploaded.document.filename});
    state.hub.publish(Notice::job_completed(UPLOAD_JOBS, &actor.user, &id, state.hub.now_ms(), &result));
    Ok(crate::documents::created(&state, &uploaded))
}

#[utoipa::path(delete, path = "/{session}", tag = TAG, summary = "Cancel a session and delete its chunks",
    params(("session" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    state.docs().cancel_upload(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
