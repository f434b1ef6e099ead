//! Rows moved per second by resharding's copy step against a raw `COPY` of the same rows
//! between the same two Postgres databases (the issue's goal: at least half of it), in
//! one run on the shared Postgres server.
//!
//! A source shard gets `VELLUM_BENCH_DOCUMENTS` documents (default 20,000), each with two
//! versions, two tags and two blobs; a second shard joins the ring, which moves about half
//! of them. The copy step (`vellum_core::resharding::copy_batch`, batches of
//! `VELLUM_BENCH_BATCH`, default 500) copies and verifies them into one fresh database; a
//! raw `COPY … TO STDOUT` piped into `COPY … FROM STDIN` moves the same rows into another.
//! Each is run twice and the faster run counts. Then the hand-over (`HandOvers`: the copy,
//! and the documents removed from the source with a marker each, in the same batches, in
//! two lanes as the mover runs it when its pool has room) moves them into a third database
//! and back, `VELLUM_BENCH_HANDOVERS` times (default 3), each way against the faster of the
//! raw `COPY`s of the same rows made just before and just after it (this machine's speed
//! drifts); the ratio printed is the median of the rounds', with their range.
//!
//! Then the routing's cost on reads: metadata reads per second through a library of 1, 2
//! and 4 shards (databases on the same Postgres server, the documents spread as the routing
//! sends them) against the same reads from one database directly (goal: at least 0.9), with
//! `VELLUM_BENCH_READERS` concurrent readers (default 8): after a second of each to open
//! the pools' connections, `VELLUM_BENCH_ROUNDS` rounds (default 7) of
//! `VELLUM_BENCH_SECONDS` (default 2) directly and through the routing, which of the two
//! first alternating from round to round; the ratio printed is the median of the rounds'
//! ratios, with their range.
//!
//! Last, the requests failed during a move: readers, writers and uploaders go on through a
//! library that knows a move from one shard to two while the mover hands the documents
//! over; every request is counted, and every failure printed (goal: none).
//!
//! ```sh
//! scripts/test --services-only
//! cargo bench -p vellum-core --bench resharding
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::memory::InMemory;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use vellum_core::blob::{Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, Documents, Library, MetadataPatch, NewDocument, shard_connections};
use vellum_core::resharding::run_move;
use vellum_core::resharding::{HandOvers, copy_batch, moving};
use vellum_core::routing::RoutingTable;
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

/// Lists the moving documents `ids` in `bench_moving` on `pool`, for [`RAW`]'s queries.
async fn list_moving(pool: &PgPool, ids: &[i64]) {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_moving (id BIGINT PRIMARY KEY)")
        .execute(pool)
        .await
        .expect("a table");
    sqlx::query("INSERT INTO bench_moving SELECT UNNEST($1::BIGINT[]) ON CONFLICT DO NOTHING")
        .bind(ids)
        .execute(pool)
        .await
        .expect("the moving ids");
}

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

/// The rows of the tables a copy fills.
async fn rows_of(pool: &PgPool) -> i64 {
    let mut total = 0;
    for t in ["blobs", "documents", "versions", "document_tags"] {
        total += count(pool, &format!("SELECT COUNT(*) FROM {t}")).await;
    }
    total
}

