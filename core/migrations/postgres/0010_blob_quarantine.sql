-- A blob whose stored bytes no longer hash to its SHA-256 (or whose object is gone), as an
-- integrity scrub found it: downloads of it are refused, with the reason, until a scrub
-- finds it sound again (restored from a backup).
ALTER TABLE blobs ADD COLUMN quarantined_at BIGINT;
ALTER TABLE blobs ADD COLUMN quarantine_reason TEXT;
