//! The metadata cache (seed 000's cache of documents, seed 004's L1): each gateway keeps
//! the documents and version lists it answered lately, as the JSON it sent, so that reading
//! one again costs no database round trip.
//!
//! It is bounded in memory (the JSON's bytes, weighed) and in age (a time to live), and it
//! is kept right by the events every replica already reads:
//!
//! - an event about a document (its `documentId`) drops that document on every replica as
//!   the event arrives; a change of a stored blob's tier (shared by every document with the
//!   same bytes) and a retention run's progress drop everything;
//! - a change made through this replica drops the document as the change is answered, so
//!   its client reads its own write at once, before the event comes round;
//! - a read that began before a drop does not store what it read (each drop bumps an
//!   epoch, per stripe of ids, that the read compares);
//! - the event feed falling behind or reconnecting drops everything, and a change made
//!   without an event (a tier drain moving blobs) shows once the entry's time to live ends.
//!
//! A request with `Cache-Control: no-cache` reads the database (and refreshes the entry).
//! Another replica's change is thus seen after its event arrives: milliseconds, bounded
//! by the time to live when the feed is down.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::HeaderValue;
use bytes::Bytes;
use moka::sync::Cache;
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use vellum_core::crds::webhook::EventType;
use vellum_core::documents::{Actor, DocError, Document, VersionHistory};
use vellum_core::events::Event;

/// How much the cache may hold, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    /// Bytes of cached JSON at most (documents and version lists together); 0 turns the
    /// cache off.
    pub max_bytes: u64,
    /// How long an entry is used at most after it was read from the database.
    pub ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, ttl: Duration::from_secs(60) }
    }
}

/// A document as this gateway answered it.
#[derive(Clone, Debug)]
pub struct CachedDocument {
    /// Who may see it (besides admins).
    pub owner: Arc<str>,
    pub etag: HeaderValue,
    pub json: Bytes,
}

impl CachedDocument {
    fn of(doc: &Document) -> Result<Self, DocError> {
        let json = serde_json::to_vec(doc).map_err(|e| DocError::Invalid(format!("encoding the document: {e}")))?;
        let etag = HeaderValue::from_str(&doc.etag()).map_err(|e| DocError::Invalid(e.to_string()))?;
        Ok(Self { owner: doc.uploaded_by.as_str().into(), etag, json: json.into() })
    }
}

/// Stripes of document ids with an epoch each: fewer than ids, more than concurrent
/// changes.
const STRIPES: u16 = 1024;

/// What a cached entry weighs: its JSON and the bookkeeping around it.
fn weight(json: &Bytes) -> u32 {
    u32::try_from(json.len() + 160).unwrap_or(u32::MAX)
}

/// A cache of at most `bytes`, as `weigh` weighs its entries, each kept at most `ttl`.
fn bounded<V: Clone + Send + Sync + 'static>(bytes: u64, ttl: Duration, weigh: fn(&V) -> u32) -> Cache<i64, V> {
    Cache::builder().max_capacity(bytes).weigher(move |_: &i64, v: &V| weigh(v)).time_to_live(ttl).build()
}

/// Hits and misses of one cache, as seed 004 counts them (`level="L1"`).
#[derive(Clone, Debug, Default)]
pub struct CacheMeters {
    pub hits: Counter,
    pub misses: Counter,
}

/// The documents and version lists this gateway answered lately.
pub struct MetadataCache {
    documents: Option<Cache<i64, CachedDocument>>,
    versions: Option<Cache<i64, Bytes>>,
    /// Bumped by each drop of a document in the stripe (`id % STRIPES`).
    epochs: Box<[AtomicU64]>,
    /// Bumped by each drop of everything.
    flushes: AtomicU64,
    meters: OnceLock<(CacheMeters, CacheMeters)>,
}

impl std::fmt::Debug for MetadataCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataCache")
            .field("enabled", &self.documents.is_some())
            .field("documents", &self.documents.as_ref().map(Cache::entry_count))
            .field("versions", &self.versions.as_ref().map(Cache::entry_count))
            .finish_non_exhaustive()
    }
}

/// Where a read stood when it began: it may store what it read only if nothing was dropped
/// since.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mark(u64, u64);

impl MetadataCache {
    pub fn new(settings: CacheSettings) -> Self {
        // Half each: a version list is read far less often, but weighs more.
        let half = Some(settings.max_bytes / 2).filter(|b| *b > 0);
        let documents = half.map(|bytes| bounded(bytes, settings.ttl, |v: &CachedDocument| weight(&v.json)));
        let versions = half.map(|bytes| bounded(bytes, settings.ttl, weight));
        Self {
            documents,
            versions,
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            flushes: AtomicU64::new(0),
            meters: OnceLock::new(),
        }
    }

    /// Counts hits and misses of the documents and of the version lists from now on.
    pub fn count_in(&self, documents: CacheMeters, versions: CacheMeters) {
        self.meters.set((documents, versions)).ok();
    }

