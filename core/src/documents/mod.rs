//! The document service: uploads, versions, metadata, listing, deletion and legal hold,
//! over the metadata store and the blob tiers. The gateway maps HTTP onto it; the workers
//! use it for their own changes. Every change that emits an event writes the event to the
//! outbox in the same transaction.

mod garbage;
pub(crate) mod library;
mod model;
mod retention;
mod scrub;
mod tiering;
mod usage;

use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

pub use library::{
    DocumentUpload, Library, Upload, VersionUpload, library_of, open_shards, open_shards_with, reopen_shards,
    rotate_credentials, routes_as, shard_connections,
};
pub use model::*;
pub use scrub::{QuarantinedBlob, ScrubReport};
pub use tiering::{Grace, MigrationStep, StepHook};
pub use usage::{Savings, TierUsage, Usage, UsageCounts, monthly_cost, usage_counts};

use crate::blob::{BlobError, ByteStream, Codec, StoredBlob, Tiers};
use crate::clock::{Clock, rfc3339};
use crate::crds::webhook::EventType;
use crate::events::{Bus, Event};
use crate::routing::RoutingTable;
use crate::store::{Metadata, StoreError, Tx};

/// Refuses a conditional change of `doc` that no longer matches `if_match`.
pub fn precondition(doc: &Document, if_match: Option<&str>) -> Result<(), DocError> {
    match if_match {
        Some(tags) if !doc.matches(tags) => Err(DocError::PreconditionFailed { id: doc.id, etag: doc.etag() }),
        _ => Ok(()),
    }
}

/// Why a document operation failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("{0}")]
    Invalid(String),
    #[error("document {0} not found")]
    NotFound(i64),
    #[error("version {version} of document {id} not found")]
    VersionNotFound { id: i64, version: i64 },
    #[error("{0}")]
    Conflict(String),
    #[error("upload session {0} not found")]
    SessionNotFound(String),
    #[error("bulk job {0} not found")]
    JobNotFound(String),
    /// The thing existed and is gone for good (an expired or cancelled session).
    #[error("{0}")]
    Gone(String),
    /// Bytes whose SHA-256 differs from the one announced.
    #[error("{0}")]
    ChecksumMismatch(String),
    #[error("{0}")]
    Forbidden(String),
    /// A conditional change (`If-Match`) of a document that changed since the client read
    /// it: `etag` is the document's entity tag now.
    #[error("document {id} changed since it was read: its ETag is now {etag}; read it again and reapply the change")]
    PreconditionFailed { id: i64, etag: String },
    /// Not now, soon: the document's shard is handing it over, or a move this replica has
    /// not loaded yet is under way.
    #[error("{0}")]
    Unavailable(String),
    #[error("the upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// Stored bytes an integrity scrub found are not the content's (or gone): not served.
    #[error(
        "version {version} of document {id} is quarantined: an integrity scrub found that {reason}; \
         it is served again once its stored copy is restored and a scrub finds it sound"
    )]
    Quarantined { id: i64, version: i64, reason: String },
    #[error(transparent)]
    Storage(BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BlobError> for DocError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooLarge { limit } => DocError::TooLarge { limit },
            BlobError::Body(e) => DocError::Invalid(format!("reading the upload failed: {e}")),
            other => DocError::Storage(other),
        }
    }
}

impl crate::store::TxError for DocError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            DocError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for DocError {
    fn from(e: sqlx::Error) -> Self {
        DocError::Store(StoreError::Database(e))
    }
}

/// An upload's description, checked, with its content type decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub new: NewDocument,
    pub content_type: String,
}

/// A version's bytes, ready to stream: what to send and how to find it.
#[derive(Clone, Debug)]
pub struct Content {
    pub document: Document,
    pub version: i64,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    /// Lowercase hex SHA-256: the strong ETag of the bytes.
    pub sha256: String,
    tier: String,
    object_key: String,
    codec: Codec,
}

/// The document service.
#[derive(Clone, Debug)]
pub struct Documents {
    meta: Metadata,
    /// Swapped whole when the platform config changes; a read in progress keeps the tier
    /// it started with.
    tiers: Arc<std::sync::RwLock<Tiers>>,
    clock: Clock,
    bus: Option<Bus>,
    /// The largest document accepted, in bytes.
    pub max_upload: u64,
    /// This database's place among the platform's shards: the documents and upload
    /// sessions it creates get ids the routing table sends to it.
    placement: Option<Placement>,
    /// The platform's other shards: a stored copy one of them refers to is not garbage.
    siblings: Arc<[Metadata]>,
}

/// Where a shard stands in the routing table in force and, while a move runs, in the
/// table it moves to (`None`: the shard leaves it).
#[derive(Clone, Debug)]
pub struct Placement {
    pub table: Arc<RoutingTable>,
    pub index: usize,
    pub next: Option<(Arc<RoutingTable>, Option<usize>)>,
}

impl Placement {
    /// Whether `shard_of` sends a key here under both tables.
    fn owns(&self, shard_of: impl Fn(&RoutingTable) -> usize) -> bool {
        shard_of(&self.table) == self.index
            && self.next.as_ref().is_none_or(|(next, index)| Some(shard_of(next)) == *index)
    }
}

/// Tries at drawing an id that routes to a shard before giving up: a shard's share of the
/// hash space is at least 2^-32, so a shard that ever gets a new document (which is chosen
/// by the same routing) finds one in a handful of draws.
const PLACEMENT_DRAWS: usize = 1 << 20;

const DOCUMENT_COLUMNS: &str = "d.id, d.owner, d.filename, d.file_type, d.content_type, d.title, d.description, \
     d.tags, d.metadata, d.current_version, d.size, d.sha256, d.legal_hold, d.created_at, d.updated_at, d.deleted_at, \
     d.archived_at, d.archive_id, b.tier";