/// Hands the documents `ids` over from `a` to `b` and back, `batch` at a time, each way
/// beside raw COPYs of the same rows made just before and just after it (from where the
/// rows are then), as this machine's speed drifts and a reference measured minutes apart
/// says less: each way's time, and the three raw COPYs' (before, between, after).
async fn there_and_back(
    (a, a_pg): (&Metadata, &PgPool),
    (b, b_pg): (&Metadata, &PgPool),
    raw_pg: &PgPool,
    ids: &[i64],
    batch: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    list_moving(b_pg, ids).await;
    let (moved, whole) = (rows_of(raw_pg).await, rows_of(a_pg).await);
    let mut beside = vec![raw_copy(a_pg, raw_pg).await];
    let mut handed = Vec::new();
    for ((from, from_pg), (to, to_name, to_pg)) in [((a, a_pg), (b, "b", b_pg)), ((b, b_pg), (a, "a", a_pg))] {
        let handing = Instant::now();
        let mut pipeline = HandOvers::for_source(from);
        for chunk in ids.chunks(batch) {
            pipeline.push(from, to, to_name, chunk, 0, 0).await.expect("a batch handed over");
        }
        pipeline.finish().await.expect("the last batch handed over");
        handed.push(handing.elapsed());
        let expected = if to_name == "b" { moved } else { whole };
        assert_eq!(rows_of(to_pg).await, expected, "the hand-over's target holds the rows it should");
        assert_eq!(rows_of(from_pg).await, whole - expected, "the source keeps only what stays");
        // The rows are now where the hand-over put them: the next raw COPY reads them there.
        beside.push(raw_copy(to_pg, raw_pg).await);
        assert_eq!(rows_of(raw_pg).await, moved, "the raw COPY beside it copies the same rows");
    }
    (handed, beside)
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
    list_moving(&source_pg, &ids).await;
    let step_pg = pool(&step_db.url).await;

    let mut raw = Duration::MAX;
    let mut step = Duration::MAX;
    for _ in 0..2 {
        raw = raw.min(raw_copy(&source_pg, &raw_pg).await);
        step = step.min(step_copy(&source, &step_target, &ids, batch).await);
    }
    let handed_target = Metadata::open(&handed_db.url).await.expect("the hand-over's target");
    let handed_pg = pool(&handed_db.url).await;
    let (step_rows, raw_rows) = (rows_of(&step_pg).await, rows_of(&raw_pg).await);
    assert_eq!(step_rows, raw_rows, "both copies hold the same rows");
    #[allow(clippy::cast_precision_loss)]
    let per_second = |d: Duration| raw_rows as f64 / d.as_secs_f64();
    // Each way's ratios and rates (hand-over, raw COPY beside it), round by round.
    let rounds = knob("VELLUM_BENCH_HANDOVERS", 3).max(1);
    let (mut ratios, mut rates) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..rounds {
        let (handed, beside) =
            there_and_back((&source, &source_pg), (&handed_target, &handed_pg), &raw_pg, &ids, batch).await;
        for (way, (took, around)) in handed.iter().zip(beside.windows(2)).enumerate() {
            let reference = around[0].min(around[1]);
            ratios[way].push(reference.as_secs_f64() / took.as_secs_f64());
            rates[way].push((per_second(*took), per_second(reference)));
        }
    }
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
    for (way, (ratios, rates)) in ["there", "back"].iter().zip(ratios.into_iter().zip(rates)) {
        let (low, high) = range(&ratios);
        println!(
            "  hand-over {way} (copied, verified, removed from the source, marked): {:.0} rows/s | raw COPY beside it: {:.0} rows/s | ratio {:.2}, median of {rounds} rounds ({low:.2}-{high:.2}) (goal >= 0.5)",
            median(rates.iter().map(|r| r.0).collect()),
            median(rates.iter().map(|r| r.1).collect()),
            median(ratios)
        );
    }
    for meta in [&source, &step_target, &handed_target] {
        meta.close().await;
    }
    for pg in [&source_pg, &raw_pg, &step_pg, &handed_pg] {
        pg.close().await;
    }
    routing_overhead(n).await;
    failures_during_a_move(n, batch).await;
}

/// The middle value of `values` (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The lowest and the highest of `values`.
fn range(values: &[f64]) -> (f64, f64) {
    (values.iter().copied().fold(f64::MAX, f64::min), values.iter().copied().fold(0f64, f64::max))
}

fn tiers() -> Tiers {
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::new(InMemory::new()));
    Tiers::new(vec![Arc::new(tier)], "hot").expect("a tier")
}

fn admin() -> Actor {
    Actor { user: "bench".into(), admin: true }
}

