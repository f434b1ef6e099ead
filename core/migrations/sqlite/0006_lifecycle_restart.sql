-- When a restore from the archive or a move on request last restarted a document's
-- lifecycle clock: transitions and archiving count their ages from then, so the next
-- retention run does not undo what a person asked for (deletion still counts from the
-- upload).
ALTER TABLE documents ADD COLUMN lifecycle_restarted_at BIGINT;
