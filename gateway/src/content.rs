//! Serving a version's bytes: `Range`, `ETag`, `If-None-Match`, `If-Range`, and a
//! `Content-Disposition` that survives any file name.

use std::fmt::Write as _;
use std::ops::Range;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use vellum_core::documents::Content;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// What a `Range` header asks of a body of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No range, or one the server may ignore (another unit, several ranges, bad syntax).
    Full,
    Partial(Range<u64>),
    /// A range entirely beyond the end: 416.
    Unsatisfiable,
}

/// Parses a `Range` header as RFC 9110 says: a single byte range is served, anything the
/// server may ignore is ignored.
pub fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Full };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // A suffix: the last N bytes.
        let Ok(n) = last.parse::<u64>() else { return RangeRequest::Full };
        if n == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Partial(size.saturating_sub(n)..size);
    }
    let Ok(start) = first.parse::<u64>() else { return RangeRequest::Full };
    let end = if last.is_empty() {
        size
    } else {
        match last.parse::<u64>() {
            Ok(last) if last >= start => last.saturating_add(1).min(size),
            _ => return RangeRequest::Full,
        }
    };
    if start >= size { RangeRequest::Unsatisfiable } else { RangeRequest::Partial(start..end) }
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

/// `attachment; filename="report.pdf"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf`
pub fn content_disposition(filename: &str) -> String {
    let fallback: String = filename
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let mut encoded = String::new();
    for byte in filename.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// The response for `content`, honouring the conditional and range headers of `request`.
pub async fn serve(state: &AppState, content: &Content, request: &HeaderMap) -> ApiResult<Response> {
    let etag = format!("\"{}\"", content.sha256);
    let header_str = |name: header::HeaderName| request.get(name).and_then(|v| v.to_str().ok());
    let base = || {
        let mut builder = Response::builder()
            .header(header::ETAG, &etag)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CACHE_CONTROL, "private, no-cache")
            // The stored type is what was uploaded: a browser must not guess another (an
            // HTML or script reading of a "text/plain" upload).
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        if let Ok(v) = HeaderValue::from_str(&content_disposition(&content.filename)) {
            builder = builder.header(header::CONTENT_DISPOSITION, v);
        }
        builder.header("x-document-version", content.version)
    };
    if header_str(header::IF_NONE_MATCH).is_some_and(|list| etag_matches(list, &etag)) {
        return base()
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, &e));
    }
    let range_applies = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = if range_applies { parse_range(header_str(header::RANGE), content.size) } else { RangeRequest::Full };
    let (status, range) = match range {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        RangeRequest::Unsatisfiable => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range is beyond the document's {} bytes", content.size),
            )
            .with_header(header::CONTENT_RANGE, &format!("bytes */{}", content.size)));
        }
    };
    let stream = state.docs().at(content.document.id, |shard| Box::pin(shard.read(content, range.clone()))).await?;
    let length = range.as_ref().map_or(content.size, |r| r.end - r.start);
    let mut builder = base()
        .status(status)
        .header(header::CONTENT_TYPE, &content.content_type)
        .header(header::CONTENT_LENGTH, length);
    if let Some(r) = &range {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", r.start, r.end - 1, content.size));
    }
    builder.body(Body::from_stream(stream)).map_err(|e| ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeRequest::{Full, Partial, Unsatisfiable};
        let p = |v: &str| parse_range(Some(v), 100);
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(p("bytes=0-9"), Partial(0..10));
        assert_eq!(p("bytes=90-"), Partial(90..100));
        assert_eq!(p("bytes=90-500"), Partial(90..100));
        assert_eq!(p("bytes=-10"), Partial(90..100));
        assert_eq!(p("bytes=-500"), Partial(0..100));
        assert_eq!(p("bytes=100-"), Unsatisfiable);
        assert_eq!(p("bytes=-0"), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Unsatisfiable);
        for ignored in ["bytes=9-1", "bytes=a-b", "items=0-1", "bytes=0-1,5-6", "bytes=", "bytes=--1"] {
            assert_eq!(p(ignored), Full, "{ignored}");
        }
    }

    #[test]
    fn etags_match_lists_weak_forms_and_stars() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", W/\"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    #[test]
    fn dispositions_keep_names_safe_and_exact() {
        assert_eq!(content_disposition("a b.pdf"), "attachment; filename=\"a b.pdf\"; filename*=UTF-8''a%20b.pdf");
        assert_eq!(
            content_disposition("ré\"sumé.txt"),
            "attachment; filename=\"r__sum_.txt\"; filename*=UTF-8''r%C3%A9%22sum%C3%A9.txt"
        );
    }
}
