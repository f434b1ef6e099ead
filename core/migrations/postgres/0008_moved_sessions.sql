-- Live resharding moves upload sessions too: a session handed over to the shard named
-- leaves this row where it was, so that a request routed here by a table older than the
-- move is sent on. Kept until every replica routes by the table the move reached.
CREATE TABLE moved_sessions (
    id        TEXT PRIMARY KEY,
    shard     TEXT NOT NULL,
    moved_at  BIGINT NOT NULL
);
