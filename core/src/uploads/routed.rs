//! Upload sessions on a sharded platform: a session's key routes it to its shard, and a
//! session handed over to another shard by a live resharding is followed there, even in
//! the middle of a request (a chunk stored while its session moved is recorded where the
//! session went).

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;

use super::tus::{TusStep, TusUpload};
use super::{Chunk, Completion, Initiate, Session};
use crate::documents::library::MAX_HOPS;
use crate::documents::{Actor, DocError, Documents, Library, Uploaded};

impl Library {
    /// Runs `op` on the shard holding upload session `id`, starting at shard `from` (by
    /// default the one the table in force routes the key to) and following the markers of
    /// hand-overs; returns the index of the shard `op` was answered on, and its answer.
    async fn find_session<'s, T>(
        &'s self,
        id: &str,
        from: Option<usize>,
        op: impl Fn(&'s Documents) -> BoxFuture<'s, Result<T, DocError>>,
    ) -> Result<(usize, T), DocError> {
        let mut index = from.unwrap_or_else(|| self.table().shard_of_key(id));
        for _ in 0..MAX_HOPS {
            let shard = &self.shards()[index];
            match op(shard).await {
                Err(DocError::SessionNotFound(missing)) if missing == id => {
                    let Some(name) = crate::resharding::session_moved_to(shard.meta(), id).await? else {
                        return Err(DocError::SessionNotFound(missing));
                    };
                    index = self.names().iter().position(|n| *n == name).ok_or_else(|| {
                        DocError::Unavailable(format!(
                            "upload session {id} moved to shard {name}, which this replica has not loaded yet; try \
                             again shortly"
                        ))
                    })?;
                }
                other => return other.map(|value| (index, value)),
            }
        }
        Err(DocError::Unavailable(format!("upload session {id} is moving between shards; try again shortly")))
    }

    /// Runs `op` on the shard holding upload session `id` (see [`Library::at`] for documents).
    async fn at_session<'s, T>(
        &'s self,
        id: &str,
        op: impl Fn(&'s Documents) -> BoxFuture<'s, Result<T, DocError>>,
    ) -> Result<T, DocError> {
        self.find_session(id, None, op).await.map(|(_, value)| value)
    }

    /// Where the document of a session on `shard` is recorded: on the session's own shard
    /// while the routing sends new documents there, else (a shard a move drains) where the
    /// routing sends a new document.
    fn home_of_session<'s>(&'s self, shard: &'s Documents) -> &'s Documents {
        let names = self.names();
        let index = self.shards().iter().position(|s| std::ptr::eq(s, shard));
        let stays = index.is_some_and(|i| {
            i < self.table().names().len() && self.next().is_none_or(|next| next.names().contains(&names[i]))
        });
        if stays { shard } else { self.for_new() }
    }

    /// Starts a chunked upload session, on the shard a new document would go to.
    pub async fn initiate_upload(&self, actor: &Actor, init: Initiate) -> Result<Session, DocError> {
        self.for_new().initiate_upload(actor, init).await
    }

    /// A session's state.
    pub async fn upload_status(&self, actor: &Actor, id: &str) -> Result<Session, DocError> {
        self.at_session(id, |shard| Box::pin(shard.upload_status(actor, id))).await
    }

