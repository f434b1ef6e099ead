//! What retention runs do to documents: the documents as the retention rules see them,
//! the record of an action that failed, expiring a noncurrent version, archiving and
//! restoring. Moving the bytes is tier migration (`tiering`); deleting what nothing refers
//! to is garbage collection (`garbage`).

use serde_json::json;
use sqlx::Row;

use super::garbage::release_blob;
use super::tiering::{Grace, StepHook};
use super::{DocError, Documents, with};
use crate::crds::webhook::EventType;
use crate::events::Event;
use crate::retention::{DocumentFacts, VersionFacts};
use crate::store::StoreError;

impl Documents {
    /// Up to `limit` documents with ids above `after`, in id order, with their versions,
    /// as the retention rules see them. Soft-deleted documents are left out.
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

    /// One document as the retention rules see it, if the actor may see it.
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
}
