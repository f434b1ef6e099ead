//! Moving documents between metadata shards, the copy step of a live resharding: which
//! documents a new routing table moves off a shard, and a batch of them copied — rows of
//! `documents`, `versions`, `document_tags` and the `blobs` their versions reference — to
//! the shard they move to, and verified there before the copy commits.
//!
//! A batch is copied in one transaction on the target while the source's documents of the
//! batch are held `FOR SHARE`: a write to one of them waits until the batch is copied
//! (briefly), so the copy is never of a half-written document. The target's rows of the
//! batch are replaced whole, so copying a batch again (after a crash, or after its
//! documents changed) leaves the target equal to the source, never with a row twice; the
//! target's rows of moving documents are not read by anyone until the routing version
//! flips, which is the coordinator's to decide, as is removing the source's rows after it.
//! Blob rows are content-addressed: a blob the target already holds (the same bytes
//! uploaded there) is kept, as its copy in the tier is as good as the source's.
//!
//! Postgres only: a platform with more than one shard runs on Postgres.

use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::routing::RoutingTable;
use crate::store::{Dialect, Metadata, StoreError};

/// A column's type, as the copy reads and writes it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Int,
    Text,
}

/// One value of a copied row.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
    /// Selects the rows of the batch, given as `$1…$n` ids in place of `{ids}`.
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
    rows_of: "FROM documents t WHERE t.id IN ({ids})",
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
    rows_of: "FROM versions t WHERE t.document_id IN ({ids})",
    order: "t.document_id, t.version",
};

const TAGS: Table = Table {
    name: "document_tags",
    columns: &[("document_id", Int), ("tag", Text)],
    compared: 2,
    rows_of: "FROM document_tags t WHERE t.document_id IN ({ids})",
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
    ],
    compared: 2,
    rows_of: "FROM blobs t WHERE t.sha256 IN (SELECT v.sha256 FROM versions v WHERE v.document_id IN ({ids}))",
    order: "t.sha256",
};

impl Table {
    fn select(&self, ids: usize, lock: bool) -> String {
        let columns: Vec<String> = self.columns.iter().map(|(c, _)| format!("t.{c}")).collect();
        let placeholders: Vec<String> = (1..=ids).map(|n| format!("${n}")).collect();
        let from = self.rows_of.replace("{ids}", &placeholders.join(", "));
        // Only the documents' own rows are locked: every write to a document updates it.
        let lock = if lock { " FOR SHARE" } else { "" };
        format!("SELECT {} {from} ORDER BY {}{lock}", columns.join(", "), self.order)
    }

    /// One statement inserting `rows` rows.
    fn insert(&self, rows: usize) -> String {
        let columns: Vec<&str> = self.columns.iter().map(|(c, _)| *c).collect();
        let width = columns.len();
        let tuples: Vec<String> = (0..rows)
            .map(|r| {
                let placeholders: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
                format!("({})", placeholders.join(", "))
            })
            .collect();
        let conflict = if self.name == "blobs" { " ON CONFLICT (sha256) DO NOTHING" } else { "" };
        format!("INSERT INTO {} ({}) VALUES {}{conflict}", self.name, columns.join(", "), tuples.join(", "))
    }

    fn decode(&self, row: &AnyRow) -> Result<Vec<Value>, StoreError> {
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

/// The most documents a batch may hold (their ids are one statement's parameters).
pub const MAX_BATCH: usize = 10_000;

/// The most parameters one statement of the copy binds.
const MAX_PARAMETERS: usize = 60_000;

/// The rows of a batch, table by table, in the order the copy writes them.
type Rows = Vec<Vec<Vec<Value>>>;

const TABLES: [&Table; 4] = [&BLOBS, &DOCUMENTS, &VERSIONS, &TAGS];

/// The batch's rows; with `lock`, its documents' rows are first held `FOR SHARE` (waiting
/// for writes under way), so that the rows read after are those of finished writes and stay
/// so until the transaction ends: every write to a document updates its row.
async fn read(conn: &mut sqlx::AnyConnection, ids: &[i64], lock: bool) -> Result<Rows, StoreError> {
    if lock {
        let mut query = sqlx::query(AssertSqlSafe(DOCUMENTS.select(ids.len(), true)));
        for id in ids {
            query = query.bind(*id);
        }
        query.fetch_all(&mut *conn).await?;
    }
    let mut all = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let sql = table.select(ids.len(), false);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in ids {
            query = query.bind(*id);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        all.push(rows.iter().map(|r| table.decode(r)).collect::<Result<Vec<_>, _>>()?);
    }
    Ok(all)
}

/// A digest of what the verification compares of `rows`.
fn digest(rows: &Rows) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (table, rows) in TABLES.iter().zip(rows) {
        hash.update(table.name);
        hash.update((rows.len() as u64).to_be_bytes());
        for row in rows {
            for value in &row[..table.compared] {
                match value {
                    Value::Int(v) => hash.update(format!("i{v:?}|")),
                    Value::Text(v) => {
                        let text = v.as_deref().map_or_else(|| "~".to_owned(), |t| format!("{}:{t}", t.len()));
                        hash.update(format!("t{text}|"));
                    }
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
    if source.dialect() != Dialect::Postgres || target.dialect() != Dialect::Postgres {
        return Err(MoveError::NotPostgres);
    }
    if ids.is_empty() {
        return Ok(Copied::default());
    }
    if ids.len() > MAX_BATCH {
        return Err(MoveError::BatchTooLarge(ids.len()));
    }
    // Read committed: each statement sees the writes finished before it, and none can
    // finish on the batch once its documents are held.
    let mut held = source.pool().begin().await?;
    let rows = read(&mut held, ids, true).await?;
    let mut tx = target.pool().begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
    // The target's rows of the batch are replaced whole (versions and tags go with their
    // document), so a copy made again is equal to the source, never doubled.
    let placeholders: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
    let mut clear =
        sqlx::query(AssertSqlSafe(format!("DELETE FROM documents WHERE id IN ({})", placeholders.join(", "))));
    for id in ids {
        clear = clear.bind(*id);
    }
    clear.execute(&mut *tx).await?;
    for (table, rows) in TABLES.iter().zip(&rows) {
        // As many rows a statement as its parameters allow (Postgres takes 65,535).
        for chunk in rows.chunks(MAX_PARAMETERS / table.columns.len()) {
            let sql = table.insert(chunk.len());
            let mut insert = sqlx::query(AssertSqlSafe(sql));
            for value in chunk.iter().flatten() {
                insert = match value {
                    Value::Int(v) => insert.bind(*v),
                    Value::Text(v) => insert.bind(v.clone()),
                };
            }
            insert.execute(&mut *tx).await?;
        }
    }
    let copied = read(&mut tx, ids, false).await?;
    if digest(&copied) != digest(&rows) {
        tx.rollback().await?;
        held.rollback().await?;
        return Err(MoveError::Mismatch { ids: ids.to_vec() });
    }
    tx.commit().await?;
    held.commit().await?;
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let bytes = rows[2]
        .iter()
        .map(|v| match v[3] {
            Value::Int(Some(size)) => u64::try_from(size).unwrap_or(0),
            _ => 0,
        })
        .sum();
    Ok(Copied { documents: count(rows[1].len()), versions: count(rows[2].len()), bytes })
}