/// A random id below 2^53, so that JavaScript clients read it exactly.
pub fn random_document_id() -> i64 {
    rand::random_range(1..(1i64 << 53))
}

fn document_from_row(row: &AnyRow) -> Result<Document, StoreError> {
    let corrupt = |what: &str, e: serde_json::Error| StoreError::Corrupt(format!("document {what}: {e}"));
    let tags: String = row.try_get("tags")?;
    let metadata: String = row.try_get("metadata")?;
    let sha256: String = row.try_get("sha256")?;
    let deleted_at: Option<i64> = row.try_get("deleted_at")?;
    Ok(Document {
        id: row.try_get("id")?,
        filename: row.try_get("filename")?,
        file_type: row.try_get("file_type")?,
        content_type: row.try_get("content_type")?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
        tags: serde_json::from_str(&tags).map_err(|e| corrupt("tags", e))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| corrupt("metadata", e))?,
        uploaded_by: row.try_get("owner")?,
        size: row.try_get("size")?,
        checksum: format!("sha256:{sha256}"),
        current_version: row.try_get("current_version")?,
        storage_tier: row.try_get("tier")?,
        legal_hold: row.try_get::<i64, _>("legal_hold")? != 0,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
        deleted_at: deleted_at.map(rfc3339),
        archived_at: row.try_get::<Option<i64>, _>("archived_at")?.map(rfc3339),
        archive_id: row.try_get("archive_id")?,
    })
}

/// The payload fields every document event carries (the seed's webhook payload).
fn document_fields(doc: &Document) -> Map<String, Value> {
    let mut metadata = doc.metadata.clone();
    if let Some(title) = &doc.title {
        metadata.insert("title".into(), json!(title));
    }
    if let Some(description) = &doc.description {
        metadata.insert("description".into(), json!(description));
    }
    metadata.insert("tags".into(), json!(doc.tags));
    let Value::Object(fields) = json!({
        "documentId": doc.id,
        "filename": doc.filename,
        "fileType": doc.file_type,
        "contentType": doc.content_type,
        "size": doc.size,
        "uploadedBy": doc.uploaded_by,
        "checksum": doc.checksum,
        "versionNumber": doc.current_version,
        "storageTier": doc.storage_tier,
        "metadata": metadata,
    }) else {
        unreachable!("a JSON object literal")
    };
    fields
}

fn with(mut fields: Map<String, Value>, extra: Value) -> Map<String, Value> {
    if let Value::Object(extra) = extra {
        fields.extend(extra);
    }
    fields
}

/// Writes the event of an actor's change to the outbox. The operator's smoke checks change
/// nothing anyone watches: their events reach no webhook, topic or subscriber.
async fn announce(actor: &Actor, event: Event, tx: &mut Tx, now: i64) -> Result<(), StoreError> {
    if actor.is_smoke() {
        return Ok(());
    }
    event.enqueue(tx, now).await
}

/// Reads a document inside a transaction, as the actor may see it.
async fn load(tx: &mut Tx, actor: &Actor, id: i64, include_deleted: bool) -> Result<Document, DocError> {
    let sql = format!("SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN blobs b ON b.sha256 = d.sha256 WHERE d.id = $1");
    let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&mut **tx).await?;
    visible(row.as_ref().map(document_from_row).transpose()?, actor, id, include_deleted)
}

/// The document `id` as read, if `actor` may see it (a deleted one only with
/// `include_deleted`); not found otherwise.
fn visible(doc: Option<Document>, actor: &Actor, id: i64, include_deleted: bool) -> Result<Document, DocError> {
    match doc {
        Some(doc) if actor.sees(&doc.uploaded_by) && (doc.deleted_at.is_none() || include_deleted) => Ok(doc),
        _ => Err(DocError::NotFound(id)),
    }
}

/// How long an upload may take between claiming the key of its copy and recording it.
const UPLOAD_CLAIM_MS: i64 = 24 * 3_600_000;

/// Removes the claim on a stored copy, in the transaction that records the copy: `false`
/// when there is no live claim here (it is in another database, or ran out and the
/// collector may have deleted the copy), and the copy must not be recorded.
pub(crate) async fn take_live_claim(tx: &mut Tx, tier: &str, object_key: &str, now: i64) -> Result<bool, StoreError> {
    let taken = sqlx::query("DELETE FROM blob_garbage WHERE tier = $1 AND object_key = $2 AND not_before > $3")
        .bind(tier)
        .bind(object_key)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(taken.rows_affected() > 0)
}

/// Records a stored blob, or finds that its content was already stored. Returns whether
/// it was (the new copy must then be deleted once the transaction commits).
///
/// Another transaction may record the same content at the same time (an upload of the
/// same bytes, a resharding copy bringing a document that has them): the insert waits for
/// it, and once it has committed this one finds the content recorded, as if it had been
/// before.
async fn record_blob(tx: &mut Tx, blob: &StoredBlob, now: i64) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO blobs (sha256, object_key, tier, size, stored_size, compression, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (sha256) DO NOTHING",
    )
    .bind(&blob.sha256)
    .bind(&blob.object_key)
    .bind(&blob.tier)
    .bind(i64::try_from(blob.size).unwrap_or(i64::MAX))
    .bind(i64::try_from(blob.stored_size).unwrap_or(i64::MAX))
    .bind(blob.codec.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(true);
    }
    // Recorded: no longer garbage (see `Documents::store_bytes`). A duplicate copy keeps
    // its claim until the upload deletes it, or the collector does after a crash.
    // The claim must be here: a copy claimed on another shard, or whose claim the collector
    // already took, could be deleted under the row recorded now (the error rolls it back).
    if !take_live_claim(tx, &blob.tier, &blob.object_key, now).await? {
        return Err(StoreError::Corrupt(format!(
            "stored copy {} is not claimed in this database: it was stored through another shard, or its claim \
             ran out and the collector may have deleted it",
            blob.object_key
        )));
    }
    Ok(false)
}

