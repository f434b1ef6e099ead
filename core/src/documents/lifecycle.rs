//! What retention runs and the lifecycle endpoints do to documents: move a blob between
//! tiers without ever making it unreadable, archive and restore, expire versions, collect
//! copies nothing refers to, and account for what the tiers hold and cost.
//!
//! A tier migration of one blob goes in four steps, each durable before the next:
//! 1. **claim**: the target key is recorded in `blob_garbage` (due in a day), so that if
//!    the migration never finishes, its copy is collected rather than orphaned;
//! 2. **copy**: inside the store when both tiers are on one backend (one bucket with the
//!    same credentials, or one local file system) and the target keeps the stored form:
//!    an S3 CopyObject or a hard link, no byte through the worker. Otherwise the original
//!    bytes stream from the source tier into the target (compressed as the target tier
//!    compresses), hashed on the way: a source that no longer matches its checksum is never
//!    copied;
//! 3. **verify**: the copy is read back from the target and its SHA-256 compared;
//! 4. **switch**: one transaction points the blob row at the copy, takes the claim back,
//!    and records the source in `blob_garbage`, due after a grace period for reads that
//!    looked the blob up before the switch.
//!
//! The source is deleted by [`Documents::collect_garbage`] once due. A crash between any
//! two steps leaves the blob row pointing at a complete, verified copy, and at most one
//! copy waiting in `blob_garbage`; the next run moves the blob again.
//!
//! Retention runs and drains move a batch at a time ([`Documents::move_blobs`]): the same
//! steps in the same order, with one statement locating the batch, one claiming every
//! target, the copies running side by side, and one transaction switching every verified
//! copy. One blob failing (a source that no longer verifies, an unreachable tier) fails
//! alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{DocError, Documents, Tx, with};
use crate::blob::{Codec, StoredBlob, Tier, Tiers, new_object_key};
use crate::config::PlatformConfig;
use crate::crds::webhook::EventType;
use crate::events::Event;
use crate::lifecycle::{DocumentFacts, VersionFacts};
use crate::store::StoreError;

/// The steps of a tier migration, after each of which a test may stop the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStep {
    /// The target key is recorded as garbage-to-be.
    Claimed,
    /// The bytes are in the target tier.
    Copied,
    /// The copy read back with the right checksum.
    Verified,
    /// The metadata points at the copy; the source waits in `blob_garbage`.
    Switched,
}

impl MigrationStep {
    pub const ALL: [MigrationStep; 4] =
        [MigrationStep::Claimed, MigrationStep::Copied, MigrationStep::Verified, MigrationStep::Switched];

    pub fn name(self) -> &'static str {
        match self {
            MigrationStep::Claimed => "claimed",
            MigrationStep::Copied => "copied",
            MigrationStep::Verified => "verified",
            MigrationStep::Switched => "switched",
        }
    }
}

/// How long copies wait in `blob_garbage`.
#[derive(Clone, Copy, Debug)]
pub struct Grace {
    /// How long a migration's source stays readable after the switch, for reads that
    /// looked the blob up before it.
    pub source_ms: i64,
    /// How long a migration may take between claiming its target and switching to it.
    pub claim_ms: i64,
}

impl Default for Grace {
    fn default() -> Self {
        Self { source_ms: 5 * 60_000, claim_ms: 24 * 3_600_000 }
    }
}

/// Observes the steps of a migration (fault injection in tests; nothing in production).
pub type StepHook<'a> = &'a (dyn Fn(MigrationStep) + Send + Sync);

/// What a tier holds and costs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierUsage {
    pub tier: String,
    /// The tier's class, or none when the tier is no longer configured.
    pub class: Option<String>,
    pub objects: i64,
    /// Bytes as stored (after compression).
    pub bytes: i64,
    /// Bytes before compression.
    pub original_bytes: i64,
    pub cost_per_gb_month: Option<f64>,
    pub estimated_monthly_cost: f64,
}

/// What compression, deduplication and tiering save each month, against every version
/// stored separately and uncompressed in the default tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Savings {
    pub compression: f64,
    pub deduplication: f64,
    pub tiering: f64,
    pub total: f64,
}

