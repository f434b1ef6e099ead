//! The one error type of the API: a status and a JSON body with a message. Server-side
//! failures are logged in full and answered without their details.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vellum_core::documents::DocError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Extra headers (`WWW-Authenticate`, `Retry-After`, `Content-Range`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), headers: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    #[must_use]
    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.push((name, value));
        }
        self
    }

    /// A failure of ours: logged with its cause, answered as a plain 500 (or 503).
    pub fn internal(status: StatusCode, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        let message = if status == StatusCode::SERVICE_UNAVAILABLE {
            "a backing service is unavailable; try again shortly"
        } else {
            "internal error"
        };
        Self::new(status, message)
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match &e {
            DocError::Invalid(_) => Self::bad_request(e.to_string()),
            DocError::NotFound(_)
            | DocError::VersionNotFound { .. }
            | DocError::SessionNotFound(_)
            | DocError::JobNotFound(_) => Self::not_found(e.to_string()),
            DocError::Gone(_) => Self::new(StatusCode::GONE, e.to_string()),
            DocError::ChecksumMismatch(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            DocError::Conflict(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
            DocError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, e.to_string()),
            DocError::PreconditionFailed { etag, .. } => {
                Self::new(StatusCode::PRECONDITION_FAILED, e.to_string()).with_header(header::ETAG, etag)
            }
            DocError::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).with_header(header::RETRY_AFTER, "1")
            }
            DocError::TooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            // The object store gave bytes that are not the content's: a bad answer from
            // upstream, which the gateway will not pass on.
            DocError::Quarantined { .. } => Self::new(StatusCode::BAD_GATEWAY, e.to_string()),
            DocError::Storage(_) => Self::internal(StatusCode::SERVICE_UNAVAILABLE, &e),
            DocError::Store(_) => Self::internal(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }
}

/// The body of every error answer.
#[derive(serde::Serialize, Debug, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub status: u16,
    /// The status's reason phrase.
    pub error: String,
    /// What went wrong, precisely.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            status: self.status.as_u16(),
            // 460 is tus' own status (its checksum extension), unknown to the http crate.
            error: self
                .status
                .canonical_reason()
                .unwrap_or(if self.status.as_u16() == 460 { "Checksum Mismatch" } else { "Error" })
                .to_owned(),
            message: self.message,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
