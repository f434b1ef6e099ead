-- Documents, their versions, the content-addressed blobs they point to, and the outbox.
-- Times are milliseconds since the Unix epoch (BIGINT), so that the same queries run on
-- Postgres and on SQLite; flags are 0 or 1 for the same reason.

CREATE TABLE blobs (
    sha256       TEXT PRIMARY KEY,
    -- The object's key in its tier: unique per stored copy, so that a purge deleting one
    -- copy can never delete a copy a concurrent upload has just written.
    object_key   TEXT NOT NULL,
    tier         TEXT NOT NULL,
    size         BIGINT NOT NULL,
    stored_size  BIGINT NOT NULL,
    compression  TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE TABLE documents (
    id               BIGINT PRIMARY KEY,
    owner            TEXT NOT NULL,
    filename         TEXT NOT NULL,
    file_type        TEXT NOT NULL,
    content_type     TEXT NOT NULL,
    title            TEXT,
    description      TEXT,
    tags             TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    current_version  BIGINT NOT NULL,
    size             BIGINT NOT NULL,
    sha256           TEXT NOT NULL,
    legal_hold       BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    last_accessed_at BIGINT,
    deleted_at       BIGINT,
    deleted_by       TEXT
);
CREATE INDEX documents_listing ON documents (created_at DESC, id DESC);
CREATE INDEX documents_owner ON documents (owner, created_at DESC, id DESC);

CREATE TABLE document_tags (
    document_id BIGINT NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    tag         TEXT NOT NULL,
    PRIMARY KEY (document_id, tag)
);
CREATE INDEX document_tags_tag ON document_tags (tag, document_id);

CREATE TABLE versions (
    document_id        BIGINT NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    version            BIGINT NOT NULL,
    sha256             TEXT NOT NULL REFERENCES blobs (sha256),
    size               BIGINT NOT NULL,
    filename           TEXT NOT NULL,
    content_type       TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    created_by         TEXT NOT NULL,
    change_description TEXT,
    restored_from      BIGINT,
    PRIMARY KEY (document_id, version)
);
CREATE INDEX versions_sha256 ON versions (sha256);

CREATE TABLE outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    event_type   TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
