//! Moving documents between metadata shards: a live resharding's steps.
//!
//! A move goes from the routing table in force to a new one. It runs in this order:
//!
//! 1. Every replica loads the new table beside the one in force (a [`Library`] that knows
//!    both): it keeps routing by the table in force, and gives new documents ids both tables
//!    send to the same shard, so nothing new lands where it would have to move.
//! 2. [`begin_move`] marks each source shard with the new table's version. A replica that
//!    does not know it may no longer record a new document there (it is told to retry), and
//!    the mark waits for the records under way, so the listing below misses nothing.
//! 3. [`moving`] lists, with a cursor, the documents the new table sends elsewhere, and
//!    [`hand_over`] moves them in batches: the batch is copied to its target and verified
//!    there (rows read back equal the source's, by digest) while the source holds it, then
//!    removed from the source in the same source transaction that leaves a marker naming
//!    the target. Ownership thus moves a batch at a time: a write waits for the hand-over and
//!    then finds the document gone and its marker, and a [`Library`] follows the marker
//!    ([`Library::at`]) and is answered by the target; nothing is written to a copy that is
//!    thrown away. A listing asks the target shards once more after every shard answered,
//!    so a document crossing during it is listed, and once.
//! 4. Once every batch is handed over, the new table is put in force (the flip); replicas
//!    still on the old one follow markers until they load it, and the markers go after.
//!
//! Reverting before the flip is a move back under the old table, by the same steps. A crash
//! leaves each batch either wholly on its source (a copy on the target that the next
//! hand-over replaces, and that listings name once) or wholly on its target.
//!
//! The copies in the tiers are shared by every shard: a blob row handed over refers to the
//! same stored copy, which stays; a shard's garbage collector (and a purge) deletes a copy
//! only when no other shard's blob row refers to it.
//!
//! Upload sessions (chunked and tus) move the same way ([`hand_over_sessions`]), with
//! their chunks' rows (the chunks' bytes are in the tiers): a chunk stored while its session
//! is handed over is recorded where the session went, and a session whose document is
//! being assembled is waited for. New sessions get keys both tables route alike.
//!
//! [`copy_batch`] copies without handing over (the source keeps the documents).
//!
//! Postgres only: a platform with more than one shard runs on Postgres. The batches move
//! through Postgres' own driver ([`Metadata::begin_native`]), which decodes the rows
//! without the generic driver's copy of every value.

use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};

use crate::documents::Library;
use crate::routing::RoutingTable;
use crate::store::{Dialect, Metadata, NativeTx, StoreError};

/// A column's type, as the copy reads and writes it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Int,
    Text,
}

/// One value of a copied row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

/// A table a document's rows live in.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// The columns the verification compares (all of them, but for `blobs`, whose copy in
    /// the tier may be the target's own).
    compared: usize,
    /// Selects the rows of the batch, given as one array of keys in place of `{ids}`.
    rows_of: &'static str,
    /// Ordered by.
    order: &'static str,
}

use Kind::{Int, Text};

const DOCUMENTS: Table = Table {
    name: "documents",
    columns: &[
        ("id", Int),
        ("owner", Text),
        ("filename", Text),
        ("file_type", Text),
        ("content_type", Text),
        ("title", Text),
        ("description", Text),
        ("tags", Text),
        ("metadata", Text),
        ("current_version", Int),
        ("size", Int),
        ("sha256", Text),
        ("legal_hold", Int),
        ("created_at", Int),
        ("updated_at", Int),
        ("last_accessed_at", Int),
        ("deleted_at", Int),
        ("deleted_by", Text),
        ("archived_at", Int),
        ("archive_id", Text),
        ("lifecycle_error", Text),
        ("lifecycle_restarted_at", Int),
    ],
    compared: 22,
    rows_of: "FROM documents t WHERE t.id = ANY({ids})",
    order: "t.id",
};

const VERSIONS: Table = Table {
    name: "versions",
    columns: &[
        ("document_id", Int),
        ("version", Int),
        ("sha256", Text),
        ("size", Int),
        ("filename", Text),
        ("content_type", Text),
        ("created_at", Int),
        ("created_by", Text),
        ("change_description", Text),
        ("restored_from", Int),
    ],
    compared: 10,
    rows_of: "FROM versions t WHERE t.document_id = ANY({ids})",
    order: "t.document_id, t.version",
};

const TAGS: Table = Table {
    name: "document_tags",
    columns: &[("document_id", Int), ("tag", Text)],
    compared: 2,
    rows_of: "FROM document_tags t WHERE t.document_id = ANY({ids})",
    order: "t.document_id, t.tag",
};

const BLOBS: Table = Table {
    name: "blobs",
    // The content's identity first: what the verification compares.
    columns: &[
        ("sha256", Text),
        ("size", Int),
        ("object_key", Text),
        ("tier", Text),
        ("stored_size", Int),
        ("compression", Text),
        ("created_at", Int),
        ("quarantined_at", Int),
        ("quarantine_reason", Text),
    ],
    compared: 2,
    rows_of: "FROM blobs t WHERE t.sha256 IN (SELECT v.sha256 FROM versions v WHERE v.document_id = ANY({ids}))",
    order: "t.sha256",
};

/// The blob rows of the contents given (in place of `{ids}`), where [`BLOBS`] finds those
/// of documents' versions.
const BLOBS_BY_SHA: Table = Table { rows_of: "FROM blobs t WHERE t.sha256 = ANY({ids})", ..BLOBS };

const SESSIONS: Table = Table {
    name: "upload_sessions",
    columns: &[
        ("id", Text),
        ("owner", Text),
        ("filename", Text),
        ("content_type", Text),
        ("title", Text),
        ("description", Text),
        ("tags", Text),
        ("metadata", Text),
        ("total_size", Int),
        ("chunk_size", Int),
        ("total_chunks", Int),
        ("expected_sha256", Text),
        ("status", Text),
        ("lock_until", Int),
        ("document_id", Int),
        ("created_at", Int),
        ("updated_at", Int),
        ("expires_at", Int),
        ("protocol", Text),
        ("tus_metadata", Text),
    ],
    compared: 20,
    rows_of: "FROM upload_sessions t WHERE t.id = ANY({ids})",
    order: "t.id",
};

const CHUNKS: Table = Table {
    name: "upload_chunks",
    columns: &[
        ("session_id", Text),
        ("n", Int),
        ("size", Int),
        ("sha256", Text),
        ("tier", Text),
        ("object_key", Text),
        ("created_at", Int),
    ],
    compared: 7,
    rows_of: "FROM upload_chunks t WHERE t.session_id = ANY({ids})",
    order: "t.session_id, t.n",
};

