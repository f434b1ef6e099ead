//! The limits that keep the gateway serving under careless and hostile clients, and the
//! admission checks that apply them before anything costly is done for a request:
//! declared lengths over the limit are refused before a byte of the body is read, uploads
//! in progress are bounded per replica, failed token checks are bounded per client
//! address, and a request refused with 429 or 503 has a bounded prefix of its body read so
//! that the client sees the answer rather than a reset connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::AppState;
use crate::error::ApiError;

/// The largest JSON (or other buffered) request body, in bytes.
pub const MAX_JSON_BYTES: usize = 1 << 20;
/// What a multipart upload may carry beside its file: the form's other fields and framing.
pub const FORM_OVERHEAD_BYTES: u64 = 256 << 10;
/// The longest bearer token checked; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 << 10;
/// Header fields a request may carry, and their bytes in all: past either, 431 with the
/// usual JSON body.
pub const MAX_HEADER_FIELDS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// The fields past which the HTTP parser itself answers 431 (with no body, as it cannot
/// reach the API): well above [`MAX_HEADER_FIELDS`], so that the API answers first.
pub const PARSER_MAX_HEADER_FIELDS: usize = 500;

/// 431 for a request head with more header fields or bytes than the limits, with a JSON
/// body that says which limit (the parser's own 431, for heads far past them, has no body).
fn oversized_head(headers: &HeaderMap) -> Option<Response> {
    // As on the wire: name, ": ", value, CRLF.
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    (headers.len() > MAX_HEADER_FIELDS || bytes > MAX_HEADER_BYTES).then(|| {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} header fields of {bytes} bytes; at most {MAX_HEADER_FIELDS} fields and {MAX_HEADER_BYTES} bytes are read",
                headers.len()
            ),
        )
        .into_response()
    })
}

/// How much of a refused request's body is read so that its client sees the refusal.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Limits of one gateway replica.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// A request's head must arrive within this time; an idle keep-alive connection is
    /// closed after it too.
    pub header_timeout: Duration,
    /// A request body that sends nothing for this long fails.
    pub body_timeout: Duration,
    /// Open sockets at most, WebSockets included: at the cap the longest-open idle
    /// connection is closed to make room, or the new one refused when all are busy.
    pub max_connections: usize,
    /// Uploads (whole, chunk, tus segment, completion) in progress at once; more are
    /// answered 503 with `Retry-After`.
    pub max_uploads: usize,
    /// Failed token checks allowed per client address and second (twice that in a burst);
    /// past it the address gets 429 without its tokens being checked. 0: unlimited.
    pub auth_failures_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_uploads: 64,
            auth_failures_per_second: 20,
        }
    }
}

/// What the limits count while the gateway serves.
#[derive(Debug)]
pub struct Admission {
    uploads: Arc<Semaphore>,
    failures: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Addresses past their failure budget, and until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Admission {
    pub fn new(limits: &Limits) -> Self {
        let failures = NonZeroU32::new(limits.auth_failures_per_second).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { uploads: Arc::new(Semaphore::new(limits.max_uploads.max(1))), failures, blocked: Mutex::default() }
    }

    /// A place for one upload, or `None` when every place is taken.
    pub fn upload(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.uploads).try_acquire_owned().ok()
    }

    /// How long `address` must wait before its tokens are checked again, if it is past
    /// its budget of failures.
    pub fn blocked(&self, address: IpAddr) -> Option<Duration> {
        let blocked = self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        blocked.get(&address).and_then(|until| until.checked_duration_since(Instant::now()))
    }

    /// Counts a failed token check from `address`.
    pub fn failed(&self, address: IpAddr) {
        let Some(failures) = &self.failures else { return };
        if let Err(not_until) = failures.check_key(&address) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            let until = Instant::now() + wait.max(Duration::from_secs(1));
            self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(address, until);
        }
    }

    /// Forgets addresses whose budget is whole again and whose block ran out, so that the
    /// tables hold only the addresses failing now.
    pub fn prune(&self) {
        if let Some(failures) = &self.failures {
            failures.retain_recent();
            failures.shrink_to_fit();
        }
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
    }

    /// Addresses the tables hold (for tests and metrics).
    pub fn tracked_addresses(&self) -> usize {
        self.failures.as_ref().map_or(0, RateLimiter::len)
            + self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// The length a request declares, when it declares one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// 413 for a body declared larger than `limit`; the body is never read, so the
/// connection closes after the answer.
pub fn too_large(limit: u64) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than the limit of {limit} bytes"))
        .with_header(header::CONNECTION, "close")
}