    /// Stores chunk `n` of session `id` (see [`Documents::put_chunk`]); when the session is
    /// handed over while the chunk arrives, the chunk is recorded where it went.
    pub async fn put_chunk(
        &self,
        actor: &Actor,
        id: &str,
        n: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<Session, DocError> {
        let (index, want) = self.find_session(id, None, |shard| Box::pin(shard.chunk_length(actor, id, n))).await?;
        let stored = self.shards()[index].store_chunk(id, n, want, checksum, body).await?;
        let at = match self.find_session(id, Some(index), |shard| Box::pin(shard.record_chunk(id, n, &stored))).await {
            Ok((at, ())) => at,
            Err(e) => {
                self.shards()[index].drop_object(&stored.tier, &stored.object_key).await;
                return Err(e);
            }
        };
        self.find_session(id, Some(at), |shard| Box::pin(shard.upload_status(actor, id))).await.map(|(_, s)| s)
    }

    /// The chunks of session `id` received so far.
    pub async fn uploaded_chunks(&self, actor: &Actor, id: &str) -> Result<Vec<Chunk>, DocError> {
        self.at_session(id, |shard| Box::pin(shard.uploaded_chunks(actor, id))).await
    }

    /// The chunk numbers of session `id` still to send.
    pub async fn missing_chunks(&self, actor: &Actor, id: &str) -> Result<Vec<u64>, DocError> {
        self.at_session(id, |shard| Box::pin(shard.missing_chunks(actor, id))).await
    }

    /// Assembles session `id`'s chunks into a document, recorded on the session's shard
    /// (see `home_of_session`); completing it again answers with that document,
    /// wherever it is now.
    pub async fn complete_upload(&self, actor: &Actor, id: &str) -> Result<Uploaded, DocError> {
        let (_, done) = self
            .find_session(id, None, |shard| {
                Box::pin(shard.complete_upload_into(actor, id, self.home_of_session(shard)))
            })
            .await?;
        match done {
            Completion::New(uploaded) => Ok(*uploaded),
            Completion::Before(document) => {
                self.at(document, |shard| Box::pin(shard.uploaded_before(actor, document))).await
            }
        }
    }

    /// Cancels session `id` and deletes its chunks.
    pub async fn cancel_upload(&self, actor: &Actor, id: &str) -> Result<(), DocError> {
        self.at_session(id, |shard| Box::pin(shard.cancel_upload(actor, id))).await
    }

    /// Creates a tus upload, on the shard a new document would go to.
    pub async fn tus_create(&self, actor: &Actor, length: u64, metadata: Option<&str>) -> Result<TusUpload, DocError> {
        self.for_new().tus_create(actor, length, metadata).await
    }

    /// A tus upload's offset, length and expiry.
    pub async fn tus_status(&self, actor: &Actor, id: &str) -> Result<TusUpload, DocError> {
        self.at_session(id, |shard| Box::pin(shard.tus_status(actor, id))).await
    }

    /// Appends a PATCH's bytes to tus upload `id` (see [`Documents::tus_append`]); when the
    /// upload is handed over while the bytes arrive, they are recorded where it went.
    pub async fn tus_append(
        &self,
        actor: &Actor,
        id: &str,
        offset: u64,
        checksum: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<TusUpload, DocError> {
        let (index, step) = self.find_session(id, None, |shard| Box::pin(shard.tus_begin(actor, id, offset))).await?;
        let left = match step {
            TusStep::Done(upload) => return Ok(*upload),
            TusStep::Append { left } => left,
        };
        let (stored, broken) = self.shards()[index].tus_store(id, left, checksum, body).await?;
        let appended =
            self.find_session(id, Some(index), |shard| Box::pin(shard.append_segment(id, offset, &stored))).await;
        let at = match appended {
            Ok((at, ())) => at,
            Err(e) => {
                self.shards()[index].drop_object(&stored.tier, &stored.object_key).await;
                return Err(e);
            }
        };
        let size = stored.size;
        if let Some(e) = broken {
            return Err(DocError::Invalid(format!(
                "reading the upload failed after {size} bytes, which were kept: {e}"
            )));
        }
        self.find_session(id, Some(at), |shard| {
            Box::pin(shard.tus_appended(actor, id, (offset, size), self.home_of_session(shard)))
        })
        .await
        .map(|(_, upload)| upload)
    }

    /// Terminates tus upload `id` and deletes what it received.
    pub async fn tus_terminate(&self, actor: &Actor, id: &str) -> Result<(), DocError> {
        self.at_session(id, |shard| Box::pin(shard.tus_terminate(actor, id))).await
    }
}
