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
use crate::store::{Dialect, StoreError};

mod routed;
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

/// Inside a write: refuses with `Conflict` unless the session still takes data, and with
/// `SessionNotFound` when it is not here (it was handed over to another shard). On
/// Postgres the session's row is held (`FOR SHARE`) until the write ends, so a hand-over
/// waits for it, and it waits for a hand-over.
async fn ensure_active(tx: &mut sqlx::AnyConnection, dialect: Dialect, id: &str) -> Result<(), DocError> {
    let lock = if dialect == Dialect::Postgres { " FOR SHARE" } else { "" };
    let status: Option<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT status FROM upload_sessions WHERE id = $1{lock}")))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status.as_deref() {
        Some("ACTIVE") => Ok(()),
        Some(_) => Err(DocError::Conflict(format!("upload session {id} stopped taking data"))),
        None => Err(DocError::SessionNotFound(id.to_owned())),
    }
}

/// Whether session `id` is still on this shard (a live resharding may hand it over).
async fn still_here(pool: &sqlx::AnyPool, id: &str) -> Result<(), DocError> {
    let here: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM upload_sessions WHERE id = $1").bind(id).fetch_optional(pool).await?;
    here.map(drop).ok_or_else(|| DocError::SessionNotFound(id.to_owned()))
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
        // Counted while the session was here: a hand-over takes it with its chunks at once.
        still_here(self.meta().pool(), id).await?;
        let status = if s.status == "ACTIVE" && self.clock().now_ms() >= s.expires_at { "EXPIRED" } else { &s.status };
        // A completed session received every chunk (its chunks went into the document).
        let (count, bytes) = if s.status == "COMPLETED" { (s.total_chunks, s.total_size) } else { (count, bytes) };
        #[allow(clippy::cast_precision_loss)]
        let progress = if bytes >= s.total_size && count == s.total_chunks {
            100.0
        } else if s.total_size == 0 {
            0.0
        } else {
            // Rounded down: 100 only once every byte is in.
            (bytes as f64 * 10_000.0 / s.total_size as f64).floor().min(9_999.0) / 100.0
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

    /// Records a new session row (`insert`, binding `$1` to the id) under a key drawn by
    /// `draw` that the routing sends here (while documents move, under both tables), once
    /// this replica may record here at all (it knows any move under way).
    async fn insert_session(
        &self,
        draw: impl Fn() -> String,
        insert: impl for<'q> Fn(
            sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>
        + Sync,
        sql: &str,
    ) -> Result<String, DocError> {
        let id = self.new_key(draw)?;
        self.meta()
            .write(|mut tx| {
                let (id, insert, sql) = (&id, &insert, sql);
                Box::pin(async move {
                    let r = async {
                        self.check_move(&mut tx).await?;
                        insert(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).bind(id)).execute(&mut *tx).await?;
                        Ok::<_, DocError>(())
                    }
                    .await;
                    (tx, r)
                })
            })
            .await?;
        Ok(id)
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
        let now = self.clock().now_ms();
        let (tags, metadata) =
            (json!(prepared.new.tags).to_string(), Value::Object(prepared.new.metadata.clone()).to_string());
        let id = self
            .insert_session(
                || uuid::Uuid::new_v4().to_string(),
                |query| {
                    query
                        .bind(actor.user.clone())
                        .bind(prepared.new.filename.clone())
                        .bind(init.content_type.clone())
                        .bind(prepared.new.title.clone())
                        .bind(prepared.new.description.clone())
                        .bind(tags.clone())
                        .bind(metadata.clone())
                        .bind(i(init.total_size))
                        .bind(i(chunk_size))
                        .bind(i(total_chunks))
                        .bind(expected.clone())
                        .bind(now)
                        .bind(now + SESSION_TTL_MS)
                },
                "INSERT INTO upload_sessions (id, owner, filename, content_type, title, description, tags, metadata, \
                 total_size, chunk_size, total_chunks, expected_sha256, status, created_at, updated_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'ACTIVE', $13, $13, $14)",
            )
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
        crate::documents::Library::single(self.clone()).put_chunk(actor, id, n, checksum, body).await
    }

    /// The length chunk `n` of session `id` must have, once the session takes it.
    pub(crate) async fn chunk_length(&self, actor: &Actor, id: &str, n: u64) -> Result<u64, DocError> {
        let session = self.chunked_session(actor, id).await?;
        self.check_active(id, &session)?;
        if n >= session.total_chunks {
            return Err(DocError::Invalid(format!(
                "chunk {n} is out of bounds: this session has chunks 0 to {}",
                session.total_chunks - 1
            )));
        }
        Ok(session.chunk_len(n))
    }

    /// Stores the bytes of chunk `n` (which must be `want` bytes long, and match `checksum`
    /// when given) in the default tier, without recording them: nothing is kept on failure.
    pub(crate) async fn store_chunk(
        &self,
        id: &str,
        n: u64,
        want: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<StoredBlob, DocError> {
        let expected_sha = checksum.map(parse_checksum).transpose()?;
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
        Ok(stored)
    }

    /// Records stored chunk `n` of session `id`, in place of any sent before (whose bytes
    /// are deleted). `SessionNotFound` when the session was handed over to another shard:
    /// the caller records it there.
    pub(crate) async fn record_chunk(&self, id: &str, n: u64, stored: &StoredBlob) -> Result<(), DocError> {
        let dialect = self.meta().dialect();
        let replaced = self
            .meta()
            .write(|mut tx| {
                Box::pin(async move {
                    let r = async {
                        ensure_active(&mut tx, dialect, id).await?;
                        let old: Option<(String, String)> = sqlx::query_as(
                            "DELETE FROM upload_chunks WHERE session_id = $1 AND n = $2 RETURNING tier, object_key",
                        )
                        .bind(id)
                        .bind(i(n))
                        .fetch_optional(&mut *tx)
                        .await?;
                        insert_chunk(&mut tx, id, n, stored, self.clock().now_ms()).await?;
                        Ok::<_, DocError>(old)
                    }
                    .await;
                    (tx, r)
                })
            })
            .await?;
        if let Some((tier, key)) = replaced {
            self.drop_object(&tier, &key).await;
        }
        Ok(())
    }

    /// Deletes a chunk's stored bytes (kept, when the tier is gone, for its collector).
    pub(crate) async fn drop_object(&self, tier: &str, key: &str) {
        if let Ok(tier) = self.tiers().get(tier) {
            tier.delete(key).await.ok();
        }
    }

    /// The chunks received so far, in order.
    pub async fn uploaded_chunks(&self, actor: &Actor, id: &str) -> Result<Vec<Chunk>, DocError> {
        self.session(actor, id).await?;
        let rows = sqlx::query("SELECT n, size, sha256 FROM upload_chunks WHERE session_id = $1 ORDER BY n")
            .bind(id)
            .fetch_all(self.meta().pool())
            .await?;
        still_here(self.meta().pool(), id).await?;
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
        crate::documents::Library::single(self.clone()).complete_upload(actor, id).await
    }

    /// [`Self::complete_upload`], recording the document on `dest` (on a sharded
    /// platform, where the routing sends a new document; the session may be elsewhere).
    pub(crate) async fn complete_upload_into(
        &self,
        actor: &Actor,
        id: &str,
        dest: &Documents,
    ) -> Result<Completion, DocError> {
        let session = self.chunked_session(actor, id).await?;
        if let Some(done) = completed(&session) {
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
        self.finish(actor, id, &session, dest).await.map(|uploaded| Completion::New(Box::new(uploaded)))
    }

    /// The answer to completing again a session completed as `document`, which is on this
    /// shard.
    pub(crate) async fn uploaded_before(&self, actor: &Actor, document: i64) -> Result<Uploaded, DocError> {
        let document = self.get(actor, document).await?;
        let version_number = document.current_version;
        Ok(Uploaded { document, deduplicated: false, version_number })
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
    /// the document on `dest` and settles the session.
    async fn finish(
        &self,
        actor: &Actor,
        id: &str,
        session: &SessionRow,
        dest: &Documents,
    ) -> Result<Uploaded, DocError> {
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
            // Handed over to another shard meanwhile, or being completed by another replica.
            still_here(self.meta().pool(), id).await?;
            return Err(DocError::Conflict(format!("upload session {id} is being completed")));
        }
        let result = self.assemble(actor, id, session, dest).await;
        let (status, document_id) = match &result {
            Ok(uploaded) => ("COMPLETED", Some(uploaded.document.id)),
            Err(_) => ("ACTIVE", None),
        };
        self.settle_session(id, status, document_id, result.is_ok()).await?;
        result
    }

    /// Gives session `id` its `status` (and document), deleting its chunks' rows with it
    /// when `drop` (and their bytes after): a session is never handed over between the two.
    async fn settle_session(
        &self,
        id: &str,
        status: &str,
        document_id: Option<i64>,
        drop: bool,
    ) -> Result<(), DocError> {
        let now = self.clock().now_ms();
        let dropped = self
            .meta()
            .write(|mut tx| {
                Box::pin(async move {
                    let r = async {
                        sqlx::query(
                            "UPDATE upload_sessions SET status = $1, lock_until = NULL, \
                             document_id = COALESCE($2, document_id), updated_at = $3 WHERE id = $4",
                        )
                        .bind(status)
                        .bind(document_id)
                        .bind(now)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                        if !drop {
                            return Ok(Vec::new());
                        }
                        let rows: Vec<(String, String)> = sqlx::query_as(
                            "DELETE FROM upload_chunks WHERE session_id = $1 RETURNING tier, object_key",
                        )
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await?;
                        Ok::<_, DocError>(rows)
                    }
                    .await;
                    (tx, r)
                })
            })
            .await?;
        for (tier, key) in &dropped {
            self.drop_object(tier, key).await;
        }
        Ok(())
    }

    async fn assemble(
        &self,
        actor: &Actor,
        id: &str,
        session: &SessionRow,
        dest: &Documents,
    ) -> Result<Uploaded, DocError> {
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
        let blob: StoredBlob = dest.store_bytes(&prepared.content_type, bytes).await?;
        if blob.size != session.total_size {
            dest.discard(&blob).await;
            return Err(DocError::Invalid(format!(
                "the chunks hold {} bytes, not the {} announced",
                blob.size, session.total_size
            )));
        }
        if let Some(expected) = &session.expected_sha256
            && *expected != blob.sha256
        {
            dest.discard(&blob).await;
            return Err(DocError::ChecksumMismatch(format!(
                "the assembled file's SHA-256 is sha256:{}, not the sha256:{expected} announced",
                blob.sha256
            )));
        }
        dest.record_upload(actor, &prepared, blob).await
    }

    /// Cancels a session and deletes its chunks.
    pub async fn cancel_upload(&self, actor: &Actor, id: &str) -> Result<(), DocError> {
        self.session(actor, id).await?;
        let cancelled = sqlx::query(
            "UPDATE upload_sessions SET status = 'CANCELLED', updated_at = $1 WHERE id = $2 \
             AND status NOT IN ('COMPLETING', 'COMPLETED')",
        )
        .bind(self.clock().now_ms())
        .bind(id)
        .execute(self.meta().pool())
        .await?;
        if cancelled.rows_affected() != 1 {
            // Handed over to another shard meanwhile, or being completed.
            let session = self.session(actor, id).await?;
            return Err(DocError::Conflict(format!("upload session {id} is {}", session.status.to_ascii_lowercase())));
        }
        self.settle_session(id, "CANCELLED", None, true).await
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
                self.settle_session(id, "EXPIRED", None, true).await?;
                expired += 1;
            }
        }
        Ok(expired)
    }
}

/// What completing a session came to.
#[derive(Debug)]
pub(crate) enum Completion {
    /// The document it assembled now.
    New(Box<Uploaded>),
    /// It was completed before, as this document (which may be on another shard by now).
    Before(i64),
}

/// A session completed before, as the document it made.
fn completed(session: &SessionRow) -> Option<Completion> {
    (session.status == "COMPLETED").then_some(session.document_id).flatten().map(Completion::Before)
}