/// Storage usage of the whole platform.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub tiers: Vec<TierUsage>,
    /// Bytes of every version, as if each were stored on its own and uncompressed.
    pub logical_bytes: i64,
    pub stored_bytes: i64,
    pub objects: i64,
    pub estimated_monthly_cost: f64,
    /// The cost without compression, deduplication and tiering.
    pub baseline_monthly_cost: f64,
    pub monthly_savings: Savings,
}

const GIB: f64 = 1_073_741_824.0;

/// The monthly cost of `bytes` at `cost_per_gb` a GiB-month.
#[allow(clippy::cast_precision_loss)]
pub fn monthly_cost(bytes: i64, cost_per_gb: f64) -> f64 {
    bytes as f64 / GIB * cost_per_gb
}

/// Where a blob is now.
pub(super) struct Located {
    pub(super) tier: String,
    pub(super) object_key: String,
    pub(super) codec: Codec,
}

/// Where the blob `sha256` is stored now, if it still is.
pub(super) async fn locate(conn: &mut sqlx::AnyConnection, sha256: &str) -> Result<Option<Located>, DocError> {
    let row = sqlx::query("SELECT tier, object_key, compression FROM blobs WHERE sha256 = $1")
        .bind(sha256)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let codec: String = row.try_get("compression")?;
    Ok(Some(Located {
        tier: row.try_get("tier")?,
        object_key: row.try_get("object_key")?,
        codec: Codec::parse(&codec).ok_or_else(|| StoreError::Corrupt(format!("blob compression {codec}")))?,
    }))
}

