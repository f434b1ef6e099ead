//! The tus 1.0 resumable upload protocol (core, creation, termination, checksum and
//! expiration), over the same session store as the chunked sessions.
//!
//! A tus upload is a session whose segments are its PATCH requests in order: segment `n`
//! starts where segment `n - 1` ended, and the upload's offset is their total size. Each
//! segment is stored as its own object in the default tier; the SHA-256 of the whole file
//! is computed while the segments are streamed into the document's blob when the last byte
//! arrives, and becomes its deduplication key. The offset check and the append happen in
//! one transaction, so two replicas racing on one upload cannot both append at one offset.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value, json};

use super::{SESSION_TTL_MS, SessionRow, ensure_active, i, insert_chunk, received, still_here};
use crate::blob::StoredBlob;
use crate::documents::{Actor, DocError, Documents, NewDocument, Uploaded};

/// The protocol version this server speaks.
pub const VERSION: &str = "1.0.0";
/// The extensions this server supports, as `Tus-Extension` lists them.
pub const EXTENSIONS: &str = "creation,creation-with-upload,termination,checksum,expiration";
/// The checksum algorithms accepted in `Upload-Checksum`.
pub const CHECKSUM_ALGORITHMS: &str = "sha256";

/// A tus upload as the protocol's headers show it.
#[derive(Clone, Debug, PartialEq)]
pub struct TusUpload {
    pub id: String,
    /// How many bytes were received (`Upload-Offset`).
    pub offset: u64,
    /// How many bytes the upload has (`Upload-Length`).
    pub length: u64,
    /// When an unfinished upload expires, in ms since the epoch (`Upload-Expires`).
    pub expires_at_ms: i64,
    /// `Upload-Metadata` as the client sent it.
    pub metadata: Option<String>,
    /// The document the upload became, once complete.
    pub document_id: Option<i64>,
    /// The document, when this very request completed the upload.
    pub completed: Option<Uploaded>,
}

/// Decodes `Upload-Metadata`: comma-separated `key base64value` pairs (the value may be
/// absent). Keys are unique, without spaces or commas; values must be UTF-8 text here.
pub fn parse_metadata(header: &str) -> Result<Vec<(String, String)>, DocError> {
    let bad = |why: String| DocError::Invalid(format!("Upload-Metadata: {why}"));
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in header.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut parts = pair.split(' ').filter(|p| !p.is_empty());
        let key = parts.next().unwrap_or_default();
        let value = match parts.next() {
            Some(encoded) => {
                let raw = STANDARD.decode(encoded).map_err(|_| bad(format!("the value of {key:?} is not base64")))?;
                String::from_utf8(raw).map_err(|_| bad(format!("the value of {key:?} is not UTF-8 text")))?
            }
            None => String::new(),
        };
        if parts.next().is_some() {
            return Err(bad(format!("{pair:?} is not `key base64value`")));
        }
        if pairs.iter().any(|(k, _)| k == key) {
            return Err(bad(format!("key {key:?} appears twice")));
        }
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

/// What the document says about itself, from the metadata tus clients send: `filename`
/// (or `name`), `filetype` (or `type`, `contentType`), `title`, `description`, `tags`
/// (comma-separated); any other key becomes custom metadata.
fn new_document(pairs: Vec<(String, String)>) -> NewDocument {
    let mut new = NewDocument { filename: "upload".to_owned(), ..NewDocument::default() };
    let mut custom = Map::new();
    for (key, value) in pairs {
        match key.as_str() {
            "filename" | "name" => new.filename = value,
            "filetype" | "type" | "contentType" | "content-type" => new.content_type = Some(value),
            "title" => new.title = Some(value),
            "description" => new.description = Some(value),
            "tags" => {
                new.tags = value.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect();
            }
            _ => {
                custom.insert(key, Value::String(value));
            }
        }
    }
    new.metadata = custom;
    new
}

/// Decodes `Upload-Checksum: sha256 <base64 digest>` into the digest's hex form.
pub fn parse_checksum(header: &str) -> Result<String, DocError> {
    let (algorithm, digest) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| DocError::Invalid("Upload-Checksum must be `<algorithm> <base64 digest>`".to_owned()))?;
    if !algorithm.eq_ignore_ascii_case("sha256") {
        return Err(DocError::Invalid(format!(
            "Upload-Checksum algorithm {algorithm:?} is not supported; use one of: {CHECKSUM_ALGORITHMS}"
        )));
    }
    match STANDARD.decode(digest.trim()) {
        Ok(bytes) if bytes.len() == 32 => Ok(hex::encode(bytes)),
        _ => Err(DocError::Invalid("Upload-Checksum's digest is not a base64 SHA-256".to_owned())),
    }
}

