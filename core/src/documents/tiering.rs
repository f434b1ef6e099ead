//! Tier migration: moving a blob between tiers without ever making it unreadable, one
//! document on request or a batch at a time for retention runs and drains.
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

use std::collections::HashMap;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{DocError, Documents, Tx, with};
use crate::blob::{Codec, StoredBlob, Tier, Tiers, new_object_key};
use crate::crds::webhook::EventType;
use crate::events::Event;
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
    pub(super) async fn move_versions(
        &self,
        id: i64,
        tier: &str,
        grace: Grace,
        hook: StepHook<'_>,
    ) -> Result<u64, DocError> {
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
}

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