/// An upload session's tables, in the order the copy writes them.
const SESSION_TABLES: [&Table; 2] = [&SESSIONS, &CHUNKS];

impl Table {
    /// Selects the rows of the things keyed by `$1`, an array of `K`.
    fn select<K: Key>(&self, lock: Option<Lock>) -> String {
        let columns: Vec<String> = self.columns.iter().map(|(c, _)| format!("t.{c}")).collect();
        let from = self.rows_of.replace("{ids}", &format!("(SELECT $1::{0})::{0}", K::ARRAY));
        // Only the documents' own rows are locked: every write to a document updates it.
        let lock = match lock {
            None => "",
            Some(Lock::Share) => " FOR SHARE",
            Some(Lock::Update) => " FOR UPDATE",
        };
        format!("SELECT {} {from} ORDER BY {}{lock}", columns.join(", "), self.order)
    }

    /// One statement inserting rows given column by column, each column one array (`$1`
    /// the first column's values, and so on): the server reads each array in one go,
    /// where a row of placeholders per row would have it parse and plan thousands.
    fn insert(&self) -> String {
        let columns: Vec<&str> = self.columns.iter().map(|(c, _)| *c).collect();
        let arrays: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, kind))| {
                let array = match kind {
                    Int => "bigint[]",
                    Text => "text[]",
                };
                format!("${}::{array}", i + 1)
            })
            .collect();
        let conflict = if self.name == "blobs" { " ON CONFLICT (sha256) DO NOTHING" } else { "" };
        let columns = columns.join(", ");
        format!(
            "INSERT INTO {} ({columns}) SELECT * FROM unnest({}){conflict} RETURNING {columns}",
            self.name,
            arrays.join(", ")
        )
    }

    fn decode(&self, row: &PgRow) -> Result<Vec<Value>, StoreError> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (_, kind))| {
                Ok(match kind {
                    Int => Value::Int(row.try_get(i)?),
                    Text => Value::Text(row.try_get(i)?),
                })
            })
            .collect()
    }
}

/// How the source's documents of a batch are held while it is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lock {
    /// Writes wait; the source keeps the documents (a copy).
    Share,
    /// Writes wait, and find the documents gone when they go on (a hand-over).
    Update,
}

/// A key of the things a copy moves (a document's id, an upload session's), bound as one
/// Postgres array of them: one parameter whatever the batch's size, so one prepared
/// statement serves every batch.
trait Key: Send + Sync {
    /// The array's type.
    const ARRAY: &'static str;
    /// Appends the key as an element of an array literal.
    fn element(&self, out: &mut String);
}

impl Key for i64 {
    const ARRAY: &'static str = "bigint[]";
    fn element(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{self}");
    }
}

impl Key for String {
    const ARRAY: &'static str = "text[]";
    fn element(&self, out: &mut String) {
        quoted(self, out);
    }
}

impl Key for &String {
    const ARRAY: &'static str = "text[]";
    fn element(&self, out: &mut String) {
        quoted(self, out);
    }
}

/// Appends `text` as a quoted element of an array literal (every element is quoted, so a
/// text reading `NULL` stays a text).
fn quoted(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// The array literal of `keys` (`{1,2,3}`), bound as text and cast by the statement.
fn array<K: Key>(keys: &[K]) -> String {
    let mut out = String::with_capacity(2 + keys.len() * 12);
    out.push('{');
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        key.element(&mut out);
    }
    out.push('}');
    out
}

/// The array literal of column `column` of `rows`.
fn column(rows: &[Vec<Value>], column: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(2 + rows.len() * 16);
    out.push('{');
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match &row[column] {
            Value::Int(Some(v)) => {
                let _ = write!(out, "{v}");
            }
            Value::Text(Some(t)) => quoted(t, &mut out),
            Value::Int(None) | Value::Text(None) => out.push_str("NULL"),
        }
    }
    out.push('}');
    out
}

/// The most documents a batch may hold.
pub const MAX_BATCH: usize = 10_000;

/// The rows of a batch, table by table, in the order the copy writes them.
type Rows = Vec<Vec<Vec<Value>>>;

/// A document's tables, in the order the copy reads and writes them: the documents' rows
/// first (read with the lock that holds the batch; nothing refers to a blob from them),
/// then the blob rows before the versions that refer to them.
const TABLES: [&Table; 4] = [&DOCUMENTS, &BLOBS, &VERSIONS, &TAGS];

/// Where [`TABLES`] has the documents, the blob rows and the versions.
const AT_DOCUMENTS: usize = 0;
const AT_BLOBS: usize = 1;
const AT_VERSIONS: usize = 2;

/// The rows of `tables` of the things keyed by `keys` (an array literal of `K`s).
async fn read_rows<K: Key>(
    conn: &mut sqlx::PgConnection,
    tables: &[&Table],
    keys: &str,
    lock: Option<Lock>,
) -> Result<Rows, StoreError> {
    let mut all = Vec::with_capacity(tables.len());
    for table in tables {
        all.push(read_table::<K>(conn, table, keys, lock).await?);
    }
    Ok(all)
}

/// The rows of `table` of the things keyed by `keys` (an array literal of `K`s).
async fn read_table<K: Key>(
    conn: &mut sqlx::PgConnection,
    table: &Table,
    keys: &str,
    lock: Option<Lock>,
) -> Result<Vec<Vec<Value>>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(table.select::<K>(lock))).bind(keys).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| table.decode(r)).collect()
}

/// Writes `rows` of `tables`, one statement a table: the rows as the database stored
/// them, table by table, which the verification compares with the source's.
async fn write_rows(conn: &mut sqlx::PgConnection, tables: &[&Table], rows: &Rows) -> Result<Rows, StoreError> {
    let mut stored = Vec::with_capacity(tables.len());
    for (table, rows) in tables.iter().zip(rows) {
        stored.push(write_table(conn, table, rows).await?);
    }
    Ok(stored)
}

