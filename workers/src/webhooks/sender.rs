//! Sends one signed delivery and reports what happened.
//!
//! Every request carries both signature schemes over the exact bytes sent: Standard
//! Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature` with one `v1,`
//! signature per signing key) and the seed receivers' `X-Webhook-Signature`, `X-Event-Type`
//! and `X-Timestamp`. Redirects are never followed and proxies never used; the destination
//! policy is applied to every address the sender may connect to, after DNS resolution.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use vellum_core::signing::{legacy_signature, standard_signature};
use vellum_core::webhooks::rules::{Verdict, judge};
use vellum_core::webhooks::{Attempt, DestinationPolicy, Endpoint, truncate_body};

/// Resolves host names and keeps only the addresses the policy allows, so the connection
/// can only go to a checked address (a name that resolves to a public address at check
/// time and a private one at connect time cannot slip through).
#[derive(Debug)]
struct PolicyResolver {
    policy: Arc<DestinationPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusals = Vec::new();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusals.push(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refusals.first().cloned().unwrap_or_else(|| format!("{host} has no address"));
                return Err(Box::new(Refused(format!("{host} resolves only to refused addresses: {why}"))) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// A delivery the destination policy refused.
#[derive(Debug, thiserror::Error)]
#[error("destination refused: {0}")]
struct Refused(String);

/// Sends deliveries. One per process: the connection pool is shared by all endpoints.
#[derive(Clone, Debug)]
pub struct Sender {
    client: reqwest::Client,
    policy: Arc<DestinationPolicy>,
}

/// What a send found: the attempt to log and the verdict on it.
#[derive(Clone, Debug)]
pub struct Sent {
    pub attempt: Attempt,
    pub verdict: Verdict,
}

impl Sender {
    pub fn new(policy: DestinationPolicy) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver { policy: Arc::clone(&policy) }))
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { client, policy })
    }

    /// Why a URL may not be delivered to before any connection is tried: a literal IP
    /// address (which never reaches the resolver) the policy refuses, or not HTTP(S).
    pub fn precheck(&self, url: &str) -> Result<reqwest::Url, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("unsupported URL scheme {:?}", url.scheme()));
        }
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(url::Host::Domain(_)) => None,
            None => return Err("the URL has no host".into()),
        };
        if let Some(addr) = literal {
            self.policy.check(addr).map_err(|e| format!("destination refused: {e}"))?;
        }
        Ok(url)
    }

    /// Sends `body` to the endpoint as event `event_id` of type `event_type`, signed with
    /// every key of the endpoint, and waits at most the endpoint's timeout.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        event_id: &str,
        event_type: &str,
        event_timestamp: i64,
        body: &str,
        now_ms: i64,
    ) -> Sent {
        let started = Instant::now();
        let fail = |error: String, status: Option<u16>| Sent {
            attempt: Attempt {
                started_at: now_ms,
                duration_ms: elapsed_ms(started),
                status_code: status,
                success: false,
                error: Some(error.clone()),
                response_body: None,
            },
            verdict: Verdict::Failed { reason: error, retry_after: None },
        };
        let url = match self.precheck(&endpoint.config.url) {
            Ok(url) => url,
            Err(e) => return fail(e, None),
        };
        let headers = match signed_headers(endpoint, event_id, event_type, event_timestamp, body, now_ms / 1000) {
            Ok(h) => h,
            Err(e) => return fail(e, None),
        };
        let timeout = Duration::from_secs(u64::from(endpoint.config.timeout_seconds.max(1)));
        let request = self.client.post(url).headers(headers).body(body.to_owned()).timeout(timeout);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return fail(describe(&e), None),
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let response_body = read_prefix(response, timeout.saturating_sub(started.elapsed())).await;
        let verdict = judge(status, retry_after.as_deref(), std::time::SystemTime::now());
        let success = verdict == Verdict::Delivered;
        let error = match &verdict {
            Verdict::Delivered => None,
            Verdict::Gone => Some("HTTP 410 Gone".to_owned()),
            Verdict::Failed { reason, .. } => Some(reason.clone()),
        };
        Sent {
            attempt: Attempt {
                started_at: now_ms,
                duration_ms: elapsed_ms(started),
                status_code: Some(status),
                success,
                error,
                response_body: Some(response_body),
            },
            verdict,
        }
    }
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// An error with its causes, which is where reqwest keeps the useful part ("connection
/// refused", "destination refused: ...").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() { "timed out".to_owned() } else { error.to_string() };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads at most the logged prefix of a response body, within `budget`.
async fn read_prefix(response: reqwest::Response, budget: Duration) -> String {
    let mut bytes = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            bytes.extend_from_slice(&chunk);
            if bytes.len() >= vellum_core::webhooks::MAX_LOGGED_BODY {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(budget.max(Duration::from_millis(100)), read).await;
    truncate_body(&String::from_utf8_lossy(&bytes))
}

/// The headers of one attempt: content type, both signature schemes, and the endpoint's
/// extra headers (which cannot replace ours: the CRD refuses them, and they are set first
/// here so ours win in any case).
pub fn signed_headers(
    endpoint: &Endpoint,
    event_id: &str,
    event_type: &str,
    event_timestamp_ms: i64,
    body: &str,
    now_s: i64,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for extra in &endpoint.config.headers {
        let name =
            HeaderName::from_bytes(extra.name.as_bytes()).map_err(|_| format!("bad header name {:?}", extra.name))?;
        let value = HeaderValue::from_str(&extra.value).map_err(|_| format!("bad value for header {}", extra.name))?;
        headers.insert(name, value);
    }
    let Some(current) = endpoint.keys.first() else {
        return Err("the endpoint has no signing key".into());
    };
    let signatures: Vec<String> =
        endpoint.keys.iter().map(|key| standard_signature(key, event_id, now_s, body.as_bytes())).collect();
    let value = |s: &str| HeaderValue::from_str(s).map_err(|_| format!("{s:?} is not a header value"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(concat!("vellum-webhooks/", env!("CARGO_PKG_VERSION"))));
    headers.insert("webhook-id", value(event_id)?);
    headers.insert("webhook-timestamp", value(&now_s.to_string())?);
    headers.insert("webhook-signature", value(&signatures.join(" "))?);
    headers.insert("x-webhook-signature", value(&legacy_signature(current, body.as_bytes()))?);
    headers.insert("x-event-type", value(event_type)?);
    headers.insert("x-timestamp", value(&event_timestamp_ms.to_string())?);
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vellum_core::config::{SecretHandle, WebhookConfig};
    use vellum_core::crds::webhook::{DeactivationRule, HttpHeader, RetryPolicy};

    fn endpoint(url: &str, keys: Vec<Vec<u8>>) -> Endpoint {
        Endpoint {
            name: "e".into(),
            config: WebhookConfig {
                url: url.into(),
                signing_key: SecretHandle::new("s", "k"),
                event_types: vec![],
                filter: None,
                retry: RetryPolicy::default(),
                timeout_seconds: 1,
                rate_limit: None,
                max_concurrency: 1,
                headers: vec![
                    HttpHeader { name: "X-Webhook-Signature".into(), value: "forged".into() },
                    HttpHeader { name: "X-Team".into(), value: "docs".into() },
                ],
                paused: false,
                deactivation: DeactivationRule::default(),
            },
            keys,
        }
    }

    #[test]
    fn both_schemes_sign_and_rotation_adds_a_signature() {
        let e = endpoint("http://example.com", vec![b"new".to_vec(), b"old".to_vec()]);
        let h = signed_headers(&e, "evt_1", "DOCUMENT_UPLOADED", 1_700_000_000_123, "{}", 1_700_000_000).unwrap();
        assert_eq!(h["webhook-id"], "evt_1");
        assert_eq!(h["webhook-timestamp"], "1700000000");
        let sigs: Vec<&str> = h["webhook-signature"].to_str().unwrap().split(' ').collect();
        assert_eq!(
            sigs,
            [
                standard_signature(b"new", "evt_1", 1_700_000_000, b"{}"),
                standard_signature(b"old", "evt_1", 1_700_000_000, b"{}")
            ]
        );
        assert_eq!(
            h["x-webhook-signature"],
            legacy_signature(b"new", b"{}").as_str(),
            "extra headers cannot forge ours"
        );
        assert_eq!(h["x-event-type"], "DOCUMENT_UPLOADED");
        assert_eq!(h["x-timestamp"], "1700000000123");
        assert_eq!(h["x-team"], "docs");
    }

    #[tokio::test]
    async fn literal_and_resolved_forbidden_addresses_are_refused_without_a_request() {
        let sender = Sender::new(DestinationPolicy::default()).unwrap();
        for url in
            ["http://127.0.0.1:9/hook", "http://[::1]:9/hook", "http://169.254.169.254/latest", "http://localhost:9/"]
        {
            let sent = sender.send(&endpoint(url, vec![b"k".to_vec()]), "e", "T", 0, "{}", 0).await;
            let error = sent.attempt.error.unwrap();
            assert!(error.contains("destination refused"), "{url}: {error}");
            assert_eq!(sent.attempt.status_code, None);
        }
        assert!(sender.precheck("ftp://example.com/").unwrap_err().contains("scheme"));
    }
}
