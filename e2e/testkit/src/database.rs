//! A fresh Postgres database per test.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

use crate::{KitError, cleanup, env, unique_name};

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

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        cleanup(&format!("database {name}"), async move {
            let mut conn = PgConnection::connect_with(&admin).await.map_err(|e| KitError::server("connecting", e))?;
            sqlx::raw_sql(AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)))
                .execute(&mut conn)
                .await
                .map_err(|e| KitError::server(format!("dropping {name}"), e))?;
            Ok(())
        });
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