/// Writes `rows` of `table` in one statement: the rows as the database stored them. A blob
/// the target already had keeps its row, and that row is what is returned for it.
async fn write_table(
    conn: &mut sqlx::PgConnection,
    table: &Table,
    rows: &[Vec<Value>],
) -> Result<Vec<Vec<Value>>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut insert = sqlx::query(AssertSqlSafe(table.insert()));
    for c in 0..table.columns.len() {
        insert = insert.bind(column(rows, c));
    }
    let mut written =
        insert.fetch_all(&mut *conn).await?.iter().map(|r| table.decode(r)).collect::<Result<Vec<_>, _>>()?;
    if written.len() < rows.len() && table.name == BLOBS.name {
        let inserted: std::collections::HashSet<&Value> = written.iter().map(|row| &row[0]).collect();
        let kept: Vec<&String> = rows
            .iter()
            .filter(|row| !inserted.contains(&row[0]))
            .filter_map(|row| match &row[0] {
                Value::Text(Some(sha)) => Some(sha),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = BLOBS.columns.iter().map(|(c, _)| *c).collect();
        let sql = format!("SELECT {} FROM blobs WHERE sha256 = ANY((SELECT $1::text[])::text[])", names.join(", "));
        let found = sqlx::query(AssertSqlSafe(sql)).bind(array(&kept)).fetch_all(&mut *conn).await?;
        for row in &found {
            written.push(BLOBS.decode(row)?);
        }
    }
    Ok(written)
}

/// Leaves a marker in `table` (`moved_documents` or `moved_sessions`) for each of `keys`,
/// naming the shard `target` it was handed over to at `now`.
async fn mark_moved<K: Key>(
    conn: &mut sqlx::PgConnection,
    table: &str,
    keys: &[K],
    target: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (id, shard, moved_at) SELECT k, $2, $3 FROM unnest($1::{}) k \
         ON CONFLICT (id) DO UPDATE SET shard = EXCLUDED.shard, moved_at = EXCLUDED.moved_at",
        K::ARRAY
    )))
    .bind(array(keys))
    .bind(target)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes the rows of `table` whose `column` is one of `keys`.
async fn delete_keyed<K: Key>(
    conn: &mut sqlx::PgConnection,
    table: &str,
    column: &str,
    keys: &[K],
) -> Result<(), StoreError> {
    let sql = format!("DELETE FROM {table} WHERE {column} = ANY((SELECT $1::{0})::{0})", K::ARRAY);
    sqlx::query(AssertSqlSafe(sql)).bind(array(keys)).execute(&mut *conn).await?;
    Ok(())
}

/// The array literal of the texts in column `column` of `rows`, sorted and each once (the
/// content hashes of a batch's blob rows or versions).
fn distinct_texts(rows: &[Vec<Value>], column: usize) -> String {
    let mut texts: Vec<&String> = rows
        .iter()
        .filter_map(|row| match &row[column] {
            Value::Text(Some(text)) => Some(text),
            _ => None,
        })
        .collect();
    texts.sort_unstable();
    texts.dedup();
    array(&texts)
}

/// The ids in the first column of `rows` (the documents' rows).
fn ids_of(rows: &[Vec<Value>]) -> Vec<i64> {
    rows.iter()
        .filter_map(|row| match row[0] {
            Value::Int(id) => id,
            Value::Text(_) => None,
        })
        .collect()
}

/// A digest of what the verification compares of `rows` (of `tables`).
fn digest(tables: &[&Table], rows: &Rows) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (table, rows) in tables.iter().zip(rows) {
        hash.update(table.name);
        hash.update((rows.len() as u64).to_be_bytes());
        // In one order whatever order the rows came in (and whatever collation each
        // database sorts text by).
        let mut rows: Vec<&Vec<Value>> = rows.iter().collect();
        rows.sort_unstable();
        for row in rows {
            for value in &row[..table.compared] {
                // Each value tagged with its kind and, for a text, its length: no two
                // different rows feed the same bytes.
                match value {
                    Value::Int(Some(v)) => {
                        hash.update(b"i");
                        hash.update(v.to_be_bytes());
                    }
                    Value::Text(Some(t)) => {
                        hash.update(b"t");
                        hash.update((t.len() as u64).to_be_bytes());
                        hash.update(t.as_bytes());
                    }
                    Value::Int(None) => hash.update(b"I"),
                    Value::Text(None) => hash.update(b"T"),
                }
            }
        }
    }
    hash.finalize().into()
}

/// What a batch's copy wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub documents: u64,
    pub versions: u64,
    /// Bytes of the documents' versions (as uploaded).
    pub bytes: u64,
}

/// Why a batch was not copied.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("moving documents between shards needs Postgres shards")]
    NotPostgres,
    #[error("a batch of {0} documents is more than {MAX_BATCH}, which one statement can name")]
    BatchTooLarge(usize),
    #[error("the copy of documents {ids:?} does not read back as the source holds them")]
    Mismatch { ids: Vec<i64> },
    #[error("the copy of upload sessions {ids:?} does not read back as the source holds them")]
    SessionMismatch { ids: Vec<String> },
    #[error("no move is under way: the platform config names no routing to move to")]
    NoMove,
    #[error("the routing sends documents to shard {0}, which is not open")]
    UnknownShard(String),
    #[error("a hand-over lane stopped before its step ended: {0}")]
    Interrupted(String),
}

impl From<sqlx::Error> for MoveError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
}

/// The next documents of `source` (the shard at `source_index` of `to`'s list, or a shard
/// leaving it: `None`) that `to` routes elsewhere, after id `after`, looking at up to
/// `scan` documents: each with the index of the shard it moves to, and the id to go on
/// after (`None` once every document was looked at).
pub async fn moving(
    source: &Metadata,
    source_index: Option<usize>,
    to: &RoutingTable,
    after: i64,
    scan: i64,
) -> Result<(Vec<(i64, usize)>, Option<i64>), MoveError> {
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM documents WHERE id > $1 ORDER BY id LIMIT $2")
        .bind(after)
        .bind(scan)
        .fetch_all(source.pool())
        .await?;
    let next = if i64::try_from(ids.len()).unwrap_or(i64::MAX) < scan { None } else { ids.last().copied() };
    let moving = ids
        .into_iter()
        .filter_map(|id| {
            let owner = to.shard_of_id(id);
            (Some(owner) != source_index).then_some((id, owner))
        })
        .collect();
    Ok((moving, next))
}

/// Copies the documents `ids` from `source` to `target` and verifies the copy, in one
/// transaction on the target, while the source's rows of the batch are held.
pub async fn copy_batch(source: &Metadata, target: &Metadata, ids: &[i64]) -> Result<Copied, MoveError> {
    let Some(copy) = copy(source, target, ids, Lock::Share).await? else { return Ok(Copied::default()) };
    copy.target.commit().await?;
    copy.held.commit().await?;
    Ok(copy.copied)
}

/// Hands the documents `ids` over from `source` to `target` (named `target_name` in the
/// routing tables): copies and verifies them as [`copy_batch`] does, holding the source's
/// documents `FOR UPDATE`, and once the copy has committed, removes them from the source
/// and leaves a marker for each naming the target, in one source transaction. A write to
/// one of them waits for the hand-over and then finds the document gone (and, through the
/// marker, its new shard), so no write is applied to a copy that is discarded.
///
/// The blob rows only the moved documents referred to go with them: the target's row now
/// refers to the same stored copy, which stays (the source's row goes without a claim);
/// where the target kept its own copy of the same bytes, the source's copy is claimed as
/// garbage, due after `grace_ms` (reads that looked it up before the hand-over finish).
///
/// A crash between the two commits leaves the documents on both shards and the source
/// still theirs (no marker): the hand-over made again replaces the target's rows.
pub async fn hand_over(
    source: &Metadata,
    target: &Metadata,
    target_name: &str,
    ids: &[i64],
    now: i64,
    grace_ms: i64,
) -> Result<Copied, MoveError> {
    let mut one = HandOvers::default();
    one.push(source, target, target_name, ids, now, grace_ms).await?;
    one.finish().await
}

