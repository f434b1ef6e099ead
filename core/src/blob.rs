//! Storage tiers over `object_store`, and the blobs in them.
//!
//! A blob is written once under a key of its own (`blobs/<uuid>`), hashing (SHA-256) and
//! optionally compressing (zstd) as the bytes stream through, so memory stays flat whatever
//! the size. Only after the bytes are stored does the metadata store decide, in a
//! transaction, whether the content already existed (then the new copy is deleted: the
//! upload was deduplicated) or becomes the blob for its hash. Because each copy has a key
//! of its own, deleting an unreferenced copy can never delete bytes a concurrent upload
//! relies on.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use async_compression::Level;
use async_compression::tokio::bufread::ZstdDecoder;
use async_compression::tokio::write::ZstdEncoder;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::chunked::ChunkedStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::config::{PlatformConfig, SecretBundle, TierConfig};
use crate::crds::storage_tier::{Compression, TierClass};

/// A stream of bytes, as blobs are read and written.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Why a tier could not store or return a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("storage tier {tier}: {message}")]
    Open { tier: String, message: String },
    #[error("unknown storage tier {0}")]
    UnknownTier(String),
    #[error("storage tier {tier}: {source}")]
    Store {
        tier: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading the upload: {0}")]
    Body(#[source] std::io::Error),
    #[error("the upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("storage tier {tier}: writing: {source}")]
    Write {
        tier: String,
        #[source]
        source: std::io::Error,
    },
}

/// One storage tier: where its blobs go and how they are compressed.
#[derive(Debug)]
pub struct Tier {
    pub name: String,
    pub class: TierClass,
    pub cost_per_gb_month: Option<f64>,
    pub compression: Compression,
    store: Arc<dyn ObjectStore>,
    /// Where the tier is in a store other tiers may share: copies between tiers on one
    /// backend happen inside it.
    backend: Option<Backend>,
}

/// An object store shared by every tier on the same backend (one bucket reached with the
/// same endpoint and credentials, or this machine's file system), and where in it one
/// tier is. A copy between two tiers on one backend happens inside the store: a hard link
/// on a local file system, a CopyObject on S3. The bytes never pass through here.
#[derive(Clone)]
pub struct Backend {
    /// Which backend (a digest: it may derive from credentials).
    id: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Backend {
    fn path(&self, key: &str) -> ObjectPath {
        let key = ObjectPath::from(key);
        self.prefix.parts().chain(key.parts()).collect()
    }
}

/// The backends tiers are opened on, one store per backend.
#[derive(Default)]
struct Backends(BTreeMap<String, Arc<dyn ObjectStore>>);

impl Backends {
    /// The shared backend of a tier's config, if tiers can share its store.
    fn of(&mut self, config: &TierConfig, secrets: &SecretBundle, data_dir: &Path) -> Option<Backend> {
        if let Some(path) = config.url.strip_prefix("file://") {
            let dir = local_dir(path, data_dir).canonicalize().ok()?;
            let prefix = ObjectPath::from_absolute_path(&dir).ok()?;
            let store = self.0.entry("file://".to_owned()).or_insert_with(|| Arc::new(LocalFileSystem::new()));
            return Some(Backend { id: "file://".to_owned(), store: Arc::clone(store), prefix });
        }
        if config.url.starts_with("memory://") {
            return None;
        }
        let url = url::Url::parse(&config.url).ok()?;
        let options = backend_options(config, secrets).ok()?;
        let root = format!("{}://{}", url.scheme(), url.host_str()?);
        let mut hasher = Sha256::new();
        hasher.update(root.as_bytes());
        for (key, value) in &options {
            hasher.update([0]);
            hasher.update(key.as_bytes());
            hasher.update([0]);
            hasher.update(value.as_bytes());
        }
        let id = hex::encode(hasher.finalize());
        let store = if let Some(store) = self.0.get(&id) {
            Arc::clone(store)
        } else {
            let (store, _) = object_store::parse_url_opts(&url::Url::parse(&root).ok()?, options).ok()?;
            let store: Arc<dyn ObjectStore> = Arc::from(store);
            self.0.insert(id.clone(), Arc::clone(&store));
            store
        };
        let prefix = ObjectPath::from_url_path(url.path()).ok()?;
        Some(Backend { id, store, prefix })
    }
}

/// A backend's `object_store` options: the config's, and its credentials from `secrets`.
fn backend_options(config: &TierConfig, secrets: &SecretBundle) -> Result<BTreeMap<String, String>, String> {
    let mut options = config.options.clone();
    for (key, handle) in &config.secret_options {
        let value = secrets
            .get(handle)
            .and_then(|v| v.expose_str())
            .ok_or_else(|| format!("credential {key} is missing or not UTF-8 (Secret key {})", handle.0))?;
        options.insert(key.clone(), value.to_owned());
    }
    Ok(options)
}

/// The directory of a `file://` tier: absolute, or under the data directory.
fn local_dir(path: &str, data_dir: &Path) -> std::path::PathBuf {
    if path.starts_with('/') { Path::new(path).to_path_buf() } else { data_dir.join(path) }
}

/// How a blob is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Zstd,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Codec::None),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// A blob that has been written to a tier and not yet recorded in the metadata store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    pub tier: String,
    pub object_key: String,
    /// Lowercase hex SHA-256 of the original bytes.
    pub sha256: String,
    /// Size of the original bytes.
    pub size: u64,
    /// Size as stored, after compression.
    pub stored_size: u64,
    pub codec: Codec,
}

/// The size of the chunks a download reads from a local-file tier at a time.
const LOCAL_READ_CHUNK: usize = 256 << 10;

impl Tier {
    /// Opens the tier described by `config`. A `file://` URL with a relative path
    /// (`file://tiers/hot`) is resolved against `data_dir`, and its directory created.
    pub fn open(name: &str, config: &TierConfig, secrets: &SecretBundle, data_dir: &Path) -> Result<Self, BlobError> {
        let fail = |message: String| BlobError::Open { tier: name.to_owned(), message };
        let store: Arc<dyn ObjectStore> = if config.url.starts_with("memory://") {
            Arc::new(InMemory::new())
        } else if let Some(path) = config.url.strip_prefix("file://") {
            let dir = local_dir(path, data_dir);
            std::fs::create_dir_all(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
            let local = LocalFileSystem::new_with_prefix(&dir).map_err(|e| fail(e.to_string()))?;
            // Reads from a local file come in chunks read on the blocking pool; the store's
            // own 8 KiB chunks make that pool the bottleneck of a download.
            Arc::new(ChunkedStore::new(Arc::new(local), LOCAL_READ_CHUNK))
        } else {
            let url = url::Url::parse(&config.url).map_err(|e| fail(format!("backend URL: {e}")))?;
            let options = backend_options(config, secrets).map_err(fail)?;
            let (store, prefix) = object_store::parse_url_opts(&url, options).map_err(|e| fail(e.to_string()))?;
            let store: Arc<dyn ObjectStore> = Arc::from(store);
            if prefix.as_ref().is_empty() {
                store
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
            }
        };
        Ok(Self::from_store(name, config.class, config.cost_per_gb_month, config.compression.clone(), store))
    }

    /// A tier over an existing object store.
    pub fn from_store(
        name: &str,
        class: TierClass,
        cost_per_gb_month: Option<f64>,
        compression: Compression,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        Self { name: name.to_owned(), class, cost_per_gb_month, compression, store, backend: None }
    }

    /// Copies `from_key` of this tier to `to_key` of `target` inside their store, when both
    /// are on one backend; `None` when they are not (the bytes must be streamed).
    pub async fn copy_within(&self, from_key: &str, target: &Tier, to_key: &str) -> Option<Result<u64, BlobError>> {
        let (from, to) = (self.backend.as_ref()?, target.backend.as_ref()?);
        if from.id != to.id {
            return None;
        }
        let copied = async {
            from.store.copy(&from.path(from_key), &to.path(to_key)).await.map_err(|e| target.err(e))?;
            let head = target.store.head(&ObjectPath::from(to_key)).await.map_err(|e| target.err(e))?;
            Ok(head.size)
        };
        Some(copied.await)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Whether blobs of `content_type` are compressed in this tier.
    pub fn compresses(&self, content_type: &str) -> bool {
        let content_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        self.compression.enabled
            && !self.compression.skip_content_types.iter().any(|skip| {
                let skip = skip.to_ascii_lowercase();
                match skip.strip_suffix("/*") {
                    Some(family) => content_type.split('/').next() == Some(family),
                    None => content_type == skip,
                }
            })
    }

    fn err(&self, source: object_store::Error) -> BlobError {
        BlobError::Store { tier: self.name.clone(), source }
    }

    /// Streams `body` into a new object, hashing and (if `compress`) compressing it on
    /// the way. Fails with [`BlobError::TooLarge`] as soon as more than `limit` bytes
    /// arrive; on any failure the partial object is removed.
    pub async fn write(
        &self,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
        compress: bool,
        limit: u64,
    ) -> Result<StoredBlob, BlobError> {
        self.write_under("blobs", body, compress, limit).await
    }

    /// [`Self::write`], to a new key under `prefix`.
    pub async fn write_under(
        &self,
        prefix: &str,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
        compress: bool,
        limit: u64,
    ) -> Result<StoredBlob, BlobError> {
        self.write_at(new_object_key(prefix), body, compress, limit).await
    }

    /// [`Self::write`], to the key given (one from [`new_object_key`]).
    pub async fn write_at(
        &self,
        object_key: String,
        mut body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
        compress: bool,
        limit: u64,
    ) -> Result<StoredBlob, BlobError> {
        let path = ObjectPath::from(object_key.as_str());
        let writer = BufWriter::new(Arc::clone(&self.store), path.clone());
        let mut sink: Pin<Box<dyn tokio::io::AsyncWrite + Send>> = if compress {
            Box::pin(ZstdEncoder::with_quality(writer, Level::Precise(self.compression.level)))
        } else {
            Box::pin(writer)
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let outcome: Result<(), BlobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(BlobError::Body)?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(BlobError::TooLarge { limit });
                }
                hasher.update(&chunk);
                sink.write_all(&chunk).await.map_err(|e| self.write_err(e))?;
            }
            sink.shutdown().await.map_err(|e| self.write_err(e))
        }
        .await;
        if let Err(e) = outcome {
            drop(sink);
            // The multipart upload (if one was started) is aborted when its writer drops
            // unfinished; a completed small object is deleted.
            self.store.delete(&path).await.ok();
            return Err(e);
        }
        let stored_size = self.store.head(&path).await.map_err(|e| self.err(e))?.size;
        Ok(StoredBlob {
            tier: self.name.clone(),
            object_key,
            sha256: hex::encode(hasher.finalize()),
            size,
            stored_size,
            codec: if compress { Codec::Zstd } else { Codec::None },
        })
    }

    fn write_err(&self, source: std::io::Error) -> BlobError {
        BlobError::Write { tier: self.name.clone(), source }
    }

    /// Streams the original bytes of a blob, or the `range` of them.
    pub async fn read(
        &self,
        object_key: &str,
        codec: Codec,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, BlobError> {
        let path = ObjectPath::from(object_key);
        match codec {
            Codec::None => {
                let options = GetOptions { range: range.map(GetRange::Bounded), ..GetOptions::default() };
                let result = self.store.get_opts(&path, options).await.map_err(|e| self.err(e))?;
                Ok(Box::pin(result.into_stream().map_err(std::io::Error::other)))
            }
            Codec::Zstd => {
                // zstd frames cannot be entered in the middle: a range is decompressed from
                // the start and the bytes before it skipped.
                let result = self.store.get(&path).await.map_err(|e| self.err(e))?;
                let compressed = StreamReader::new(result.into_stream().map_err(std::io::Error::other));
                let mut decoder = ZstdDecoder::new(tokio::io::BufReader::new(compressed));
                decoder.multiple_members(true);
                let Some(range) = range else { return Ok(Box::pin(ReaderStream::new(decoder))) };
                let mut skip = (&mut decoder).take(range.start);
                tokio::io::copy(&mut skip, &mut tokio::io::sink()).await.map_err(|e| self.write_err(e))?;
                Ok(Box::pin(ReaderStream::new(decoder.take(range.end - range.start))))
            }
        }
    }

    /// Deletes an object; one already gone counts as deleted.
    pub async fn delete(&self, object_key: &str) -> Result<(), BlobError> {
        match self.store.delete(&ObjectPath::from(object_key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Writes, reads back and deletes a small probe object: whether the tier works.
    pub async fn probe(&self) -> Result<(), BlobError> {
        let path = ObjectPath::from(format!("probes/{}", uuid::Uuid::new_v4().simple()));
        let payload = Bytes::from_static(b"vellum probe");
        self.store.put(&path, payload.clone().into()).await.map_err(|e| self.err(e))?;
        let back = self.store.get(&path).await.map_err(|e| self.err(e))?.bytes().await.map_err(|e| self.err(e))?;
        self.store.delete(&path).await.map_err(|e| self.err(e))?;
        if back == payload {
            Ok(())
        } else {
            Err(BlobError::Open { tier: self.name.clone(), message: "the probe object read back differently".into() })
        }
    }
}

/// The platform's tiers by name, and the one uploads land in.
#[derive(Clone, Debug)]
pub struct Tiers {
    tiers: BTreeMap<String, Arc<Tier>>,
    default: String,
}

impl Tiers {
    /// Opens every tier of the platform config.
    pub fn open(config: &PlatformConfig, secrets: &SecretBundle, data_dir: &Path) -> Result<Self, BlobError> {
        let mut tiers = BTreeMap::new();
        let mut backends = Backends::default();
        for (name, tier) in &config.tiers {
            let mut opened = Tier::open(name, tier, secrets, data_dir)?;
            opened.backend = backends.of(tier, secrets, data_dir);
            tiers.insert(name.clone(), Arc::new(opened));
        }
        Self::new(tiers.into_values().collect(), &config.default_tier)
    }

    /// Tiers from already opened ones.
    pub fn new(tiers: Vec<Arc<Tier>>, default: &str) -> Result<Self, BlobError> {
        let tiers: BTreeMap<_, _> = tiers.into_iter().map(|t| (t.name.clone(), t)).collect();
        if !tiers.contains_key(default) {
            return Err(BlobError::UnknownTier(default.to_owned()));
        }
        Ok(Self { tiers, default: default.to_owned() })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Tier>, BlobError> {
        self.tiers.get(name).cloned().ok_or_else(|| BlobError::UnknownTier(name.to_owned()))
    }

    pub fn default_tier(&self) -> Arc<Tier> {
        Arc::clone(&self.tiers[&self.default])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tier>> {
        self.tiers.values()
    }
}

/// A key of its own for a new stored copy, under `prefix`.
pub fn new_object_key(prefix: &str) -> String {
    format!("{prefix}/{}", uuid::Uuid::new_v4().simple())
}

/// A stream of one `Bytes` value, for tests and small bodies.
pub fn once(bytes: impl Into<Bytes>) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send {
    futures::stream::iter([Ok(bytes.into())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(compression: Compression) -> Tier {
        Tier::from_store("hot", TierClass::Hot, None, compression, Arc::new(InMemory::new()))
    }

    async fn collect(stream: ByteStream) -> Vec<u8> {
        stream
            .try_fold(Vec::new(), |mut acc, b| async move {
                acc.extend_from_slice(&b);
                Ok(acc)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn compressed_blobs_read_back_whole_and_by_range() {
        let tier = tier(Compression { enabled: true, ..Compression::default() });
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            data.chunks(7919).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let blob = tier.write(futures::stream::iter(chunks), true, u64::MAX).await.unwrap();
        assert_eq!(blob.size, data.len() as u64);
        assert!(blob.stored_size < blob.size / 2, "{} of {}", blob.stored_size, blob.size);
        assert_eq!(blob.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(collect(tier.read(&blob.object_key, Codec::Zstd, None).await.unwrap()).await, data);
        let part = collect(tier.read(&blob.object_key, Codec::Zstd, Some(12_345..67_890)).await.unwrap()).await;
        assert_eq!(part, &data[12_345..67_890]);
    }

    #[tokio::test]
    async fn plain_ranges_come_from_the_store() {
        let tier = tier(Compression::default());
        let blob = tier.write(once("hello, world"), false, 100).await.unwrap();
        assert_eq!(blob.stored_size, 12);
        assert_eq!(collect(tier.read(&blob.object_key, Codec::None, Some(7..12)).await.unwrap()).await, b"world");
    }

    #[tokio::test]
    async fn an_oversize_upload_fails_and_leaves_nothing() {
        let tier = tier(Compression::default());
        let err = tier.write(once(vec![0u8; 101]), false, 100).await.unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 100 }), "{err}");
        let left: Vec<_> = tier.store().list(None).try_collect().await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn compression_skips_listed_types_and_families() {
        let tier = tier(Compression {
            enabled: true,
            skip_content_types: vec!["image/*".into(), "application/zip".into()],
            ..Compression::default()
        });
        assert!(tier.compresses("application/pdf"));
        assert!(tier.compresses("text/plain; charset=utf-8"));
        assert!(!tier.compresses("image/png"));
        assert!(!tier.compresses("Application/ZIP"));
        assert!(!self::tier(Compression::default()).compresses("text/plain"));
    }
}
