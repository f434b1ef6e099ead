//! Integrity scrubs: every stored blob is read back and its SHA-256 compared with the one
//! recorded when it was uploaded. A blob whose bytes differ, or whose object is gone, is
//! quarantined: downloads of it are refused with the reason instead of serving bytes that
//! are not the document's. A quarantined blob found sound again (its object restored from a
//! backup) is released. A blob that cannot be read for another reason (the store is
//! unreachable) is counted as an error and left as it is, for the next scrub.
//!
//! A scrub reads the blobs a page at a time in hash order and holds no lock while it reads
//! objects; a blob that a tier migration moves meanwhile is checked where it was, and the
//! quarantine applies only if it is still there.

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{DocError, Documents};
use crate::blob::{BlobError, Codec};
use crate::store::StoreError;

/// Blobs read from the database at a time.
const PAGE: i64 = 200;
/// Objects read and hashed at once.
const CONCURRENCY: usize = 4;

/// What a scrub found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScrubReport {
    /// Blobs read back and hashed (sound or not).
    pub checked: u64,
    /// Bytes hashed (as uploaded, after decompression).
    pub bytes: u64,
    /// Blobs quarantined by this scrub.
    pub quarantined: Vec<QuarantinedBlob>,
    /// Blobs found unsound: those quarantined now and those that already were.
    pub unsound: u64,
    /// Quarantined blobs found sound again, and released.
    pub released: u64,
    /// Blobs that could not be read (left as they were).
    pub errors: u64,
}

/// A blob a scrub quarantined.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedBlob {
    pub sha256: String,
    pub tier: String,
    pub reason: String,
    /// The documents with a version of this content.
    pub documents: Vec<i64>,
}

/// One blob as the page read it.
struct Stored {
    sha256: String,
    tier: String,
    object_key: String,
    codec: Codec,
    quarantined: bool,
}

/// What reading one blob back found.
enum Finding {
    Sound { bytes: u64 },
    Unsound { bytes: u64, reason: String },
    Unreadable(String),
}