/// A place among the replica's uploads in progress, held by an upload handler until it
/// answers. Taken before anything else of the request: a declared length over the upload
/// limit is refused at once (413), and without a free place the answer is 503 with
/// `Retry-After`.
#[derive(Debug)]
pub struct UploadPlace(#[allow(dead_code)] OwnedSemaphorePermit);

impl FromRequestParts<AppState> for UploadPlace {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.docs().max_upload().saturating_add(FORM_OVERHEAD_BYTES);
        if declared_length(&parts.headers).is_some_and(|n| n > limit) {
            return Err(too_large(limit));
        }
        let Some(place) = state.admission.upload() else {
            state.metrics.uploads_refused.inc();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this replica is taking as many uploads as it may at once; try again shortly",
            )
            .with_header(header::RETRY_AFTER, "1"));
        };
        Ok(Self(place))
    }
}

/// Middleware on every route, the admission checks in one layer:
/// - a client address past its budget of failed token checks is answered 429 before
///   anything else is done for it (its tokens are not even parsed), and every 401 the
///   gateway answers — a bad token in a header, in `?token=`, on a WebSocket upgrade —
///   counts against its address; the probes ([`crate::health::PROBES`]) stay open;
/// - a request head past the limits is answered 431, with a JSON body that says which limit;
/// - a refusal of a request with a body is answered so that its client sees it (see
///   `drain_refused`).
pub async fn guard(
    axum::extract::State(admission): axum::extract::State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    let probe = crate::health::PROBES.contains(&request.uri().path());
    if let Some(peer) = peer
        && !probe
        && let Some(wait) = admission.blocked(peer)
    {
        let seconds = wait.as_secs_f64().ceil().max(1.0);
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many failed token checks from this address")
            .with_header(header::RETRY_AFTER, &format!("{seconds:.0}"))
            .into_response();
    }
    if let Some(refused) = oversized_head(request.headers()) {
        return refused;
    }
    let response = drain_refused(request, next).await;
    if let Some(peer) = peer
        && response.status() == StatusCode::UNAUTHORIZED
    {
        admission.failed(peer);
    }
    response
}

/// A request body that hands itself back when dropped unread, so that a refusal can read
/// what its client is still sending.
struct Returning {
    inner: Option<Body>,
    ended: bool,
    back: Option<oneshot::Sender<Body>>,
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(http_body::Body::size_hint).unwrap_or_default()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if !self.ended
            && let (Some(inner), Some(back)) = (self.inner.take(), self.back.take())
        {
            let _ = back.send(inner);
        }
    }
}

/// Reads up to `limit` bytes of `body`; whether it ended within them.
async fn drain(mut body: Body, limit: usize) -> bool {
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > limit {
                return false;
            }
        }
    }
    true
}

/// When a request carrying a body is refused with 429 or 503 before its body was read, up
/// to 1 MiB of the body is read (for up to 2 s) before the answer is sent, so that a client
/// still sending sees the answer and its `Retry-After` instead of a reset; a longer body
/// closes the connection after the answer.
async fn drain_refused(request: Request, next: Next) -> Response {
    let declared = declared_length(request.headers());
    let has_body = declared.is_some_and(|n| n > 0) || request.headers().contains_key(header::TRANSFER_ENCODING);
    // A body declared longer than what is read would not end within it: not worth waiting.
    let too_long = declared.is_some_and(|n| n > DRAIN_BYTES as u64);
    // A client waiting for 100 Continue sends nothing until told to: leave it waiting.
    let waits =
        request.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !has_body || waits {
        return next.run(request).await;
    }
    if too_long {
        let mut response = next.run(request).await;
        if matches!(response.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return response;
    }
    let (back, mut returned) = oneshot::channel();
    let request = request.map(|body| Body::new(Returning { inner: Some(body), ended: false, back: Some(back) }));
    let mut response = next.run(request).await;
    // The handler has answered: its request's body is gone (read to its end, or handed
    // back unread).
    if matches!(response.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
        && let Ok(body) = returned.try_recv()
    {
        let drained = tokio::time::timeout(DRAIN_TIME, drain(body, DRAIN_BYTES)).await.unwrap_or(false);
        if !drained {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    response
}