/// Hashes the original bytes of a stored copy.
async fn checksum(tier: &Tier, object_key: &str, codec: Codec) -> Result<(String, u64), DocError> {
    let mut stream = tier.read(object_key, codec, None).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| DocError::Storage(crate::blob::BlobError::Write { tier: tier.name.clone(), source: e }))?
    {
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

impl Documents {
    /// Moves the blob `sha256` to `to_tier` (see the module's documentation for the steps).
    /// Returns the bytes moved: 0 when the blob is already there or is gone.
    pub async fn move_blob(
        &self,
        sha256: &str,
        to_tier: &str,
        grace: Grace,
        hook: StepHook<'_>,
    ) -> Result<u64, DocError> {
        let moves = [(sha256.to_owned(), to_tier.to_owned())];
        self.move_blobs(&moves, grace, hook, 1).await?.pop().unwrap_or(Ok(0))
    }

    /// Moves many blobs, each `(sha256, to_tier)` as [`Self::move_blob`] would, with the
    /// same steps in the same order, but a batch at a time: one statement locates a batch,
    /// one claims its targets, `concurrency` copies run at once, and one transaction
    /// switches every verified copy. Returns each move's outcome, in order; `Err` only when
    /// the metadata store failed for the whole batch.
    pub async fn move_blobs(
        &self,
        moves: &[(String, String)],
        grace: Grace,
        hook: StepHook<'_>,
        concurrency: usize,
    ) -> Result<Vec<Result<u64, DocError>>, DocError> {
        let mut outcomes = Vec::with_capacity(moves.len());
        for batch in moves.chunks(MOVE_BATCH) {
            outcomes.extend(self.move_batch(batch, grace, hook, concurrency).await?);
        }
        Ok(outcomes)
    }

    async fn move_batch(
        &self,
        moves: &[(String, String)],
        grace: Grace,
        hook: StepHook<'_>,
        concurrency: usize,
    ) -> Result<Vec<Result<u64, DocError>>, DocError> {
        let mut outcomes: Vec<Option<Result<u64, DocError>>> = moves.iter().map(|_| None).collect();
        let shas: Vec<&str> = moves.iter().map(|(sha, _)| sha.as_str()).collect();
        let mut located = self.locate_all(&shas).await?;
        let tiers = self.tiers();

        // Where each copy goes, under a new key; blobs already there or gone move nowhere.
        let mut planned: Vec<Planned<'_>> = Vec::new();
        for (index, (sha, to)) in moves.iter().enumerate() {
            let Some((from, content_type, size)) = located.remove(sha.as_str()) else {
                outcomes[index] = Some(Ok(0));
                continue;
            };
            if from.tier == *to {
                outcomes[index] = Some(Ok(0));
                continue;
            }
            if let Err(e) = tiers.get(to).and_then(|_| tiers.get(&from.tier)) {
                outcomes[index] = Some(Err(e.into()));
                continue;
            }
            planned.push(Planned { index, sha, to, from, content_type, size, key: new_object_key("blobs") });
        }

        // Every target key is claimed as garbage before a byte is written.
        let now = self.clock.now_ms();
        for chunk in planned.chunks(CLAIM_ROWS) {
            let values: Vec<String> =
                (0..chunk.len()).map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3)).collect();
            let sql = format!("INSERT INTO blob_garbage (tier, object_key, not_before) VALUES {}", values.join(", "));
            let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
            for p in chunk {
                insert = insert.bind(p.to).bind(&p.key).bind(now + grace.claim_ms);
            }
            insert.execute(self.meta.pool()).await?;
        }
        for _ in &planned {
            hook(MigrationStep::Claimed);
        }

        // Copies, each read back and verified.
        // Boxed futures in a Vec rather than a mapped stream: a mapped stream of borrowing
        // futures trips the compiler's Send check where a caller spawns the work.
        let copying: Vec<BoxFuture<'_, (usize, Result<StoredBlob, DocError>)>> = planned
            .iter()
            .enumerate()
            .map(|(at, p)| {
                let tiers = &tiers;
                Box::pin(async move { (at, copy_verified(tiers, p, hook).await) }) as BoxFuture<'_, _>
            })
            .collect();
        let copies: Vec<(usize, Result<StoredBlob, DocError>)> =
            futures::stream::iter(copying).buffer_unordered(concurrency.max(1)).collect().await;
        let mut verified: Vec<(&Planned<'_>, StoredBlob)> = Vec::new();
        for (at, copy) in copies {
            let p = &planned[at];
            match copy {
                Ok(copy) => verified.push((p, copy)),
                // The claimed copy, if any, is collected once its claim runs out.
                Err(e) => outcomes[p.index] = Some(Err(e)),
            }
        }

        // One transaction switches every verified copy whose claim still holds.
        let switched = self
            .write(|mut owned| {
                let verified = &verified;
                Box::pin(async move {
                    let r = async {
                        let tx = &mut owned;
                        let now = self.clock.now_ms();
                        let mut out: Vec<Result<bool, DocError>> = Vec::with_capacity(verified.len());
                        for (p, copy) in verified {
                            out.push(switch(tx, p, copy, now, grace).await?);
                        }
                        Ok(out)
                    }
                    .await;
                    (owned, r)
                })
            })
            .await?;
        for ((p, copy), done) in verified.iter().zip(switched) {
            outcomes[p.index] = Some(done.map(|moved| {
                hook(MigrationStep::Switched);
                if moved { copy.size } else { 0 }
            }));
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(Ok(0))).collect())
    }

    /// Where each of `shas` is stored now, with a content type of a version holding it.
    async fn locate_all(&self, shas: &[&str]) -> Result<HashMap<String, (Located, String, u64)>, DocError> {
        let mut found = HashMap::new();
        for chunk in shas.chunks(CLAIM_ROWS) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT b.sha256, b.tier, b.object_key, b.compression, b.size, \
                 (SELECT v.content_type FROM versions v WHERE v.sha256 = b.sha256 LIMIT 1) AS content_type \
                 FROM blobs b WHERE b.sha256 IN ({})",
                marks.join(", ")
            );
            let mut select = sqlx::query(sqlx::AssertSqlSafe(sql));
            for sha in chunk {
                select = select.bind(*sha);
            }
            for row in select.fetch_all(self.meta.pool()).await? {
                let codec: String = row.try_get("compression")?;
                let located = Located {
                    tier: row.try_get("tier")?,
                    object_key: row.try_get("object_key")?,
                    codec: Codec::parse(&codec)
                        .ok_or_else(|| StoreError::Corrupt(format!("blob compression {codec}")))?,
                };
                let content_type: Option<String> = row.try_get("content_type")?;
                let size = u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or_default();
                found.insert(
                    row.try_get("sha256")?,
                    (located, content_type.unwrap_or_else(|| "application/octet-stream".to_owned()), size),
                );
            }
        }
        Ok(found)
    }

    /// Deletes the stored copies in `blob_garbage` that are due and that no blob row refers
    /// to. Returns how many were deleted. Copies in a tier that is not configured wait.
    /// The copies of a batch are deleted several at once, then their rows in one
    /// transaction (a crash in between leaves rows whose copies are gone: deleting them
    /// again finds nothing and succeeds).
    pub async fn collect_garbage(&self) -> Result<u64, DocError> {
        let tiers = self.tiers();
        let mut deleted = 0;
        let mut skipped: BTreeSet<(String, String)> = BTreeSet::new();
        loop {
            let now = self.clock.now_ms();
            let rows = sqlx::query(
                "SELECT g.tier, g.object_key FROM blob_garbage g WHERE g.not_before <= $1 AND NOT EXISTS \
                 (SELECT 1 FROM blobs b WHERE b.tier = g.tier AND b.object_key = g.object_key) \
                 ORDER BY g.not_before, g.object_key LIMIT $2",
            )
            .bind(now)
            .bind(i64::try_from(skipped.len()).unwrap_or(i64::MAX) + 256)
            .fetch_all(self.meta.pool())
            .await?;
            let mut due: Vec<(String, String)> = Vec::new();
            for row in &rows {
                let (tier, key): (String, String) = (row.try_get("tier")?, row.try_get("object_key")?);
                if skipped.contains(&(tier.clone(), key.clone())) {
                    continue;
                }
                if tiers.get(&tier).is_err() {
                    skipped.insert((tier, key));
                    continue;
                }
                due.push((tier, key));
            }
            if due.is_empty() {
                return Ok(deleted);
            }
            let deleting: Vec<BoxFuture<'_, Result<(), crate::blob::BlobError>>> = due
                .iter()
                .map(|(tier, key)| {
                    let tiers = &tiers;
                    Box::pin(async move { tiers.get(tier)?.delete(key).await }) as BoxFuture<'_, _>
                })
                .collect();
            let results: Vec<Result<(), crate::blob::BlobError>> =
                futures::stream::iter(deleting).buffer_unordered(GC_CONCURRENCY).collect().await;
            results.into_iter().collect::<Result<Vec<()>, _>>()?;
            let mut tx = self.meta.pool().begin().await?;
            for (tier, key) in &due {
                sqlx::query("DELETE FROM blob_garbage WHERE tier = $1 AND object_key = $2 AND not_before <= $3")
                    .bind(tier)
                    .bind(key)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            deleted += due.len() as u64;
        }
    }

    /// Up to `limit` documents with ids above `after`, in id order, with their versions,
    /// as the lifecycle rules see them. Soft-deleted documents are left out.
    pub async fn lifecycle_page(&self, after: i64, limit: i64) -> Result<Vec<DocumentFacts>, DocError> {
        let rows = sqlx::query(
            "SELECT id, owner, file_type, tags, legal_hold, archived_at, last_accessed_at, lifecycle_error, \
             lifecycle_restarted_at \
             FROM documents WHERE id > $1 AND deleted_at IS NULL ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.meta.pool())
        .await?;
        let mut docs = Vec::with_capacity(rows.len());
        for row in &rows {
            let tags: String = row.try_get("tags")?;
            docs.push(DocumentFacts {
                id: row.try_get("id")?,
                owner: row.try_get("owner")?,
                file_type: row.try_get("file_type")?,
                tags: serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt(format!("document tags: {e}")))?,
                legal_hold: row.try_get::<i64, _>("legal_hold")? != 0,
                archived: row.try_get::<Option<i64>, _>("archived_at")?.is_some(),
                last_accessed_at: row.try_get("last_accessed_at")?,
                restarted_at: row.try_get("lifecycle_restarted_at")?,
                failed: row.try_get("lifecycle_error")?,
                versions: Vec::new(),
            });
        }
        let (Some(first), Some(last)) = (docs.first().map(|d| d.id), docs.last().map(|d| d.id)) else {
            return Ok(docs);
        };
        let rows = sqlx::query(
            "SELECT v.document_id, v.version, v.created_at, v.sha256, v.size, v.content_type, b.tier \
             FROM versions v JOIN blobs b ON b.sha256 = v.sha256 \
             WHERE v.document_id >= $1 AND v.document_id <= $2 ORDER BY v.document_id, v.version DESC",
        )
        .bind(first)
        .bind(last)
        .fetch_all(self.meta.pool())
        .await?;
        let mut at = 0;
        for row in &rows {
            let id: i64 = row.try_get("document_id")?;
            while at < docs.len() && docs[at].id < id {
                at += 1;
            }
            let Some(doc) = docs.get_mut(at).filter(|d| d.id == id) else { continue };
            doc.versions.push(VersionFacts {
                version: row.try_get("version")?,
                created_at: row.try_get("created_at")?,
                sha256: row.try_get("sha256")?,
                size: row.try_get("size")?,
                content_type: row.try_get("content_type")?,
                tier: row.try_get("tier")?,
            });
        }
        Ok(docs)
    }

    /// One document as the lifecycle rules see it, if the actor may see it.
    pub async fn lifecycle_facts(&self, actor: &super::Actor, id: i64) -> Result<DocumentFacts, DocError> {
        self.get(actor, id).await?;
        self.lifecycle_page(id - 1, 1).await?.into_iter().find(|d| d.id == id).ok_or(DocError::NotFound(id))
    }

    /// Records (or, with `None`, clears) the failure of a lifecycle action on a document.
    pub async fn set_lifecycle_error(&self, id: i64, error: Option<&str>) -> Result<(), DocError> {
        sqlx::query("UPDATE documents SET lifecycle_error = $1 WHERE id = $2")
            .bind(error)
            .bind(id)
            .execute(self.meta.pool())
            .await?;
        Ok(())
    }

    /// Deletes one noncurrent version; its blob goes to `blob_garbage` when no other
    /// version refers to it. Refused under legal hold and for the current version.
    pub async fn expire_version(&self, id: i64, version: i64, grace: Grace) -> Result<(), DocError> {
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let row = sqlx::query("SELECT current_version, legal_hold FROM documents WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut **tx)
                        .await?
                        .ok_or(DocError::NotFound(id))?;
                    if row.try_get::<i64, _>("legal_hold")? != 0 {
                        return Err(DocError::Conflict(format!("document {id} is under legal hold")));
                    }
                    if row.try_get::<i64, _>("current_version")? == version {
                        return Err(DocError::Conflict(format!("version {version} of document {id} is current")));
                    }
                    let sha: String =
                        sqlx::query_scalar("SELECT sha256 FROM versions WHERE document_id = $1 AND version = $2")
                            .bind(id)
                            .bind(version)
                            .fetch_optional(&mut **tx)
                            .await?
                            .ok_or(DocError::VersionNotFound { id, version })?;
                    sqlx::query("DELETE FROM versions WHERE document_id = $1 AND version = $2")
                        .bind(id)
                        .bind(version)
                        .execute(&mut **tx)
                        .await?;
                    release_blob(tx, &sha, now + grace.source_ms).await?;
                    Ok(())
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// Moves every version of a document to `tier` and marks it archived, announcing
    /// DOCUMENT_ARCHIVED. Returns the bytes moved.
    pub async fn archive(
        &self,
        id: i64,
        tier: &str,
        policy: &str,
        grace: Grace,
        hook: StepHook<'_>,
    ) -> Result<u64, DocError> {
        let moved = self.move_versions(id, tier, grace, hook).await?;
        let actor = super::Actor { user: format!("policy:{policy}"), admin: true };
        self.write(|mut owned| {
            let actor = &actor;
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = super::load(tx, actor, id, false).await?;
                    if doc.archive_id.is_some() {
                        return Ok(());
                    }
                    let archive_id = uuid::Uuid::new_v4().to_string();
                    sqlx::query(
                        "UPDATE documents SET archived_at = $1, archive_id = $2, updated_at = $1, lifecycle_error = NULL \
                         WHERE id = $3",
                    )
                    .bind(now)
                    .bind(&archive_id)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                    let doc = super::load(tx, actor, id, false).await?;
                    let fields = with(
                        super::document_fields(&doc),
                        json!({"archiveId": archive_id, "storageTier": tier, "policy": policy}),
                    );
                    Event::new(EventType::DocumentArchived, now, fields).enqueue(tx, now).await?;
                    Ok(())
                }
                .await;
                (owned, r)
            })
        })
        .await?;
        Ok(moved)
    }

    /// Brings an archived document back to the default tier, announcing DOCUMENT_RESTORED.
    pub async fn restore_archived(
        &self,
        actor: &super::Actor,
        id: i64,
        grace: Grace,
    ) -> Result<super::Document, DocError> {
        let doc = self.get(actor, id).await?;
        if doc.archive_id.is_none() {
            return Err(DocError::Conflict(format!("document {id} is not archived")));
        }
        let default = self.tiers().default_tier().name.clone();
        self.move_versions(id, &default, grace, &|_| {}).await?;
        self.write(|mut owned| {
            Box::pin(async move {
                let r = async {
                    let tx = &mut owned;
                    let now = self.clock.now_ms();
                    let doc = super::load(tx, actor, id, false).await?;
                    let Some(archive_id) = doc.archive_id.clone() else { return Ok(doc) };
                    sqlx::query(
                        "UPDATE documents SET archived_at = NULL, archive_id = NULL, updated_at = $1, \
                         lifecycle_restarted_at = $1 WHERE id = $2",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                    let doc = super::load(tx, actor, id, false).await?;
                    let fields =
                        with(super::document_fields(&doc), json!({"archiveId": archive_id, "restoredBy": actor.user}));
                    Event::new(EventType::DocumentRestored, now, fields).enqueue(tx, now).await?;
                    Ok(doc)
                }
                .await;
                (owned, r)
            })
        })
        .await
    }

    /// Moves the current version of a document to `tier` on request, hotter or colder
    /// (promotion back from a cold tier, say). Archived documents are restored instead.
    pub async fn move_document(
        &self,
        actor: &super::Actor,
        id: i64,
        tier: &str,
        grace: Grace,
    ) -> Result<super::Document, DocError> {
        let doc = self.get(actor, id).await?;
        if doc.archive_id.is_some() {
            return Err(DocError::Conflict(format!("document {id} is archived: restore it instead")));
        }
        self.tiers().get(tier).map_err(|_| DocError::Invalid(format!("there is no storage tier {tier:?}")))?;
        if doc.storage_tier != tier {
            let sha = doc.checksum.trim_start_matches("sha256:").to_owned();
            self.move_blob(&sha, tier, grace, &|_| {}).await?;
            self.write(|mut owned| {
                Box::pin(async move {
                    let r = async {
                        let tx = &mut owned;
                        let now = self.clock.now_ms();
                        // Asked for: the next retention run must not undo it at once.
                        sqlx::query("UPDATE documents SET lifecycle_restarted_at = $1 WHERE id = $2")
                            .bind(now)
                            .bind(id)
                            .execute(&mut **tx)
                            .await?;
                        let doc = super::load(tx, actor, id, false).await?;
                        let fields = with(
                            super::document_fields(&doc),
                            json!({"changedFields": ["storageTier"], "updatedBy": actor.user}),
                        );
                        Event::new(EventType::DocumentUpdated, now, fields).enqueue(tx, now).await?;
                        Ok(())
                    }
                    .await;
                    (owned, r)
                })
            })
            .await?;
        }
        self.get(actor, id).await
    }

    /// Moves the blob of every version of a document to `tier`.
    async fn move_versions(&self, id: i64, tier: &str, grace: Grace, hook: StepHook<'_>) -> Result<u64, DocError> {
        let shas: Vec<String> = sqlx::query_scalar("SELECT DISTINCT sha256 FROM versions WHERE document_id = $1")
            .bind(id)
            .fetch_all(self.meta.pool())
            .await?;
        let mut moved = 0;
        for sha in shas {
            moved += self.move_blob(&sha, tier, grace, hook).await?;
        }
        Ok(moved)
    }

    /// Bytes and objects per tier, their monthly cost, and what compression,
    /// deduplication and tiering save.
    pub async fn usage(&self, config: &PlatformConfig) -> Result<Usage, DocError> {
        Ok(self.usage_counts().await?.priced(config))
    }

    /// What this database's blobs and versions hold, before pricing: shards add theirs up.
    pub async fn usage_counts(&self) -> Result<UsageCounts, DocError> {
        Ok(usage_counts(&self.meta).await?)
    }
}

