//! The accept loop: HTTP/1.1 connections served by hyper under the limits that keep one
//! careless or hostile client from taking the gateway down (see [`Limits`]).
//!
//! `axum::serve` sets no timer, so a client sending its request head one byte a second, or
//! an idle socket, was kept forever, and sockets were accepted until the process ran out of
//! file descriptors. Here every connection must send a whole request head within the
//! header timeout (which also closes idle keep-alive connections), a request body must
//! make progress within the body timeout, and at most `max_connections` sockets are open:
//! at the cap the longest-open connection that is between requests is closed to make room
//! for the new one, or, when every connection is busy, the new one is refused. A socket
//! upgraded to a WebSocket keeps its place under the cap until it closes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::limits::Limits;

/// How long a new connection at the cap waits for the idle one shed for it to close.
const ROOM_WAIT: Duration = Duration::from_millis(250);

/// A socket holding its place under the connection cap for as long as it is open, also
/// after an upgrade hands it to a WebSocket.
struct Counted {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One served connection, as the cap sees it.
#[derive(Debug, Default)]
struct Conn {
    /// Requests in progress, each until its response body is sent or dropped.
    busy: AtomicUsize,
    shedding: AtomicBool,
    shed: Notify,
}

/// Counts a request in progress on its connection until dropped.
struct Busy(Arc<Conn>);

impl Busy {
    fn enter(conn: &Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(conn))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connections being served, oldest first.
#[derive(Debug, Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::default());
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, Arc::clone(&conn));
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
    }

    /// Asks the longest-open connection that is between requests to close; false when
    /// every connection is busy.
    fn shed_one(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for conn in open.values() {
            if conn.busy.load(Ordering::SeqCst) == 0 && !conn.shedding.swap(true, Ordering::SeqCst) {
                conn.shed.notify_one();
                return true;
            }
        }
        false
    }
}

/// Serves `router` on `listener` under `limits` until `stop` resolves, then lets the
/// requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Registry::default());
    let tracker = TaskTracker::new();
    let (closing, closed) = watch::channel(false);
    // hyper's own HTTP/1 connection rather than hyper-util's version-detecting one, which
    // waits for a first byte before any timer runs (an idle socket would never time out).
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(crate::limits::PARSER_MAX_HEADER_FIELDS);
    let builder = Arc::new(builder);
    let body_timeout = limits.body_timeout;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let place = if let Ok(place) = Arc::clone(&places).try_acquire_owned() {
            place
        } else {
            let room = if registry.shed_one() {
                tokio::time::timeout(ROOM_WAIT, Arc::clone(&places).acquire_owned()).await.ok().and_then(Result::ok)
            } else {
                None
            };
            let Some(place) = room else {
                tracing::debug!(%peer, "refusing a connection: every place is taken by a busy one");
                continue;
            };
            place
        };
        stream.set_nodelay(true).ok();
        let (id, conn) = registry.add();
        let (registry, builder, router, mut closed) =
            (Arc::clone(&registry), Arc::clone(&builder), router.clone(), closed.clone());
        tracker.spawn(async move {
            let counted = Arc::clone(&conn);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let busy = Busy::enter(&counted);
                let mut request = request.map(|body| Body::new(TimeoutBody::new(body_timeout, body)));
                request.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await.unwrap_or_else(|never: Infallible| match never {});
                    // Busy until the response body is sent (or dropped with the connection).
                    Ok::<_, Infallible>(response.map(move |body| {
                        Body::new(body.map_frame(move |frame| {
                            let _ = &busy;
                            frame
                        }))
                    }))
                }
            });
            let served =
                builder.serve_connection(TokioIo::new(Counted { stream, _place: place }), service).with_upgrades();
            tokio::pin!(served);
            let mut shutting = false;
            loop {
                tokio::select! {
                    result = served.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                        break;
                    }
                    () = conn.shed.notified() => {
                        // No request is in progress (checked while the connection is not
                        // polled): dropping it closes the socket and cuts nothing short.
                        if conn.busy.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        served.as_mut().graceful_shutdown();
                    }
                    _ = closed.wait_for(|c| *c), if !shutting => {
                        shutting = true;
                        served.as_mut().graceful_shutdown();
                    }
                }
            }
            registry.remove(id);
        });
    }
    drop(listener);
    let _ = closing.send(true);
    tracker.close();
    tracker.wait().await;
    Ok(())
}
