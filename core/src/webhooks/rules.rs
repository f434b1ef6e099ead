//! The pure rules deliveries follow: which events an endpoint receives, how an answer is
//! judged, when a failed attempt is retried and when an endpoint is deactivated.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::config::WebhookConfig;
use crate::crds::webhook::{DeactivationRule, EventType, RetryPolicy};

/// Whether `config` wants an event of `event_type` with this payload: its type is among
/// the endpoint's `eventTypes` (empty means all), and the document meets every criterion
/// of the endpoint's filter.
pub fn wants(config: &WebhookConfig, event_type: EventType, payload: &Value) -> bool {
    if !config.event_types.is_empty() && !config.event_types.contains(&event_type) {
        return false;
    }
    let Some(filter) = &config.filter else { return true };
    let str_field = |name: &str| payload.get(name).and_then(Value::as_str);
    if !filter.tags.is_empty() {
        let tags = payload.pointer("/metadata/tags").and_then(Value::as_array);
        let has =
            tags.is_some_and(|tags| tags.iter().filter_map(Value::as_str).any(|t| filter.tags.iter().any(|f| f == t)));
        if !has {
            return false;
        }
    }
    if !filter.file_types.is_empty() {
        let file_type = str_field("fileType").map(|t| t.trim_start_matches('.').to_ascii_lowercase());
        if !file_type
            .is_some_and(|t| filter.file_types.iter().any(|f| f.trim_start_matches('.').eq_ignore_ascii_case(&t)))
        {
            return false;
        }
    }
    if !filter.owners.is_empty() {
        let owner = str_field("uploadedBy").or_else(|| str_field("deletedBy"));
        if !owner.is_some_and(|o| filter.owners.iter().any(|f| f == o)) {
            return false;
        }
    }
    true
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx answer: delivered.
    Delivered,
    /// 410 Gone: the endpoint asks to be removed; it is deactivated at once.
    Gone,
    /// Anything else: retried while retries remain. `retry_after` is the delay the
    /// endpoint asked for with `Retry-After` on a 429 or 503.
    Failed { reason: String, retry_after: Option<Duration> },
}

/// Judges an HTTP answer. Redirects are failures: following one could lead a delivery to
/// an address the destination policy forbids, and a receiver that moved must be updated.
pub fn judge(status: u16, retry_after: Option<&str>, now: SystemTime) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        300..=399 => Verdict::Failed { reason: format!("redirect ({status}) not followed"), retry_after: None },
        429 | 503 => Verdict::Failed {
            reason: format!("HTTP {status}"),
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        _ => Verdict::Failed { reason: format!("HTTP {status}"), retry_after: None },
    }
}

/// The longest `Retry-After` honoured; an endpoint cannot park its deliveries for longer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `Retry-After` as delay-seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The delay before retry number `retry` (1 for the first retry): `initialBackoffSeconds`
/// doubled for each retry after the first, capped at `maxBackoffSeconds`, then spread by
/// up to 20 % (`jitter` in `[0, 1)`) when the policy asks for jitter.
pub fn backoff(policy: &RetryPolicy, retry: u32, jitter: f64) -> Duration {
    let initial = u64::from(policy.initial_backoff_seconds.max(1));
    let cap = u64::from(policy.max_backoff_seconds.max(policy.initial_backoff_seconds).max(1));
    let doublings = retry.saturating_sub(1).min(40);
    let base = initial.saturating_mul(1u64 << doublings).min(cap);
    let base = Duration::from_secs(base);
    if policy.jitter { base.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0)) } else { base }
}

/// What happens after a failed attempt: the delay before the next one, or `None` when
/// no retry remains and the delivery is FAILED. `attempts` counts the attempts made,
/// this one included; an endpoint's `Retry-After` wins over a shorter backoff.
pub fn next_retry(policy: &RetryPolicy, attempts: u32, retry_after: Option<Duration>, jitter: f64) -> Option<Duration> {
    if attempts > policy.max_retries {
        return None;
    }
    let delay = backoff(policy, attempts, jitter);
    Some(retry_after.map_or(delay, |asked| asked.max(delay)))
}