/// A database holding the documents of `1..=n` that `table` routes to shard `index`, its
/// pool sized as a replica sizes each of `table`'s shards.
async fn shard_of(n: usize, table: &RoutingTable, index: usize) -> (TestDatabase, Documents) {
    let db = TestDatabase::new().await.expect("a database");
    let meta = Metadata::open_with(&db.url, shard_connections(table.names().len())).await.expect("a shard");
    let pg = pool(&db.url).await;
    populate(&pg, n).await;
    let elsewhere: Vec<i64> =
        (1..=i64::try_from(n).expect("a count")).filter(|id| table.shard_of_id(*id) != index).collect();
    sqlx::query("DELETE FROM documents WHERE id = ANY($1)").bind(&elsewhere).execute(&pg).await.expect("deleting");
    // The shard as it is in use: only its documents' blobs, and its tables vacuumed and
    // analyzed (as autovacuum leaves them, but not in the middle of a measurement).
    sqlx::query("DELETE FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256)")
        .execute(&pg)
        .await
        .expect("deleting the blobs of documents elsewhere");
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pg).await.expect("vacuuming");
    pg.close().await;
    (db, Documents::new(meta, tiers(), Clock::system(), None, 1 << 20))
}

/// Metadata reads per second of `readers` concurrent readers of random documents among
/// `1..=n`, for `span`, each read through `read`.
async fn reads_per_second<F>(n: usize, readers: usize, span: Duration, read: F) -> f64
where
    F: Fn(i64) -> futures::future::BoxFuture<'static, bool> + Sync,
{
    let count = AtomicU64::new(0);
    let started = Instant::now();
    let read = &read;
    let count = &count;
    let loops = (0..readers).map(|r| async move {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (r as u64 + 1);
        while started.elapsed() < span {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = i64::try_from(x % n as u64).expect("an id") + 1;
            assert!(read(id).await, "document {id} read");
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    futures::future::join_all(loops).await;
    #[allow(clippy::cast_precision_loss)]
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    rate
}

/// Reads through libraries of 1, 2 and 4 shards against reads of one database.
async fn routing_overhead(n: usize) {
    let readers = knob("VELLUM_BENCH_READERS", 8);
    let span = Duration::from_secs(u64::try_from(knob("VELLUM_BENCH_SECONDS", 2)).expect("seconds"));
    let rounds = knob("VELLUM_BENCH_ROUNDS", 7).max(1);
    let (_single_db, single) = shard_of(n, &ring(&["a"]), 0).await;
    let direct = || {
        let single = single.clone();
        move |id: i64| -> futures::future::BoxFuture<'static, bool> {
            let single = single.clone();
            Box::pin(async move { single.get(&admin(), id).await.is_ok() })
        }
    };
    let routed = |library: &Arc<Library>| {
        let library = Arc::clone(library);
        move |id: i64| -> futures::future::BoxFuture<'static, bool> {
            let library = Arc::clone(&library);
            Box::pin(async move {
                let me = admin();
                library.at(id, |shard| Box::pin(shard.get(&me, id))).await.is_ok()
            })
        }
    };
    println!(
        "metadata reads of {n} documents, {readers} readers, each routed count side by side with one database read directly:"
    );
    // One library at a time, its connections closed before the next: the server's
    // connections are bounded (100 by default).
    for count in [1usize, 2, 4] {
        let names: Vec<String> = (0..count).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let table = ring(&refs);
        let mut shards = Vec::new();
        let mut databases = Vec::new();
        for index in 0..count {
            let (db, docs) = shard_of(n, &table, index).await;
            databases.push(db);
            shards.push(docs);
        }
        let library = Arc::new(Library::sharded(Arc::new(table), shards));
        // A round of each first, unmeasured: the pools open their connections. Then rounds
        // side by side, each routed measurement paired with the direct one next to it:
        // on a shared machine the rate of either drifts by a fifth between rounds, and the
        // median of the pairs' ratios follows what the two have in common.
        reads_per_second(n, readers, Duration::from_secs(1), direct()).await;
        reads_per_second(n, readers, Duration::from_secs(1), routed(&library)).await;
        let (mut ratios, mut rates) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Which of the two goes first alternates, so a drift within a round (the
            // machine's load rising or falling) weighs on each as often.
            let (alone, through) = if round % 2 == 0 {
                let alone = reads_per_second(n, readers, span, direct()).await;
                (alone, reads_per_second(n, readers, span, routed(&library)).await)
            } else {
                let through = reads_per_second(n, readers, span, routed(&library)).await;
                (reads_per_second(n, readers, span, direct()).await, through)
            };
            ratios.push(through / alone);
            rates.push((through, alone));
        }
        let through = median(rates.iter().map(|r| r.0).collect());
        let alone = median(rates.iter().map(|r| r.1).collect());
        let (low, high) = range(&ratios);
        println!(
            "  through the routing, {count} shard(s) on the same server: {through:.0} reads/s | directly {alone:.0} reads/s | ratio {:.2}, median of {rounds} rounds side by side ({low:.2}-{high:.2}) (goal >= 0.9)",
            median(ratios)
        );
        for shard in library.shards() {
            shard.meta().close().await;
        }
    }
    single.meta().close().await;
}

/// Requests answered and failed while a move from one shard to two runs.
async fn failures_during_a_move(n: usize, batch: usize) {
    let one = Arc::new(ring(&["a"]));
    let two = Arc::new(ring(&["a", "b"]));
    let (_a_db, a) = shard_of(n, &one, 0).await;
    let b_db = TestDatabase::new().await.expect("a database");
    let b =
        Documents::new(Metadata::open(&b_db.url).await.expect("a shard"), a.tiers(), Clock::system(), None, 1 << 20);
    let growing = Library::moving(Arc::clone(&one), Some(Arc::clone(&two)), Vec::new(), vec![a, b]);
    let done = AtomicBool::new(false);
    let (answered, failed) = (AtomicU64::new(0), std::sync::Mutex::new(Vec::new()));
    let note = |what: &str, ok: Result<(), String>| {
        answered.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ok {
            failed.lock().expect("the failures").push(format!("{what}: {e}"));
        }
    };
    let n64 = i64::try_from(n).expect("a count");
    let me = admin();
    let reader = |start: i64| {
        let (growing, me, done, note) = (&growing, &me, &done, &note);
        async move {
            let mut id = start;
            while !done.load(Ordering::SeqCst) {
                id = id * 7 % n64 + 1;
                let got = growing.at(id, |shard| Box::pin(shard.get(me, id))).await;
                note("read", got.map(drop).map_err(|e| e.to_string()));
            }
        }
    };
    let writer = async {
        let mut id = 3;
        while !done.load(Ordering::SeqCst) {
            id = id * 11 % n64 + 1;
            let patch =
                MetadataPatch { title: Some(Some(format!("during the move {id}"))), ..MetadataPatch::default() };
            let updated = growing.at(id, |shard| Box::pin(shard.update(&me, id, patch.clone()))).await;
            note("update", updated.map(drop).map_err(|e| e.to_string()));
        }
    };
    let uploader = async {
        let mut i = 0;
        while !done.load(Ordering::SeqCst) {
            i += 1;
            let result = async {
                let mut upload = growing.begin_document();
                upload.store("text/plain", once(format!("uploaded during the move {i}"))).await?;
                let new = NewDocument { filename: format!("during-{i}.txt"), ..NewDocument::default() };
                upload.finish(&me, &Documents::prepare(new)?).await
            }
            .await;
            note("upload", result.map(drop).map_err(|e| e.to_string()));
        }
    };
    let started = Instant::now();
    let mover = async {
        let sums = run_move(&growing, batch, 0, &|_| {}).await.expect("the move");
        done.store(true, Ordering::SeqCst);
        sums
    };
    let (sums, (), (), (), (), ()) = tokio::join!(mover, reader(1), reader(2), reader(5), writer, uploader);
    let failed = failed.into_inner().expect("the failures");
    println!(
        "requests during a move of {} of {n} documents from one shard to two ({:.1} s): {} answered, {} failed (goal 0)",
        sums[0].1.moved_documents,
        started.elapsed().as_secs_f64(),
        answered.load(Ordering::Relaxed),
        failed.len()
    );
    for failure in failed.iter().take(10) {
        println!("  failed: {failure}");
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(run());
}
