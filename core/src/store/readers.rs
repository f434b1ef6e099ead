//! Connections kept out of the pool between short reads.
//!
//! sqlx's pool tests every connection it takes back with a round trip to the server (a
//! `Sync` and its `ReadyForQuery`, in a task of its own); nothing in its options turns that
//! off. A primary-key read through the pool therefore costs two round trips where `psql`
//! or `pgbench` spend one. A read that ran to its end leaves its connection ready for the
//! next statement, so [`Reader::done`] keeps it here instead, and the next read takes it
//! without asking the pool. A read that failed or was dropped half-way lets its connection
//! go back to the pool, which tests it as before.
//!
//! What is kept here is bounded so that it never takes for long what the pool would have
//! given others:
//! - a connection is kept only while the pool has one idle or room to open one: a read
//!   ending when the pool is spent gives its connection back, to whoever waits for one;
//! - a connection unused for [`IDLE`] goes back to the pool (a task looks every [`IDLE`]
//!   while any is kept), and so does one kept through reads for [`ROUNDS`] (the pool then
//!   applies its own age limit and any rotated credentials);
//! - a writer that finds the pool without an idle connection returns every kept one first
//!   ([`Readers::release_all`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};

use super::StoreError;

/// How long a kept connection may sit unused before it goes back to the pool.
const IDLE: Duration = Duration::from_secs(1);

/// How long a connection may be kept through reads before it goes back to the pool once.
const ROUNDS: Duration = Duration::from_secs(60);

/// A connection kept for the next read.
struct Kept {
    connection: PoolConnection<Any>,
    /// When it was first kept, since it last came from the pool.
    since: Instant,
    /// When its last read ended.
    used: Instant,
}

/// The connections kept between reads, shared by every clone of a store.
pub(super) struct Readers {
    /// Whether reads keep connections at all.
    keeps: bool,
    /// Oldest use first: a read takes the newest, and the oldest go back to the pool.
    kept: Mutex<Vec<Kept>>,
    /// Whether a task is returning the connections left unused.
    sweeping: AtomicBool,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("keeps", &self.keeps)
            .field("kept", &self.lock().len())
            .field("sweeping", &self.sweeping.load(Ordering::Relaxed))
            .finish()
    }
}

impl Readers {
    /// Readers that keep connections, or (`keeps` false) none: every read goes through
    /// the pool. How many are kept is bounded by the pool's size, as a connection is kept
    /// only while the pool is not [`spent`].
    pub(super) fn new(keeps: bool) -> Self {
        Self { keeps, kept: Mutex::new(Vec::new()), sweeping: AtomicBool::new(false) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection for one read: a kept one if there is one, else one from `pool`.
    pub(super) async fn take<'a>(self: &'a Arc<Self>, pool: &'a AnyPool) -> Result<Reader<'a>, StoreError> {
        let (kept, stale) = {
            let mut kept = self.lock();
            let stale = Self::stale(&mut kept);
            (kept.pop(), stale)
        };
        // Outside the lock: each goes back to the pool in a task of sqlx's.
        drop(stale);
        let (connection, since) = match kept {
            Some(k) => (k.connection, k.since),
            None => (pool.acquire().await?, Instant::now()),
        };
        Ok(Reader { connection, since, readers: self, pool })
    }

    /// Takes out of `kept` those left unused for [`IDLE`] (the oldest first).
    fn stale(kept: &mut Vec<Kept>) -> Vec<Kept> {
        let now = Instant::now();
        let fresh = kept.iter().position(|k| now.duration_since(k.used) < IDLE).unwrap_or(kept.len());
        kept.drain(..fresh).collect()
    }

    /// Returns the connections left unused to the pool, every [`IDLE`] while any is kept,
    /// so that a store whose reads stopped keeps none for long.
    async fn sweep(readers: Weak<Self>) {
        loop {
            tokio::time::sleep(IDLE).await;
            let Some(readers) = readers.upgrade() else { return };
            let (stale, empty) = {
                let mut kept = readers.lock();
                let stale = Self::stale(&mut kept);
                if kept.is_empty() {
                    // Decided under the lock: a connection kept after it starts a sweep again.
                    readers.sweeping.store(false, Ordering::Release);
                }
                (stale, kept.is_empty())
            };
            drop(stale);
            if empty {
                return;
            }
        }
    }

    /// Lets every kept connection go back to the pool.
    pub(super) fn release_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }

    /// Whether any connection is kept.
    pub(super) fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    fn keep(self: &Arc<Self>, connection: PoolConnection<Any>, since: Instant, pool: &AnyPool) {
        let now = Instant::now();
        if !self.keeps || spent(pool) || now.duration_since(since) >= ROUNDS {
            return;
        }
        let mut kept = self.lock();
        kept.push(Kept { connection, since, used: now });
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::sweep(Arc::downgrade(self)));
        }
    }
}

/// Whether `pool` has no connection idle and no room to open one: whoever asks it for one
/// waits.
pub(super) fn spent(pool: &AnyPool) -> bool {
    pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections()
}

impl Drop for Readers {
    fn drop(&mut self) {
        // A pooled connection goes back in a task, which needs a runtime; without one
        // (a store dropped after its runtime), the kept connections are closed instead.
        if tokio::runtime::Handle::try_current().is_err() {
            for kept in std::mem::take(&mut *self.lock()) {
                drop(kept.connection.detach());
            }
        }
    }
}

/// A connection lent for one read. [`Reader::done`] once the read ran to its end; dropped
/// without it (an error, a cancelled read), the connection goes back to the pool.
pub struct Reader<'a> {
    connection: PoolConnection<Any>,
    since: Instant,
    readers: &'a Arc<Readers>,
    pool: &'a AnyPool,
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("since", &self.since).finish_non_exhaustive()
    }
}

impl Reader<'_> {
    /// The read's connection.
    pub fn connection(&mut self) -> &mut AnyConnection {
        &mut self.connection
    }

    /// The read ran to its end: the connection is kept for the next one (unless the pool
    /// is spent, when it goes back there).
    pub fn done(self) {
        self.readers.keep(self.connection, self.since, self.pool);
    }
}
