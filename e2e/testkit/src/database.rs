//! A fresh Postgres database per test.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

use crate::{KitError, env, unique_name};

/// A Postgres database of its own, created for one test and dropped when this value is.
#[derive(Debug)]
pub struct TestDatabase {
    /// Name of the database.
    pub name: String,
    /// Connection URL of the database, for the code under test.
    pub url: String,
    admin: PgConnectOptions,
}

impl TestDatabase {
    /// Creates a database on the server named by `VELLUM_TEST_DATABASE_URL`.
    pub async fn new() -> Result<Self, KitError> {
        Self::on(&env::get(env::DATABASE_URL, env::DATABASE_URL_DEFAULT)).await
    }

    /// The metadata database of a test that runs on both dialects: a fresh Postgres
    /// database, or a SQLite file in `dir`. Keep the returned database for as long as the
    /// test runs; dropping it drops the Postgres database.
    pub async fn or_sqlite(postgres: bool, dir: &std::path::Path) -> Result<(String, Option<Self>), KitError> {
        if postgres {
            let db = Self::new().await?;
            Ok((db.url.clone(), Some(db)))
        } else {
            Ok((format!("sqlite://{}", dir.join("meta.db").display()), None))
        }
    }

    /// Creates a database on the server of `admin_url`, whose role may create databases.
    pub async fn on(admin_url: &str) -> Result<Self, KitError> {
        let unreachable = |e: sqlx::Error| KitError::Unreachable {
            server: "Postgres",
            address: redact(admin_url),
            variable: env::DATABASE_URL,
            source: e.into(),
        };
        let admin: PgConnectOptions = admin_url.parse().map_err(unreachable)?;
        let mut conn = PgConnection::connect_with(&admin).await.map_err(unreachable)?;
        let name = unique_name("vellum_test_");
        // The name is ours (a prefix and hex digits), so formatting it in is safe.
        sqlx::raw_sql(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .execute(&mut conn)
            .await
            .map_err(|e| KitError::server(format!("creating database {name}"), e))?;
        conn.close().await.ok();
        let url = admin.clone().database(&name).to_url_lossy().to_string();
        Ok(Self { name, url, admin })
    }

    /// A connection pool to the database.
    pub async fn pool(&self) -> Result<PgPool, KitError> {
        PgPoolOptions::new()
            .max_connections(5)
            .connect_with(self.admin.clone().database(&self.name))
            .await
            .map_err(|e| KitError::server(format!("connecting to {}", self.name), e))
    }
}

/// How long dropping a database waits for `DROP DATABASE` to finish before leaving it to
/// finish on its own.
const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for TestDatabase {
    /// Drops the database, waiting at most `DROP_WAIT` (five seconds) once the statement is sent.
    ///
    /// The code under test may be opening one more connection to the database on the very
    /// runtime this drop blocks. That backend is still authenticating: `WITH (FORCE)` does
    /// not see it, and it absorbs no `ProcSignalBarrier`, so `DROP DATABASE` waits for it,
    /// and it waits for the blocked runtime, until the server's `authentication_timeout`
    /// (a minute by default) ends it. Rather than wait, the drop returns and lets the
    /// runtime go on (or shut down, closing the socket); the statement finishes on the
    /// server either way, even if this process exits first, since the server does not
    /// look at the client while it waits.
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let (sent, progress) = std::sync::mpsc::channel::<Result<bool, String>>();
        let spawned = std::thread::Builder::new().name("testkit-dropdb".into()).stack_size(32 << 20).spawn(move || {
            let dropping = async {
                let mut conn = PgConnection::connect_with(&admin).await.map_err(|e| format!("connecting: {e}"))?;
                let _ = sent.send(Ok(false));
                sqlx::raw_sql(AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| format!("dropping {name}: {e}"))?;
                Ok(true)
            };
            let done = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(Box::pin(dropping)),
                Err(e) => Err(e.to_string()),
            };
            let _ = sent.send(done);
        });
        if let Err(e) = spawned {
            eprintln!("vellum-testkit: cleaning up database {} failed: spawning its thread: {e}", self.name);
            return;
        }
        // Connecting is quick (the thread's runtime is its own); then the statement is sent.
        let mut waited = None;
        loop {
            let next = match waited {
                None => progress.recv().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                Some(limit) => progress.recv_timeout(limit),
            };
            match next {
                Ok(Ok(false)) => waited = Some(DROP_WAIT),
                Ok(Ok(true)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return,
                Ok(Err(e)) => return eprintln!("vellum-testkit: cleaning up database {} failed: {e}", self.name),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return eprintln!("vellum-testkit: cleaning up database {} panicked", self.name);
                }
            }
        }
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}