/// Hand-overs one after another, in `lanes` pipelines side by side. Each lane is a
/// three-stage pipeline: while a batch is read (and held) on its source, the batch before
/// it is copied to its target and the one before that is released from its source (the
/// stages run on different databases, or on different documents of one). A batch goes to
/// the first lane free, and the lanes step each at its own pace: the steps and guarantees
/// of [`hand_over`], batch by batch, at the pace of the slowest stage rather than of all
/// three, and with two lanes, of two batches' slowest stages run at once (a batch's copy,
/// the slowest, waits mostly on the target database, and the other lane's stages run
/// meanwhile, never waiting for this lane's step to end).
///
/// Lanes that share a source release at once, except where their batches share a blob
/// row: a release's first statement locks its batch's blob rows, in one order, so no two
/// decide at once whether a blob row that both batches refer to is still needed (each
/// would see the other's versions and keep it).
/// Lanes that share a target copy a blob row both batches refer to one after the other:
/// the second waits for the first and keeps its row.
///
/// A batch is held on its source from its read until it is released, two of its lane's
/// steps later or by [`HandOvers::finish`]. One dropped unreleased (an error, a crash) is
/// left as a crash leaves it: on its source, with or without a copy on the target that the
/// next hand-over replaces.
pub struct HandOvers {
    /// The lanes not stepping.
    idle: Vec<Lane>,
    /// The lanes stepping, each a task of its own (it goes on while the mover does
    /// something else, and stops where it is when this is dropped), giving itself back
    /// with what its step released.
    stepping: tokio::task::JoinSet<Stepped>,
}

/// A lane back from a step, and what the step released.
type Stepped = (Lane, Result<Copied, MoveError>);

impl Default for HandOvers {
    /// One lane.
    fn default() -> Self {
        Self::new(1)
    }
}

impl std::fmt::Debug for HandOvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle: Vec<_> = self
            .idle
            .iter()
            .map(|lane| {
                (lane.reading.as_ref().map(|r| r.held.ids.len()), lane.pending.as_ref().map(|h| h.copied.documents))
            })
            .collect();
        f.debug_struct("HandOvers").field("idle", &idle).field("stepping", &self.stepping.len()).finish()
    }
}

impl HandOvers {
    /// A pipeline of `lanes` lanes (at least one).
    #[must_use]
    pub fn new(lanes: usize) -> Self {
        Self { idle: (0..lanes.max(1)).map(|_| Lane::default()).collect(), stepping: tokio::task::JoinSet::new() }
    }

    /// As many lanes as `source`'s pool allows: a lane uses up to three of its connections
    /// at once (a batch being read, one being copied, one being released), and a mover
    /// needs one more to find the next batch.
    #[must_use]
    pub fn for_source(source: &Metadata) -> Self {
        Self::new(if source.max_connections() >= MOVER_CONNECTIONS { 2 } else { 1 })
    }

    /// How many lanes the pipeline runs.
    #[must_use]
    pub fn lanes(&self) -> usize {
        self.idle.len() + self.stepping.len()
    }

    /// Reads and holds the documents `ids` on `source`, to be handed over to `target`
    /// (named `target_name`), in the first lane free (waiting for one), whose step reads
    /// it while the lane's batches before it are copied and released. What the steps that
    /// ended meanwhile released.
    pub async fn push(
        &mut self,
        source: &Metadata,
        target: &Metadata,
        target_name: &str,
        ids: &[i64],
        now: i64,
        grace_ms: i64,
    ) -> Result<Copied, MoveError> {
        if target.dialect() != Dialect::Postgres {
            return Err(MoveError::NotPostgres);
        }
        let batch = Batch {
            source: source.clone(),
            target: target.clone(),
            target_name: target_name.to_owned(),
            ids: ids.to_vec(),
            now,
            grace_ms,
        };
        let mut released = Copied::default();
        let mut lane = loop {
            if let Some(lane) = self.idle.pop() {
                break lane;
            }
            // A lane that failed fails the push, its batch not taken.
            released = sum([Ok(released), self.next_stepped().await])?;
        };
        self.stepping.spawn(async move {
            let stepped = lane.push(batch).await;
            (lane, stepped)
        });
        Ok(released)
    }

    /// Copies and releases the batches still in the pipeline: what they moved.
    pub async fn finish(&mut self) -> Result<Copied, MoveError> {
        let mut released = Ok(Copied::default());
        while !self.stepping.is_empty() {
            released = sum([released, self.next_stepped().await]);
        }
        let finished = futures::future::join_all(self.idle.iter_mut().map(Lane::finish)).await;
        sum(std::iter::once(released).chain(finished))
    }

    /// Waits for the next lane to end its step, and takes it back: what the step released.
    async fn next_stepped(&mut self) -> Result<Copied, MoveError> {
        match self.stepping.join_next().await {
            Some(Ok((lane, released))) => {
                self.idle.push(lane);
                released
            }
            Some(Err(stopped)) if stopped.is_panic() => std::panic::resume_unwind(stopped.into_panic()),
            Some(Err(stopped)) => {
                // Its batches were dropped, as a crash drops them; a new lane takes its place.
                self.idle.push(Lane::default());
                Err(MoveError::Interrupted(stopped.to_string()))
            }
            None => Ok(Copied::default()),
        }
    }
}

/// The source connections a lane of [`HandOvers`] holds at most.
const CONNECTIONS_PER_LANE: u32 = 3;

/// The connections a source's pool needs for [`HandOvers::for_source`] to run two lanes:
/// three for each, and one for the mover to find the next batch.
pub const MOVER_CONNECTIONS: u32 = 2 * CONNECTIONS_PER_LANE + 1;

/// What `results` moved in all, or the first error among them.
fn sum(results: impl IntoIterator<Item = Result<Copied, MoveError>>) -> Result<Copied, MoveError> {
    results.into_iter().try_fold(Copied::default(), |all, one| {
        let one = one?;
        Ok(Copied {
            documents: all.documents + one.documents,
            versions: all.versions + one.versions,
            bytes: all.bytes + one.bytes,
        })
    })
}

