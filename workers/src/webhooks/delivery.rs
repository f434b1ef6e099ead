//! The webhook delivery engine: one dispatcher per endpoint, working from the delivery log.
//!
//! Endpoints are isolated: each has its own dispatcher, its own concurrency limit
//! (`maxConcurrency` attempts in flight) and its own rate limiter, so a slow or failing
//! endpoint holds only its own deliveries back. Retries wait in the database, not in
//! memory, so a restarted worker picks up exactly where the log says.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use vellum_core::clock::Clock;
use vellum_core::config::WebhookConfig;
use vellum_core::events::Event;
use vellum_core::store::{Metadata, StoreError};
use vellum_core::webhooks::rules::{Verdict, next_retry};
use vellum_core::webhooks::{self, Delivery, Endpoint, Next, Outcome};

use super::sender::Sender;

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a rotated-out signing key keeps signing beside the new one.
    pub key_grace: Duration,
    /// A lease lasts the endpoint's timeout plus this margin; a delivery whose dispatcher
    /// died is retried once it runs out.
    pub lease_margin: Duration,
    /// Longest idle wait before a dispatcher looks at the log again on its own.
    pub idle_poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            key_grace: Duration::from_secs(24 * 3600),
            lease_margin: Duration::from_secs(30),
            idle_poll: Duration::from_secs(5),
        }
    }
}

/// An endpoint as configured: what [`Engine::set_endpoints`] takes.
#[derive(Clone, Debug)]
pub struct Configured {
    pub name: String,
    pub config: WebhookConfig,
    /// The current signing key's bytes.
    pub key: Vec<u8>,
}

struct Dispatcher {
    endpoint: watch::Sender<Endpoint>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

struct Inner {
    meta: Metadata,
    clock: Clock,
    sender: Sender,
    settings: Settings,
    endpoints: Mutex<Arc<Vec<Endpoint>>>,
    dispatchers: Mutex<HashMap<String, Dispatcher>>,
    /// Whether this engine sends (a worker, standalone mode) or only keeps the endpoints
    /// and the log (a cluster's gateway replica, whose workers send).
    dispatching: bool,
    /// Where attempts are counted, when the process reports metrics.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    stop: watch::Sender<bool>,
}

/// Delivers webhooks. Cheap to clone.
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("endpoints", &self.endpoint_names()).finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine that delivers: one dispatcher per endpoint.
    pub fn new(meta: Metadata, clock: Clock, sender: Sender, settings: Settings) -> Self {
        Self::with(meta, clock, sender, settings, true)
    }

    /// An engine that keeps the endpoints, their signing keys and the delivery log but sends
    /// nothing (test sends aside): a cluster's gateway replica. Its workers deliver, so an
    /// endpoint's concurrency and rate limits hold across the platform, not per replica.
    pub fn without_dispatch(meta: Metadata, clock: Clock, sender: Sender, settings: Settings) -> Self {
        Self::with(meta, clock, sender, settings, false)
    }

    fn with(meta: Metadata, clock: Clock, sender: Sender, settings: Settings, dispatching: bool) -> Self {
        Self(Arc::new(Inner {
            meta,
            clock,
            sender,
            settings,
            endpoints: Mutex::new(Arc::new(Vec::new())),
            dispatchers: Mutex::new(HashMap::new()),
            dispatching,
            metrics: std::sync::OnceLock::new(),
            stop: watch::channel(false).0,
        }))
    }

    /// Counts every attempt from now on in `metrics`.
    pub fn report_to(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.0.metrics.set(metrics);
    }

    pub fn sender(&self) -> &Sender {
        &self.0.sender
    }

    pub fn meta(&self) -> &Metadata {
        &self.0.meta
    }

    fn endpoint_names(&self) -> Vec<String> {
        self.endpoints().iter().map(|e| e.name.clone()).collect()
    }

