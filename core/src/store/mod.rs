//! The metadata store: documents, versions, blobs, upload sessions and the outbox, in
//! Postgres (in a cluster) or SQLite (the embedded default), through one set of queries.
//!
//! Both databases are reached through sqlx's `Any` driver, so every query is written once.
//! Times are stored as milliseconds since the epoch and JSON as text, which both databases
//! store alike; the schemas differ only where the dialects must (identity columns) and live
//! in `migrations/postgres` and `migrations/sqlite`.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Executor, PgPool, Postgres, Transaction};

mod readers;
pub use readers::Reader;
use readers::Readers;

/// Which database is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL's scheme only: the rest may hold a password.
    #[error("unsupported database URL scheme {0:?}: expected postgres://… or sqlite://…")]
    UnsupportedUrl(String),
    #[error("cannot open the metadata database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the metadata database: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("metadata database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying the whole transaction may succeed: a serialization failure or a
    /// deadlock on Postgres, a busy database on SQLite.
    pub fn is_retryable(&self) -> bool {
        let StoreError::Database(sqlx::Error::Database(e)) = self else { return false };
        matches!(e.code().as_deref(), Some("40001" | "40P01" | "5" | "517" | "6"))
    }

    /// The database sqlx reached, or the network error that kept it from it.
    fn sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Connect(e)
            | StoreError::Database(e)
            | StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the database refused who connected: a role that does not exist, a wrong
    /// password, no `pg_hba.conf` entry for it.
    pub fn is_bad_credentials(&self) -> bool {
        let Some(sqlx::Error::Database(e)) = self.sqlx() else { return false };
        matches!(e.code().as_deref(), Some("28P01" | "28000"))
    }

    /// What went wrong, for a person reading a status or a log: the server's own message
    /// without the source line Postgres appends to it, and "connection refused" (or the
    /// like) for a server that is not there, instead of the I/O error's debug form.
    pub fn brief(&self) -> String {
        match self.sqlx() {
            Some(sqlx::Error::Database(e)) => e.message().to_owned(),
            Some(sqlx::Error::Io(e)) => match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => "connection timed out".to_owned(),
                _ => e.to_string(),
            },
            Some(sqlx::Error::PoolTimedOut) => "no connection became free in time".to_owned(),
            _ => self.to_string(),
        }
    }
}

/// An error a write transaction may end with: the store's own, or a caller's domain error
/// that may wrap one (only those are retried).
pub trait TxError: From<StoreError> {
    fn store_error(&self) -> Option<&StoreError>;
}

impl TxError for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

/// The metadata store: a connection pool and the dialect behind it.
#[derive(Clone)]
pub struct Metadata {
    pool: AnyPool,
    dialect: Dialect,
    /// Connections kept between short reads (Postgres only).
    readers: Arc<Readers>,
    /// The URL new connections are made with (it may hold a password: never shown).
    url: Arc<std::sync::Mutex<String>>,
    /// A pool of Postgres' own driver, opened on first use by those that move many rows
    /// ([`Self::begin_native`]).
    native: Arc<OnceLock<PgPool>>,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL is left out: it may hold a password.
        f.debug_struct("Metadata")
            .field("pool", &self.pool)
            .field("dialect", &self.dialect)
            .field("readers", &self.readers)
            .field("native", &self.native.get().map(PgPool::size))
            .finish_non_exhaustive()
    }
}

/// A transaction of Postgres' own driver ([`Metadata::begin_native`]).
pub type NativeTx = Transaction<'static, Postgres>;

/// The store's transactions.
pub type Tx = Transaction<'static, Any>;

/// How often a write transaction the database refused (a serialization failure, a busy
/// database) is tried again, after a growing random pause (at most 320 ms each), before
/// its error is returned: under many writers to the same rows, eight was seen to run out.
const MAX_RETRIES: u32 = 16;

/// The most Postgres connections a store opens by default: a replica's whole budget, when
/// it has one database.
pub const MAX_CONNECTIONS: u32 = 16;

/// A pooled Postgres connection idle this long is pinged before it is used again.
const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