/// A batch to hand over, and where.
struct Batch {
    source: Metadata,
    target: Metadata,
    target_name: String,
    ids: Vec<i64>,
    now: i64,
    grace_ms: i64,
}

/// One lane of [`HandOvers`]: a three-stage pipeline.
#[derive(Default)]
struct Lane {
    /// Read and held on its source, to be copied next.
    reading: Option<Reading>,
    /// Copied to its target, to be released next.
    pending: Option<Handing>,
}

impl Lane {
    /// Reads and holds `batch` on its source while the batch pushed before is copied and
    /// the one before that released: what that one moved.
    async fn push(&mut self, batch: Batch) -> Result<Copied, MoveError> {
        let Batch { source, target, target_name, ids, now, grace_ms } = batch;
        let (read, before) = (self.reading.take(), self.pending.take());
        // The next batch is read whole while the one before is written: the target, which
        // does the most, then never waits for the source.
        let (next, written, released) =
            tokio::join!(hold(&source, &ids, Lock::Update, true), written(read), release(before));
        self.pending = written?;
        self.reading = next?.map(|held| Reading { held, target, target_name, now, grace_ms });
        released
    }

    /// Copies and releases the batches still in the lane: what they moved.
    async fn finish(&mut self) -> Result<Copied, MoveError> {
        let (read, before) = (self.reading.take(), self.pending.take());
        let (written, released) = tokio::join!(written(read), release(before));
        let (released, last) = (released?, release(written?).await?);
        sum([Ok(released), Ok(last)])
    }
}

/// A batch read and held on its source, with where it goes.
struct Reading {
    held: Held,
    target: Metadata,
    target_name: String,
    now: i64,
    grace_ms: i64,
}

/// Copies `read`, if there is one, to its target and commits it there.
async fn written(read: Option<Reading>) -> Result<Option<Handing>, MoveError> {
    let Some(Reading { held, target, target_name, now, grace_ms }) = read else { return Ok(None) };
    let Copy { held, target, rows, on_target, copied } = write(held, &target).await?;
    target.commit().await?;
    Ok(Some(Handing { held, rows, on_target, copied, target_name, now, grace_ms }))
}

/// Releases `pending`, a batch handed over but still held on its source, if there is one:
/// what it moved.
async fn release(pending: Option<Handing>) -> Result<Copied, MoveError> {
    match pending {
        Some(handing) => handing.release().await,
        None => Ok(Copied::default()),
    }
}

/// A batch copied, verified and committed on its target, still held on its source.
struct Handing {
    /// The source's transaction, holding the batch.
    held: NativeTx,
    rows: Rows,
    on_target: Rows,
    copied: Copied,
    target_name: String,
    now: i64,
    grace_ms: i64,
}

impl Handing {
    /// The second half: the batch removed from the source, with its markers.
    async fn release(self) -> Result<Copied, MoveError> {
        let mut copy = self;
        let (target_name, now, grace_ms) = (copy.target_name.clone(), copy.now, copy.grace_ms);
        let target_name = target_name.as_str();
        let present = ids_of(&copy.rows[AT_DOCUMENTS]);
        if present.is_empty() {
            copy.held.commit().await?;
            return Ok(copy.copied);
        }
        let held = &mut copy.held;
        // The blob rows of the batch, locked first and in one order: a release beside this
        // one (another lane's) that shares one waits here until this one has committed, and
        // then decides below whether that row is still needed seeing this batch's versions
        // gone, where at once each would see the other's and keep a row that neither needs.
        // Releases sharing none run at once; an upload's reference to one of these rows
        // (a key share) does not wait.
        let shas = distinct_texts(&copy.rows[AT_BLOBS], 0);
        sqlx::query(
            "SELECT 1 FROM blobs WHERE sha256 = ANY((SELECT $1::text[])::text[]) ORDER BY sha256 \
             FOR NO KEY UPDATE",
        )
        .bind(shas.as_str())
        .execute(&mut **held)
        .await?;
        // Versions and tags first, each in one statement: the documents' cascade then finds
        // nothing to delete, where it would run a delete per document for each table.
        delete_keyed(held, "document_tags", "document_id", &present).await?;
        delete_keyed(held, "versions", "document_id", &present).await?;
        delete_keyed(held, "documents", "id", &present).await?;
        mark_moved(held, "moved_documents", &present, target_name, now).await?;
        // The blob rows only the batch referred to go, in one statement.
        let freed: Vec<(String, String, String)> = sqlx::query_as(
            "DELETE FROM blobs b WHERE b.sha256 = ANY((SELECT $1::text[])::text[]) \
         AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256) \
         AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.sha256 = b.sha256) \
         RETURNING b.sha256, b.tier, b.object_key",
        )
        .bind(shas.as_str())
        .fetch_all(&mut **held)
        .await?;
        // Where the target's blob row of each content refers to.
        let on_target: std::collections::HashMap<&Value, (&Value, &Value)> =
            copy.on_target[AT_BLOBS].iter().map(|row| (&row[0], (&row[3], &row[2]))).collect();
        for (sha, tier, key) in freed {
            let same = on_target
                .get(&Value::Text(Some(sha)))
                .is_some_and(|(t, k)| **t == Value::Text(Some(tier.clone())) && **k == Value::Text(Some(key.clone())));
            if !same {
                sqlx::query(
                    "INSERT INTO blob_garbage (tier, object_key, not_before) VALUES ($1, $2, $3) \
                 ON CONFLICT (tier, object_key) DO NOTHING",
                )
                .bind(tier)
                .bind(key)
                .bind(now + grace_ms)
                .execute(&mut **held)
                .await?;
            }
        }
        // What left the shard, counted in the transaction it left in, last: releases beside
        // each other wait for each other's count only while that one commits.
        sqlx::query(
            "UPDATE shard_routing SET moved_documents = moved_documents + $1, moved_bytes = moved_bytes + $2, \
         updated_at = $3",
        )
        .bind(i64::try_from(present.len()).unwrap_or(i64::MAX))
        .bind(i64::try_from(copy.copied.bytes).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&mut **held)
        .await?;
        copy.held.commit().await?;
        Ok(copy.copied)
    }
}

/// A batch copied and verified on the target, neither transaction committed yet.
struct Copy {
    held: NativeTx,
    target: NativeTx,
    /// The source's rows, table by table.
    rows: Rows,
    /// The target's rows as read back.
    on_target: Rows,
    copied: Copied,
}

/// Copies the batch `ids` from `source` to `target`, holding it with `lock`: its
/// documents are read first, and the rest of its rows while the target writes them.
async fn copy(source: &Metadata, target: &Metadata, ids: &[i64], lock: Lock) -> Result<Option<Copy>, MoveError> {
    if target.dialect() != Dialect::Postgres {
        return Err(MoveError::NotPostgres);
    }
    match hold(source, ids, lock, false).await? {
        Some(held) => Ok(Some(write(held, target).await?)),
        None => Ok(None),
    }
}

