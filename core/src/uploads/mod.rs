//! Chunked, resumable upload sessions: initiate, put chunk N (checked against its
//! SHA-256), status, uploaded and missing chunks, complete (assembled and checked against
//! the whole file's SHA-256), cancel; sessions expire after 24 hours.
//!
//! A session's state and its completion lock live in the metadata store, and its chunks in
//! the default tier, so every gateway replica can serve every session.

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::blob::{Codec, StoredBlob};
use crate::clock::rfc3339;
use crate::documents::{Actor, DocError, Documents, NewDocument, Uploaded};
use crate::store::StoreError;

pub mod tus;

/// How long a session lives after it was started.
pub const SESSION_TTL_MS: i64 = 24 * 3600 * 1000;
/// How long a completion holds its lock before another replica may take over.
pub const COMPLETION_LOCK_MS: i64 = 15 * 60 * 1000;
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;
pub const MAX_CHUNKS: u64 = 10_000;

/// What starting a session takes.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Initiate {
    pub filename: String,
    /// At most the gateway's upload limit.
    pub total_size: u64,
    /// Bytes per chunk (default 8 MiB); the session may have at most 10,000 chunks.
    #[schema(minimum = 1, maximum = 268_435_456)]
    pub chunk_size: Option<u64>,
    pub content_type: Option<String>,
    #[schema(max_length = 500)]
    pub title: Option<String>,
    #[schema(max_length = 5000)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(max_items = 32)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// `sha256:<hex>` of the whole file, checked at completion.
    #[schema(pattern = r"^(sha256:)?[0-9a-fA-F]{64}$")]
    pub checksum: Option<String>,
}

/// A session as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_id: String,
    pub filename: String,
    pub total_size: u64,
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub uploaded_chunks: u64,
    pub uploaded_bytes: u64,
    /// Percent of the bytes received, 0 to 100.
    pub progress: f64,
    /// ACTIVE, COMPLETING, COMPLETED, CANCELLED or EXPIRED.
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document_id: Option<i64>,
}

/// One received chunk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Chunk {
    pub chunk_number: u64,
    pub size: u64,
    pub checksum: String,
}

struct SessionRow {
    owner: String,
    filename: String,
    content_type: Option<String>,
    title: Option<String>,
    description: Option<String>,
    tags: Vec<String>,
    metadata: Map<String, Value>,
    total_size: u64,
    chunk_size: u64,
    total_chunks: u64,
    expected_sha256: Option<String>,
    status: String,
    lock_until: Option<i64>,
    document_id: Option<i64>,
    created_at: i64,
    expires_at: i64,
    /// `chunks` (numbered chunks of a fixed size) or `tus` (appended segments).
    protocol: String,
    tus_metadata: Option<String>,
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn session_row(row: &AnyRow) -> Result<SessionRow, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("upload session: {e}"));
    Ok(SessionRow {
        owner: row.try_get("owner")?,
        filename: row.try_get("filename")?,
        content_type: row.try_get("content_type")?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
        tags: serde_json::from_str(&row.try_get::<String, _>("tags")?).map_err(corrupt)?,
        metadata: serde_json::from_str(&row.try_get::<String, _>("metadata")?).map_err(corrupt)?,
        total_size: u(row.try_get("total_size")?),
        chunk_size: u(row.try_get("chunk_size")?),
        total_chunks: u(row.try_get("total_chunks")?),
        expected_sha256: row.try_get("expected_sha256")?,
        status: row.try_get("status")?,
        lock_until: row.try_get("lock_until")?,
        document_id: row.try_get("document_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        protocol: row.try_get("protocol")?,
        tus_metadata: row.try_get("tus_metadata")?,
    })
}

impl SessionRow {
    fn chunk_len(&self, n: u64) -> u64 {
        if n + 1 == self.total_chunks { self.total_size - self.chunk_size * n } else { self.chunk_size }
    }
}

fn parse_checksum(value: &str) -> Result<String, DocError> {
    let hex = value.strip_prefix("sha256:").unwrap_or(value).to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(DocError::Invalid(format!("checksum {value:?} is not sha256:<64 hex digits>")))
    }
}

/// How many chunks (segments) a session holds and their total size.
async fn received<'c>(conn: impl sqlx::Executor<'c, Database = sqlx::Any>, id: &str) -> Result<(u64, u64), DocError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes FROM upload_chunks WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(conn)
    .await?;
    Ok((u(row.try_get("n")?), u(row.try_get("bytes")?)))
}

