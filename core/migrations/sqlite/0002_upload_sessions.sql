-- Chunked, resumable upload sessions. Their state and their completion lock live here, not
-- in a gateway process, so any replica can take the next chunk or finish the upload.

CREATE TABLE upload_sessions (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    filename        TEXT NOT NULL,
    content_type    TEXT,
    title           TEXT,
    description     TEXT,
    tags            TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    total_size      BIGINT NOT NULL,
    chunk_size      BIGINT NOT NULL,
    total_chunks    BIGINT NOT NULL,
    expected_sha256 TEXT,
    -- ACTIVE, COMPLETING (locked until lock_until), COMPLETED, CANCELLED, EXPIRED
    status          TEXT NOT NULL,
    lock_until      BIGINT,
    document_id     BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX upload_sessions_expiry ON upload_sessions (status, expires_at);

CREATE TABLE upload_chunks (
    session_id TEXT NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    n          BIGINT NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    tier       TEXT NOT NULL,
    object_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, n)
);