    fn stripe(&self, id: i64) -> &AtomicU64 {
        &self.epochs[usize::try_from(id.rem_euclid(i64::from(STRIPES))).unwrap_or(0)]
    }

    fn mark(&self, id: i64) -> Mark {
        Mark(self.stripe(id).load(Ordering::Acquire), self.flushes.load(Ordering::Acquire))
    }

    fn count(&self, versions: bool, hit: bool) {
        if let Some((documents, lists)) = self.meters.get() {
            let meters = if versions { lists } else { documents };
            if hit {
                meters.hits.inc()
            } else {
                meters.misses.inc()
            };
        }
    }

    /// Entry `id` of `cache` (none: the cache is off), or what `load` reads, encoded,
    /// stored unless a drop came in between (`versions` says which meters count it).
    async fn through<V, T, F>(
        &self,
        cache: Option<&Cache<i64, V>>,
        versions: bool,
        id: i64,
        fresh: bool,
        load: F,
        encode: impl FnOnce(&T) -> Result<V, DocError>,
    ) -> Result<V, DocError>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<T, DocError>>,
    {
        let Some(cache) = cache else {
            return encode(&load.await?);
        };
        if !fresh && let Some(entry) = cache.get(&id) {
            self.count(versions, true);
            return Ok(entry);
        }
        self.count(versions, false);
        let mark = self.mark(id);
        let entry = encode(&load.await?)?;
        if self.mark(id) == mark {
            cache.insert(id, entry.clone());
        }
        Ok(entry)
    }

    /// Document `id` as the actor may see it: from the cache, or from `load` (which checks
    /// the actor's right itself) when it is not there or `fresh` is asked for.
    pub async fn document<F>(&self, actor: &Actor, id: i64, fresh: bool, load: F) -> Result<CachedDocument, DocError>
    where
        F: Future<Output = Result<Document, DocError>>,
    {
        let entry = self.through(self.documents.as_ref(), false, id, fresh, load, CachedDocument::of).await?;
        // Deleted documents are never stored: only the owner is left to check.
        if actor.sees(&entry.owner) { Ok(entry) } else { Err(DocError::NotFound(id)) }
    }

    /// Document `id`'s version list as JSON, once [`Self::document`] found the actor may see
    /// it: from the cache, or from `load`.
    pub async fn versions<F>(&self, id: i64, fresh: bool, load: F) -> Result<Bytes, DocError>
    where
        F: Future<Output = Result<VersionHistory, DocError>>,
    {
        let encode = |history: &VersionHistory| {
            serde_json::to_vec(history)
                .map(Bytes::from)
                .map_err(|e| DocError::Invalid(format!("encoding the versions: {e}")))
        };
        self.through(self.versions.as_ref(), true, id, fresh, load, encode).await
    }

    /// Drops what is cached of document `id`: it changed, or may have.
    pub fn forget(&self, id: i64) {
        self.stripe(id).fetch_add(1, Ordering::AcqRel);
        if let Some(cache) = &self.documents {
            cache.invalidate(&id);
        }
        if let Some(cache) = &self.versions {
            cache.invalidate(&id);
        }
    }

