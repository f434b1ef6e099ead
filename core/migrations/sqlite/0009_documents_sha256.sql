-- Whether a blob is still referred to is asked of versions (indexed since 0001) and of
-- documents: without this index, the documents' side read the whole table, once per blob
-- a purge or a resharding hand-over lets go (slow on a large shard, and in a serializable
-- transaction a read of the whole table conflicts with every concurrent document write).
CREATE INDEX documents_sha256 ON documents (sha256);