/// Inside a write: refuses with `Conflict` unless the session still takes data.
async fn ensure_active(tx: &mut sqlx::AnyConnection, id: &str) -> Result<(), DocError> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM upload_sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if status.as_deref() == Some("ACTIVE") {
        Ok(())
    } else {
        Err(DocError::Conflict(format!("upload session {id} stopped taking data")))
    }
}

/// Inside a write: records chunk (or segment) `n` of a session and touches the session.
async fn insert_chunk(
    tx: &mut sqlx::AnyConnection,
    id: &str,
    n: u64,
    stored: &StoredBlob,
    now: i64,
) -> Result<(), DocError> {
    sqlx::query(
        "INSERT INTO upload_chunks (session_id, n, size, sha256, tier, object_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(i(n))
    .bind(i(stored.size))
    .bind(&stored.sha256)
    .bind(&stored.tier)
    .bind(&stored.object_key)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE upload_sessions SET updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Why a session operation failed, beyond the document errors.
fn gone(id: &str, status: &str) -> DocError {
    DocError::Gone(format!("upload session {id} is {}", status.to_ascii_lowercase()))
}

const SESSION_COLUMNS: &str = "owner, filename, content_type, title, description, tags, metadata, total_size, \
     chunk_size, total_chunks, expected_sha256, status, lock_until, document_id, created_at, expires_at, protocol, \
     tus_metadata";

impl Documents {
    async fn session(&self, actor: &Actor, id: &str) -> Result<SessionRow, DocError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM upload_sessions WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(self.meta().pool()).await?;
        let session = row.as_ref().map(session_row).transpose()?;
        match session {
            Some(s) if actor.sees(&s.owner) => Ok(s),
            _ => Err(DocError::SessionNotFound(id.to_owned())),
        }
    }

    /// A session of the chunked protocol (a tus upload is driven through its own paths).
    async fn chunked_session(&self, actor: &Actor, id: &str) -> Result<SessionRow, DocError> {
        let session = self.session(actor, id).await?;
        if session.protocol != "chunks" {
            return Err(DocError::Invalid(format!(
                "upload session {id} is a tus upload: continue it with the tus protocol at /api/v1/tus/{id}"
            )));
        }
        Ok(session)
    }

    /// Whether a session still takes data: not finished, not expired.
    fn check_active(&self, id: &str, session: &SessionRow) -> Result<(), DocError> {
        if session.status == "ACTIVE" && self.clock().now_ms() >= session.expires_at {
            return Err(gone(id, "expired"));
        }
        match session.status.as_str() {
            "ACTIVE" => Ok(()),
            "COMPLETING" => Err(DocError::Conflict(format!("upload session {id} is being completed"))),
            other => Err(gone(id, other)),
        }
    }

    async fn view(&self, id: &str, s: &SessionRow) -> Result<Session, DocError> {
        let (count, bytes) = received(self.meta().pool(), id).await?;
        let status = if s.status == "ACTIVE" && self.clock().now_ms() >= s.expires_at { "EXPIRED" } else { &s.status };
        #[allow(clippy::cast_precision_loss)]
        let progress = if s.status == "COMPLETED" || s.total_size == 0 {
            if count == s.total_chunks { 100.0 } else { 0.0 }
        } else {
            (bytes as f64 * 10_000.0 / s.total_size as f64).round() / 100.0
        };
        Ok(Session {
            session_id: id.to_owned(),
            filename: s.filename.clone(),
            total_size: s.total_size,
            chunk_size: s.chunk_size,
            total_chunks: s.total_chunks,
            uploaded_chunks: count,
            uploaded_bytes: bytes,
            progress,
            status: status.to_owned(),
            created_at: rfc3339(s.created_at),
            expires_at: rfc3339(s.expires_at),
            document_id: s.document_id,
        })
    }

    /// Starts an upload session.
    pub async fn initiate_upload(&self, actor: &Actor, init: Initiate) -> Result<Session, DocError> {
        let prepared = Self::prepare(NewDocument {
            filename: init.filename.clone(),
            content_type: init.content_type.clone(),
            title: init.title.clone(),
            description: init.description.clone(),
            tags: init.tags.clone(),
            metadata: init.metadata.clone(),
        })?;
        if init.total_size > self.max_upload {
            return Err(DocError::TooLarge { limit: self.max_upload });
        }
        let chunk_size = init.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(DocError::Invalid(format!("chunkSize must be between 1 and {MAX_CHUNK_SIZE} bytes")));
        }
        let total_chunks = init.total_size.div_ceil(chunk_size).max(1);
        if total_chunks > MAX_CHUNKS {
            return Err(DocError::Invalid(format!(
                "{total_chunks} chunks of {chunk_size} bytes is more than {MAX_CHUNKS}; use larger chunks"
            )));
        }
        let expected = init.checksum.as_deref().map(parse_checksum).transpose()?;
        let id = self.new_key(|| uuid::Uuid::new_v4().to_string())?;
        let now = self.clock().now_ms();
        sqlx::query(
            "INSERT INTO upload_sessions (id, owner, filename, content_type, title, description, tags, metadata, \
             total_size, chunk_size, total_chunks, expected_sha256, status, created_at, updated_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'ACTIVE', $13, $13, $14)",
        )
        .bind(&id)
        .bind(&actor.user)
        .bind(&prepared.new.filename)
        .bind(&init.content_type)
        .bind(&prepared.new.title)
        .bind(&prepared.new.description)
        .bind(json!(prepared.new.tags).to_string())
        .bind(Value::Object(prepared.new.metadata.clone()).to_string())
        .bind(i(init.total_size))
        .bind(i(chunk_size))
        .bind(i(total_chunks))
        .bind(&expected)
        .bind(now)
        .bind(now + SESSION_TTL_MS)
        .execute(self.meta().pool())
        .await?;
        self.upload_status(actor, &id).await
    }

    /// A session's state.
    pub async fn upload_status(&self, actor: &Actor, id: &str) -> Result<Session, DocError> {
        let session = self.session(actor, id).await?;
        self.view(id, &session).await
    }

    /// Stores chunk `n`, checked against its expected length and, when given, its SHA-256.
    /// Sending a chunk again replaces it.
    pub async fn put_chunk(
        &self,
        actor: &Actor,
        id: &str,
        n: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<Session, DocError> {
        let expected_sha = checksum.map(parse_checksum).transpose()?;
        let session = self.chunked_session(actor, id).await?;
        self.check_active(id, &session)?;
        if n >= session.total_chunks {
            return Err(DocError::Invalid(format!(
                "chunk {n} is out of bounds: this session has chunks 0 to {}",
                session.total_chunks - 1
            )));
        }
        let want = session.chunk_len(n);
        let tier = self.tiers().default_tier();
        let stored = tier.write_under(&format!("uploads/{id}"), body, false, want).await.map_err(|e| match e {
            crate::blob::BlobError::TooLarge { .. } => {
                DocError::Invalid(format!("chunk {n} must be exactly {want} bytes; more arrived"))
            }
            other => DocError::from(other),
        })?;
        let discard = |reason: DocError| async {
            tier.delete(&stored.object_key).await.ok();
            Err(reason)
        };
        if stored.size != want {
            return discard(DocError::Invalid(format!(
                "chunk {n} must be exactly {want} bytes; {} arrived",
                stored.size
            )))
            .await;
        }
        if let Some(sha) = expected_sha
            && sha != stored.sha256
        {
            return discard(DocError::ChecksumMismatch(format!(
                "chunk {n}'s SHA-256 is sha256:{}, not the sha256:{sha} given",
                stored.sha256
            )))
            .await;
        }
        let replaced = self
            .meta()
            .write(|mut tx| {
                let stored = &stored;
                Box::pin(async move {
                    let r = async {
                        ensure_active(&mut tx, id).await?;
                        let old: Option<String> =
                            sqlx::query_scalar("SELECT object_key FROM upload_chunks WHERE session_id = $1 AND n = $2")
                                .bind(id)
                                .bind(i(n))
                                .fetch_optional(&mut *tx)
                                .await?;
                        sqlx::query("DELETE FROM upload_chunks WHERE session_id = $1 AND n = $2")
                            .bind(id)
                            .bind(i(n))
                            .execute(&mut *tx)
                            .await?;
                        insert_chunk(&mut tx, id, n, stored, self.clock().now_ms()).await?;
                        Ok(old)
                    }
                    .await;
                    (tx, r)
                })
            })
            .await;
        match replaced {
            Ok(Some(old)) => {
                tier.delete(&old).await.ok();
            }
            Ok(None) => {}
            Err(e) => return discard(e).await,
        }
        self.upload_status(actor, id).await
    }

    /// The chunks received so far, in order.
    pub async fn uploaded_chunks(&self, actor: &Actor, id: &str) -> Result<Vec<Chunk>, DocError> {
        self.session(actor, id).await?;
        let rows = sqlx::query("SELECT n, size, sha256 FROM upload_chunks WHERE session_id = $1 ORDER BY n")
            .bind(id)
            .fetch_all(self.meta().pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Chunk {
                    chunk_number: u(r.try_get("n")?),
                    size: u(r.try_get("size")?),
                    checksum: format!("sha256:{}", r.try_get::<String, _>("sha256")?),
                })
            })
            .collect()
    }

    /// The chunk numbers still to send.
    pub async fn missing_chunks(&self, actor: &Actor, id: &str) -> Result<Vec<u64>, DocError> {
        let session = self.chunked_session(actor, id).await?;
        let have: std::collections::BTreeSet<u64> =
            self.uploaded_chunks(actor, id).await?.into_iter().map(|c| c.chunk_number).collect();
        Ok((0..session.total_chunks).filter(|n| !have.contains(n)).collect())
    }

    /// Assembles the chunks into a document. Completing a completed session again answers
    /// with its document.
    pub async fn complete_upload(&self, actor: &Actor, id: &str) -> Result<Uploaded, DocError> {
        let session = self.chunked_session(actor, id).await?;
        if let Some(done) = self.completed(actor, &session).await? {
            return Ok(done);
        }
        let session = self.takeover(id, session)?;
        let missing = self.missing_chunks(actor, id).await?;
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(20).map(ToString::to_string).collect();
            return Err(DocError::Invalid(format!(
                "{} chunk(s) missing: {}{}",
                missing.len(),
                shown.join(", "),
                if missing.len() > 20 { ", …" } else { "" }
            )));
        }
        self.finish(actor, id, &session).await
    }

    /// The document of a session completed before.
    async fn completed(&self, actor: &Actor, session: &SessionRow) -> Result<Option<Uploaded>, DocError> {
        if session.status == "COMPLETED"
            && let Some(doc) = session.document_id
        {
            let document = self.get(actor, doc).await?;
            let version_number = document.current_version;
            return Ok(Some(Uploaded { document, deduplicated: false, version_number }));
        }
        Ok(None)
    }

    /// An active session, or one whose completion lock lapsed (its replica died), which may
    /// be taken over.
    fn takeover(&self, id: &str, session: SessionRow) -> Result<SessionRow, DocError> {
        let lapsed = session.lock_until.is_some_and(|t| t < self.clock().now_ms());
        match self.check_active(id, &session) {
            Err(DocError::Conflict(_)) if lapsed => Ok(session),
            Err(e) => Err(e),
            Ok(()) => Ok(session),
        }
    }

    /// Takes the completion lock (one replica assembles, the others are told so), assembles
    /// the document and settles the session.
    async fn finish(&self, actor: &Actor, id: &str, session: &SessionRow) -> Result<Uploaded, DocError> {
        let now = self.clock().now_ms();
        let taken = sqlx::query(
            "UPDATE upload_sessions SET status = 'COMPLETING', lock_until = $1, updated_at = $2 WHERE id = $3 \
             AND (status = 'ACTIVE' OR (status = 'COMPLETING' AND lock_until < $2))",
        )
        .bind(now + COMPLETION_LOCK_MS)
        .bind(now)
        .bind(id)
        .execute(self.meta().pool())
        .await?;
        if taken.rows_affected() != 1 {
            return Err(DocError::Conflict(format!("upload session {id} is being completed")));
        }
        let result = self.assemble(actor, id, session).await;
        let (status, document_id) = match &result {
            Ok(uploaded) => ("COMPLETED", Some(uploaded.document.id)),
            Err(_) => ("ACTIVE", None),
        };
        sqlx::query("UPDATE upload_sessions SET status = $1, lock_until = NULL, document_id = $2, updated_at = $3 WHERE id = $4")
            .bind(status)
            .bind(document_id)
            .bind(self.clock().now_ms())
            .bind(id)
            .execute(self.meta().pool())
            .await?;
        if result.is_ok() {
            self.drop_chunks(id).await?;
        }
        result
    }

    async fn assemble(&self, actor: &Actor, id: &str, session: &SessionRow) -> Result<Uploaded, DocError> {
        let chunks: Vec<(String, String)> =
            sqlx::query("SELECT tier, object_key FROM upload_chunks WHERE session_id = $1 ORDER BY n")
                .bind(id)
                .fetch_all(self.meta().pool())
                .await?
                .iter()
                .map(|r| Ok((r.try_get("tier")?, r.try_get("object_key")?)))
                .collect::<Result<_, sqlx::Error>>()?;
        let prepared = Self::prepare(NewDocument {
            filename: session.filename.clone(),
            content_type: session.content_type.clone(),
            title: session.title.clone(),
            description: session.description.clone(),
            tags: session.tags.clone(),
            metadata: session.metadata.clone(),
        })?;
        let tiers = self.tiers();
        let bytes: crate::blob::ByteStream = Box::pin(
            futures::stream::iter(chunks)
                .then(move |(tier, key)| {
                    let tiers = tiers.clone();
                    async move {
                        let tier = tiers.get(&tier).map_err(std::io::Error::other)?;
                        tier.read(&key, Codec::None, None).await.map_err(std::io::Error::other)
                    }
                })
                .try_flatten(),
        );
        let blob: StoredBlob = self.store_bytes(&prepared.content_type, bytes).await?;
        if blob.size != session.total_size {
            self.discard(&blob).await;
            return Err(DocError::Invalid(format!(
                "the chunks hold {} bytes, not the {} announced",
                blob.size, session.total_size
            )));
        }
        if let Some(expected) = &session.expected_sha256
            && *expected != blob.sha256
        {
            self.discard(&blob).await;
            return Err(DocError::ChecksumMismatch(format!(
                "the assembled file's SHA-256 is sha256:{}, not the sha256:{expected} announced",
                blob.sha256
            )));
        }
        self.record_upload(actor, &prepared, blob).await
    }

    async fn drop_chunks(&self, id: &str) -> Result<(), DocError> {
        let rows = sqlx::query("SELECT tier, object_key FROM upload_chunks WHERE session_id = $1")
            .bind(id)
            .fetch_all(self.meta().pool())
            .await?;
        for row in &rows {
            let (tier, key): (String, String) = (row.try_get("tier")?, row.try_get("object_key")?);
            if let Ok(tier) = self.tiers().get(&tier) {
                tier.delete(&key).await.ok();
            }
        }
        sqlx::query("DELETE FROM upload_chunks WHERE session_id = $1").bind(id).execute(self.meta().pool()).await?;
        Ok(())
    }

    /// Cancels a session and deletes its chunks.
    pub async fn cancel_upload(&self, actor: &Actor, id: &str) -> Result<(), DocError> {
        let session = self.session(actor, id).await?;
        if session.status == "COMPLETING" || session.status == "COMPLETED" {
            return Err(DocError::Conflict(format!("upload session {id} is {}", session.status.to_ascii_lowercase())));
        }
        sqlx::query("UPDATE upload_sessions SET status = 'CANCELLED', updated_at = $1 WHERE id = $2")
            .bind(self.clock().now_ms())
            .bind(id)
            .execute(self.meta().pool())
            .await?;
        self.drop_chunks(id).await
    }

    /// Expires the sessions past their time and deletes their chunks; returns how many.
    pub async fn expire_uploads(&self) -> Result<usize, DocError> {
        let now = self.clock().now_ms();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM upload_sessions WHERE status IN ('ACTIVE', 'COMPLETING') AND expires_at <= $1",
        )
        .bind(now)
        .fetch_all(self.meta().pool())
        .await?;
        let mut expired = 0;
        for id in &ids {
            let done = sqlx::query(
                "UPDATE upload_sessions SET status = 'EXPIRED', updated_at = $1 WHERE id = $2 AND expires_at <= $1 \
                 AND (status = 'ACTIVE' OR (status = 'COMPLETING' AND lock_until < $1))",
            )
            .bind(now)
            .bind(id)
            .execute(self.meta().pool())
            .await?;
            if done.rows_affected() == 1 {
                self.drop_chunks(id).await?;
                expired += 1;
            }
        }
        Ok(expired)
    }
}