/// A batch held on its source: its documents' rows read, and held there until the
/// transaction ends.
struct Held {
    tx: NativeTx,
    ids: Vec<i64>,
    /// The rows read so far, of the first of [`TABLES`] (the documents' at least).
    rows: Rows,
    /// The batch's documents whose rows on the target are replaced: all but those that
    /// left the source with a marker before (the target's now).
    replaced: Vec<i64>,
}

/// Reads the documents `ids` on `source`, holding their rows with `lock` (waiting for the
/// writes under way): the rows of the batch read after, in the same transaction, are then
/// those of finished writes and stay so until it ends, as every write to a document
/// updates its row. With `whole`, the batch's other rows are read too (else the copy reads
/// them).
async fn hold(source: &Metadata, ids: &[i64], lock: Lock, whole: bool) -> Result<Option<Held>, MoveError> {
    if source.dialect() != Dialect::Postgres {
        return Err(MoveError::NotPostgres);
    }
    if ids.is_empty() {
        return Ok(None);
    }
    if ids.len() > MAX_BATCH {
        return Err(MoveError::BatchTooLarge(ids.len()));
    }
    // Read committed: each statement sees the writes finished before it, and none can
    // finish on the batch once its documents are held.
    let mut held = source.begin_native(None).await?.ok_or(MoveError::NotPostgres)?;
    let keys = array(ids);
    let mut rows = vec![read_table::<i64>(&mut held, &DOCUMENTS, &keys, Some(lock)).await?];
    // A document of the batch that left the source with a marker is the target's now (a
    // hand-over made again): its rows there are left alone. One gone without a marker was
    // purged: a copy of it goes.
    let handed: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM moved_documents WHERE id = ANY((SELECT $1::bigint[])::bigint[])")
            .bind(keys.as_str())
            .fetch_all(&mut *held)
            .await?;
    let replaced: Vec<i64> = ids.iter().copied().filter(|id| !handed.contains(id)).collect();
    if whole {
        // The versions first, and the blob rows by the contents they name: a lookup by key
        // each, where finding them through the versions again would join the two tables.
        let versions = read_table::<i64>(&mut held, &VERSIONS, &keys, None).await?;
        let tags = read_table::<i64>(&mut held, &TAGS, &keys, None).await?;
        let blobs = read_table::<String>(&mut held, &BLOBS_BY_SHA, &distinct_texts(&versions, 2), None).await?;
        rows.extend([blobs, versions, tags]);
    }
    Ok(Some(Held { tx: held, ids: ids.to_vec(), rows, replaced }))
}

/// Writes a held batch to `target` and verifies it there, in a transaction left open.
///
/// The batch's tables not yet read are read on the source while the target writes what
/// it has (the documents first, then each table as it comes): the two databases work at
/// once, and the copy takes about as long as the target's writes.
async fn write(batch: Held, target: &Metadata) -> Result<Copy, MoveError> {
    let Held { tx: mut held, ids, rows: read_before, replaced } = batch;
    // Read committed: a copy writing a blob row that another (a lane beside it, an upload)
    // is writing waits for it and then keeps that row, where under a snapshot it would
    // fail to serialize. The rows read back are the ones written or kept.
    let mut tx = target.begin_native(None).await?.ok_or(MoveError::NotPostgres)?;
    let (tables, receive) = tokio::sync::mpsc::channel(TABLES.len());
    let unread = &TABLES[read_before.len()..];
    let reading = async {
        let (tables, keys) = (tables, array(&ids));
        for table in unread {
            let rows = read_table::<i64>(&mut held, table, &keys, None).await?;
            if tables.send(rows).await.is_err() {
                // The target's writes failed: their error is the one returned.
                break;
            }
        }
        Ok::<_, StoreError>(())
    };
    let writing = async {
        let mut receive = receive;
        // The target's rows of the batch are replaced whole (versions and tags go with
        // their document), so a copy made again is equal to the source, never doubled; a
        // marker a document left here when it moved away before goes, as it is back.
        if !replaced.is_empty() {
            for table in ["documents", "moved_documents"] {
                delete_keyed(&mut tx, table, "id", &replaced).await?;
            }
        }
        // The rows as the target stored them (the batch's rows there were all replaced).
        let (mut rows, mut on_target) = (Vec::with_capacity(TABLES.len()), Vec::with_capacity(TABLES.len()));
        let mut read_before = read_before.into_iter();
        loop {
            let read = match read_before.next() {
                Some(read) => read,
                None => match receive.recv().await {
                    Some(read) => read,
                    None => break,
                },
            };
            on_target.push(write_table(&mut tx, TABLES[rows.len()], &read).await?);
            rows.push(read);
        }
        Ok::<_, StoreError>((rows, on_target))
    };
    let (read, written) = tokio::join!(reading, writing);
    read?;
    let (rows, on_target) = written?;
    if digest(&TABLES, &on_target) != digest(&TABLES, &rows) {
        tx.rollback().await?;
        held.rollback().await?;
        return Err(MoveError::Mismatch { ids });
    }
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let bytes = rows[AT_VERSIONS]
        .iter()
        .map(|v| match v[3] {
            Value::Int(Some(size)) => u64::try_from(size).unwrap_or(0),
            _ => 0,
        })
        .sum();
    let copied = Copied { documents: count(rows[AT_DOCUMENTS].len()), versions: count(rows[AT_VERSIONS].len()), bytes };
    Ok(Copy { held, target: tx, rows, on_target, copied })
}

/// The next upload sessions of `source` (as in [`moving`]) that `to` routes elsewhere,
/// after key `after`, looking at up to `scan`: each with the index of the shard it moves
/// to, and the key to go on after (`None` once every session was looked at).
pub async fn moving_sessions(
    source: &Metadata,
    source_index: Option<usize>,
    to: &RoutingTable,
    after: &str,
    scan: i64,
) -> Result<(Vec<(String, usize)>, Option<String>), MoveError> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM upload_sessions WHERE id > $1 ORDER BY id LIMIT $2")
        .bind(after)
        .bind(scan)
        .fetch_all(source.pool())
        .await?;
    let next = if i64::try_from(ids.len()).unwrap_or(i64::MAX) < scan { None } else { ids.last().cloned() };
    let moving = ids
        .into_iter()
        .filter_map(|id| {
            let owner = to.shard_of_key(&id);
            (Some(owner) != source_index).then_some((id, owner))
        })
        .collect();
    Ok((moving, next))
}