/// Ends a body at its first error instead of failing it, and remembers the error: the bytes
/// that arrived before a dropped connection are kept, so the client resumes after them.
fn until_error(
    body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    failure: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send {
    body.scan((), move |(), item| {
        let next = match item {
            Ok(bytes) => Some(Ok(bytes)),
            Err(e) => {
                if let Ok(mut slot) = failure.lock() {
                    *slot = Some(e);
                }
                None
            }
        };
        futures::future::ready(next)
    })
}

fn tus_upload(id: &str, session: &SessionRow, offset: u64) -> TusUpload {
    TusUpload {
        id: id.to_owned(),
        offset,
        length: session.total_size,
        expires_at_ms: session.expires_at,
        metadata: session.tus_metadata.clone(),
        document_id: session.document_id,
        completed: None,
    }
}

impl Documents {
    async fn tus_session(&self, actor: &Actor, id: &str) -> Result<SessionRow, DocError> {
        let session = self.session(actor, id).await?;
        if session.protocol == "tus" { Ok(session) } else { Err(DocError::SessionNotFound(id.to_owned())) }
    }

    async fn tus_view(&self, id: &str, session: &SessionRow) -> Result<TusUpload, DocError> {
        let offset = if session.status == "COMPLETED" {
            session.total_size
        } else {
            let (_, bytes) = received(self.meta().pool(), id).await?;
            // Counted while the upload was here: a hand-over takes it with its segments.
            still_here(self.meta().pool(), id).await?;
            bytes
        };
        Ok(tus_upload(id, session, offset))
    }

    /// Creates a tus upload of `length` bytes. An empty upload is complete at once.
    pub async fn tus_create(&self, actor: &Actor, length: u64, metadata: Option<&str>) -> Result<TusUpload, DocError> {
        let pairs = metadata.map(parse_metadata).transpose()?.unwrap_or_default();
        let prepared = Self::prepare(new_document(pairs))?;
        if length > self.max_upload {
            return Err(DocError::TooLarge { limit: self.max_upload });
        }
        let now = self.clock().now_ms();
        let (tags, fields) =
            (json!(prepared.new.tags).to_string(), Value::Object(prepared.new.metadata.clone()).to_string());
        let id = self
            .insert_session(
                || uuid::Uuid::new_v4().simple().to_string(),
                |query| {
                    query
                        .bind(actor.user.clone())
                        .bind(prepared.new.filename.clone())
                        .bind(prepared.new.content_type.clone())
                        .bind(prepared.new.title.clone())
                        .bind(prepared.new.description.clone())
                        .bind(tags.clone())
                        .bind(fields.clone())
                        .bind(i(length))
                        .bind(now)
                        .bind(now + SESSION_TTL_MS)
                        .bind(metadata.map(str::to_owned))
                },
                "INSERT INTO upload_sessions (id, owner, filename, content_type, title, description, tags, metadata, \
                 total_size, chunk_size, total_chunks, status, created_at, updated_at, expires_at, protocol, \
                 tus_metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, 'ACTIVE', $10, $10, $11, 'tus', $12)",
            )
            .await?;
        if length == 0 {
            return self.tus_append(actor, &id, 0, None, futures::stream::empty()).await;
        }
        self.tus_status(actor, &id).await
    }

    /// A tus upload's offset, length and expiry (`HEAD`). An expired or terminated upload
    /// is gone.
    pub async fn tus_status(&self, actor: &Actor, id: &str) -> Result<TusUpload, DocError> {
        let session = self.tus_session(actor, id).await?;
        if session.status != "COMPLETED" && session.status != "COMPLETING" {
            self.check_active(id, &session)?;
        }
        self.tus_view(id, &session).await
    }

    /// Appends the bytes of a PATCH at `offset`, which must be the upload's offset. With a
    /// `checksum` (`sha256 <base64>`) the bytes are kept only if they match; without one,
    /// the bytes that arrived before a broken connection are kept. The request that brings
    /// the last byte assembles the document.
    pub async fn tus_append(
        &self,
        actor: &Actor,
        id: &str,
        offset: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<TusUpload, DocError> {
        crate::documents::Library::single(self.clone()).tus_append(actor, id, offset, checksum, body).await
    }

    /// Where a PATCH at `offset` stands: the upload complete already (answered as it is),
    /// or `left` bytes to go.
    pub(crate) async fn tus_begin(&self, actor: &Actor, id: &str, offset: u64) -> Result<TusStep, DocError> {
        let session = self.tus_session(actor, id).await?;
        if session.status == "COMPLETED" {
            return if offset == session.total_size {
                self.tus_view(id, &session).await.map(|upload| TusStep::Done(Box::new(upload)))
            } else {
                Err(DocError::Conflict(format!(
                    "Upload-Offset {offset} does not match: the upload is complete at {}",
                    session.total_size
                )))
            };
        }
        self.check_active(id, &session)?;
        let (_, current) = received(self.meta().pool(), id).await?;
        // Counted while the upload was here: a hand-over takes it with its segments.
        still_here(self.meta().pool(), id).await?;
        if offset != current {
            return Err(DocError::Conflict(format!(
                "Upload-Offset {offset} does not match the upload's offset {current}"
            )));
        }
        Ok(TusStep::Append { left: session.total_size - current })
    }

    /// Stores a PATCH's bytes (at most `left`) in the default tier, without recording
    /// them: with a checksum, kept only whole and matching; without one, what arrived
    /// before a broken connection is kept, and the break returned beside it.
    pub(crate) async fn tus_store(
        &self,
        id: &str,
        left: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<(StoredBlob, Option<std::io::Error>), DocError> {
        let expected_sha = checksum.map(parse_checksum).transpose()?;
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
        let tier = self.tiers().default_tier();
        let stored = tier
            .write_under(&format!("uploads/{id}"), until_error(body, std::sync::Arc::clone(&failure)), false, left)
            .await
            .map_err(|e| match e {
                crate::blob::BlobError::TooLarge { .. } => DocError::Invalid(format!(
                    "the request carries more than the {left} bytes left of the upload's Upload-Length"
                )),
                other => DocError::from(other),
            })?;
        let broken = failure.lock().ok().and_then(|mut f| f.take());
        let discard = |reason: DocError| async {
            tier.delete(&stored.object_key).await.ok();
            Err(reason)
        };
        if let Some(sha) = &expected_sha {
            if let Some(e) = &broken {
                return discard(DocError::Invalid(format!("reading the upload failed: {e}"))).await;
            }
            if *sha != stored.sha256 {
                return discard(DocError::ChecksumMismatch(format!(
                    "the request's SHA-256 is sha256:{}, not the one in Upload-Checksum",
                    stored.sha256
                )))
                .await;
            }
        }
        Ok((stored, broken))
    }

    /// After a PATCH's `size` bytes at `offset` were recorded here: the upload's state or,
    /// with its last byte, the document assembled on `dest`.
    pub(crate) async fn tus_appended(
        &self,
        actor: &Actor,
        id: &str,
        (offset, size): (u64, u64),
        dest: &Documents,
    ) -> Result<TusUpload, DocError> {
        let session = self.tus_session(actor, id).await?;
        if offset + size < session.total_size {
            return self.tus_status(actor, id).await;
        }
        let session = self.takeover(id, session)?;
        let uploaded = self.finish(actor, id, &session, dest).await?;
        Ok(TusUpload {
            document_id: Some(uploaded.document.id),
            completed: Some(uploaded),
            ..tus_upload(id, &session, session.total_size)
        })
    }

    /// Records a segment, if the upload is still active and still at `offset`. A segment
    /// of no bytes is not recorded (its object goes). `SessionNotFound` when the upload was
    /// handed over to another shard: the caller records it there.
    pub(crate) async fn append_segment(
        &self,
        id: &str,
        offset: u64,
        stored: &crate::blob::StoredBlob,
    ) -> Result<(), DocError> {
        if stored.size == 0 {
            self.drop_object(&stored.tier, &stored.object_key).await;
            return Ok(());
        }
        let dialect = self.meta().dialect();
        self.meta()
            .write(|mut tx| {
                Box::pin(async move {
                    let r = async {
                        ensure_active(&mut tx, dialect, id).await?;
                        let (segments, bytes) = received(&mut *tx, id).await?;
                        if bytes != offset {
                            return Err(DocError::Conflict(format!(
                                "Upload-Offset {offset} does not match the upload's offset {bytes}: another request \
                                 appended first"
                            )));
                        }
                        insert_chunk(&mut tx, id, segments, stored, self.clock().now_ms()).await
                    }
                    .await;
                    (tx, r)
                })
            })
            .await
    }

    /// Terminates a tus upload and deletes what it received.
    pub async fn tus_terminate(&self, actor: &Actor, id: &str) -> Result<(), DocError> {
        self.tus_session(actor, id).await?;
        self.cancel_upload(actor, id).await
    }
}

/// Where a PATCH stands before its bytes are read.
#[derive(Debug)]
pub(crate) enum TusStep {
    /// The upload was complete already: this is the answer.
    Done(Box<TusUpload>),
    /// The bytes still to come.
    Append { left: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pairs_decode_and_map_onto_the_document() {
        // The example of the tus specification, plus the keys clients commonly send.
        let pairs = parse_metadata("filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential").unwrap();
        assert_eq!(
            pairs,
            vec![("filename".into(), "world_domination_plan.pdf".into()), ("is_confidential".into(), String::new())]
        );
        let new =
            new_document(parse_metadata("name YS50eHQ=, filetype dGV4dC9wbGFpbg==, tags YSwgYg==, team b3Bz").unwrap());
        assert_eq!(new.filename, "a.txt");
        assert_eq!(new.content_type.as_deref(), Some("text/plain"));
        assert_eq!(new.tags, vec!["a", "b"]);
        assert_eq!(new.metadata.get("team"), Some(&Value::String("ops".into())));
    }

    #[test]
    fn bad_metadata_is_refused_precisely() {
        for (header, why) in [
            ("filename !!!", "not base64"),
            ("filename /w==", "not UTF-8"),
            ("a YQ==,a Yg==", "appears twice"),
            ("a YQ== Yg==", "is not `key base64value`"),
        ] {
            let err = parse_metadata(header).unwrap_err().to_string();
            assert!(err.contains(why), "{header}: {err}");
        }
    }

    #[test]
    fn checksums_are_sha256_in_base64() {
        let digest = STANDARD.encode([7u8; 32]);
        assert_eq!(parse_checksum(&format!("sha256 {digest}")).unwrap(), hex::encode([7u8; 32]));
        assert!(parse_checksum(&format!("md5 {digest}")).unwrap_err().to_string().contains("not supported"));
        assert!(parse_checksum("sha256 AAAA").is_err());
        assert!(parse_checksum("sha256").is_err());
    }
}
