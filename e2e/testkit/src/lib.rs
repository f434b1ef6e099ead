//! The test kit: every integration test gets servers of its own without sharing state
//! with any other test running beside it.
//!
//! - [`TestDatabase`]: a fresh Postgres database, dropped afterwards.
//! - [`TestNats`]: a NATS JetStream namespace (a unique subject prefix and stream-name
//!   prefix), its streams deleted afterwards.
//! - [`TestBucket`]: a fresh bucket on an S3-compatible server, emptied and deleted afterwards.
//! - [`NatsProcess`] and [`PostgresProcess`]: private server processes, for tests that kill
//!   and restart the server under the code they test.
//!
//! The shared servers are found through environment variables with local defaults (see
//! [`env`](mod@env)); `scripts/test` installs and starts them. A test that cannot reach one fails
//! with a message saying how to start it: it never passes silently.
#![warn(clippy::unwrap_used)]

mod bucket;
mod database;
mod nats;
mod process;

pub use bucket::{S3Bucket, TestBucket};
pub use database::TestDatabase;
pub use nats::TestNats;
pub use process::{NatsProcess, PostgresProcess};

/// Environment variables naming the shared test servers, and their defaults.
pub mod env {
    /// Postgres URL of a role allowed to create databases.
    pub const DATABASE_URL: &str = "VELLUM_TEST_DATABASE_URL";
    pub const DATABASE_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    /// NATS server with JetStream enabled.
    pub const NATS_URL: &str = "VELLUM_TEST_NATS_URL";
    pub const NATS_URL_DEFAULT: &str = "nats://127.0.0.1:4222";
    /// Endpoint of the S3-compatible server.
    pub const S3_ENDPOINT: &str = "VELLUM_TEST_S3_ENDPOINT";
    pub const S3_ENDPOINT_DEFAULT: &str = "http://127.0.0.1:9000";
    pub const S3_ACCESS_KEY: &str = "VELLUM_TEST_S3_ACCESS_KEY";
    pub const S3_ACCESS_KEY_DEFAULT: &str = "vellum";
    pub const S3_SECRET_KEY: &str = "VELLUM_TEST_S3_SECRET_KEY";
    pub const S3_SECRET_KEY_DEFAULT: &str = "vellum-test-secret";
    pub const S3_REGION: &str = "VELLUM_TEST_S3_REGION";
    pub const S3_REGION_DEFAULT: &str = "us-east-1";

    /// A Python interpreter with the tus client (`tuspy`) installed, for protocol tests
    /// with stock clients. `scripts/test` makes one in its state directory.
    pub const PYTHON: &str = "VELLUM_TEST_PYTHON";
    /// A `node_modules` with the STOMP and SockJS clients; `scripts/test` makes one in its
    /// state directory.
    pub const NODE_MODULES: &str = "VELLUM_TEST_NODE_MODULES";
    /// The Chromium the browser test drives headless; `scripts/test` installs Debian's.
    pub const CHROMIUM: &str = "VELLUM_TEST_CHROMIUM";
    pub const CHROMIUM_DEFAULT: &str = "/usr/bin/chromium";

    pub(crate) fn get(name: &str, default: &str) -> String {
        std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
    }
}

/// Why the kit could not give a test what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error(
        "cannot reach {server} at {address}: {source}\n\
         start it with `scripts/test --services-only` (which installs and starts Postgres, NATS \
         and the S3 server), or point {variable} at a running one"
    )]
    Unreachable {
        server: &'static str,
        address: String,
        variable: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Server {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Process(String),
}

impl KitError {
    pub(crate) fn server(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Server { what: what.into(), source: source.into() }
    }
}

/// Where `scripts/test` keeps what it installs (`VELLUM_TEST_STATE_DIR`, else
/// `$XDG_STATE_HOME/vellum-test`, else `~/.local/state/vellum-test`).
fn state_dir() -> std::path::PathBuf {
    std::env::var_os("VELLUM_TEST_STATE_DIR").map_or_else(
        || {
            let base = std::env::var_os("XDG_STATE_HOME").map_or_else(
                || std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/state"),
                std::path::PathBuf::from,
            );
            base.join("vellum-test")
        },
        std::path::PathBuf::from,
    )
}

/// The Python interpreter that has the stock protocol clients the tests drive: the one
/// [`env::PYTHON`] names, or the one `scripts/test` installs in its state directory.
///
/// # Panics
/// When there is none, with a message saying how to get it.
pub fn python() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(env::PYTHON).filter(|p| !p.is_empty()) {
        return path.into();
    }
    let python = state_dir().join("py/bin/python");
    assert!(
        python.exists(),
        "no Python with the tus client at {}: run `scripts/test --services-only` (which installs it), \
         or point {} at an interpreter that has tuspy",
        python.display(),
        env::PYTHON
    );
    python
}

/// The `node_modules` holding the stock JavaScript clients the tests drive (`@stomp/stompjs`,
/// `sockjs-client`, `ws`, `tus-js-client` and `playwright-core`, pinned by `e2e/testkit/js`): the one [`env::NODE_MODULES`] names,
/// or the one `scripts/test` installs in its state directory.
///
/// # Panics
/// When there is none, with a message saying how to get it.
pub fn node_modules() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(env::NODE_MODULES).filter(|p| !p.is_empty()) {
        return path.into();
    }
    let modules = state_dir().join("js/node_modules");
    assert!(
        modules.join("@stomp/stompjs").exists(),
        "no JavaScript test clients at {}: run `scripts/test --services-only` (which installs them), \
         or point {} at a node_modules that has @stomp/stompjs, sockjs-client and ws",
        modules.display(),
        env::NODE_MODULES
    );
    modules
}

/// The Chromium the browser test drives: the one [`env::CHROMIUM`] names, or Debian's.
///
/// # Panics
/// When there is none, with a message saying how to get it.
pub fn chromium() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env::get(env::CHROMIUM, env::CHROMIUM_DEFAULT));
    assert!(
        path.exists(),
        "no Chromium at {}: run `scripts/test --services-only` (which installs Debian's chromium), \
         or point {} at one",
        path.display(),
        env::CHROMIUM
    );
    path
}

/// A name no other test run will pick: `prefix` and 12 hex digits of a random UUID.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..12])
}

/// Runs async cleanup from a `Drop`, on a thread of its own so it works whether or not the
/// dropping thread is inside a Tokio runtime. Cleanup failures are reported, not raised:
/// the test's own outcome matters more than a leftover it cannot fix.
pub(crate) fn cleanup<F>(what: &str, fut: F)
where
    F: std::future::Future<Output = Result<(), KitError>> + Send + 'static,
{
    // Debug builds of client futures are large: give the thread room, and the future a box.
    let spawned = std::thread::Builder::new().name("testkit-cleanup".into()).stack_size(32 << 20).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(Box::pin(fut)).map_err(|e| e.to_string())
    });
    let joined = match spawned {
        Ok(handle) => handle.join(),
        Err(e) => Ok(Err(format!("spawning the cleanup thread: {e}"))),
    };
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("vellum-testkit: cleaning up {what} failed: {e}"),
        Err(_) => eprintln!("vellum-testkit: cleaning up {what} panicked"),
    }
}
