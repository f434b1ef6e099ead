//! Rows moved per second by resharding's copy step against a raw `COPY` of the same rows
//! between the same two Postgres databases (the issue's goal: at least half of it), in
//! one run on the shared Postgres server.
//!
//! A source shard gets `VELLUM_BENCH_DOCUMENTS` documents (default 20,000), each with two
//! versions, two tags and two blobs; a second shard joins the ring, which moves about half
//! of them. The copy step (`vellum_core::resharding::copy_batch`, batches of
//! `VELLUM_BENCH_BATCH`, default 500) copies and verifies them into one fresh database; a
//! raw `COPY … TO STDOUT` piped into `COPY … FROM STDIN` moves the same rows into another.
//! Each is run twice and the faster run counts. Then the hand-over (`hand_over`: the copy,
//! and the documents removed from the source with a marker each, in the same batches) moves
//! them once into a third database, against the same raw `COPY`.
//!
//! ```sh
//! scripts/test --services-only
//! cargo bench -p vellum-core --bench resharding
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use vellum_core::resharding::{copy_batch, hand_over, moving};
use vellum_core::store::Metadata;
use vellum_testkit::TestDatabase;

#[path = "../tests/support/mod.rs"]
mod support;
use support::ring;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new().max_connections(2).connect(url).await.expect("Postgres")
}

/// Documents 1..=n, each with versions 1 and 2, tags `a` and `b`, and a blob per version.
async fn populate(source: &PgPool, n: usize) {
    let statements = [
        "INSERT INTO blobs (sha256, object_key, tier, size, stored_size, compression, created_at) \
         SELECT 'sha' || g, 'objects/' || g, 'hot', 1000 + g, 1000 + g, 'none', g FROM generate_series(1, 2 * $1) g",
        "INSERT INTO documents (id, owner, filename, file_type, content_type, title, description, tags, metadata, \
         current_version, size, sha256, legal_hold, created_at, updated_at) \
         SELECT g, 'user' || (g % 50), 'report-' || g || '.pdf', 'pdf', 'application/pdf', 'Quarterly report ' || g, \
         NULL, '[\"a\",\"b\"]', '{\"department\":\"finance\"}', 2, 1000 + $1 + g, 'sha' || ($1 + g), 0, g, g \
         FROM generate_series(1, $1) g",
        "INSERT INTO versions (document_id, version, sha256, size, filename, content_type, created_at, created_by, \
         change_description, restored_from) \
         SELECT g, v, 'sha' || (CASE WHEN v = 1 THEN g ELSE $1 + g END), 1000 + g, 'report-' || g || '.pdf', \
         'application/pdf', g, 'user' || (g % 50), NULL, NULL FROM generate_series(1, $1) g, generate_series(1, 2) v",
        "INSERT INTO document_tags (document_id, tag) SELECT g, t FROM generate_series(1, $1) g, \
         (VALUES ('a'), ('b')) AS tags(t)",
    ];
    let n = i64::try_from(n).expect("a count");
    for sql in statements {
        sqlx::query(sql).bind(n).execute(source).await.expect("populating the source");
    }
}

/// The tables a move copies, in the order their references allow, with the rows of the
/// moving documents (`bench_moving`) as a query.
const RAW: [(&str, &str); 4] = [
    (
        "blobs",
        "SELECT b.* FROM blobs b WHERE b.sha256 IN \
         (SELECT v.sha256 FROM versions v JOIN bench_moving m ON m.id = v.document_id)",
    ),
    ("documents", "SELECT d.* FROM documents d JOIN bench_moving m ON m.id = d.id"),
    ("versions", "SELECT v.* FROM versions v JOIN bench_moving m ON m.id = v.document_id"),
    ("document_tags", "SELECT t.* FROM document_tags t JOIN bench_moving m ON m.id = t.document_id"),
];

/// Copies the moving rows with `COPY` from `source` into `target`: the time it took.
async fn raw_copy(source: &PgPool, target: &PgPool) -> Duration {
    sqlx::query("TRUNCATE document_tags, versions, documents, blobs CASCADE").execute(target).await.expect("truncate");
    let started = Instant::now();
    let mut from = source.acquire().await.expect("a source connection");
    let mut into = target.acquire().await.expect("a target connection");
    for (table, select) in RAW {
        let mut out = from.copy_out_raw(&format!("COPY ({select}) TO STDOUT")).await.expect("copy out");
        let mut sink = into.copy_in_raw(&format!("COPY {table} FROM STDIN")).await.expect("copy in");
        while let Some(chunk) = out.next().await {
            sink.send(chunk.expect("a chunk")).await.expect("sending a chunk");
        }
        sink.finish().await.expect("copy in finished");
    }
    started.elapsed()
}

