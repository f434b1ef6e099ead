-- Live resharding: documents handed over to another shard, and the move a shard is part of.

-- A document handed over to the shard named: a request routed here by a table older than
-- the move finds this row where the document was, and is sent on. Kept until every
-- replica routes by the table the move reached.
CREATE TABLE moved_documents (
    id        BIGINT PRIMARY KEY,
    shard     TEXT NOT NULL,
    moved_at  BIGINT NOT NULL
);

-- The routing version this shard's documents are being moved under while a move runs, in
-- one row that is always there. Recording a new document holds the row (FOR SHARE) and
-- goes ahead only on a replica that knows that version, which draws ids the move leaves
-- in place; the mover's update of the row waits for the records under way, so no document
-- appears behind the cursor of its listing. The mover records its progress here too: the
-- documents that leave this shard in all, and those handed over so far.
CREATE TABLE shard_routing (
    singleton        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    moving_to        TEXT,
    total_documents  BIGINT NOT NULL DEFAULT 0,
    moved_documents  BIGINT NOT NULL DEFAULT 0,
    moved_bytes      BIGINT NOT NULL DEFAULT 0,
    started_at       BIGINT,
    updated_at       BIGINT
);
INSERT INTO shard_routing (singleton) VALUES (TRUE);

-- Where a stored copy is referred to from: the garbage collector asks every shard.
CREATE INDEX blobs_object ON blobs (tier, object_key);
