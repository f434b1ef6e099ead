//! The webhook delivery engine: one dispatcher per endpoint, working from the delivery log.
//!
//! Endpoints are isolated: each has its own dispatcher, its own concurrency limit
//! (`maxConcurrency` attempts in flight) and its own rate limiter, so a slow or failing
//! endpoint holds only its own deliveries back. Retries wait in the database, not in
//! memory, so a restarted worker picks up exactly where the log says.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use vellum_core::clock::Clock;
use vellum_core::config::WebhookConfig;
use vellum_core::events::Event;
use vellum_core::store::{Metadata, StoreError};
use vellum_core::webhooks::rules::{Verdict, next_retry};
use vellum_core::webhooks::{self, Delivery, Endpoint, Next};

use crate::sender::Sender;

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
    pub fn new(meta: Metadata, clock: Clock, sender: Sender, settings: Settings) -> Self {
        Self(Arc::new(Inner {
            meta,
            clock,
            sender,
            settings,
            endpoints: Mutex::new(Arc::new(Vec::new())),
            dispatchers: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
        }))
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
        for endpoint in &endpoints {
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

/// One endpoint's dispatcher: leases due deliveries as concurrency allows and sends each in
/// its own task.
async fn dispatch(inner: Arc<Inner>, mut endpoint_rx: watch::Receiver<Endpoint>, wake: Arc<Notify>) {
    let mut stop = inner.stop.subscribe();
    let mut endpoint = endpoint_rx.borrow_and_update().clone();
    let name = endpoint.name.clone();
    let mut concurrency = endpoint.config.max_concurrency.max(1);
    let mut permits = Arc::new(Semaphore::new(concurrency as usize));
    let mut rate = limiter(&endpoint.config).map(Arc::new);
    let mut tasks: JoinSet<bool> = JoinSet::new();
    // Whether the endpoint is active, and when that was read; `None` asks for a fresh read.
    let mut active = true;
    let mut checked: Option<tokio::time::Instant> = None;
    loop {
        while let Some(done) = tasks.try_join_next() {
            if matches!(done, Ok(true)) {
                checked = None;
            }
        }
        if *stop.borrow() {
            break;
        }
        // Compared rather than asked `has_changed`: waking on `changed()` below has already
        // marked the new value seen.
        let latest = endpoint_rx.borrow_and_update().clone();
        if latest.config != endpoint.config || latest.keys != endpoint.keys {
            endpoint = latest;
            if endpoint.config.max_concurrency.max(1) != concurrency {
                concurrency = endpoint.config.max_concurrency.max(1);
                permits = Arc::new(Semaphore::new(concurrency as usize));
            }
            rate = limiter(&endpoint.config).map(Arc::new);
            checked = None;
        }
        // Another worker may have deactivated (or an admin reactivated) the endpoint; a
        // deactivation by one of our own attempts is read at once.
        if checked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            match webhooks::activation(&inner.meta, &name).await {
                Ok(a) => (active, checked) = (a.active, Some(tokio::time::Instant::now())),
                Err(e) => tracing::warn!(webhook = %name, error = %e, "reading the endpoint's state"),
            }
        }
        let mut wait = inner.settings.idle_poll;
        if !endpoint.config.paused && active {
            let free = permits.available_permits();
            if free > 0 {
                let now = inner.clock.now_ms();
                let lease =
                    Duration::from_secs(u64::from(endpoint.config.timeout_seconds)) + inner.settings.lease_margin;
                let limit = if rate.is_some() { free.min(2) } else { free };
                match webhooks::claim_due(&inner.meta, &name, now, i64::try_from(limit).unwrap_or(1), lease).await {
                    Ok(claimed) if !claimed.is_empty() => {
                        for delivery in claimed {
                            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break };
                            if let Some(rate) = &rate {
                                rate.until_ready().await;
                            }
                            // The newest config and keys: they may have changed while leasing.
                            let endpoint = endpoint_rx.borrow().clone();
                            let inner = Arc::clone(&inner);
                            tasks.spawn(async move {
                                let deactivated = attempt(&inner, &endpoint, &delivery).await;
                                drop(permit);
                                if deactivated {
                                    tracing::warn!(webhook = %endpoint.name, "endpoint deactivated");
                                }
                                // Its end wakes the dispatcher through `join_next`, with the verdict.
                                deactivated
                            });
                        }
                        continue;
                    }
                    Ok(_) => match webhooks::next_due(&inner.meta, &name).await {
                        Ok(Some(due)) => {
                            let until = u64::try_from((due - now).max(1)).unwrap_or(1);
                            wait = wait.min(Duration::from_millis(until));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(webhook = %name, error = %e, "reading the next due delivery"),
                    },
                    Err(e) => {
                        tracing::warn!(webhook = %name, error = %e, "leasing deliveries");
                        wait = Duration::from_secs(1);
                    }
                }
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            _ = endpoint_rx.changed() => {}
            _ = stop.changed() => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if matches!(done, Ok(true)) {
                    checked = None;
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends one delivery and records the attempt; returns whether it deactivated the
/// endpoint. If recording fails for good the lease runs out and the delivery is sent
/// again: at least once.
async fn attempt(inner: &Inner, endpoint: &Endpoint, delivery: &Delivery) -> bool {
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
    let mut backoff = Duration::from_millis(50);
    for _ in 0..8 {
        match webhooks::record_attempt(
            &inner.meta,
            delivery,
            &sent.attempt,
            next,
            gone,
            &endpoint.config.deactivation,
            now,
        )
        .await
        {
            Ok(deactivated) => return deactivated.is_some(),
            Err(e) => {
                tracing::warn!(webhook = %endpoint.name, error = %e, "recording a webhook attempt");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    false
}
