//! Fault injection for the end-to-end tests of blue-green rollouts, in debug builds only: with
//! `VELLUM_FAULT_5XX_PERCENT=N` set, N of every 100 API requests (`/api/...`) are answered 500,
//! as a broken new version would answer them; the metrics count them like any other answer.
//! A release build ignores the variable.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The share of API requests to fail, in percent (0 in release builds).
fn percent() -> u64 {
    static PERCENT: OnceLock<u64> = OnceLock::new();
    *PERCENT.get_or_init(|| {
        let set = if cfg!(debug_assertions) { std::env::var("VELLUM_FAULT_5XX_PERCENT").ok() } else { None };
        let percent = set.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0).min(100);
        if percent > 0 {
            tracing::warn!(percent, "fault injection: answering this share of API requests with 500");
        }
        percent
    })
}

/// The 500 that answers `request` instead of the API, for the configured share of API
/// requests, evenly spread; `None` for every other request.
pub fn refusal(request: &Request) -> Option<Response> {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let percent = percent();
    if percent > 0 && request.uri().path().starts_with("/api/") {
        let n = SEEN.fetch_add(1, Ordering::Relaxed);
        // Of every 100 requests, those whose share crosses a whole step fail: even spacing.
        if (n * percent) % 100 + percent >= 100 {
            return Some(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "fault injection").into_response());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_share_is_spread_evenly() {
        for percent in [0u64, 1, 10, 30, 50, 100] {
            let failed = (0..100u64).filter(|n| percent > 0 && (n * percent) % 100 + percent >= 100).count();
            assert_eq!(failed as u64, percent, "{percent}");
        }
    }
}