/// What the blobs and versions of one metadata database hold, before pricing.
pub async fn usage_counts(meta: &crate::store::Metadata) -> Result<UsageCounts, StoreError> {
    let rows = sqlx::query(
        "SELECT tier, COUNT(*) AS objects, CAST(COALESCE(SUM(stored_size), 0) AS BIGINT) AS stored, \
         CAST(COALESCE(SUM(size), 0) AS BIGINT) AS original FROM blobs GROUP BY tier ORDER BY tier",
    )
    .fetch_all(meta.pool())
    .await?;
    let logical: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM versions")
        .fetch_one(meta.pool())
        .await?;
    let mut counts = UsageCounts { logical_bytes: logical, ..UsageCounts::default() };
    for row in &rows {
        let tier: String = row.try_get("tier")?;
        counts.tiers.insert(tier, (row.try_get("objects")?, row.try_get("stored")?, row.try_get("original")?));
    }
    Ok(counts)
}

/// Objects, stored bytes and original bytes per tier, and the bytes of every version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub tiers: BTreeMap<String, (i64, i64, i64)>,
    pub logical_bytes: i64,
}

impl UsageCounts {
    /// Adds another shard's counts.
    pub fn add(&mut self, other: &UsageCounts) {
        self.logical_bytes += other.logical_bytes;
        for (tier, (objects, stored, original)) in &other.tiers {
            let sum = self.tiers.entry(tier.clone()).or_default();
            *sum = (sum.0 + objects, sum.1 + stored, sum.2 + original);
        }
    }