/// What a hand-over of upload sessions did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionsMoved {
    /// Sessions handed over, with their chunks.
    pub moved: u64,
    /// Sessions left where they are for now: a replica is assembling their document.
    pub busy: u64,
}

/// Hands the upload sessions `ids` over from `source` to `target` (named `target_name`),
/// with their chunks' rows (the chunks' bytes are in the tiers, which every shard shares),
/// as [`hand_over`] does documents: the sessions are held `FOR UPDATE` on the source (a
/// chunk being recorded, a completion or a cancellation starting waits, then finds the
/// session gone and follows its marker), copied and verified on the target, and once that
/// has committed, removed from the source with a marker each, in one source transaction.
///
/// A session whose document is being assembled (its completion lock is held, not lapsed)
/// stays for now: it is counted as busy, and handed over once settled.
pub async fn hand_over_sessions(
    source: &Metadata,
    target: &Metadata,
    target_name: &str,
    ids: &[String],
    now: i64,
) -> Result<SessionsMoved, MoveError> {
    if source.dialect() != Dialect::Postgres || target.dialect() != Dialect::Postgres {
        return Err(MoveError::NotPostgres);
    }
    if ids.is_empty() {
        return Ok(SessionsMoved::default());
    }
    if ids.len() > MAX_BATCH {
        return Err(MoveError::BatchTooLarge(ids.len()));
    }
    let mut held = source.begin_native(None).await?.ok_or(MoveError::NotPostgres)?;
    let query = sqlx::query_as::<_, (String, String, Option<i64>)>(
        "SELECT id, status, lock_until FROM upload_sessions WHERE id = ANY((SELECT $1::text[])::text[]) ORDER BY id FOR UPDATE",
    );
    let (busy, movable): (Vec<_>, Vec<_>) = query
        .bind(array(ids))
        .fetch_all(&mut *held)
        .await?
        .into_iter()
        .partition(|(_, status, until)| status == "COMPLETING" && until.is_some_and(|t| t >= now));
    let busy = u64::try_from(busy.len()).unwrap_or(u64::MAX);
    let movable: Vec<String> = movable.into_iter().map(|(id, _, _)| id).collect();
    if movable.is_empty() {
        held.commit().await?;
        return Ok(SessionsMoved { moved: 0, busy });
    }
    let rows = read_rows::<String>(&mut held, &SESSION_TABLES, &array(&movable), None).await?;
    // The target's rows of these sessions (left by a hand-over cut short before its
    // source committed) are replaced whole, and a marker left when a session moved away
    // from there before goes: it is back.
    let mut tx =
        target.begin_native(Some("BEGIN ISOLATION LEVEL REPEATABLE READ")).await?.ok_or(MoveError::NotPostgres)?;
    for table in ["upload_sessions", "moved_sessions"] {
        delete_keyed(&mut tx, table, "id", &movable).await?;
    }
    let on_target = write_rows(&mut tx, &SESSION_TABLES, &rows).await?;
    if digest(&SESSION_TABLES, &on_target) != digest(&SESSION_TABLES, &rows) {
        tx.rollback().await?;
        held.rollback().await?;
        return Err(MoveError::SessionMismatch { ids: movable });
    }
    tx.commit().await?;
    // The chunks' rows go with their session (ON DELETE CASCADE).
    delete_keyed(&mut held, "upload_sessions", "id", &movable).await?;
    mark_moved(&mut held, "moved_sessions", &movable, target_name, now).await?;
    held.commit().await?;
    Ok(SessionsMoved { moved: u64::try_from(movable.len()).unwrap_or(u64::MAX), busy })
}

/// Hands over every upload session of `shard` (at `index` of `next`, or leaving it) that
/// `next` routes elsewhere, `batch` at a time.
async fn move_sessions(
    library: &Library,
    shard: &Metadata,
    index: Option<usize>,
    next: &RoutingTable,
    batch: usize,
) -> Result<SessionsMoved, MoveError> {
    let mut sum = SessionsMoved::default();
    let mut after = Some(String::new());
    while let Some(from) = after {
        let (found, cursor) = moving_sessions(shard, index, next, &from, i64::try_from(batch).unwrap_or(500)).await?;
        after = cursor;
        let mut by_target: std::collections::BTreeMap<usize, Vec<String>> = std::collections::BTreeMap::new();
        for (id, to) in found {
            by_target.entry(to).or_default().push(id);
        }
        for (to, ids) in by_target {
            let target_name = &next.names()[to];
            let target = library.named(target_name).ok_or_else(|| MoveError::UnknownShard(target_name.clone()))?;
            let done = hand_over_sessions(shard, target.meta(), target_name, &ids, library.clock().now_ms()).await?;
            sum.moved += done.moved;
            sum.busy += done.busy;
        }
    }
    Ok(sum)
}

/// The shard upload session `id` was handed over to from `shard`, if it was.
pub async fn session_moved_to(shard: &Metadata, id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT shard FROM moved_sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(shard.pool())
        .await?)
}

/// Marks `source` as moving its documents under the routing `version` (`None`: no move).
/// Waits for the new documents being recorded there: once it returns, a listing of the
/// source sees every document recorded by a replica that did not know the version, and
/// no such replica records another. Marked with another version than before, the
/// shard's progress starts again from nothing.
pub async fn begin_move(source: &Metadata, version: Option<&str>, now: i64) -> Result<(), MoveError> {
    sqlx::query(
        "UPDATE shard_routing SET total_documents = CASE WHEN moving_to IS NOT DISTINCT FROM $1 THEN total_documents ELSE 0 END, \
         moved_documents = CASE WHEN moving_to IS NOT DISTINCT FROM $1 THEN moved_documents ELSE 0 END, \
         moved_bytes = CASE WHEN moving_to IS NOT DISTINCT FROM $1 THEN moved_bytes ELSE 0 END, \
         started_at = CASE WHEN moving_to IS NOT DISTINCT FROM $1 THEN started_at ELSE $2 END, \
         updated_at = $2, moving_to = $1",
    )
    .bind(version)
    .bind(now)
    .execute(source.pool())
    .await?;
    Ok(())
}

/// A shard's part of a move, as the mover records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardProgress {
    /// The routing version its documents move under; `None` when no move runs.
    pub moving_to: Option<String>,
    /// Documents that leave the shard in all.
    pub total_documents: i64,
    /// Documents handed over so far, and their versions' bytes.
    pub moved_documents: i64,
    pub moved_bytes: i64,
    /// When the move began here and when it last made progress, in ms since the epoch.
    pub started_at: Option<i64>,
    pub updated_at: Option<i64>,
}

/// Hears every shard's progress, by name, after each batch of a move.
pub type Report<'a> = dyn Fn(&[(String, ShardProgress)]) + Send + Sync + 'a;