impl Documents {
    /// How many blobs a scrub of `tier` (every tier: `None`) checks on this shard.
    pub async fn scrub_total(&self, tier: Option<&str>) -> Result<i64, DocError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM blobs WHERE ($1 IS NULL OR tier = $1)")
            .bind(tier)
            .fetch_one(self.meta.pool())
            .await?)
    }

    /// Reads back every blob of `tier` (every tier: `None`) on this shard, quarantining those
    /// that are not sound and releasing quarantined ones that are; `progress` is told the
    /// blobs checked so far after each page.
    pub async fn scrub(&self, tier: Option<&str>, progress: &(dyn Fn(u64) + Sync)) -> Result<ScrubReport, DocError> {
        let mut report = ScrubReport::default();
        let mut after = String::new();
        loop {
            let page = self.scrub_page(tier, &after).await?;
            let Some(last) = page.last() else { break };
            after.clone_from(&last.sha256);
            let findings: Vec<(Stored, Finding)> = futures::stream::iter(page)
                .map(|blob| async move {
                    let finding = self.check(&blob).await;
                    (blob, finding)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            for (blob, finding) in findings {
                match finding {
                    Finding::Sound { bytes } => {
                        report.checked += 1;
                        report.bytes += bytes;
                        if blob.quarantined && self.release(&blob).await? {
                            report.released += 1;
                        }
                    }
                    Finding::Unsound { bytes, reason } => {
                        report.checked += 1;
                        report.bytes += bytes;
                        report.unsound += 1;
                        if let Some(quarantined) = self.quarantine(&blob, &reason).await? {
                            report.quarantined.push(quarantined);
                        }
                    }
                    Finding::Unreadable(error) => {
                        tracing::warn!(sha256 = %blob.sha256, tier = %blob.tier, %error, "a blob could not be read back");
                        report.errors += 1;
                    }
                }
            }
            progress(report.checked + report.errors);
        }
        Ok(report)
    }

    async fn scrub_page(&self, tier: Option<&str>, after: &str) -> Result<Vec<Stored>, DocError> {
        let rows = sqlx::query(
            "SELECT sha256, tier, object_key, compression, quarantined_at FROM blobs \
             WHERE sha256 > $1 AND ($2 IS NULL OR tier = $2) ORDER BY sha256 LIMIT $3",
        )
        .bind(after)
        .bind(tier)
        .bind(PAGE)
        .fetch_all(self.meta.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let codec: String = row.try_get("compression")?;
                Ok(Stored {
                    sha256: row.try_get("sha256")?,
                    tier: row.try_get("tier")?,
                    object_key: row.try_get("object_key")?,
                    codec: Codec::parse(&codec)
                        .ok_or_else(|| StoreError::Corrupt(format!("blob compression {codec}")))?,
                    quarantined: row.try_get::<Option<i64>, _>("quarantined_at")?.is_some(),
                })
            })
            .collect()
    }

    /// Reads `blob` back and hashes it.
    async fn check(&self, blob: &Stored) -> Finding {
        let tier = match self.tiers().get(&blob.tier) {
            Ok(tier) => tier,
            Err(e) => return Finding::Unreadable(e.to_string()),
        };
        let mut stream = match tier.read(&blob.object_key, blob.codec, None).await {
            Ok(stream) => stream,
            Err(BlobError::Store { source: object_store::Error::NotFound { .. }, .. }) => {
                let reason = format!("its object {} is missing from storage tier {}", blob.object_key, blob.tier);
                return Finding::Unsound { bytes: 0, reason };
            }
            Err(e) => return Finding::Unreadable(e.to_string()),
        };
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            match stream.try_next().await {
                Ok(Some(chunk)) => {
                    bytes += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                Ok(None) => break,
                // Bytes that do not decompress are not the blob's; the store failing to
                // send them (its error inside) says nothing of them.
                Err(e) if blob.codec == Codec::Zstd && !from_the_store(&e) => {
                    let reason = format!("its object in storage tier {} does not decompress: {e}", blob.tier);
                    return Finding::Unsound { bytes, reason };
                }
                Err(e) => return Finding::Unreadable(e.to_string()),
            }
        }
        let found = hex::encode(hasher.finalize());
        if found == blob.sha256 {
            Finding::Sound { bytes }
        } else {
            let reason = format!("its {bytes} bytes in storage tier {} hash to {found}", blob.tier);
            Finding::Unsound { bytes, reason }
        }
    }

    /// Quarantines `blob` if it is still where it was read (a tier migration may have moved
    /// it since) and not yet quarantined.
    async fn quarantine(&self, blob: &Stored, reason: &str) -> Result<Option<QuarantinedBlob>, DocError> {
        let now = self.clock.now_ms();
        let changed = sqlx::query(
            "UPDATE blobs SET quarantined_at = $1, quarantine_reason = $2 \
             WHERE sha256 = $3 AND tier = $4 AND object_key = $5 AND quarantined_at IS NULL",
        )
        .bind(now)
        .bind(reason)
        .bind(&blob.sha256)
        .bind(&blob.tier)
        .bind(&blob.object_key)
        .execute(self.meta.pool())
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        let documents: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT document_id FROM versions WHERE sha256 = $1 ORDER BY document_id")
                .bind(&blob.sha256)
                .fetch_all(self.meta.pool())
                .await?;
        tracing::warn!(sha256 = %blob.sha256, tier = %blob.tier, %reason, ?documents, "a blob failed its integrity check and is quarantined");
        Ok(Some(QuarantinedBlob {
            sha256: blob.sha256.clone(),
            tier: blob.tier.clone(),
            reason: reason.to_owned(),
            documents,
        }))
    }

    /// Releases `blob` from quarantine; `true` if it was.
    async fn release(&self, blob: &Stored) -> Result<bool, DocError> {
        let changed = sqlx::query(
            "UPDATE blobs SET quarantined_at = NULL, quarantine_reason = NULL \
             WHERE sha256 = $1 AND tier = $2 AND object_key = $3 AND quarantined_at IS NOT NULL",
        )
        .bind(&blob.sha256)
        .bind(&blob.tier)
        .bind(&blob.object_key)
        .execute(self.meta.pool())
        .await?
        .rows_affected();
        if changed > 0 {
            tracing::info!(sha256 = %blob.sha256, tier = %blob.tier, "a quarantined blob is sound again and released");
        }
        Ok(changed > 0)
    }
}

/// Whether a read failed in the object store (rather than in decompressing what it sent).
fn from_the_store(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.downcast_ref::<object_store::Error>().is_some())
}