    /// The endpoints deliveries are made to now.
    pub fn endpoints(&self) -> Arc<Vec<Endpoint>> {
        Arc::clone(&self.0.endpoints.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the set of endpoints: new ones get a dispatcher, changed ones are
    /// reconfigured in place, removed ones stop after their attempts in flight.
    pub async fn set_endpoints(&self, configured: Vec<Configured>) -> Result<(), StoreError> {
        let now = self.0.clock.now_ms();
        let mut endpoints = Vec::with_capacity(configured.len());
        for c in configured {
            let keys = webhooks::signing_keys(&self.0.meta, &c.name, &c.key, self.0.settings.key_grace, now).await?;
            endpoints.push(Endpoint { name: c.name, config: c.config, keys });
        }
        let mut dispatchers = self.0.dispatchers.lock().unwrap_or_else(PoisonError::into_inner);
        dispatchers.retain(|name, d| {
            let keep = endpoints.iter().any(|e| &e.name == name);
            if !keep {
                d.task.abort();
            }
            keep
        });
        for endpoint in endpoints.iter().filter(|_| self.0.dispatching) {
            if let Some(d) = dispatchers.get(&endpoint.name) {
                d.endpoint.send_replace(endpoint.clone());
                d.wake.notify_one();
            } else {
                let (tx, rx) = watch::channel(endpoint.clone());
                let wake = Arc::new(Notify::new());
                let task = tokio::spawn(dispatch(Arc::clone(&self.0), rx, Arc::clone(&wake)));
                dispatchers.insert(endpoint.name.clone(), Dispatcher { endpoint: tx, wake, task });
            }
        }
        *self.0.endpoints.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(endpoints);
        Ok(())
    }

    /// Queues an event for every endpoint that wants it and wakes their dispatchers.
    pub async fn ingest(&self, event: &Event) -> Result<(), StoreError> {
        let endpoints = self.endpoints();
        let queued = webhooks::ingest(&self.0.meta, &endpoints, event, self.0.clock.now_ms()).await?;
        self.wake(&queued);
        Ok(())
    }

    /// Wakes the dispatchers of these endpoints (after a replay or reactivation).
    pub fn wake(&self, names: &[String]) {
        let dispatchers = self.0.dispatchers.lock().unwrap_or_else(PoisonError::into_inner);
        for name in names {
            if let Some(d) = dispatchers.get(name) {
                d.wake.notify_one();
            }
        }
    }

    /// Stops the dispatchers; attempts in flight finish and are recorded first.
    pub async fn shutdown(&self) {
        self.0.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = {
            let mut dispatchers = self.0.dispatchers.lock().unwrap_or_else(PoisonError::into_inner);
            dispatchers.drain().map(|(_, d)| d.task).collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn limiter(config: &WebhookConfig) -> Option<DefaultDirectRateLimiter> {
    let limit = config.rate_limit.as_ref()?;
    let rate = NonZeroU32::new(limit.requests_per_second)?;
    let burst = NonZeroU32::new(limit.burst.max(1)).unwrap_or(rate);
    Some(RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Finished attempts waiting to be recorded, per endpoint; an attempt holds its slot until
/// its outcome is queued here, so a database slower than the endpoint slows sending down
/// rather than piling outcomes up in memory.
const RECORD_QUEUE: usize = 512;

/// Most deliveries one dispatcher holds leased at a time.
const LEASE_WINDOW_MAX: usize = 256;

/// Most attempts recorded in one transaction.
const RECORD_BATCH: usize = 256;

/// How many deliveries a dispatcher holds leased (started or waiting) at most, and how
/// many must be free of that window before it leases more. Leasing in batches keeps the
/// log's round trips far fewer than the deliveries; a rate-limited endpoint leases only a
/// couple it can start now, since deliveries waiting for their turn would spend their
/// lease waiting.
fn lease_window(concurrency: usize, rate_limited: bool) -> (usize, usize) {
    if rate_limited {
        (concurrency.min(2), 1)
    } else {
        let window = (8 * concurrency).min(LEASE_WINDOW_MAX).max(concurrency);
        (window, (window / 2).max(1))
    }
}

/// One endpoint's dispatcher: leases due deliveries a batch at a time (see
/// [`lease_window`]: a slot that frees finds the next delivery already leased),
/// sends each in its own task as concurrency and the rate limit allow, and hands the
/// outcomes to the endpoint's recorder, which writes them in batches.
#[allow(clippy::too_many_lines)]
async fn dispatch(inner: Arc<Inner>, mut endpoint_rx: watch::Receiver<Endpoint>, wake: Arc<Notify>) {
    let mut stop = inner.stop.subscribe();
    let mut endpoint = endpoint_rx.borrow_and_update().clone();
    let name = endpoint.name.clone();
    let mut concurrency = endpoint.config.max_concurrency.max(1) as usize;
    let mut permits = Arc::new(Semaphore::new(concurrency));
    let mut rate = limiter(&endpoint.config).map(Arc::new);
    // Set by the recorder when a batch deactivated the endpoint.
    let recheck = Arc::new(AtomicBool::new(false));
    let (outcomes, queued) = mpsc::channel::<Outcome>(RECORD_QUEUE);
    let recorder = tokio::spawn(record(
        Arc::clone(&inner),
        name.clone(),
        endpoint_rx.clone(),
        queued,
        Arc::clone(&wake),
        Arc::clone(&recheck),
    ));
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Leased deliveries not yet started.
    let mut leased: VecDeque<Delivery> = VecDeque::new();
    // When the last lease found less than it asked for, the log is not asked again before
    // this time (the next delivery falls due, or the idle poll), unless woken.
    let mut drained_until: Option<tokio::time::Instant> = None;
    // Whether the endpoint is active, and when that was read; `None` asks for a fresh read.
    let mut active = true;
    let mut checked: Option<tokio::time::Instant> = None;
    loop {
        while tasks.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        if recheck.swap(false, Ordering::AcqRel) {
            checked = None;
        }
        // Compared rather than asked `has_changed`: waking on `changed()` below has already
        // marked the new value seen.
        let latest = endpoint_rx.borrow_and_update().clone();
        if latest.config != endpoint.config || latest.keys != endpoint.keys {
            endpoint = latest;
            if endpoint.config.max_concurrency.max(1) as usize != concurrency {
                concurrency = endpoint.config.max_concurrency.max(1) as usize;
                permits = Arc::new(Semaphore::new(concurrency));
            }
            rate = limiter(&endpoint.config).map(Arc::new);
            checked = None;
            drained_until = None;
        }
        // Another worker may have deactivated (or an admin reactivated) the endpoint; a
        // deactivation by one of our own attempts is read at once.
        if checked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            match webhooks::activation(&inner.meta, &name).await {
                Ok(a) => (active, checked) = (a.active, Some(tokio::time::Instant::now())),
                Err(e) => tracing::warn!(webhook = %name, error = %e, "reading the endpoint's state"),
            }
        }
        let now = tokio::time::Instant::now();
        if drained_until.is_some_and(|until| until <= now) {
            drained_until = None;
        }
        if endpoint.config.paused || !active {
            release(&inner, &name, &mut leased).await;
        } else {
            let (window, refill) = lease_window(concurrency, rate.is_some());
            let held = leased.len() + tasks.len();
            if drained_until.is_none() && held + refill <= window {
                let limit = window - held;
                // Long enough for the last of them to wait its turn behind every delivery
                // held before it, each taking the whole timeout, and then be sent.
                let rounds = u32::try_from(window.div_ceil(concurrency)).unwrap_or(u32::MAX);
                let lease = Duration::from_secs(u64::from(endpoint.config.timeout_seconds)) * rounds
                    + inner.settings.lease_margin;
                let now_ms = inner.clock.now_ms();
                match webhooks::claim_due(&inner.meta, &name, now_ms, i64::try_from(limit).unwrap_or(1), lease).await {
                    Ok(claimed) => {
                        if claimed.len() < limit {
                            drained_until = Some(now + next_look(&inner, &name, now_ms).await);
                        }
                        leased.extend(claimed);
                    }
                    Err(e) => {
                        tracing::warn!(webhook = %name, error = %e, "leasing deliveries");
                        drained_until = Some(now + Duration::from_secs(1));
                    }
                }
            }
            while !leased.is_empty() {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else { break };
                if let Some(rate) = &rate {
                    rate.until_ready().await;
                }
                let Some(delivery) = leased.pop_front() else { break };
                // The newest config and keys: they may have changed while leasing.
                let endpoint = endpoint_rx.borrow().clone();
                let inner = Arc::clone(&inner);
                let outcomes = outcomes.clone();
                tasks.spawn(async move {
                    let outcome = attempt(&inner, &endpoint, delivery).await;
                    // Fails only when the recorder is gone (the engine is being torn down):
                    // the lease then runs out and the delivery is sent again.
                    let _ = outcomes.send(outcome).await;
                    drop(permit);
                });
            }
        }
        let wait = drained_until.unwrap_or(now + inner.settings.idle_poll);
        tokio::select! {
            () = wake.notified() => drained_until = None,
            _ = endpoint_rx.changed() => {}
            _ = stop.changed() => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = tokio::time::sleep_until(wait) => drained_until = None,
        }
    }
    release(&inner, &name, &mut leased).await;
    while tasks.join_next().await.is_some() {}
    drop(outcomes);
    let _ = recorder.await;
}

/// How long a dispatcher whose lease came back short waits before asking the log again:
/// until its next pending delivery falls due, at most the idle poll.
async fn next_look(inner: &Inner, name: &str, now_ms: i64) -> Duration {
    match webhooks::next_due(&inner.meta, name).await {
        Ok(Some(due)) => {
            let until = u64::try_from((due - now_ms).max(1)).unwrap_or(1);
            inner.settings.idle_poll.min(Duration::from_millis(until))
        }
        Ok(None) => inner.settings.idle_poll,
        Err(e) => {
            tracing::warn!(webhook = %name, error = %e, "reading the next due delivery");
            Duration::from_secs(1)
        }
    }
}

/// Gives leased deliveries that were not started back to the log (the endpoint was paused
/// or deactivated, or the dispatcher is stopping), so another dispatcher need not wait out
/// their leases.
async fn release(inner: &Inner, name: &str, leased: &mut VecDeque<Delivery>) {
    for delivery in leased.drain(..) {
        if let Err(e) = webhooks::release(&inner.meta, delivery.seq).await {
            tracing::warn!(webhook = %name, error = %e, "releasing a leased delivery; it is retried when its lease runs out");
        }
    }
}

/// One endpoint's recorder: writes finished attempts in batches of whatever has queued up
/// since the last write, in one transaction each. A batch that cannot be written after
/// several tries is dropped with a warning: its leases run out and its deliveries are sent
/// again (at least once).
async fn record(
    inner: Arc<Inner>,
    name: String,
    endpoint: watch::Receiver<Endpoint>,
    mut queued: mpsc::Receiver<Outcome>,
    wake: Arc<Notify>,
    recheck: Arc<AtomicBool>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while queued.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let rule = endpoint.borrow().config.deactivation.clone();
        let mut backoff = Duration::from_millis(50);
        for _ in 0..8 {
            match webhooks::record_attempts(&inner.meta, &name, &batch, &rule, inner.clock.now_ms()).await {
                Ok(deactivated) => {
                    if let Some(reason) = deactivated {
                        tracing::warn!(webhook = %name, %reason, "endpoint deactivated");
                        recheck.store(true, Ordering::Release);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(webhook = %name, error = %e, attempts = batch.len(), "recording webhook attempts");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        // Retries scheduled or a deactivation: the dispatcher looks at the log again.
        if recheck.load(Ordering::Acquire) || batch.iter().any(|o| matches!(o.next, Next::RetryAt(_))) {
            wake.notify_one();
        }
        batch.clear();
    }
}

/// Sends one delivery and decides what follows from it.
async fn attempt(inner: &Inner, endpoint: &Endpoint, delivery: Delivery) -> Outcome {
    let started = inner.clock.now_ms();
    let sent = inner
        .sender
        .send(endpoint, &delivery.event_id, &delivery.event_type, delivery.event_timestamp, &delivery.body, started)
        .await;
    let attempts = u32::try_from(delivery.attempts + 1).unwrap_or(u32::MAX);
    let now = inner.clock.now_ms();
    let (next, gone) = match &sent.verdict {
        Verdict::Delivered => (Next::Delivered, false),
        Verdict::Gone => (Next::Failed, true),
        Verdict::Failed { retry_after, .. } => {
            match next_retry(&endpoint.config.retry, attempts, *retry_after, rand::random::<f64>()) {
                Some(delay) => (Next::RetryAt(now.saturating_add(ms(delay))), false),
                None => (Next::Failed, false),
            }
        }
    };
    tracing::debug!(webhook = %endpoint.name, event = %delivery.event_id, attempt = attempts,
        status = ?sent.attempt.status_code, outcome = ?next, "webhook attempt");
    if let Some(metrics) = inner.metrics.get() {
        #[allow(clippy::cast_precision_loss)] // milliseconds of one attempt
        metrics.attempt(&next, gone, (now - started).max(0) as f64 / 1000.0);
    }
    Outcome { delivery, attempt: sent.attempt, next, gone, finished_at: now }
}
