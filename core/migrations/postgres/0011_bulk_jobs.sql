-- Bulk operations started through POST /api/v1/documents/bulk: what each does, the
-- documents it covers (fixed when it is created), how far it got, and which replica runs it
-- until when (a replica that stops checkpointing loses it to another).
CREATE TABLE bulk_jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    admin BIGINT NOT NULL,
    operation TEXT NOT NULL,
    tags TEXT NOT NULL,
    tier TEXT,
    ids TEXT NOT NULL,
    status TEXT NOT NULL,
    total BIGINT NOT NULL,
    processed BIGINT NOT NULL,
    succeeded BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    errors TEXT NOT NULL,
    -- An export's ZIP, once written: the storage tier and object key.
    result_tier TEXT,
    result_key TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX bulk_jobs_unfinished ON bulk_jobs (status, created_at);
