-- Lifecycle: archived documents, stored copies waiting to be deleted, and retention runs.

-- Set while a document is archived (moved to an archive tier by a policy); cleared when
-- it is restored.
ALTER TABLE documents ADD COLUMN archived_at BIGINT;
ALTER TABLE documents ADD COLUMN archive_id TEXT;
-- The last lifecycle action that failed on the document, cleared when one succeeds. An
-- expiration waits while it is set: a document whose move failed is never deleted.
ALTER TABLE documents ADD COLUMN lifecycle_error TEXT;

-- Stored copies that no blob row points to, or may soon not: the source of a tier
-- migration once the metadata points at the target (kept a while for reads in flight),
-- and the target a migration is writing (claimed by the migration when it switches the
-- metadata). A copy is deleted once not_before has passed and no blob row refers to it,
-- so a crash at any step of a migration leaves either a readable blob or garbage to
-- collect, never a missing one.
CREATE TABLE blob_garbage (
    tier        TEXT NOT NULL,
    object_key  TEXT NOT NULL,
    not_before  BIGINT NOT NULL,
    PRIMARY KEY (tier, object_key)
);
CREATE INDEX blob_garbage_due ON blob_garbage (not_before);

-- One run of a retention policy. A run that did not finish is resumed from its cursor
-- (documents are visited in id order) by the next run of the same policy.
CREATE TABLE retention_runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    policy        TEXT NOT NULL,
    dry_run       BIGINT NOT NULL,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    cursor        BIGINT NOT NULL DEFAULT 0,
    matched       BIGINT NOT NULL DEFAULT 0,
    transitioned  BIGINT NOT NULL DEFAULT 0,
    expired       BIGINT NOT NULL DEFAULT 0,
    bytes_moved   BIGINT NOT NULL DEFAULT 0,
    errors        BIGINT NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX retention_runs_policy ON retention_runs (policy, id DESC);