    /// What keeping the bytes of `tiers` there saves each month against keeping them in
    /// the default tier (what the policies moving documents there earn).
    pub fn tiering_savings<'a>(&self, config: &PlatformConfig, tiers: impl IntoIterator<Item = &'a str>) -> f64 {
        let cost_of = |tier: &str| config.tiers.get(tier).and_then(|t| t.cost_per_gb_month).unwrap_or(0.0);
        let default_cost = cost_of(&config.default_tier);
        let tiers: BTreeSet<&str> = tiers.into_iter().collect();
        tiers
            .into_iter()
            .filter_map(|tier| self.tiers.get(tier).map(|&(_, bytes, _)| (tier, bytes)))
            .map(|(tier, bytes)| monthly_cost(bytes, default_cost) - monthly_cost(bytes, cost_of(tier)))
            .sum()
    }

    /// The counts priced by the tiers of `config`.
    pub fn priced(&self, config: &PlatformConfig) -> Usage {
        let logical = self.logical_bytes;
        let default_cost = config.tiers.get(&config.default_tier).and_then(|t| t.cost_per_gb_month).unwrap_or(0.0);
        let mut usage = Usage { logical_bytes: logical, ..Usage::default() };
        let mut seen = BTreeSet::new();
        let (mut unique, mut compression, mut tiering) = (0i64, 0.0, 0.0);
        for (tier, &(objects, bytes, original)) in &self.tiers {
            let tier = tier.clone();
            let configured = config.tiers.get(&tier);
            let cost = configured.and_then(|t| t.cost_per_gb_month);
            let estimated = monthly_cost(bytes, cost.unwrap_or(0.0));
            compression += monthly_cost(original - bytes, default_cost);
            tiering += monthly_cost(bytes, default_cost) - estimated;
            unique += original;
            usage.objects += objects;
            usage.stored_bytes += bytes;
            usage.estimated_monthly_cost += estimated;
            seen.insert(tier.clone());
            usage.tiers.push(TierUsage {
                tier,
                class: configured.map(|t| format!("{:?}", t.class).to_uppercase()),
                objects,
                bytes,
                original_bytes: original,
                cost_per_gb_month: cost,
                estimated_monthly_cost: estimated,
            });
        }
        for (name, tier) in &config.tiers {
            if !seen.contains(name) {
                usage.tiers.push(TierUsage {
                    tier: name.clone(),
                    class: Some(format!("{:?}", tier.class).to_uppercase()),
                    cost_per_gb_month: tier.cost_per_gb_month,
                    ..TierUsage::default()
                });
            }
        }
        usage.tiers.sort_by(|a, b| a.tier.cmp(&b.tier));
        let deduplication = monthly_cost(logical - unique, default_cost);
        usage.baseline_monthly_cost = monthly_cost(logical, default_cost);
        usage.monthly_savings =
            Savings { compression, deduplication, tiering, total: compression + deduplication + tiering };
        usage
    }
}

