//! `/api/v1/upload`: chunked, resumable upload sessions, in the seed's paths.
//!
//! Chunks are numbered from 0. A chunk's SHA-256 may be given as `X-Chunk-Checksum:
//! sha256:<hex>` (or `?checksum=`); the whole file's as `checksum` when initiating.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::json;
use vellum_core::uploads::Initiate;

use crate::AppState;
use crate::auth::User;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/initiate", post(initiate))
        .route("/{session}", get(status).delete(cancel))
        .route("/{session}/chunk/{n}", axum::routing::post(put_chunk).put(put_chunk))
        .route("/{session}/chunks", get(chunks))
        .route("/{session}/missing-chunks", get(missing))
        .route("/{session}/complete", post(complete))
        .layer(DefaultBodyLimit::disable())
}

async fn initiate(
    State(state): State<AppState>,
    User(actor): User,
    JsonBody(init): JsonBody<Initiate>,
) -> ApiResult<Response> {
    let session = state.docs.initiate_upload(&actor, init).await?;
    let location = format!("/api/v1/upload/{}", session.session_id);
    Ok((StatusCode::CREATED, [(axum::http::header::LOCATION, location)], axum::Json(session)).into_response())
}

async fn status(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(state.docs.upload_status(&actor, &id).await?).into_response())
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ChunkParams {
    checksum: Option<String>,
}

async fn put_chunk(
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
    let session = state.docs.put_chunk(&actor, &id, n, checksum.as_deref(), body).await?;
    Ok(axum::Json(session).into_response())
}

async fn chunks(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    let chunks = state.docs.uploaded_chunks(&actor, &id).await?;
    Ok(axum::Json(json!({"sessionId": id, "chunks": chunks})).into_response())
}

async fn missing(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    let missing = state.docs.missing_chunks(&actor, &id).await?;
    Ok(axum::Json(json!({"sessionId": id, "missingChunks": missing})).into_response())
}

async fn complete(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    let uploaded = state.docs.complete_upload(&actor, &id).await?;
    Ok(crate::documents::created(&state, &uploaded))
}

async fn cancel(State(state): State<AppState>, User(actor): User, Path(id): Path<String>) -> ApiResult<Response> {
    state.docs.cancel_upload(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
