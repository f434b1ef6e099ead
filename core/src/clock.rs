//! Time, injectable: the system clock in production, a manual one in tests that age
//! documents or expire sessions without waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, from the system or from a test.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands at `start_ms` until moved.
    pub fn manual(start_ms: i64) -> Self {
        Self { manual: Some(Arc::new(AtomicI64::new(start_ms))) }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => {
                OffsetDateTime::now_utc().unix_timestamp_nanos().div_euclid(1_000_000).try_into().unwrap_or(i64::MAX)
            }
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    pub fn advance(&self, ms: i64) {
        if let Some(now) = &self.manual {
            now.fetch_add(ms, Ordering::SeqCst);
        }
    }
}

/// `2025-01-13T10:00:00.123Z`, as the API shows times.
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    (t.unix_timestamp_nanos() / 1_000_000).try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(rfc3339(1_673_604_000_000), "2023-01-13T10:00:00Z");
        assert_eq!(rfc3339(1_673_604_000_123), "2023-01-13T10:00:00.123Z");
        assert_eq!(parse_rfc3339("2023-01-13T10:00:00.123Z"), Some(1_673_604_000_123));
        assert_eq!(parse_rfc3339("2023-01-13T11:00:00+01:00"), Some(1_673_604_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = Clock::manual(1000);
        assert_eq!(clock.now_ms(), 1000);
        clock.clone().advance(500);
        assert_eq!(clock.now_ms(), 1500);
        assert!(Clock::system().now_ms() > 1_700_000_000_000);
    }
}
