//! A NATS JetStream namespace per test.

use async_nats::jetstream;
use futures::TryStreamExt;

use crate::{KitError, cleanup, env, unique_name};

/// A namespace of its own on a shared NATS server: every subject the test uses starts with
/// [`TestNats::prefix`], every stream it creates with [`TestNats::stream_prefix`]. Those
/// streams are deleted when this value is dropped.
#[derive(Debug)]
pub struct TestNats {
    /// URL of the NATS server.
    pub url: String,
    /// Subject prefix of this test (`t3f9a…`); subjects are `<prefix>.<name>`.
    pub prefix: String,
    /// Stream-name prefix of this test (`T3F9A…`); streams are `<stream_prefix>_<NAME>`.
    pub stream_prefix: String,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
}

impl TestNats {
    /// Connects to the server named by `VELLUM_TEST_NATS_URL` and checks JetStream is on.
    pub async fn new() -> Result<Self, KitError> {
        Self::on(&env::get(env::NATS_URL, env::NATS_URL_DEFAULT)).await
    }

    /// Connects to the server at `url` and checks JetStream is on.
    pub async fn on(url: &str) -> Result<Self, KitError> {
        let client =
            async_nats::ConnectOptions::new().connection_timeout(std::time::Duration::from_secs(3)).connect(url);
        let client = tokio::time::timeout(std::time::Duration::from_secs(5), client)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| KitError::Unreachable {
                server: "NATS",
                address: url.to_owned(),
                variable: env::NATS_URL,
                source: e.into(),
            })?;
        let jetstream = jetstream::new(client.clone());
        // Ask the JetStream API directly: a server without JetStream answers with an error
        // (or not at all), whatever the client's version.
        let no_jetstream =
            |e: String| KitError::server(format!("NATS at {url} has no JetStream (start it with -js)"), e);
        let reply =
            client.request("$JS.API.INFO", bytes::Bytes::new()).await.map_err(|e| no_jetstream(e.to_string()))?;
        let text = String::from_utf8_lossy(&reply.payload);
        if text.contains("\"error\"") {
            return Err(no_jetstream(text.into_owned()));
        }
        let prefix = unique_name("t");
        let stream_prefix = prefix.to_uppercase();
        Ok(Self { url: url.to_owned(), prefix, stream_prefix, client, jetstream })
    }

    /// A subject in this test's namespace.
    pub fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// A stream name in this test's namespace.
    pub fn stream_name(&self, name: &str) -> String {
        format!("{}_{}", self.stream_prefix, name.to_uppercase())
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.stream_prefix.clone();
        cleanup(&format!("NATS streams {prefix}_*"), async move {
            // The test's own client belongs to its runtime, which may be gone: connect anew.
            let client = async_nats::connect(&url).await.map_err(|e| KitError::server("connecting", e))?;
            let js = jetstream::new(client);
            let names: Vec<String> =
                js.stream_names().try_collect().await.map_err(|e| KitError::server("listing streams", e))?;
            for name in names.into_iter().filter(|n| n.starts_with(&format!("{prefix}_"))) {
                js.delete_stream(&name).await.map_err(|e| KitError::server(format!("deleting {name}"), e))?;
            }
            Ok(())
        });
    }
}
