-- tus 1.0 uploads share the session store with the chunked sessions: a tus upload's
-- segments are its PATCH requests in order (upload_chunks.n), its offset their total size.

ALTER TABLE upload_sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'chunks';
-- The Upload-Metadata header as the client sent it, echoed on HEAD.
ALTER TABLE upload_sessions ADD COLUMN tus_metadata TEXT;