/// Whether an endpoint with `calls` attempts of which `failures` failed since it was last
/// activated is to be deactivated: at least `minimumCalls` calls, and a failure rate above
/// `failureRatePercent`.
pub fn should_deactivate(rule: &DeactivationRule, calls: i64, failures: i64) -> bool {
    rule.enabled
        && calls >= i64::from(rule.minimum_calls)
        && failures * 100 > i64::from(rule.failure_rate_percent) * calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretHandle;
    use crate::crds::webhook::EventFilter;
    use serde_json::json;

    fn config(event_types: Vec<EventType>, filter: Option<EventFilter>) -> WebhookConfig {
        WebhookConfig {
            url: "http://example.com/hook".into(),
            signing_key: SecretHandle::new("s", "k"),
            event_types,
            filter,
            retry: RetryPolicy::default(),
            timeout_seconds: 30,
            rate_limit: None,
            max_concurrency: 4,
            headers: vec![],
            paused: false,
            deactivation: DeactivationRule::default(),
        }
    }

    fn doc(tags: &[&str], file_type: &str, owner: &str) -> Value {
        json!({"fileType": file_type, "uploadedBy": owner, "metadata": {"tags": tags}})
    }

    #[test]
    fn event_types_empty_means_all() {
        let all = config(vec![], None);
        let some = config(vec![EventType::DocumentDeleted], None);
        let payload = doc(&[], "pdf", "ann");
        assert!(wants(&all, EventType::DocumentUploaded, &payload));
        assert!(!wants(&some, EventType::DocumentUploaded, &payload));
        assert!(wants(&some, EventType::DocumentDeleted, &payload));
    }

    #[test]
    fn every_filter_criterion_must_match() {
        let filter =
            EventFilter { tags: vec!["legal".into()], file_types: vec!["PDF".into()], owners: vec!["ann".into()] };
        let c = config(vec![], Some(filter));
        let t = EventType::DocumentUploaded;
        assert!(wants(&c, t, &doc(&["x", "legal"], "pdf", "ann")));
        assert!(!wants(&c, t, &doc(&["x"], "pdf", "ann")), "tag missing");
        assert!(!wants(&c, t, &doc(&["legal"], "docx", "ann")), "file type");
        assert!(!wants(&c, t, &doc(&["legal"], "pdf", "bob")), "owner");
        assert!(!wants(&c, t, &json!({})), "a payload without the fields does not match a filter");
    }

    #[test]
    fn answers_are_judged() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(judge(200, None, now), Verdict::Delivered);
        assert_eq!(judge(204, None, now), Verdict::Delivered);
        assert_eq!(judge(410, None, now), Verdict::Gone);
        assert!(matches!(judge(302, Some("5"), now), Verdict::Failed { retry_after: None, .. }));
        assert!(matches!(judge(500, Some("5"), now), Verdict::Failed { retry_after: None, .. }), "only 429/503");
        assert_eq!(
            judge(429, Some("7"), now),
            Verdict::Failed { reason: "HTTP 429".into(), retry_after: Some(Duration::from_secs(7)) }
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert!(
            matches!(judge(503, Some(&date), now), Verdict::Failed { retry_after: Some(d), .. } if d == Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn the_default_schedule_is_at_once_then_2_4_8_seconds_then_failed() {
        let policy = RetryPolicy { jitter: false, ..RetryPolicy::default() };
        let delays: Vec<_> = (1..=4).map(|n| next_retry(&policy, n, None, 0.0)).collect();
        assert_eq!(
            delays,
            vec![Some(Duration::from_secs(2)), Some(Duration::from_secs(4)), Some(Duration::from_secs(8)), None]
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered_by_at_most_a_fifth() {
        let policy = RetryPolicy { max_retries: 20, initial_backoff_seconds: 1, max_backoff_seconds: 60, jitter: true };
        assert_eq!(backoff(&policy, 20, 0.0), Duration::from_secs(60));
        assert_eq!(backoff(&policy, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&policy, 3, 0.999_999), Duration::from_secs(4).mul_f64(1.0 + 0.2 * 0.999_999));
        assert!(backoff(&policy, 3, 0.5) > Duration::from_secs(4));
        assert_eq!(backoff(&policy, u32::MAX, 0.0), Duration::from_secs(60), "no overflow");
    }

    #[test]
    fn retry_after_wins_over_a_shorter_backoff_only() {
        let policy = RetryPolicy { jitter: false, ..RetryPolicy::default() };
        assert_eq!(next_retry(&policy, 1, Some(Duration::from_secs(10)), 0.0), Some(Duration::from_secs(10)));
        assert_eq!(next_retry(&policy, 1, Some(Duration::from_secs(1)), 0.0), Some(Duration::from_secs(2)));
        assert_eq!(next_retry(&policy, 4, Some(Duration::from_secs(1)), 0.0), None, "retries exhausted");
    }

    #[test]
    fn deactivation_needs_enough_calls_and_more_than_the_rate() {
        let rule = DeactivationRule::default();
        assert!(!should_deactivate(&rule, 9, 9), "fewer than 10 calls");
        assert!(should_deactivate(&rule, 10, 9));
        assert!(!should_deactivate(&rule, 10, 8), "80 % is not more than 80 %");
        assert!(!should_deactivate(&DeactivationRule { enabled: false, ..rule }, 100, 100));
    }
}