/// Deletes the blob row of `sha` when no version or document refers to it any more, and
/// hands its copy to `blob_garbage`, due at `not_before`.
async fn release_blob(tx: &mut Tx, sha: &str, not_before: i64) -> Result<(), StoreError> {
    if let Some((tier, object_key)) = super::forget_unreferenced_blob(tx, sha).await? {
        sqlx::query("INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3)")
            .bind(tier)
            .bind(object_key)
            .bind(not_before)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Stored copies the collector deletes at once.
const GC_CONCURRENCY: usize = 8;

/// Blobs one batch of a migration locates, claims and switches together.
const MOVE_BATCH: usize = 256;
/// Rows per statement when locating or claiming: bound parameters stay far under every
/// database's limit.
const CLAIM_ROWS: usize = 200;

/// One move of a batch, once located.
struct Planned<'m> {
    /// Its place in the batch.
    index: usize,
    sha: &'m str,
    to: &'m str,
    from: Located,
    content_type: String,
    /// The original size.
    size: u64,
    /// The claimed key of the copy.
    key: String,
}

/// Copies a planned blob to its claimed key and reads the copy back.
async fn copy_verified(tiers: &Tiers, p: &Planned<'_>, hook: StepHook<'_>) -> Result<StoredBlob, DocError> {
    let source = tiers.get(&p.from.tier)?;
    let target = tiers.get(p.to)?;
    // Inside the store when both tiers are on one backend and the target keeps the stored
    // form (compressed or not) as it is; the read-back below verifies the copy either way.
    let same_form = (p.from.codec == Codec::Zstd) == target.compresses(&p.content_type);
    let inside = if same_form { source.copy_within(&p.from.object_key, &target, &p.key).await } else { None };
    let copy = match inside {
        Some(Ok(stored_size)) => StoredBlob {
            tier: p.to.to_owned(),
            object_key: p.key.clone(),
            sha256: p.sha.to_owned(),
            size: p.size,
            stored_size,
            codec: p.from.codec,
        },
        other => {
            if let Some(Err(e)) = other {
                tracing::debug!(error = %e, sha = p.sha, "copying inside the store failed; streaming the bytes instead");
            }
            let bytes = source.read(&p.from.object_key, p.from.codec, None).await?;
            target.write_at(p.key.clone(), bytes, target.compresses(&p.content_type), u64::MAX).await?
        }
    };
    if copy.sha256 != p.sha {
        return Err(DocError::ChecksumMismatch(format!(
            "the blob {} read from storage tier {} has the checksum {}: it was not moved",
            p.sha, p.from.tier, copy.sha256
        )));
    }
    hook(MigrationStep::Copied);
    let (there, _) = checksum(&target, &p.key, copy.codec).await?;
    if there != p.sha {
        return Err(DocError::ChecksumMismatch(format!(
            "the copy of blob {} in storage tier {} reads back as {there}: it was not switched to",
            p.sha, p.to
        )));
    }
    hook(MigrationStep::Verified);
    Ok(copy)
}

/// Points one blob at its verified copy, inside the batch's transaction, and records the
/// source as garbage due after the grace: `Ok(true)`. `Ok(false)` when the blob was moved
/// or purged meanwhile (the copy becomes garbage due now); an `Err` inside when the copy's
/// claim ran out (it may be collected already: the blob stays where it is).
async fn switch(
    tx: &mut Tx,
    p: &Planned<'_>,
    copy: &StoredBlob,
    now: i64,
    grace: Grace,
) -> Result<Result<bool, DocError>, StoreError> {
    if !super::take_live_claim(tx, p.to, &p.key, now).await? {
        return Ok(Err(DocError::Conflict(format!(
            "the copy of blob {} in {} outlived its claim and may be collected; the blob stays in {}",
            p.sha, p.to, p.from.tier
        ))));
    }
    let moved = sqlx::query(
        "UPDATE blobs SET tier = $1, object_key = $2, stored_size = $3, compression = $4 \
         WHERE sha256 = $5 AND tier = $6 AND object_key = $7",
    )
    .bind(p.to)
    .bind(&p.key)
    .bind(i64::try_from(copy.stored_size).unwrap_or(i64::MAX))
    .bind(copy.codec.as_str())
    .bind(p.sha)
    .bind(&p.from.tier)
    .bind(&p.from.object_key)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let (tier, key, due) = if moved == 0 {
        (p.to, p.key.as_str(), now)
    } else {
        (p.from.tier.as_str(), p.from.object_key.as_str(), now + grace.source_ms)
    };
    sqlx::query("INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3)")
        .bind(tier)
        .bind(key)
        .bind(due)
        .execute(&mut **tx)
        .await?;
    Ok(Ok(moved > 0))
}
