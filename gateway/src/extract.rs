//! Extractors whose rejections are the API's JSON errors rather than axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;

/// A JSON body; malformed JSON, a wrong type or an unknown field is a 400 naming the problem.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Refused before a byte is read: the limit is known from the declared length.
        if crate::limits::declared_length(req.headers()).is_some_and(|n| n > crate::limits::MAX_JSON_BYTES as u64) {
            return Err(crate::limits::too_large(crate::limits::MAX_JSON_BYTES as u64));
        }
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        let mut value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        // Every body of this API is an object; serde would also read a struct from an array.
        if !value.is_object() {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "the body must be a JSON object"));
        }
        integral(&mut value);
        T::deserialize(value).map(Self).map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("the JSON does not have the expected shape: {e}"))
        })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Makes numbers written with a zero fraction (`5.0`) integers, as JSON Schema's
/// `integer` allows: serde's integer types refuse them otherwise.
fn integral(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.007_199_254_740_992e15
            {
                #[allow(clippy::cast_possible_truncation)]
                let whole = f as i64;
                *value = Value::from(whole);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral),
        Value::Object(map) => map.values_mut().for_each(integral),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_numbers_with_a_zero_fraction_become_integers() {
        let mut v: Value = serde_json::from_str(r#"{"a": 5.0, "b": [2.5, -3.0], "c": {"d": 1e3}}"#).unwrap();
        integral(&mut v);
        assert_eq!(v, serde_json::json!({"a": 5, "b": [2.5, -3], "c": {"d": 1000}}));
    }
}

/// Query parameters; a bad one is a 400 naming it.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// The positive integer named `name` in the path; anything else is a 404 for `what` (no such
/// thing can have that id), answered with the JSON error body.
async fn positive_in_path<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    name: &str,
    what: &str,
) -> Result<i64, ApiError> {
    let axum::extract::Path(params) = axum::extract::Path::<Vec<(String, String)>>::from_request_parts(parts, state)
        .await
        .map_err(|r| ApiError::bad_request(r.body_text()))?;
    let raw = params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default();
    match raw.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ApiError::not_found(format!("{what} {raw} not found"))),
    }
}

/// A version number in the path (`{n}`); anything but a positive integer is a 404, since
/// no such version can exist (as for [`DocId`]).
#[derive(Debug)]
pub struct VersionNo(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for VersionNo {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        positive_in_path(parts, state, "n", "version").await.map(Self)
    }
}

/// A document id in the path; anything but a positive integer is a 404,
/// since no such document can exist.
#[derive(Debug)]
pub struct DocId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for DocId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        positive_in_path(parts, state, "id", "document").await.map(Self)
    }
}