/// What the mover has recorded on `shard`.
pub async fn progress(shard: &Metadata) -> Result<ShardProgress, StoreError> {
    type Row = (Option<String>, i64, i64, i64, Option<i64>, Option<i64>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT moving_to, total_documents, moved_documents, moved_bytes, started_at, updated_at FROM shard_routing",
    )
    .fetch_optional(shard.pool())
    .await?;
    Ok(row.map_or_else(ShardProgress::default, |(moving_to, total, moved, bytes, started_at, updated_at)| {
        ShardProgress {
            moving_to,
            total_documents: total,
            moved_documents: moved,
            moved_bytes: bytes,
            started_at,
            updated_at,
        }
    }))
}

/// Ends a move on `shard` once every replica routes by the table it reached: no longer
/// marked, and its markers gone (no replica follows them any more).
pub async fn finish_move(shard: &Metadata, now: i64) -> Result<(), MoveError> {
    begin_move(shard, None, now).await?;
    sqlx::query("DELETE FROM moved_documents").execute(shard.pool()).await?;
    sqlx::query("DELETE FROM moved_sessions").execute(shard.pool()).await?;
    Ok(())
}

/// Runs the move `library` knows of (to [`Library::next`]): on every shard, the documents
/// the next table sends elsewhere are handed over, `batch` at a time, to the shard it sends
/// them to, and each shard's progress is recorded on it as it goes; `report` hears the sum
/// after every batch. Run again after a crash, it goes on from where the documents are
/// (what was handed over is no longer on its source), so nothing is moved twice.
///
/// Upload sessions move the same way, after the documents of each pass; a session whose
/// document is being assembled is waited for.
///
/// Returns the sum once no shard holds a document or session the next table sends
/// elsewhere.
pub async fn run_move(
    library: &Library,
    batch: usize,
    grace_ms: i64,
    report: &Report<'_>,
) -> Result<Vec<(String, ShardProgress)>, MoveError> {
    run_move_paced(library, batch, grace_ms, None, report).await
}

/// [`run_move`], moving at most `per_second` documents a second over the run (a pause
/// after each batch that got ahead), to bound the load the move puts on the databases.
pub async fn run_move_paced(
    library: &Library,
    batch: usize,
    grace_ms: i64,
    per_second: Option<u32>,
    report: &Report<'_>,
) -> Result<Vec<(String, ShardProgress)>, MoveError> {
    let next = library.next().ok_or(MoveError::NoMove)?;
    let started = tokio::time::Instant::now();
    let mut moved_here = 0u64;
    let batch = batch.clamp(1, MAX_BATCH);
    let names = library.names();
    let now = || library.clock().now_ms();
    for shard in library.shards() {
        begin_move(shard.meta(), Some(next.version()), now()).await?;
    }
    // What is left to move, and so what moves in all (what moved before a restart counts).
    for (name, shard) in names.iter().zip(library.shards()) {
        let index = next.names().iter().position(|n| n == name);
        let left = remaining(shard.meta(), index, next).await?;
        sqlx::query("UPDATE shard_routing SET total_documents = moved_documents + $1, updated_at = $2")
            .bind(i64::try_from(left).unwrap_or(i64::MAX))
            .bind(now())
            .execute(shard.meta().pool())
            .await?;
    }
    let mut sums = Vec::new();
    for (name, shard) in names.iter().zip(library.shards()) {
        sums.push((name.clone(), progress(shard.meta()).await?));
    }
    report(&sums);
    // A pass finds nothing new once it is done; a second pass makes sure.
    loop {
        let mut moved_any = false;
        for (position, (name, shard)) in names.iter().zip(library.shards()).enumerate() {
            let index = next.names().iter().position(|n| n == name);
            let mut after = Some(0);
            let mut pipeline = HandOvers::for_source(shard.meta());
            tracing::info!(shard = %name, lanes = pipeline.lanes(), "handing documents over");
            while let Some(from) = after {
                let (found, cursor) =
                    moving(shard.meta(), index, next, from, i64::try_from(batch).unwrap_or(500)).await?;
                after = cursor;
                let mut by_target: std::collections::BTreeMap<usize, Vec<i64>> = std::collections::BTreeMap::new();
                for (id, to) in found {
                    by_target.entry(to).or_default().push(id);
                }
                for (to, ids) in by_target {
                    let target_name = &next.names()[to];
                    let target =
                        library.named(target_name).ok_or_else(|| MoveError::UnknownShard(target_name.clone()))?;
                    // Counted from the submission: a batch is released during the next one.
                    moved_any |= !ids.is_empty();
                    moved_here += u64::try_from(ids.len()).unwrap_or(u64::MAX);
                    pipeline.push(shard.meta(), target.meta(), target_name, &ids, now(), grace_ms).await?;
                    if let Some(rate) = per_second.filter(|r| *r > 0) {
                        #[allow(clippy::cast_precision_loss)]
                        let due = started + std::time::Duration::from_secs_f64(moved_here as f64 / f64::from(rate));
                        if due > tokio::time::Instant::now() {
                            // Not holding a batch while it waits: writes to it would wait too.
                            pipeline.finish().await?;
                            tokio::time::sleep_until(due).await;
                        }
                    }
                    sums[position].1 = progress(shard.meta()).await?;
                    report(&sums);
                }
            }
            pipeline.finish().await?;
            sums[position].1 = progress(shard.meta()).await?;
            report(&sums);
        }
        let mut busy = 0;
        for (name, shard) in names.iter().zip(library.shards()) {
            let index = next.names().iter().position(|n| n == name);
            let sessions = move_sessions(library, shard.meta(), index, next, batch).await?;
            moved_any |= sessions.moved > 0;
            busy += sessions.busy;
        }
        if !moved_any && busy == 0 {
            return Ok(sums);
        }
        if !moved_any {
            tokio::time::sleep(SETTLING).await;
        }
    }
}

/// How long the mover waits for sessions being completed before it looks again.
const SETTLING: std::time::Duration = std::time::Duration::from_millis(250);

/// How many documents on `shard` (at `index` of `next`, or leaving it) `next` sends elsewhere.
async fn remaining(shard: &Metadata, index: Option<usize>, next: &RoutingTable) -> Result<u64, MoveError> {
    let (mut left, mut after) = (0u64, Some(0));
    while let Some(from) = after {
        let (found, cursor) = moving(shard, index, next, from, 10_000).await?;
        left += found.len() as u64;
        after = cursor;
    }
    Ok(left)
}

/// The document `id`'s marker on `shard`: the shard it was handed over to.
pub async fn moved_to(shard: &Metadata, id: i64) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT shard FROM moved_documents WHERE id = $1")
        .bind(id)
        .fetch_optional(shard.pool())
        .await?)
}