/// Copies the moving documents with the copy step, `batch` at a time: the time it took.
async fn step_copy(source: &Metadata, target: &Metadata, ids: &[i64], batch: usize) -> Duration {
    let started = Instant::now();
    for chunk in ids.chunks(batch) {
        copy_batch(source, target, chunk).await.expect("a batch copied");
    }
    started.elapsed()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await.expect("a count")
}

async fn run() {
    let n = knob("VELLUM_BENCH_DOCUMENTS", 20_000);
    let batch = knob("VELLUM_BENCH_BATCH", 500);
    let (source_db, step_db, raw_db, handed_db) = (
        TestDatabase::new().await.expect("a database"),
        TestDatabase::new().await.expect("a database"),
        TestDatabase::new().await.expect("a database"),
        TestDatabase::new().await.expect("a database"),
    );
    let (source, step_target) = (
        Metadata::open(&source_db.url).await.expect("the source shard"),
        Metadata::open(&step_db.url).await.expect("the target shard"),
    );
    // The raw copy's target has the same schema.
    Metadata::open(&raw_db.url).await.expect("the raw copy's database");
    let (source_pg, raw_pg) = (pool(&source_db.url).await, pool(&raw_db.url).await);
    populate(&source_pg, n).await;

    let table = ring(&["a", "b"]);
    let (mut ids, mut after) = (Vec::new(), Some(0));
    let listed = Instant::now();
    while let Some(from) = after {
        let (batch_ids, next) = moving(&source, Some(0), &table, from, 5_000).await.expect("the moving documents");
        ids.extend(batch_ids.into_iter().map(|(id, _)| id));
        after = next;
    }
    let listing = listed.elapsed();
    sqlx::query("CREATE TABLE bench_moving (id BIGINT PRIMARY KEY)").execute(&source_pg).await.expect("a table");
    sqlx::query("INSERT INTO bench_moving SELECT UNNEST($1::BIGINT[])")
        .bind(&ids)
        .execute(&source_pg)
        .await
        .expect("the moving ids");
    let step_pg = pool(&step_db.url).await;

    let mut raw = Duration::MAX;
    let mut step = Duration::MAX;
    for _ in 0..2 {
        raw = raw.min(raw_copy(&source_pg, &raw_pg).await);
        step = step.min(step_copy(&source, &step_target, &ids, batch).await);
    }
    let rows_of = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            let mut total = 0;
            for t in ["blobs", "documents", "versions", "document_tags"] {
                total += count(&pool, &format!("SELECT COUNT(*) FROM {t}")).await;
            }
            total
        }
    };
    let handed_target = Metadata::open(&handed_db.url).await.expect("the hand-over's target");
    let handing = Instant::now();
    for chunk in ids.chunks(batch) {
        hand_over(&source, &handed_target, "b", chunk, 0, 0).await.expect("a batch handed over");
    }
    let handed = handing.elapsed();
    let handed_pg = pool(&handed_db.url).await;
    let (step_rows, raw_rows) = (rows_of(&step_pg).await, rows_of(&raw_pg).await);
    assert_eq!(step_rows, raw_rows, "both copies hold the same rows");
    assert_eq!(rows_of(&handed_pg).await, raw_rows, "the hand-over's target holds the same rows");
    let left = count(&source_pg, "SELECT COUNT(*) FROM documents").await;
    assert_eq!(left, i64::try_from(n - ids.len()).expect("a count"), "the source keeps only what stays");
    #[allow(clippy::cast_precision_loss)]
    let per_second = |d: Duration| raw_rows as f64 / d.as_secs_f64();
    println!(
        "resharding copy of {} of {n} documents ({raw_rows} rows), batches of {batch}; listing the movers took {:.2} s",
        ids.len(),
        listing.as_secs_f64()
    );
    println!(
        "  copy step (copied and verified): {:.0} rows/s | raw COPY between the same databases: {:.0} rows/s | ratio {:.2} (goal >= 0.5)",
        per_second(step),
        per_second(raw),
        raw.as_secs_f64() / step.as_secs_f64()
    );
    println!(
        "  hand-over (copied, verified, removed from the source, marked): {:.0} rows/s | ratio to raw COPY {:.2} (goal >= 0.5)",
        per_second(handed),
        raw.as_secs_f64() / handed.as_secs_f64()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(run());
}
