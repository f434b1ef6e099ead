//! A fresh S3 bucket per test.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::{KitError, cleanup, env, unique_name};

/// A bucket of its own on an S3-compatible server, created for one test and emptied and
/// deleted when this value is dropped. It dereferences to the [`S3Bucket`] it created.
#[derive(Debug)]
pub struct TestBucket {
    bucket: S3Bucket,
}

impl std::ops::Deref for TestBucket {
    type Target = S3Bucket;
    fn deref(&self) -> &S3Bucket {
        &self.bucket
    }
}

/// Where a bucket is and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    /// Endpoint of the S3 server (`http://127.0.0.1:9000`).
    pub endpoint: String,
    /// Name of the bucket.
    pub name: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl TestBucket {
    /// Creates a bucket on the server named by `VELLUM_TEST_S3_ENDPOINT`.
    pub async fn new() -> Result<Self, KitError> {
        let bucket = S3Bucket {
            endpoint: env::get(env::S3_ENDPOINT, env::S3_ENDPOINT_DEFAULT),
            name: unique_name("vellum-test-"),
            access_key: env::get(env::S3_ACCESS_KEY, env::S3_ACCESS_KEY_DEFAULT),
            secret_key: env::get(env::S3_SECRET_KEY, env::S3_SECRET_KEY_DEFAULT),
            region: env::get(env::S3_REGION, env::S3_REGION_DEFAULT),
        };
        let url = bucket.presigned(|b, c| b.create_bucket(c).sign(Duration::from_secs(60)))?;
        let response = reqwest::Client::new().put(url).send().await.map_err(|e| KitError::Unreachable {
            server: "the S3 server",
            address: bucket.endpoint.clone(),
            variable: env::S3_ENDPOINT,
            source: e.into(),
        })?;
        check(response, &format!("creating bucket {}", bucket.name)).await?;
        Ok(Self { bucket })
    }
}

impl S3Bucket {
    /// Whether the bucket exists on the server.
    pub async fn exists(&self) -> Result<bool, KitError> {
        let url = self.presigned(|b, c| b.head_bucket(Some(c)).sign(Duration::from_secs(60)))?;
        let response = reqwest::Client::new().head(url).send().await.map_err(|e| KitError::server("HEAD bucket", e))?;
        Ok(response.status().is_success())
    }

    /// The bucket as `object_store` addresses it: `s3://<name>`.
    pub fn url(&self) -> String {
        format!("s3://{}", self.name)
    }

    /// The `object_store` options that reach the bucket, as a StorageTier's backend would
    /// give them.
    pub fn options(&self) -> Vec<(String, String)> {
        vec![
            ("aws_endpoint".into(), self.endpoint.clone()),
            ("aws_access_key_id".into(), self.access_key.clone()),
            ("aws_secret_access_key".into(), self.secret_key.clone()),
            ("aws_region".into(), self.region.clone()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_virtual_hosted_style_request".into(), "false".into()),
        ]
    }

    /// An object store client for the bucket.
    pub fn store(&self) -> Result<Arc<AmazonS3>, KitError> {
        // Tests want a failure at once, not object_store's default of retrying for minutes.
        let retry = RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(10), ..RetryConfig::default() };
        let mut builder = AmazonS3Builder::new().with_bucket_name(&self.name).with_retry(retry);
        for (key, value) in self.options() {
            let key = key.parse().map_err(|e| KitError::server(format!("option {key}"), e))?;
            builder = builder.with_config(key, value);
        }
        builder.build().map(Arc::new).map_err(|e| KitError::server("building the S3 client", e))
    }

    fn presigned(&self, sign: impl FnOnce(&Bucket, &Credentials) -> url::Url) -> Result<url::Url, KitError> {
        let endpoint = self.endpoint.parse().map_err(|e| KitError::server(format!("endpoint {}", self.endpoint), e))?;
        let bucket = Bucket::new(endpoint, UrlStyle::Path, self.name.clone(), self.region.clone())
            .map_err(|e| KitError::server(format!("bucket {}", self.name), e))?;
        let credentials = Credentials::new(self.access_key.clone(), self.secret_key.clone());
        Ok(sign(&bucket, &credentials))
    }
}

async fn check(response: reqwest::Response, what: &str) -> Result<(), KitError> {
    if response.status().is_success() {
        return Ok(());
    }
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    Err(KitError::server(what.to_owned(), format!("HTTP {status}: {body}")))
}

impl Drop for TestBucket {
    fn drop(&mut self) {
        let bucket = self.bucket.clone();
        cleanup(&format!("bucket {}", bucket.name), async move {
            let store = bucket.store()?;
            let objects: Vec<_> =
                store.list(None).try_collect().await.map_err(|e| KitError::server("listing objects", e))?;
            for object in objects {
                store.delete(&object.location).await.map_err(|e| KitError::server("deleting an object", e))?;
            }
            let url = bucket.presigned(|b, c| b.delete_bucket(c).sign(Duration::from_secs(60)))?;
            let response = reqwest::Client::new()
                .delete(url)
                .send()
                .await
                .map_err(|e| KitError::server("deleting the bucket", e))?;
            check(response, "deleting the bucket").await
        });
    }
}