/// How long a pool user waits for a connection before its error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// A Postgres pool of at most `connections`, for either driver (the store's generic one
/// and the native one of [`Metadata::begin_native`]). sqlx pings a connection (a round
/// trip) before handing it out and again when it comes back; the second cannot be turned
/// off. The first is kept only for a connection that sat idle long enough for the server
/// or the network to have dropped it: on a busy pool it made a primary-key read three
/// round trips.
fn postgres_pool<DB: sqlx::Database>(connections: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new().max_connections(connections.max(1)).test_before_acquire(false).before_acquire(
        |conn: &mut DB::Connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        },
    )
}

/// Begins a transaction on `pool` with `statement` (`None`: the plain `BEGIN`), the
/// `BEGIN` run to its answer in a task of its own whoever waits for it (see
/// [`Metadata::begin_with`]).
async fn begin_in_a_task<DB: sqlx::Database>(
    pool: sqlx::Pool<DB>,
    statement: Option<&'static str>,
) -> Result<Transaction<'static, DB>, StoreError> {
    let begun = tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(statement).await,
            None => pool.begin().await,
        }
    });
    match begun.await {
        Ok(begun) => Ok(begun?),
        // Only when the runtime shuts down (the task cannot panic).
        Err(e) => Err(StoreError::Database(sqlx::Error::Io(std::io::Error::other(e)))),
    }
}

