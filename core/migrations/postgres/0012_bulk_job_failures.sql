-- An export whose ZIP could not be stored is tried again, by any replica, a few times;
-- then it fails for good, and says why.
ALTER TABLE bulk_jobs ADD COLUMN export_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE bulk_jobs ADD COLUMN failure TEXT;