#[allow(clippy::too_many_arguments)]
async fn insert_version(
    tx: &mut Tx,
    id: i64,
    version: i64,
    sha256: &str,
    size: i64,
    filename: &str,
    content_type: &str,
    now: i64,
    by: &str,
    change: Option<&str>,
    restored_from: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO versions (document_id, version, sha256, size, filename, content_type, created_at, created_by, \
         change_description, restored_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(version)
    .bind(sha256)
    .bind(size)
    .bind(filename)
    .bind(content_type)
    .bind(now)
    .bind(by)
    .bind(change)
    .bind(restored_from)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Deletes the row of blob `sha` if no version or document refers to it any more, and
/// returns where its copy is stored (`tier`, `object_key`): the caller deletes the copy.
///
/// In a serializable transaction: a concurrent upload that links to this blob either
/// commits first (and the blob stays) or fails and retries (and stores its own copy).
async fn forget_unreferenced_blob(tx: &mut Tx, sha: &str) -> Result<Option<(String, String)>, StoreError> {
    let row = sqlx::query(
        "SELECT tier, object_key FROM blobs b WHERE sha256 = $1 AND NOT EXISTS \
         (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256) \
         AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.sha256 = b.sha256)",
    )
    .bind(sha)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    sqlx::query("DELETE FROM blobs WHERE sha256 = $1").bind(sha).execute(&mut **tx).await?;
    Ok(Some((row.try_get("tier")?, row.try_get("object_key")?)))
}

/// Makes the tag index of a document say `tags`.
async fn replace_tags(tx: &mut Tx, id: i64, tags: &[String]) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM document_tags WHERE document_id = $1").bind(id).execute(&mut **tx).await?;
    for tag in tags {
        sqlx::query("INSERT INTO document_tags (document_id, tag) VALUES ($1, $2)")
            .bind(id)
            .bind(tag)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// A value bound into a dynamically built query.
enum Bind {
    Int(i64),
    Text(String),
}

fn encode_cursor(created_at_ms: i64, id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{id}"))
}

/// The page size a listing asks for, checked.
fn page_limit(query: &ListQuery) -> Result<u32, DocError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(DocError::Invalid(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    Ok(limit)
}

/// A page of `items` (newest first, with their creation times), at most `limit` of them,
/// with the cursor of the next page when there is more.
fn page_of(mut items: Vec<(i64, Document)>, more: bool, limit: usize) -> Page {
    let more = more || items.len() > limit;
    items.truncate(limit);
    let next_cursor = if more { items.last().map(|(at, doc)| encode_cursor(*at, doc.id)) } else { None };
    Page { items: items.into_iter().map(|(_, doc)| doc).collect(), next_cursor }
}

fn decode_cursor(cursor: &str) -> Result<(i64, i64), DocError> {
    let bad = || DocError::Invalid(format!("cursor {cursor:?} is not one this API returned"));
    let text = URL_SAFE_NO_PAD.decode(cursor).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(bad)?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?))
}

fn like_pattern(words: &str) -> String {
    let escaped: String = words
        .to_lowercase()
        .chars()
        .flat_map(|c| if matches!(c, '%' | '_' | '\\') { vec!['\\', c] } else { vec![c] })
        .collect();
    format!("%{escaped}%")
}

impl Documents {
    pub fn new(meta: Metadata, tiers: Tiers, clock: Clock, bus: Option<Bus>, max_upload: u64) -> Self {
        Self {
            meta,
            tiers: Arc::new(std::sync::RwLock::new(tiers)),
            clock,
            bus,
            max_upload,
            placement: None,
            siblings: Arc::new([]),
        }
    }

    /// Places this database among the platform's shards, which are `siblings`.
    #[must_use]
    pub fn placed(mut self, placement: Placement, siblings: Arc<[Metadata]>) -> Self {
        self.placement = Some(placement);
        self.siblings = siblings;
        self
    }

    /// The same service (tiers, clock, limits) on another database: a shard a routing
    /// change adds.
    #[must_use]
    pub fn on(&self, meta: Metadata) -> Self {
        Self { meta, placement: None, siblings: Arc::new([]), ..self.clone() }
    }

    /// Shares `other`'s tiers: a config reload that replaces them reaches both.
    #[must_use]
    pub fn sharing_tiers_with(mut self, other: &Documents) -> Self {
        self.tiers = Arc::clone(&other.tiers);
        self
    }

    /// Whether the routing table sends document `id` here.
    pub fn owns_id(&self, id: i64) -> bool {
        self.placement.as_ref().is_none_or(|p| p.owns(|table| table.shard_of_id(id)))
    }

    /// Whether the routing table sends the record named `key` here.
    pub fn owns_key(&self, key: &str) -> bool {
        self.placement.as_ref().is_none_or(|p| p.owns(|table| table.shard_of_key(key)))
    }

    /// Goes on recording a new document only on a replica that knows the move its shard is
    /// part of, if one runs (or routes by the table it moves to already): such a replica
    /// draws ids the move leaves here. The shard's
    /// routing row is held until the record commits, so the mover's update of it waits.
    pub(crate) async fn check_move(&self, tx: &mut Tx) -> Result<(), DocError> {
        let lock = if self.meta.dialect() == crate::store::Dialect::Postgres { " FOR SHARE" } else { "" };
        let moving: Option<String> = sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(format!(
            "SELECT moving_to FROM shard_routing{lock}"
        )))
        .fetch_optional(&mut **tx)
        .await?
        .flatten();
        // A replica that knows the move, or that routes by the table it reached (the flip
        // came before the shard's mark is cleared).
        let knows = |version: &str| {
            self.placement.as_ref().is_some_and(|p| {
                p.table.version() == version || p.next.as_ref().is_some_and(|(next, _)| next.version() == version)
            })
        };
        match moving {
            Some(version) if !knows(&version) => Err(DocError::Unavailable(format!(
                "this shard is moving documents under routing version {version}, which this replica has not loaded \
                 yet; try again shortly"
            ))),
            _ => Ok(()),
        }
    }

    /// The shard document `id` was handed over to, if it was handed over from here.
    pub async fn moved_to(&self, id: i64) -> Result<Option<String>, DocError> {
        Ok(crate::resharding::moved_to(&self.meta, id).await?)
    }

    /// Hands the claim on an upload's stored copy over to `to` (where it will be recorded
    /// instead): claimed there first, then released here, so that until it is recorded
    /// some shard claims it and no collector deletes it.
    pub(crate) async fn transfer_claim(&self, blob: &StoredBlob, to: &Documents) -> Result<(), DocError> {
        sqlx::query(
            "INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3) \
             ON CONFLICT (tier, object_key) DO NOTHING",
        )
        .bind(&blob.tier)
        .bind(&blob.object_key)
        .bind(self.clock.now_ms() + UPLOAD_CLAIM_MS)
        .execute(to.meta.pool())
        .await
        .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM blob_garbage WHERE tier = $1 AND object_key = $2")
            .bind(&blob.tier)
            .bind(&blob.object_key)
            .execute(self.meta.pool())
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// The platform's other shards.
    pub(crate) fn siblings(&self) -> &[Metadata] {
        &self.siblings
    }

    /// A new document id that routes here.
    fn new_document_id(&self) -> Result<i64, DocError> {
        (0..PLACEMENT_DRAWS)
            .map(|_| random_document_id())
            .find(|id| self.owns_id(*id))
            .ok_or_else(|| DocError::Conflict("no document id routes to this shard; its range is too narrow".into()))
    }

    /// A new record name (from `draw`) that routes here.
    pub(crate) fn new_key(&self, draw: impl Fn() -> String) -> Result<String, DocError> {
        (0..PLACEMENT_DRAWS)
            .map(|_| draw())
            .find(|key| self.owns_key(key))
            .ok_or_else(|| DocError::Conflict("no session id routes to this shard; its range is too narrow".into()))
    }

    pub fn meta(&self) -> &Metadata {
        &self.meta
    }

    /// The tiers as they are now.
    pub fn tiers(&self) -> Tiers {
        self.tiers.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the tiers, when the platform config changed. Blobs in a tier that is gone
    /// stay where they are, unread until the tier comes back.
    pub fn set_tiers(&self, tiers: Tiers) {
        *self.tiers.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tiers;
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Wakes the event relay, after a transaction written outside this type enqueued events.
    pub fn wake_relay(&self) {
        self.committed_events();
    }

    fn committed_events(&self) {
        if let Some(bus) = &self.bus {
            bus.wake.notify_one();
        }
    }

    /// Runs `work` in a write transaction (retried when the database asks), then wakes the
    /// event relay.
    async fn write<'a, T>(
        &self,
        work: impl FnMut(Tx) -> BoxFuture<'a, (Tx, Result<T, DocError>)>,
    ) -> Result<T, DocError> {
        let value = self.meta.write(work).await?;
        self.committed_events();
        Ok(value)
    }

    /// Stores the bytes of an upload in the default tier, compressed unless their content
    /// type is one the tier skips.
    pub async fn store_bytes(
        &self,
        content_type: &str,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<StoredBlob, DocError> {
        let tier = self.tiers().default_tier();
        // Claimed as garbage before a byte is written, and unclaimed by the transaction that
        // records it: a crash in between leaves a copy the collector deletes, never an
        // orphan no row knows of.
        let key = crate::blob::new_object_key("blobs");
        sqlx::query("INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3)")
            .bind(&tier.name)
            .bind(&key)
            .bind(self.clock.now_ms() + UPLOAD_CLAIM_MS)
            .execute(self.meta.pool())
            .await
            .map_err(StoreError::from)?;
        Ok(tier.write_at(key, body, tier.compresses(content_type), self.max_upload).await?)
    }

    /// Deletes the new copy of a blob that turned out to be stored already, or that no
    /// committed transaction recorded.
    pub async fn discard(&self, blob: &StoredBlob) {
        if let Ok(tier) = self.tiers().get(&blob.tier)
            && let Err(e) = tier.delete(&blob.object_key).await
        {
            tracing::warn!(error = %e, key = %blob.object_key, "deleting an unrecorded blob copy");
        }
    }

    /// Checks what an upload says about its document, before its bytes are taken.
    pub fn prepare(new: NewDocument) -> Result<Prepared, DocError> {
        check_filename(&new.filename).map_err(DocError::Invalid)?;
        let tags = check_tags(&new.tags).map_err(DocError::Invalid)?;
        check_text("title", new.title.as_deref(), MAX_TITLE_CHARS).map_err(DocError::Invalid)?;
        check_text("description", new.description.as_deref(), MAX_DESCRIPTION_CHARS).map_err(DocError::Invalid)?;
        check_metadata(&new.metadata).map_err(DocError::Invalid)?;
        if let Some(ct) = &new.content_type {
            check_content_type(ct).map_err(DocError::Invalid)?;
        }
        let content_type = content_type_for(&new.filename, new.content_type.as_deref());
        Ok(Prepared { new: NewDocument { tags, ..new }, content_type })
    }

    /// Uploads a new document.
    pub async fn upload(
        &self,
        actor: &Actor,
        new: NewDocument,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<Uploaded, DocError> {
        let prepared = Self::prepare(new)?;
        let blob = self.store_bytes(&prepared.content_type, body).await?;
        self.record_upload(actor, &prepared, blob).await
    }

    /// Records a new document whose bytes are already stored on this shard (by
    /// [`Self::store_bytes`], through a [`DocumentUpload`] or an upload session). The stored
    /// copy is deleted if it is not needed or the record fails.
    pub(crate) async fn record_upload(
        &self,
        actor: &Actor,
        prepared: &Prepared,
        blob: StoredBlob,
    ) -> Result<Uploaded, DocError> {
        let result = self
            .write(|mut owned| {
                let (new, tags, content_type, blob) = (&prepared.new, &prepared.new.tags, &prepared.content_type, &blob);
                Box::pin(async move {
                    let r = async {
                        let tx = &mut owned;
                    let now = self.clock.now_ms();
                    self.check_move(tx).await?;
                    let deduplicated = record_blob(tx, blob, now).await?;
                    let id = self.new_document_id()?;
                    let size = i64::try_from(blob.size).unwrap_or(i64::MAX);
                    sqlx::query(
                        "INSERT INTO documents (id, owner, filename, file_type, content_type, title, description, tags, \
                         metadata, current_version, size, sha256, legal_hold, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, 0, $12, $12)",
                    )
                    .bind(id)
                    .bind(&actor.user)
                    .bind(&new.filename)
                    .bind(file_type(&new.filename))
                    .bind(content_type)
                    .bind(&new.title)
                    .bind(&new.description)
                    .bind(json!(tags).to_string())
                    .bind(Value::Object(new.metadata.clone()).to_string())
                    .bind(size)
                    .bind(&blob.sha256)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                    replace_tags(tx, id, tags).await?;
                    insert_version(tx, id, 1, &blob.sha256, size, &new.filename, content_type, now, &actor.user, None, None)
                        .await?;
                    let document = load(tx, actor, id, false).await?;
                    announce(actor, Event::new(EventType::DocumentUploaded, now, document_fields(&document)), tx, now).await?;
                    Ok(Uploaded { document, deduplicated, version_number: 1 })
                    }
                    .await;
                    (owned, r)
                })
            })
            .await;
        self.settle(&blob, &result).await;
        result
    }

    /// Deletes the new copy unless the committed transaction made it the blob: the result
    /// comes from the attempt that committed, so its `deduplicated` is what was recorded.
    pub(crate) async fn settle(&self, blob: &StoredBlob, result: &Result<Uploaded, DocError>) {
        if !matches!(result, Ok(uploaded) if !uploaded.deduplicated) {
            self.discard(blob).await;
        }
    }

    fn check_version(new: &NewVersion) -> Result<(), DocError> {
        if let Some(name) = &new.filename {
            check_filename(name).map_err(DocError::Invalid)?;
        }
        if let Some(ct) = &new.content_type {
            check_content_type(ct).map_err(DocError::Invalid)?;
        }
        check_text("changeDescription", new.change_description.as_deref(), MAX_DESCRIPTION_CHARS)
            .map_err(DocError::Invalid)
    }

    /// Uploads a new version of a document.
    pub async fn upload_version(
        &self,
        actor: &Actor,
        id: i64,
        new: NewVersion,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<Uploaded, DocError> {
        Self::check_version(&new)?;
        // Check access (and the precondition) before taking the bytes.
        let current = self.get(actor, id).await?;
        precondition(&current, new.if_match.as_deref())?;
        let content_type = Self::version_content_type(&current, &new);
        let blob = self.store_bytes(&content_type, body).await?;
        self.record_version(actor, id, new, blob).await
    }

    fn version_content_type(current: &Document, new: &NewVersion) -> String {
        match (&new.content_type, &new.filename) {
            (Some(ct), _) if !ct.is_empty() && ct != "application/octet-stream" => ct.clone(),
            (_, Some(filename)) => content_type_for(filename, None),
            _ => current.content_type.clone(),
        }
    }

    /// Records a new version whose bytes are already stored on this shard. The stored copy
    /// is deleted if it is not needed or the record fails.
    pub(crate) async fn record_version(
        &self,
        actor: &Actor,
        id: i64,
        new: NewVersion,
        blob: StoredBlob,
    ) -> Result<Uploaded, DocError> {
        let result = self.try_record_version(actor, id, &new, &blob).await;
        self.settle(&blob, &result).await;
        result
    }

    /// Records a new version whose bytes are already stored and claimed on this shard,
    /// leaving the stored copy to the caller whatever the outcome.
    pub(crate) async fn try_record_version(
        &self,
        actor: &Actor,
        id: i64,
        new: &NewVersion,
        blob: &StoredBlob,
    ) -> Result<Uploaded, DocError> {
        Self::check_version(new)?;
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = load(tx, actor, id, false).await?;
                    precondition(&doc, new.if_match.as_deref())?;
                    let content_type = &Self::version_content_type(&doc, new);
                    let filename = new.filename.as_ref().unwrap_or(&doc.filename);
                    let deduplicated = record_blob(tx, blob, now).await?;
                    let version = doc.current_version + 1;
                    let size = i64::try_from(blob.size).unwrap_or(i64::MAX);
                    insert_version(
                        tx,
                        id,
                        version,
                        &blob.sha256,
                        size,
                        filename,
                        content_type,
                        now,
                        &actor.user,
                        new.change_description.as_deref(),
                        None,
                    )
                    .await?;
                    self.point_at_version(tx, id, version, &blob.sha256, size, filename, content_type, now).await?;
                    let document = load(tx, actor, id, false).await?;
                    let fields = with(
                        document_fields(&document),
                        json!({"changeDescription": new.change_description, "createdBy": actor.user}),
                    );
                    announce(actor, Event::new(EventType::DocumentVersionCreated, now, fields), tx, now).await?;
                    Ok(Uploaded { document, deduplicated, version_number: version })
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn point_at_version(
        &self,
        tx: &mut Tx,
        id: i64,
        version: i64,
        sha256: &str,
        size: i64,
        filename: &str,
        content_type: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE documents SET current_version = $1, sha256 = $2, size = $3, filename = $4, file_type = $5, \
             content_type = $6, updated_at = $7 WHERE id = $8",
        )
        .bind(version)
        .bind(sha256)
        .bind(size)
        .bind(filename)
        .bind(file_type(filename))
        .bind(content_type)
        .bind(now)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// A document, if the actor may see it: one statement, outside a transaction (a
    /// `BEGIN` and a `ROLLBACK` around it were two more round trips for every read).
    pub async fn get(&self, actor: &Actor, id: i64) -> Result<Document, DocError> {
        let sql =
            format!("SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN blobs b ON b.sha256 = d.sha256 WHERE d.id = $1");
        let mut reader = self.meta.reader().await?;
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(reader.connection()).await?;
        reader.done();
        visible(row.as_ref().map(document_from_row).transpose()?, actor, id, false)
    }

    /// Changes a document's descriptive metadata.
    pub async fn update(&self, actor: &Actor, id: i64, patch: MetadataPatch) -> Result<Document, DocError> {
        self.update_if(actor, id, patch, None).await
    }

    /// [`Self::update`], only if the document still matches `if_match` (an `If-Match`
    /// header's value), checked in the transaction that changes it: two editors who read
    /// the same document cannot both change it unseen.
    pub async fn update_if(
        &self,
        actor: &Actor,
        id: i64,
        patch: MetadataPatch,
        if_match: Option<&str>,
    ) -> Result<Document, DocError> {
        if let Some(name) = &patch.filename {
            check_filename(name).map_err(DocError::Invalid)?;
        }
        let tags = patch.tags.as_deref().map(check_tags).transpose().map_err(DocError::Invalid)?;
        if let Some(Some(title)) = &patch.title {
            check_text("title", Some(title), MAX_TITLE_CHARS).map_err(DocError::Invalid)?;
        }
        if let Some(Some(description)) = &patch.description {
            check_text("description", Some(description), MAX_DESCRIPTION_CHARS).map_err(DocError::Invalid)?;
        }
        if let Some(metadata) = &patch.metadata {
            check_metadata(metadata).map_err(DocError::Invalid)?;
        }
        self.write(|mut owned| {
            let (patch, tags) = (&patch, &tags);
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let mut doc = load(tx, actor, id, false).await?;
                    precondition(&doc, if_match)?;
                    let mut changed: Vec<&str> = Vec::new();
                    if let Some(title) = &patch.title
                        && *title != doc.title
                    {
                        doc.title.clone_from(title);
                        changed.push("title");
                    }
                    if let Some(description) = &patch.description
                        && *description != doc.description
                    {
                        doc.description.clone_from(description);
                        changed.push("description");
                    }
                    if let Some(tags) = tags
                        && *tags != doc.tags
                    {
                        doc.tags.clone_from(tags);
                        changed.push("tags");
                        replace_tags(tx, id, tags).await?;
                    }
                    if let Some(metadata) = &patch.metadata
                        && *metadata != doc.metadata
                    {
                        doc.metadata.clone_from(metadata);
                        changed.push("metadata");
                    }
                    if let Some(filename) = &patch.filename
                        && *filename != doc.filename
                    {
                        doc.filename.clone_from(filename);
                        changed.push("filename");
                    }
                    if changed.is_empty() {
                        return Ok(doc);
                    }
                    sqlx::query(
                        "UPDATE documents SET title = $1, description = $2, tags = $3, metadata = $4, filename = $5, \
                     file_type = $6, updated_at = $7 WHERE id = $8",
                    )
                    .bind(&doc.title)
                    .bind(&doc.description)
                    .bind(json!(doc.tags).to_string())
                    .bind(Value::Object(doc.metadata.clone()).to_string())
                    .bind(&doc.filename)
                    .bind(file_type(&doc.filename))
                    .bind(now)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                    let doc = load(tx, actor, id, false).await?;
                    let fields =
                        with(document_fields(&doc), json!({"changedFields": changed, "updatedBy": actor.user}));
                    announce(actor, Event::new(EventType::DocumentUpdated, now, fields), tx, now).await?;
                    Ok(doc)
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// A page of the documents the actor may see, newest first.
    pub async fn list(&self, actor: &Actor, query: &ListQuery) -> Result<Page, DocError> {
        let (items, more) = self.list_keyed(actor, query).await?;
        Ok(page_of(items, more, page_limit(query)? as usize))
    }

    /// Up to a page of the documents the actor may see, newest first, each with its
    /// creation time in ms (the listing's order), and whether more follow.
    pub(crate) async fn list_keyed(
        &self,
        actor: &Actor,
        query: &ListQuery,
    ) -> Result<(Vec<(i64, Document)>, bool), DocError> {
        let limit = page_limit(query)?;
        let mut sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN blobs b ON b.sha256 = d.sha256 WHERE d.deleted_at IS NULL"
        );
        let mut binds: Vec<Bind> = Vec::new();
        let mut push = |sql: &mut String, clause: &str, values: Vec<Bind>| {
            let mut clause = clause.to_owned();
            for value in values {
                binds.push(value);
                clause = clause.replacen('?', &format!("${}", binds.len()), 1);
            }
            sql.push_str(" AND ");
            sql.push_str(&clause);
        };
        let owner = if actor.admin { query.owner.clone() } else { Some(actor.user.clone()) };
        match owner {
            Some(owner) => push(&mut sql, "d.owner = ?", vec![Bind::Text(owner)]),
            // An admin's listing of everyone's documents leaves out the smoke checks' own.
            None => push(&mut sql, "d.owner <> ?", vec![Bind::Text(SMOKE_USER.to_owned())]),
        }
        if let Some(file_type) = &query.file_type {
            push(&mut sql, "d.file_type = ?", vec![Bind::Text(file_type.trim_start_matches('.').to_ascii_lowercase())]);
        }
        if let Some(tag) = &query.tag {
            push(
                &mut sql,
                "EXISTS (SELECT 1 FROM document_tags t WHERE t.document_id = d.id AND t.tag = ?)",
                vec![Bind::Text(tag.clone())],
            );
        }
        if let Some(from) = query.created_from {
            push(&mut sql, "d.created_at >= ?", vec![Bind::Int(from)]);
        }
        if let Some(to) = query.created_to {
            push(&mut sql, "d.created_at < ?", vec![Bind::Int(to)]);
        }
        if let Some(q) = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
            let pattern = like_pattern(q);
            push(
                &mut sql,
                "(LOWER(d.filename) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(d.title, '')) LIKE ? ESCAPE '\\')",
                vec![Bind::Text(pattern.clone()), Bind::Text(pattern)],
            );
        }
        if let Some(cursor) = &query.cursor {
            let (at, id) = decode_cursor(cursor)?;
            push(
                &mut sql,
                "(d.created_at < ? OR (d.created_at = ? AND d.id < ?))",
                vec![Bind::Int(at), Bind::Int(at), Bind::Int(id)],
            );
        }
        let _ = write!(sql, " ORDER BY d.created_at DESC, d.id DESC LIMIT {}", limit + 1);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for bind in binds {
            q = match bind {
                Bind::Int(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        let mut reader = self.meta.reader().await?;
        let rows = q.fetch_all(reader.connection()).await?;
        reader.done();
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            items.push((row.try_get::<i64, _>("created_at")?, document_from_row(row)?));
        }
        Ok((items, rows.len() > limit as usize))
    }

    /// A document's versions, newest first.
    pub async fn versions(&self, actor: &Actor, id: i64) -> Result<VersionHistory, DocError> {
        let doc = self.get(actor, id).await?;
        let mut reader = self.meta.reader().await?;
        let rows = sqlx::query(
            "SELECT version, created_at, created_by, change_description, size, sha256, filename, content_type, \
             restored_from FROM versions WHERE document_id = $1 ORDER BY version DESC",
        )
        .bind(id)
        .fetch_all(reader.connection())
        .await?;
        reader.done();
        let versions = rows
            .iter()
            .map(|row| {
                let version: i64 = row.try_get("version")?;
                Ok(Version {
                    version_number: version,
                    created_at: rfc3339(row.try_get("created_at")?),
                    created_by: row.try_get("created_by")?,
                    change_description: row.try_get("change_description")?,
                    size: row.try_get("size")?,
                    checksum: format!("sha256:{}", row.try_get::<String, _>("sha256")?),
                    filename: row.try_get("filename")?,
                    content_type: row.try_get("content_type")?,
                    restored_from_version: row.try_get("restored_from")?,
                    is_latest: version == doc.current_version,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        if versions.is_empty() {
            // Every document has a version: none means the document went with a hand-over
            // to another shard since it was read, and then it is not found here either,
            // which a library follows to its new shard.
            self.get(actor, id).await?;
            return Err(StoreError::Corrupt(format!("document {id} has no versions")).into());
        }
        Ok(VersionHistory { document_id: id, current_version: doc.current_version, versions })
    }

    /// Makes an old version current again, as a new version with the old bytes.
    pub async fn restore_version(&self, actor: &Actor, id: i64, from: i64) -> Result<Restored, DocError> {
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = load(tx, actor, id, false).await?;
                    let row = sqlx::query(
                    "SELECT sha256, size, filename, content_type FROM versions WHERE document_id = $1 AND version = $2",
                )
                .bind(id)
                .bind(from)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or(DocError::VersionNotFound { id, version: from })?;
                    let sha256: String = row.try_get("sha256")?;
                    let size: i64 = row.try_get("size")?;
                    let filename: String = row.try_get("filename")?;
                    let content_type: String = row.try_get("content_type")?;
                    let version = doc.current_version + 1;
                    let change = format!("Restored from version {from}");
                    insert_version(
                        tx,
                        id,
                        version,
                        &sha256,
                        size,
                        &filename,
                        &content_type,
                        now,
                        &actor.user,
                        Some(&change),
                        Some(from),
                    )
                    .await?;
                    self.point_at_version(tx, id, version, &sha256, size, &filename, &content_type, now).await?;
                    let document = load(tx, actor, id, false).await?;
                    let fields = with(
                        document_fields(&document),
                        json!({"restoredFromVersion": from, "changeDescription": change, "createdBy": actor.user}),
                    );
                    announce(actor, Event::new(EventType::DocumentVersionCreated, now, fields), tx, now).await?;
                    Ok(Restored {
                        document_id: id,
                        version_number: version,
                        restored_from_version: from,
                        message: format!("Version {from} restored as version {version}"),
                    })
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// Deletes a document softly: it disappears from reads and listings but its versions
    /// and bytes stay until it is purged. Refused under legal hold.
    pub async fn delete(&self, actor: &Actor, id: i64) -> Result<(), DocError> {
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = load(tx, actor, id, false).await?;
                    if doc.legal_hold {
                        return Err(DocError::Conflict(format!(
                            "document {id} is under legal hold and cannot be deleted"
                        )));
                    }
                    sqlx::query("UPDATE documents SET deleted_at = $1, deleted_by = $2, updated_at = $1 WHERE id = $3")
                        .bind(now)
                        .bind(&actor.user)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    let fields = with(document_fields(&doc), json!({"deletedBy": actor.user, "permanent": false}));
                    announce(actor, Event::new(EventType::DocumentDeleted, now, fields), tx, now).await?;
                    Ok(())
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// Deletes a document for good, with every version, and the blobs no other version
    /// references. Refused under legal hold.
    pub async fn purge(&self, actor: &Actor, id: i64) -> Result<(), DocError> {
        let freed: Vec<(String, String)> = self
            .write(|mut owned| {
                Box::pin(async move {
                    let r = async {
                        let tx = &mut owned;
                        let now = self.clock.now_ms();
                        let doc = load(tx, actor, id, true).await?;
                        if doc.legal_hold {
                            return Err(DocError::Conflict(format!(
                                "document {id} is under legal hold and cannot be purged"
                            )));
                        }
                        let shas: Vec<String> =
                            sqlx::query_scalar("SELECT DISTINCT sha256 FROM versions WHERE document_id = $1")
                                .bind(id)
                                .fetch_all(&mut **tx)
                                .await?;
                        sqlx::query("DELETE FROM versions WHERE document_id = $1").bind(id).execute(&mut **tx).await?;
                        sqlx::query("DELETE FROM document_tags WHERE document_id = $1")
                            .bind(id)
                            .execute(&mut **tx)
                            .await?;
                        sqlx::query("DELETE FROM documents WHERE id = $1").bind(id).execute(&mut **tx).await?;
                        let mut freed = Vec::new();
                        for sha in shas {
                            freed.extend(forget_unreferenced_blob(tx, &sha).await?);
                        }
                        let fields = with(document_fields(&doc), json!({"deletedBy": actor.user, "permanent": true}));
                        announce(actor, Event::new(EventType::DocumentDeleted, now, fields), tx, now).await?;
                        Ok(freed)
                    }
                    .await;
                    (owned, r)
                })
            })
            .await?;
        // A copy another shard refers to (a document handed over there shares it) is kept;
        // if the other shards cannot be asked, every copy is: a leak, not a loss.
        let shared = self.referenced_elsewhere(&freed).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "keeping a purged document's copies: the other shards did not answer");
            freed.iter().cloned().collect()
        });
        for (tier, key) in freed.into_iter().filter(|copy| !shared.contains(copy)) {
            match self.tiers().get(&tier) {
                Ok(tier) => {
                    if let Err(e) = tier.delete(&key).await {
                        // The row is gone, so the copy is unreferenced garbage: a leak, not a loss.
                        tracing::warn!(error = %e, key, "deleting a purged blob");
                    }
                }
                Err(e) => tracing::warn!(error = %e, key, "deleting a purged blob"),
            }
        }
        Ok(())
    }

    /// Puts a document under legal hold or releases it. Admins only.
    pub async fn set_legal_hold(&self, actor: &Actor, id: i64, on: bool) -> Result<Document, DocError> {
        if !actor.admin {
            return Err(DocError::Forbidden("legal hold needs the admin role".into()));
        }
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = load(tx, actor, id, true).await?;
                    if doc.legal_hold == on {
                        return Ok(doc);
                    }
                    sqlx::query("UPDATE documents SET legal_hold = $1, updated_at = $2 WHERE id = $3")
                        .bind(i64::from(on))
                        .bind(now)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    let doc = load(tx, actor, id, true).await?;
                    let fields =
                        with(document_fields(&doc), json!({"changedFields": ["legalHold"], "updatedBy": actor.user}));
                    announce(actor, Event::new(EventType::DocumentUpdated, now, fields), tx, now).await?;
                    Ok(doc)
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// Finds the bytes of a version (the current one when `version` is `None`).
    pub async fn content(&self, actor: &Actor, id: i64, version: Option<i64>) -> Result<Content, DocError> {
        let document = self.get(actor, id).await?;
        let version = version.unwrap_or(document.current_version);
        let mut reader = self.meta.reader().await?;
        let row = sqlx::query(
            "SELECT v.filename, v.content_type, v.size, v.sha256, b.tier, b.object_key, b.compression, \
             b.quarantine_reason FROM versions v JOIN blobs b ON b.sha256 = v.sha256 \
             WHERE v.document_id = $1 AND v.version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(reader.connection())
        .await?;
        reader.done();
        let Some(row) = row else {
            // The version may have gone with its document since the document was read (a
            // hand-over to another shard committed in between): then the document is not
            // found either, which a library follows to the document's new shard.
            self.get(actor, id).await?;
            return Err(DocError::VersionNotFound { id, version });
        };
        if let Some(reason) = row.try_get::<Option<String>, _>("quarantine_reason")? {
            return Err(DocError::Quarantined { id, version, reason });
        }
        let codec: String = row.try_get("compression")?;
        self.touch(id).await;
        Ok(Content {
            document,
            version,
            filename: row.try_get("filename")?,
            content_type: row.try_get("content_type")?,
            size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or_default(),
            sha256: row.try_get("sha256")?,
            tier: row.try_get("tier")?,
            object_key: row.try_get("object_key")?,
            codec: Codec::parse(&codec).ok_or_else(|| StoreError::Corrupt(format!("blob compression {codec}")))?,
        })
    }

    /// Streams the bytes of `content`, or the `range` of them. When the copy it names is
    /// gone (a tier migration moved the blob since `content` was looked up, and its source
    /// has been collected), the blob is looked up again and read where it is now.
    pub async fn read(&self, content: &Content, range: Option<std::ops::Range<u64>>) -> Result<ByteStream, DocError> {
        let tier = self.tiers().get(&content.tier)?;
        match tier.read(&content.object_key, content.codec, range.clone()).await {
            Err(BlobError::Store { source: object_store::Error::NotFound { .. }, .. }) => {
                let mut conn = self.meta.pool().acquire().await?;
                let now = tiering::locate(&mut conn, &content.sha256)
                    .await?
                    .ok_or(DocError::NotFound(content.document.id))?;
                drop(conn);
                let tier = self.tiers().get(&now.tier)?;
                Ok(tier.read(&now.object_key, now.codec, range).await?)
            }
            other => Ok(other?),
        }
    }

    /// Notes that a document was read, for policies that age documents by last access.
    /// At most one write an hour per document: the age counts in days.
    async fn touch(&self, id: i64) {
        let now = self.clock.now_ms();
        let result = sqlx::query(
            "UPDATE documents SET last_accessed_at = $1 WHERE id = $2 \
             AND (last_accessed_at IS NULL OR last_accessed_at < $3)",
        )
        .bind(now)
        .bind(id)
        .bind(now - 3_600_000)
        .execute(self.meta.pool())
        .await;
        if let Err(e) = result {
            // A missed access time makes a document age a little early; the read goes on.
            tracing::warn!(error = %e, id, "recording a document's last access");
        }
    }
}