impl Metadata {
    /// Connects to `url` (`postgres://…`, or `sqlite://path` which is created if missing,
    /// or `sqlite::memory:`), without migrating.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, MAX_CONNECTIONS).await
    }

    /// [`Self::connect`], with at most `connections` Postgres connections open at once
    /// (SQLite's pools are sized by what the file allows).
    pub async fn connect_with(url: &str, connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(StoreError::UnsupportedUrl(url.split(':').next().unwrap_or_default().to_owned()));
        };
        let url = match dialect {
            Dialect::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url).map_err(StoreError::Connect)?;
        let pool = match dialect {
            Dialect::Postgres => postgres_pool(connections),
            // Every connection to an in-memory database is a database of its own, so it
            // gets exactly one. A file gets a few: WAL lets readers run beside the writer,
            // and writers queue on `BEGIN IMMEDIATE` rather than failing half-way.
            Dialect::Sqlite if url.contains(":memory:") || url.contains("mode=memory") => {
                AnyPoolOptions::new().max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
            }
            Dialect::Sqlite => AnyPoolOptions::new().max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON")
                        .await?;
                    Ok(())
                })
            }),
        };
        if dialect == Dialect::Postgres {
            // One connection first, on its own: the pool retries a server that is not there
            // until its timeout and then says only that it timed out; this says "refused".
            let first = options.connect().await.map_err(StoreError::Connect)?;
            let _ = first.close().await;
        }
        let pool = pool.acquire_timeout(ACQUIRE_TIMEOUT).connect_with(options).await.map_err(StoreError::Connect)?;
        // As many as the pool holds may be kept for reads (while it is not spent: see
        // `readers.rs`); a shard's pool of four, half kept, sent most reads of eight readers
        // over four shards through the pool's round trip. SQLite's few connections are all
        // the file allows, and its reads cost no round trip.
        let readers = Arc::new(Readers::new(dialect == Dialect::Postgres));
        Ok(Self { pool, dialect, readers, url: Arc::new(std::sync::Mutex::new(url)), native: Arc::default() })
    }

    /// Uses `url` for the connections made from now on, when it names the same database
    /// as before with other credentials (a rotated password, or another user): `Ok(true)`.
    /// `Ok(false)` when nothing changed. A URL naming another database (scheme, host,
    /// port, database or parameters) is refused: moving a database takes a restart. The
    /// connections already open stay until the pool retires them.
    pub fn rotate(&self, url: &str) -> Result<bool, String> {
        let mut current = self.url.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current == url {
            return Ok(false);
        }
        let target = |u: &str| {
            url::Url::parse(u).ok().map(|mut parsed| {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                parsed.to_string()
            })
        };
        match (target(&current), target(url)) {
            (Some(was), Some(now)) if was == now && self.dialect == Dialect::Postgres => {}
            _ => return Err("the new URL names another database; moving a database takes a restart".to_owned()),
        }
        let options = AnyConnectOptions::from_str(url).map_err(|_| "the new URL does not parse".to_owned())?;
        self.pool.set_connect_options(options);
        if let Some(native) = self.native.get() {
            native.set_connect_options(
                PgConnectOptions::from_str(url).map_err(|_| "the new URL does not parse".to_owned())?,
            );
        }
        // The kept connections logged in with the old credentials: they go back to the
        // pool, which retires them as it does its own.
        self.readers.release_all();
        url.clone_into(&mut current);
        Ok(true)
    }

    /// Connects to `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, MAX_CONNECTIONS).await
    }

    /// [`Self::open`], with at most `connections` Postgres connections (as
    /// [`Self::connect_with`]).
    pub async fn open_with(url: &str, connections: u32) -> Result<Self, StoreError> {
        let store = Self::connect_with(url, connections).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// The most connections this store's pool opens at once.
    pub fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }

    /// A store on the same database, connecting with the URL in use now (rotated
    /// credentials included), whose pool opens at most `connections` at once: `self` when
    /// it already does, or when it is SQLite (sized by what the file allows). A pool's size
    /// is fixed when it is made, so a shard kept through a routing change that adds or
    /// removes shards gets a new pool of its share; the old one closes when its last user
    /// lets it go.
    pub async fn resized(&self, connections: u32) -> Result<Self, StoreError> {
        let connections = connections.max(1);
        if self.dialect != Dialect::Postgres || self.max_connections() == connections {
            return Ok(self.clone());
        }
        let url = self.url.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        Self::connect_with(&url, connections).await
    }

    /// Applies the migrations this build knows and the database has not seen.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.dialect {
            Dialect::Postgres => sqlx::migrate!("migrations/postgres"),
            Dialect::Sqlite => sqlx::migrate!("migrations/sqlite"),
        };
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    /// How many documents this database holds.
    pub async fn count_documents(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM documents").fetch_one(&self.pool).await?)
    }

    /// The schema version: the newest migration applied.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let version: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success").fetch_one(&self.pool).await;
        match version {
            Ok(version) => Ok(version.unwrap_or(0)),
            // A database no migration has touched yet.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01") || e.message().contains("no such table") =>
            {
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A connection for one short read, which [`Reader::done`] keeps for the next one once
    /// the read ran to its end: a read costs one round trip rather than the pool's two
    /// (see `readers.rs`).
    pub async fn reader(&self) -> Result<Reader<'_>, StoreError> {
        self.readers.take(&self.pool).await
    }

    /// Closes the store's connections, waiting for those in use to come back: the ones
    /// kept for reads go back first (the pool's own `close` would wait for them for ever).
    pub async fn close(&self) {
        self.readers.release_all();
        self.pool.close().await;
        if let Some(native) = self.native.get() {
            native.close().await;
        }
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Begins a transaction that writes. On Postgres it is SERIALIZABLE, so that decisions
    /// taken on what it read (a blob is unreferenced, a session is unlocked) hold at commit
    /// or the transaction fails and is retried; on SQLite it takes the write lock at once.
    pub async fn begin_write(&self) -> Result<Tx, StoreError> {
        let statement = match self.dialect {
            Dialect::Postgres => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            Dialect::Sqlite => "BEGIN IMMEDIATE",
        };
        self.begin_with(Some(statement)).await
    }

    /// Begins a transaction with `statement` (`None`: the plain `BEGIN`), safely even when
    /// the caller stops waiting (its future dropped: a task cancelled, a `select!` that
    /// went the other way). sqlx 0.9 queues no `ROLLBACK` for a `begin` dropped while its
    /// `BEGIN` awaits the answer, so its connection would go back to the pool inside the
    /// transaction, and every later user of it would run in that transaction, holding its
    /// locks for ever. Here the `BEGIN` runs to its answer in a task of its own; a
    /// transaction nobody waits for any more is dropped begun, and so rolled back.
    pub async fn begin_with(&self, statement: Option<&'static str>) -> Result<Tx, StoreError> {
        if readers::spent(&self.pool) && self.readers.any() {
            // The pool is spent: what the readers keep goes back to it first.
            self.readers.release_all();
        }
        begin_in_a_task(self.pool.clone(), statement).await
    }

    /// [`Self::begin_with`] on a connection of Postgres' own driver, for those that move
    /// many rows (resharding): the generic driver copies every value of every row into a
    /// value of its own and back, which moving documents between shards spent most of its
    /// own time on. `None` on SQLite.
    ///
    /// The first call opens a second pool, of the store's size; its connections are opened
    /// as they are needed, so only a process that moves rows opens any.
    pub async fn begin_native(&self, statement: Option<&'static str>) -> Result<Option<NativeTx>, StoreError> {
        if self.dialect != Dialect::Postgres {
            return Ok(None);
        }
        begin_in_a_task(self.native_pool()?, statement).await.map(Some)
    }

    /// The native driver's pool, made (with the credentials in use) on first use.
    fn native_pool(&self) -> Result<PgPool, StoreError> {
        if let Some(pool) = self.native.get() {
            return Ok(pool.clone());
        }
        let url = self.url.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let options = PgConnectOptions::from_str(&url).map_err(StoreError::Connect)?;
        let pool = postgres_pool(self.max_connections()).acquire_timeout(ACQUIRE_TIMEOUT).connect_lazy_with(options);
        // Two first uses at once: one pool is kept, the other (which opened nothing) goes.
        Ok(self.native.get_or_init(|| pool).clone())
    }

    /// Runs `work` in a write transaction, committing its result, and retries the whole
    /// transaction when the database asks for it (serialization failures, busy database).
    ///
    /// `work` owns the transaction while it runs and hands it back with its result, so
    /// that it may borrow anything that outlives this call.
    pub async fn write<'a, T, E, F>(&self, mut work: F) -> Result<T, E>
    where
        E: TxError,
        F: FnMut(Tx) -> futures::future::BoxFuture<'a, (Tx, Result<T, E>)>,
    {
        let mut attempt = 0u32;
        loop {
            let result = match self.begin_write().await {
                Ok(tx) => match work(tx).await {
                    (tx, Ok(value)) => tx.commit().await.map(|()| value).map_err(|e| E::from(StoreError::from(e))),
                    (tx, Err(e)) => {
                        tx.rollback().await.ok();
                        Err(e)
                    }
                },
                Err(e) => Err(E::from(e)),
            };
            match result {
                Err(e) if e.store_error().is_some_and(StoreError::is_retryable) && attempt < MAX_RETRIES => {
                    attempt += 1;
                    let jitter = rand::random_range(0..10u64 << attempt.min(5));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_file_is_created_and_migrated_twice_without_harm() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let store = Metadata::open(&url).await.unwrap();
        assert_eq!(store.dialect(), Dialect::Sqlite);
        assert!(store.schema_version().await.unwrap() >= 1);
        drop(store);
        let again = Metadata::open(&url).await.unwrap();
        again.ping().await.unwrap();
    }

    /// The two dialects' migrations are one schema: they may differ only in the lines where
    /// the dialects must (identity columns).
    #[test]
    fn postgres_and_sqlite_migrations_differ_only_where_the_dialects_must() {
        let dir = |d: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(d);
        let mut names: Vec<_> = std::fs::read_dir(dir("postgres")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let mut sqlite: Vec<_> = std::fs::read_dir(dir("sqlite")).unwrap().map(|e| e.unwrap().file_name()).collect();
        sqlite.sort();
        assert_eq!(names, sqlite, "the same migrations on both");
        let allowed = [("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "INTEGER PRIMARY KEY AUTOINCREMENT")];
        for name in names {
            let pg = std::fs::read_to_string(dir("postgres").join(&name)).unwrap();
            let lite = std::fs::read_to_string(dir("sqlite").join(&name)).unwrap();
            assert_eq!(pg.lines().count(), lite.lines().count(), "{name:?}");
            for (a, b) in pg.lines().zip(lite.lines()).filter(|(a, b)| a != b) {
                assert!(
                    allowed.iter().any(|(p, s)| a.replace(p, s) == b),
                    "{name:?}: the dialects differ beyond identity columns:\n  {a}\n  {b}"
                );
            }
        }
    }

    #[tokio::test]
    async fn unknown_urls_are_refused_by_scheme_without_their_password() {
        let err = Metadata::connect("mysql://app:hunter2@localhost/x").await.unwrap_err().to_string();
        assert!(err.contains("\"mysql\"") && err.contains("postgres://"), "{err}");
        assert!(!err.contains("hunter2"), "the password stays out of the message: {err}");
    }
}
