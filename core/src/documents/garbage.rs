//! Garbage collection of stored copies: what nothing refers to any more waits in
//! `blob_garbage` until it is due (a migration's source after its grace, a claim that was
//! never taken back, the blob of an expired version) and is then deleted from its tier.

use std::collections::BTreeSet;

use futures::StreamExt;
use futures::future::BoxFuture;
use sqlx::Row;

use super::{DocError, Documents, Tx};
use crate::store::StoreError;

impl Documents {
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
            let shared = self.referenced_elsewhere(&due).await?;
            if !shared.is_empty() {
                // A copy another shard refers to (its document was handed over there) is that
                // shard's: this shard's claim on it goes, the copy stays.
                let mut tx = self.meta.begin_with(None).await?;
                for (tier, key) in &shared {
                    sqlx::query("DELETE FROM blob_garbage WHERE tier = $1 AND object_key = $2")
                        .bind(tier)
                        .bind(key)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                due.retain(|copy| !shared.contains(copy));
                if due.is_empty() {
                    continue;
                }
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
            let mut tx = self.meta.begin_with(None).await?;
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
}

impl Documents {
    /// The copies of `due` a blob row of another shard refers to.
    pub(super) async fn referenced_elsewhere(
        &self,
        due: &[(String, String)],
    ) -> Result<BTreeSet<(String, String)>, DocError> {
        let mut shared = BTreeSet::new();
        for sibling in self.siblings() {
            for (tier, key) in due {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM blobs WHERE tier = $1 AND object_key = $2 LIMIT 1")
                        .bind(tier)
                        .bind(key)
                        .fetch_optional(sibling.pool())
                        .await
                        .map_err(StoreError::from)?;
                if found.is_some() {
                    shared.insert((tier.clone(), key.clone()));
                }
            }
        }
        Ok(shared)
    }
}

/// Deletes the blob row of `sha` when no version or document refers to it any more, and
/// hands its copy to `blob_garbage`, due at `not_before`.
pub(super) async fn release_blob(tx: &mut Tx, sha: &str, not_before: i64) -> Result<(), StoreError> {
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