    /// Drops everything: what changed is not known.
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        if let Some(cache) = &self.documents {
            cache.invalidate_all();
        }
        if let Some(cache) = &self.versions {
            cache.invalidate_all();
        }
    }

    /// Drops what `event` changed.
    pub fn observe(&self, event: &Event) {
        let p = &event.payload;
        let tier_changed = p
            .get("changedFields")
            .and_then(Value::as_array)
            .is_some_and(|fields| fields.iter().any(|f| f.as_str() == Some("storageTier")));
        let retention =
            matches!(event.event_type, EventType::BulkOperationProgress | EventType::BulkOperationCompleted)
                && p.get("operation").and_then(Value::as_str).is_some_and(|op| op.starts_with("retention:"));
        if tier_changed || retention {
            // A blob's tier is every document's with the same bytes; a retention run moves,
            // archives and expires documents without an event for each.
            self.flush();
        } else if let Some(id) = p.get("documentId").and_then(Value::as_i64) {
            self.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(id: i64, owner: &str, title: &str) -> Document {
        serde_json::from_value(json!({
            "id": id, "filename": "a.txt", "fileType": "txt", "contentType": "text/plain", "title": title,
            "description": null, "tags": [], "metadata": {}, "uploadedBy": owner, "size": 1,
            "checksum": "sha256:00", "currentVersion": 1, "storageTier": "hot", "legalHold": false,
            "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    fn actor(user: &str) -> Actor {
        Actor { user: user.into(), admin: false }
    }

    fn title(entry: &CachedDocument) -> String {
        serde_json::from_slice::<Value>(&entry.json).unwrap()["title"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_read_is_answered_from_the_cache_until_the_document_changes() {
        let cache = MetadataCache::new(CacheSettings::default());
        let meters = CacheMeters::default();
        cache.count_in(meters.clone(), CacheMeters::default());
        let first = cache.document(&actor("ann"), 7, false, async { Ok(doc(7, "ann", "one")) }).await.unwrap();
        assert_eq!(title(&first), "one");
        let again = cache
            .document(&actor("ann"), 7, false, async { Err::<Document, _>(DocError::NotFound(7)) })
            .await
            .expect("answered from the cache, without loading");
        assert_eq!(again.etag, first.etag);
        // Someone else's document is not found, cached or not.
        assert!(matches!(
            cache.document(&actor("bob"), 7, false, async { Ok(doc(7, "ann", "one")) }).await,
            Err(DocError::NotFound(7))
        ));
        assert_eq!((meters.hits.get(), meters.misses.get()), (2, 1));

        let event = Event::new(EventType::DocumentUpdated, 0, json!({"documentId": 7}).as_object().unwrap().clone());
        cache.observe(&event);
        let changed = cache.document(&actor("ann"), 7, false, async { Ok(doc(7, "ann", "two")) }).await.unwrap();
        assert_eq!(title(&changed), "two");
        assert_ne!(changed.etag, first.etag);
        // `fresh` reads through.
        let fresh = cache.document(&actor("ann"), 7, true, async { Ok(doc(7, "ann", "three")) }).await.unwrap();
        assert_eq!(title(&fresh), "three");
    }

    #[tokio::test]
    async fn a_read_that_began_before_a_change_does_not_store_what_it_read() {
        let cache = Arc::new(MetadataCache::new(CacheSettings::default()));
        let (loaded, finish) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .document(&actor("ann"), 9, false, async move {
                        finish.await.ok();
                        Ok(doc(9, "ann", "old"))
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        // The change commits and is announced while the old row is on its way back.
        cache.forget(9);
        loaded.send(()).unwrap();
        assert_eq!(title(&reader.await.unwrap().unwrap()), "old");
        let next = cache.document(&actor("ann"), 9, false, async { Ok(doc(9, "ann", "new")) }).await.unwrap();
        assert_eq!(title(&next), "new", "the stale read was not stored");
    }

    #[tokio::test]
    async fn a_tier_change_or_a_retention_run_drops_everything() {
        let cache = MetadataCache::new(CacheSettings::default());
        for id in [1, 2] {
            cache.document(&actor("ann"), id, false, async move { Ok(doc(id, "ann", "a")) }).await.unwrap();
        }
        let tier = json!({"documentId": 1, "changedFields": ["storageTier"]});
        cache.observe(&Event::new(EventType::DocumentUpdated, 0, tier.as_object().unwrap().clone()));
        let second = cache.document(&actor("ann"), 2, false, async { Ok(doc(2, "ann", "b")) }).await.unwrap();
        assert_eq!(title(&second), "b", "document 2 shares nothing with 1 but its blob may");
        let run = json!({"operation": "retention:default", "processed": 3});
        cache.observe(&Event::new(EventType::BulkOperationProgress, 0, run.as_object().unwrap().clone()));
        let third = cache.document(&actor("ann"), 2, false, async { Ok(doc(2, "ann", "c")) }).await.unwrap();
        assert_eq!(title(&third), "c");
        // A user's bulk job announces each document it changes: its progress drops nothing.
        let job = json!({"operation": "tag", "processed": 3});
        cache.observe(&Event::new(EventType::BulkOperationProgress, 0, job.as_object().unwrap().clone()));
        let kept = cache.document(&actor("ann"), 2, false, async { Ok(doc(2, "ann", "d")) }).await.unwrap();
        assert_eq!(title(&kept), "c");
    }

    #[tokio::test]
    async fn the_cache_holds_no_more_than_its_bytes() {
        let cache = MetadataCache::new(CacheSettings { max_bytes: 64 << 10, ttl: Duration::from_secs(60) });
        for id in 0..2000 {
            cache.document(&actor("ann"), id, false, async move { Ok(doc(id, "ann", "x")) }).await.unwrap();
        }
        let documents = cache.documents.as_ref().unwrap();
        documents.run_pending_tasks();
        assert!(documents.weighted_size() <= 32 << 10, "{} bytes held", documents.weighted_size());
        assert!(documents.entry_count() > 10);
    }

    #[tokio::test]
    async fn a_cache_of_no_bytes_reads_through() {
        let cache = MetadataCache::new(CacheSettings { max_bytes: 0, ttl: Duration::from_secs(60) });
        cache.document(&actor("ann"), 1, false, async { Ok(doc(1, "ann", "a")) }).await.unwrap();
        let next = cache.document(&actor("ann"), 1, false, async { Ok(doc(1, "ann", "b")) }).await.unwrap();
        assert_eq!(title(&next), "b");
    }
}
