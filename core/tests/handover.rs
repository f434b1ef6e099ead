//! Live resharding's hand-over, on two real Postgres databases sharing one tier: documents
//! handed over batch by batch from the shard they were on to the shard a new routing table
//! sends them to, while readers, writers, uploaders and listings go on through a library
//! that knows the move. Nothing fails, nothing is lost, nothing is listed twice or missed;
//! a replica that does not know the move is told to retry rather than answered wrongly;
//! and the stored copies the moved documents share with the source stay when the source's
//! collector runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::memory::InMemory;
use vellum_core::blob::{Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, DocError, Documents, Library, ListQuery, MetadataPatch, NewDocument, NewVersion};
use vellum_core::resharding::{begin_move, hand_over, moving};
use vellum_core::store::Metadata;
use vellum_testkit::TestDatabase;

mod support;
use support::ring;

const START: i64 = 1_767_225_600_000;
const GRACE: i64 = 5 * 60_000;

struct Platform {
    a: Documents,
    b: Documents,
    clock: Clock,
    _dbs: [TestDatabase; 2],
}

async fn platform() -> Platform {
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::new(InMemory::new()));
    let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
    let clock = Clock::manual(START);
    let (da, db) = (TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap());
    let a = Documents::new(Metadata::open(&da.url).await.unwrap(), tiers.clone(), clock.clone(), None, 1 << 20);
    let b = Documents::new(Metadata::open(&db.url).await.unwrap(), tiers, clock.clone(), None, 1 << 20);
    Platform { a, b, clock, _dbs: [da, db] }
}

fn alice() -> Actor {
    Actor { user: "alice".into(), admin: false }
}

async fn bytes_of(library: &Library, id: i64, version: i64) -> Result<Vec<u8>, DocError> {
    let me = alice();
    let content = library.at(id, |shard| Box::pin(shard.content(&me, id, Some(version)))).await?;
    let stream = library.at(id, |shard| Box::pin(shard.read(&content, None))).await?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.map_err(|e| DocError::Invalid(e.to_string()))?;
    Ok(chunks.concat())
}

async fn count(docs: &Documents, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(docs.meta().pool())
        .await
        .unwrap()
}

/// What the traffic was told, to check against what the shards hold after the move.
#[derive(Default)]
struct Acknowledged {
    titles: BTreeMap<i64, String>,
    /// Every version's bytes, by document and version number.
    versions: BTreeMap<(i64, i64), Vec<u8>>,
    new_documents: BTreeSet<i64>,
    failures: Vec<String>,
    requests: u64,
    /// Requests answered before the last batch was handed over.
    during: u64,
}

impl Acknowledged {
    fn record<T>(&mut self, what: &str, result: &Result<T, DocError>, moving: bool) {
        self.requests += 1;
        self.during += u64::from(moving);
        if let Err(e) = result {
            self.failures.push(format!("{what}: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn documents_are_handed_over_batch_by_batch_while_every_request_is_answered() {
    let p = platform().await;
    let me = alice();
    let root = Actor { user: "root".into(), admin: true };
    let one = Arc::new(ring(&["a"]));
    let two = Arc::new(ring(&["a", "b"]));
    let before = Library::sharded(Arc::clone(&one), vec![p.a.clone()]);
    let acknowledged = Mutex::new(Acknowledged::default());
    let mut ids = Vec::new();
    for i in 0..160 {
        let new = NewDocument { filename: format!("d{i}.txt"), tags: vec!["all".into()], ..NewDocument::default() };
        let mut upload = before.begin_document();
        let body = format!("document {i}");
        upload.store("text/plain", once(body.clone())).await.unwrap();
        let id = upload.finish(&me, &Documents::prepare(new).unwrap()).await.unwrap().document.id;
        acknowledged.lock().unwrap().versions.insert((id, 1), body.into_bytes());
        ids.push(id);
    }
    // One document's bytes are also another's that stays: the stored copy is shared.
    let twin = ids.iter().copied().find(|id| two.shard_of_id(*id) == 1).unwrap();
    let stays = ids.iter().copied().find(|id| two.shard_of_id(*id) == 0).unwrap();
    let twin_bytes = acknowledged.lock().unwrap().versions[&(twin, 1)].clone();
    let shared = before
        .at(stays, |shard| Box::pin(shard.upload_version(&me, stays, NewVersion::default(), once(twin_bytes.clone()))))
        .await
        .unwrap();
    assert!(shared.deduplicated, "the second document's version shares the first's stored copy");
    acknowledged.lock().unwrap().versions.insert((stays, 2), twin_bytes.clone());

    // The move: the library knows both tables; the source is marked before it is listed.
    let library = Library::moving(Arc::clone(&one), Some(Arc::clone(&two)), Vec::new(), vec![p.a.clone(), p.b.clone()]);
    begin_move(p.a.meta(), Some(two.version()), START).await.unwrap();
    let stale = Library::sharded(Arc::clone(&one), vec![p.a.clone()]);
    let mut stale_upload = stale.begin_document();
    stale_upload.store("text/plain", once("from a replica that does not know the move")).await.unwrap();
    let refused = stale_upload
        .finish(&me, &Documents::prepare(NewDocument { filename: "x.txt".into(), ..NewDocument::default() }).unwrap())
        .await;
    assert!(matches!(&refused, Err(DocError::Unavailable(m)) if m.contains(two.version())), "{refused:?}");

    let done = AtomicBool::new(false);
    let handed = Mutex::new(Vec::<i64>::new());
    let mover = async {
        let mut after = Some(0);
        let mut batches = 0;
        while let Some(from) = after {
            let (batch, next) = moving(p.a.meta(), Some(0), &two, from, 6).await.unwrap();
            let batch: Vec<i64> = batch
                .into_iter()
                .map(|(id, to)| {
                    assert_eq!(to, 1);
                    id
                })
                .collect();
            hand_over(p.a.meta(), p.b.meta(), "b", &batch, p.clock.now_ms(), GRACE).await.unwrap();
            handed.lock().unwrap().extend(&batch);
            batches += 1;
            after = next;
            // Room for the traffic between batches, as a worker's pace leaves.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        done.store(true, Ordering::SeqCst);
        batches
    };
    let (batches, ()) = tokio::join!(mover, traffic(&library, &ids, &done, &acknowledged));
    let ack = acknowledged.into_inner().unwrap();
    assert!(ack.failures.is_empty(), "{} of {} requests failed: {:#?}", ack.failures.len(), ack.requests, ack.failures);
    assert!(batches > 2, "the move took {batches} batches");
    assert!(ack.during > 150, "{} of {} requests during the move", ack.during, ack.requests);
    eprintln!("{} batches; {} of {} requests answered during the move, none failed", batches, ack.during, ack.requests);
    let handed = handed.into_inner().unwrap();
    let expected: Vec<i64> = ids.iter().copied().filter(|id| two.shard_of_id(*id) == 1).collect();
    assert_eq!(handed.iter().copied().collect::<BTreeSet<_>>(), expected.iter().copied().collect(), "each mover once");

    // After the flip: the new table alone routes, and finds everything acknowledged where it
    // routes it. A replica still on the old table follows the markers the move left.
    let after = Library::sharded(Arc::clone(&two), vec![p.a.clone(), p.b.clone()]);
    let still_old =
        Library::moving(Arc::clone(&one), Some(Arc::clone(&two)), Vec::new(), vec![p.a.clone(), p.b.clone()]);
    let all: BTreeSet<i64> = ids.iter().copied().chain(ack.new_documents.iter().copied()).collect();
    for id in &all {
        let owner = two.shard_of_id(*id);
        let direct = after.shards()[owner].get(&me, *id).await;
        assert!(direct.is_ok(), "document {id} is on shard {owner}: {direct:?}");
        assert!(after.shards()[1 - owner].get(&me, *id).await.is_err(), "document {id} is on one shard only");
        if let Some(title) = ack.titles.get(id) {
            assert_eq!(direct.as_ref().unwrap().title.as_deref(), Some(title.as_str()), "document {id}'s last title");
        }
        let history = after.at(*id, |shard| Box::pin(shard.versions(&me, *id))).await.unwrap();
        let acknowledged_versions = ack.versions.keys().filter(|(doc, _)| doc == id).count();
        assert_eq!(history.versions.len(), acknowledged_versions, "document {id}'s every acknowledged version");
        assert!(still_old.at(*id, |shard| Box::pin(shard.get(&me, *id))).await.is_ok());
    }
    for id in &ack.new_documents {
        assert_eq!(one.shard_of_id(*id), two.shard_of_id(*id), "new document {id} was put where it stays");
    }
    assert_eq!(count(&p.a, "moved_documents").await, i64::try_from(expected.len()).unwrap());
    // A replica that knows neither the move nor shard b is told to retry, not "not found".
    let unknown = stale.at(expected[0], |shard| Box::pin(shard.get(&me, expected[0]))).await;
    assert!(matches!(&unknown, Err(DocError::Unavailable(m)) if m.contains("shard b")), "{unknown:?}");

    // Past every claim and grace, both collectors run, the source's after its copy of a
    // shared blob lost its last reference there: every acknowledged version still reads.
    after.at(stays, |shard| Box::pin(shard.purge(&root, stays))).await.unwrap();
    p.clock.advance(48 * 3_600_000);
    for shard in after.shards() {
        shard.collect_garbage().await.unwrap();
    }
    for ((id, version), bytes) in &ack.versions {
        if *id == stays {
            continue;
        }
        assert_eq!(&bytes_of(&after, *id, *version).await.unwrap(), bytes, "document {id} version {version}");
    }
    assert_eq!(bytes_of(&after, twin, 1).await.unwrap(), twin_bytes, "the copy the source shared with the moved twin");
    assert_eq!(count(&p.a, "blob_garbage").await, 0, "the source's claim on the shared copy is dropped, not acted on");
}

/// Readers (metadata and bytes), metadata writers, new versions, new documents and
/// listings of everything, each going on until the move is `done` and a few times more.
async fn traffic(library: &Library, ids: &[i64], done: &AtomicBool, acknowledged: &Mutex<Acknowledged>) {
    let me = alice();
    let pick = |n: u64| ids[usize::try_from(n).unwrap() % ids.len()];
    let readers = async {
        let mut n = 0u64;
        while !done.load(Ordering::SeqCst) || n < 40 {
            let id = pick(n * 7 + 3);
            let got = library.at(id, |shard| Box::pin(shard.get(&me, id))).await;
            let expected = acknowledged.lock().unwrap().versions.get(&(id, 1)).cloned();
            let bytes = bytes_of(library, id, 1).await;
            let mut ack = acknowledged.lock().unwrap();
            ack.record("get", &got, !done.load(Ordering::SeqCst));
            ack.record("download", &bytes, !done.load(Ordering::SeqCst));
            if let (Ok(bytes), Some(expected)) = (&bytes, expected)
                && *bytes != expected
            {
                ack.failures.push(format!("document {id} version 1 downloaded other bytes"));
            }
            n += 1;
        }
    };
    let writers = async {
        let mut n = 0u64;
        while !done.load(Ordering::SeqCst) || n < 40 {
            let id = pick(n * 11 + 5);
            let title = format!("title {n}");
            let patch = MetadataPatch { title: Some(Some(title.clone())), ..MetadataPatch::default() };
            let updated = library.at(id, |shard| Box::pin(shard.update(&me, id, patch.clone()))).await;
            let mut ack = acknowledged.lock().unwrap();
            ack.record("update", &updated, !done.load(Ordering::SeqCst));
            if updated.is_ok() {
                ack.titles.insert(id, title);
            }
            n += 1;
        }
    };
    let versioners = async {
        let mut n = 0u64;
        while !done.load(Ordering::SeqCst) || n < 20 {
            let id = pick(n * 13 + 1);
            let body = format!("version of {id} number {n}");
            let result = async {
                let mut upload = library.begin_version(&me, id).await?;
                upload.store("text/plain", once(body.clone())).await?;
                upload.finish(&me, NewVersion::default()).await
            }
            .await;
            let mut ack = acknowledged.lock().unwrap();
            ack.record("new version", &result, !done.load(Ordering::SeqCst));
            if let Ok(uploaded) = result {
                ack.versions.insert((id, uploaded.version_number), body.into_bytes());
            }
            n += 1;
        }
    };
    let uploaders = async {
        let mut n = 0u64;
        while !done.load(Ordering::SeqCst) || n < 20 {
            let body = format!("new document {n}");
            let result = async {
                let mut upload = library.begin_document();
                upload.store("text/plain", once(body.clone())).await?;
                let new =
                    NewDocument { filename: format!("n{n}.txt"), tags: vec!["all".into()], ..NewDocument::default() };
                upload.finish(&me, &Documents::prepare(new)?).await
            }
            .await;
            let mut ack = acknowledged.lock().unwrap();
            ack.record("upload", &result, !done.load(Ordering::SeqCst));
            if let Ok(uploaded) = result {
                ack.new_documents.insert(uploaded.document.id);
                ack.versions.insert((uploaded.document.id, 1), body.into_bytes());
            }
            n += 1;
        }
    };
    let listers = async {
        let mut n = 0u64;
        let all = ListQuery { tag: Some("all".into()), limit: Some(1000), ..ListQuery::default() };
        while !done.load(Ordering::SeqCst) || n < 10 {
            let page = library.list(&me, &all).await;
            let mut ack = acknowledged.lock().unwrap();
            ack.record("list", &page, !done.load(Ordering::SeqCst));
            if let Ok(page) = page {
                let listed: Vec<i64> = page.items.iter().map(|d| d.id).collect();
                let unique: BTreeSet<i64> = listed.iter().copied().collect();
                if unique.len() != listed.len() {
                    let mut seen = BTreeSet::new();
                    let twice: Vec<&i64> = listed.iter().filter(|id| !seen.insert(**id)).collect();
                    ack.failures.push(format!("a listing named documents twice: {twice:?}"));
                }
                if let Some(missed) = ids.iter().find(|id| !unique.contains(id)) {
                    ack.failures.push(format!("a listing missed document {missed}"));
                }
            }
            n += 1;
        }
    };
    tokio::join!(readers, writers, versioners, uploaders, listers);
}

/// A crash between a hand-over's two commits leaves the batch copied to the target and
/// still the source's (no marker): reads are answered by the source, a listing names each
/// document once, and the hand-over made again replaces the copy and completes, with a
/// change made in between carried over.
#[tokio::test]
async fn a_hand_over_interrupted_between_its_commits_is_made_again_without_doubling() {
    let p = platform().await;
    let me = alice();
    let one = Arc::new(ring(&["a"]));
    let two = Arc::new(ring(&["a", "b"]));
    let library = Library::moving(Arc::clone(&one), Some(Arc::clone(&two)), Vec::new(), vec![p.a.clone(), p.b.clone()]);
    let mut ids = Vec::new();
    for i in 0..24 {
        let new = NewDocument { filename: format!("d{i}.txt"), tags: vec!["all".into()], ..NewDocument::default() };
        ids.push(p.a.upload(&me, new, once(format!("document {i}"))).await.unwrap().document.id);
    }
    let (batch, _) = moving(p.a.meta(), Some(0), &two, 0, 100).await.unwrap();
    let batch: Vec<i64> = batch.into_iter().map(|(id, _)| id).collect();
    assert!(batch.len() > 1, "{batch:?}");
    // The state a crash after the target's commit leaves: the copy, and no marker.
    vellum_core::resharding::copy_batch(p.a.meta(), p.b.meta(), &batch).await.unwrap();
    let all = ListQuery { tag: Some("all".into()), limit: Some(100), ..ListQuery::default() };
    let listed: Vec<i64> = library.list(&me, &all).await.unwrap().items.iter().map(|d| d.id).collect();
    assert_eq!(listed.len(), ids.len(), "each document once: {listed:?}");
    assert_eq!(listed.iter().copied().collect::<BTreeSet<_>>(), ids.iter().copied().collect());
    let patch = MetadataPatch { title: Some(Some("changed after the copy".into())), ..MetadataPatch::default() };
    let changed = library.at(batch[0], |shard| Box::pin(shard.update(&me, batch[0], patch.clone()))).await.unwrap();
    assert_eq!(changed.title.as_deref(), Some("changed after the copy"), "the source still answers");
    let root = Actor { user: "root".into(), admin: true };
    library.at(batch[1], |shard| Box::pin(shard.purge(&root, batch[1]))).await.unwrap();

    hand_over(p.a.meta(), p.b.meta(), "b", &batch, p.clock.now_ms(), GRACE).await.unwrap();
    assert!(p.b.get(&me, batch[1]).await.is_err(), "the copy of a document purged meanwhile goes too");
    let moved_count = i64::try_from(batch.len() - 1).unwrap();
    assert_eq!(count(&p.b, "documents").await, moved_count, "the copy was replaced, not doubled");
    assert_eq!(count(&p.b, "versions").await, moved_count);
    assert_eq!(count(&p.a, "documents").await, i64::try_from(ids.len() - batch.len()).unwrap());
    let now = p.b.get(&me, batch[0]).await.unwrap();
    assert_eq!(now.title.as_deref(), Some("changed after the copy"), "the change made in between was carried over");
    // Made a third time (the worker did not learn that it had finished): nothing changes.
    let again = hand_over(p.a.meta(), p.b.meta(), "b", &batch, p.clock.now_ms(), GRACE).await.unwrap();
    assert_eq!(again.documents, 0, "nothing is left on the source to hand over");
    assert_eq!(count(&p.b, "documents").await, moved_count);
    for id in batch.iter().filter(|id| **id != batch[1]) {
        assert!(library.at(*id, |shard| Box::pin(shard.get(&me, *id))).await.is_ok());
    }
}

/// Two lanes hand over batches whose documents share stored content (one blob row for
/// many documents, deduplicated on upload) at once: on the target, the second lane's copy
/// of a shared blob row waits for the first's and keeps it (it does not fail to
/// serialize); on the source, the last document referring to a blob row takes it along,
/// and no blob row is left behind that no document refers to.
#[tokio::test]
async fn lanes_side_by_side_hand_over_documents_sharing_their_content() {
    use vellum_core::resharding::HandOvers;
    let p = platform().await;
    let me = alice();
    let two = ring(&["a", "b"]);
    // The documents leaving for b go in batches of three, dealt to the two lanes in turn,
    // and the two batches of a step share their contents: each slot's content is new at
    // that step, so both lanes write its blob row at once.
    let (mut ids, mut leaving) = (Vec::new(), 0);
    for i in 0..100 {
        let bytes = format!("step {} slot {}", leaving / 6, leaving % 3);
        let new = NewDocument { filename: format!("d{i}.txt"), ..NewDocument::default() };
        let id = p.a.upload(&me, new, once(bytes.clone())).await.unwrap().document.id;
        leaving += usize::from(two.shard_of_id(id) == 1);
        ids.push((id, bytes));
    }
    let blobs = count(&p.a, "blobs").await;
    assert!(usize::try_from(blobs).unwrap() <= leaving.div_ceil(6) * 3 + 3, "deduplicated: {blobs} blob rows");
    let leaving: Vec<&(i64, String)> = ids.iter().filter(|(id, _)| two.shard_of_id(*id) == 1).collect();
    assert!(leaving.len() > 30, "{}", leaving.len());
    let mut lanes = HandOvers::new(2);
    let mut moved = 0;
    for batch in leaving.chunks(3) {
        let batch: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        moved += lanes.push(p.a.meta(), p.b.meta(), "b", &batch, p.clock.now_ms(), GRACE).await.unwrap().documents;
    }
    moved += lanes.finish().await.unwrap().documents;
    assert_eq!(moved, u64::try_from(leaving.len()).unwrap(), "every batch was released");
    assert_eq!(count(&p.b, "documents").await, i64::try_from(leaving.len()).unwrap());
    for (id, bytes) in &leaving {
        let content = p.b.content(&me, *id, None).await.unwrap();
        let read: Vec<bytes::Bytes> = p.b.read(&content, None).await.unwrap().try_collect().await.unwrap();
        assert_eq!(read.concat(), bytes.as_bytes(), "document {id} reads from its new shard");
    }
    for shard in [&p.a, &p.b] {
        let unreferenced: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256)",
        )
        .fetch_one(shard.meta().pool())
        .await
        .unwrap();
        assert_eq!(unreferenced, 0, "a blob row no document refers to was left behind");
    }
    let staying = i64::try_from(ids.len() - leaving.len()).unwrap();
    assert_eq!(count(&p.a, "documents").await, staying);
}

/// A release that shares a blob row with another release under way on its source (another
/// lane's) waits for that one to commit, and then, seeing the other batch's versions gone,
/// takes the blob row along: at once, each would see the other's versions and keep a row
/// that neither needs. The other release is played by a transaction that has done what a
/// release does before it decides about blob rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_sharing_a_blob_row_with_one_under_way_waits_for_it_and_takes_the_row() {
    let p = platform().await;
    let me = alice();
    let two = ring(&["a", "b"]);
    let mut leaving = Vec::new();
    for i in 0.. {
        let new = NewDocument { filename: format!("d{i}.txt"), ..NewDocument::default() };
        let id = p.a.upload(&me, new, once(format!("document {i}"))).await.unwrap().document.id;
        if two.shard_of_id(id) == 1 {
            leaving.push(id);
            if leaving.len() == 2 {
                break;
            }
        }
    }
    let (first, second) = (leaving[0], leaving[1]);
    // Both documents' second versions have the same content: one blob row.
    for id in [first, second] {
        p.a.upload_version(&me, id, NewVersion::default(), once("shared content")).await.unwrap();
    }
    let shared: String = sqlx::query_scalar("SELECT sha256 FROM versions WHERE document_id = $1 AND version = 2")
        .bind(first)
        .fetch_one(p.a.meta().pool())
        .await
        .unwrap();
    let blob_rows = || {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM blobs WHERE sha256 = $1")
            .bind(shared.clone())
            .fetch_one(p.a.meta().pool())
    };
    assert_eq!(blob_rows().await.unwrap(), 1);

    // The other release, under way: the shared row locked, the first document's rows gone.
    let mut other = p.a.meta().pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM blobs WHERE sha256 = $1 FOR NO KEY UPDATE")
        .bind(&shared)
        .execute(&mut *other)
        .await
        .unwrap();
    for sql in [
        "DELETE FROM document_tags WHERE document_id = $1",
        "DELETE FROM versions WHERE document_id = $1",
        "DELETE FROM documents WHERE id = $1",
    ] {
        sqlx::query(sql).bind(first).execute(&mut *other).await.unwrap();
    }
    let (a, b) = (p.a.clone(), p.b.clone());
    let now = p.clock.now_ms();
    let release = tokio::spawn(async move { hand_over(a.meta(), b.meta(), "b", &[second], now, GRACE).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!release.is_finished(), "the release waits for the one under way that shares its blob row");
    other.commit().await.unwrap();
    let moved = tokio::time::timeout(std::time::Duration::from_secs(30), release).await.unwrap().unwrap().unwrap();
    assert_eq!(moved.documents, 1);
    assert_eq!(blob_rows().await.unwrap(), 0, "the shared blob row, no longer referred to, left with the second");
    let unreferenced: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256)",
    )
    .fetch_one(p.a.meta().pool())
    .await
    .unwrap();
    // The first document's own first version's blob row stays: the stand-in release did
    // not take it (a real one would have).
    assert_eq!(unreferenced, 1);
    assert_eq!(bytes_of(&Library::single(p.b.clone()), second, 2).await.unwrap(), b"shared content");
}

/// Where each of `ids` is: the name of the one shard of `library` holding it (and that it
/// is on one only).
async fn homes(library: &Library, ids: &[i64]) -> BTreeMap<i64, String> {
    let me = alice();
    let mut homes = BTreeMap::new();
    for id in ids {
        let mut on = Vec::new();
        for (name, shard) in library.names().iter().zip(library.shards()) {
            if shard.get(&me, *id).await.is_ok() {
                on.push(name.clone());
            }
        }
        assert_eq!(on.len(), 1, "document {id} is on {on:?}");
        homes.insert(*id, on.remove(0));
    }
    homes
}

/// The mover runs a whole move from the library's two tables, recording its progress on
/// each shard; killed part-way (its future dropped at any await, between a hand-over's two
/// commits included) and run again, it finishes without moving anything twice; reverted
/// before the flip (the new shard drained back), and run the other way (a shard removed),
/// it leaves every document where the table in force sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_runs_to_its_end_resumes_after_a_kill_and_moves_back() {
    use vellum_core::resharding::{finish_move, progress, run_move};
    let p = platform().await;
    let me = alice();
    let one = Arc::new(ring(&["a"]));
    let two = Arc::new(ring(&["a", "b"]));
    let mut ids = Vec::new();
    for i in 0..120 {
        let new = NewDocument { filename: format!("d{i}.txt"), ..NewDocument::default() };
        ids.push(p.a.upload(&me, new, once(format!("document {i}"))).await.unwrap().document.id);
    }
    let expected = i64::try_from(ids.iter().filter(|id| two.shard_of_id(**id) == 1).count()).unwrap();
    let growing = Library::moving(Arc::clone(&one), Some(Arc::clone(&two)), Vec::new(), vec![p.a.clone(), p.b.clone()]);

    // Killed after its eighth report (the first is made before any push): the mover runs
    // two lanes (its pool has room), a push waits for a lane to be free, and so once seven
    // batches were pushed at least five steps have ended, three of one lane at least, whose
    // third releases its first batch.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reports = std::sync::atomic::AtomicUsize::new(0);
    let report = move |_: &[(String, vellum_core::resharding::ShardProgress)]| {
        if reports.fetch_add(1, Ordering::SeqCst) == 7 {
            tx.send(()).ok();
        }
    };
    tokio::select! {
        _ = run_move(&growing, 5, GRACE, &report) => panic!("the move finished before it was killed"),
        _ = rx.recv() => {}
    }
    let part = progress(p.a.meta()).await.unwrap();
    assert!(part.moved_documents > 0 && part.moved_documents < expected, "{part:?}");
    assert_eq!(part.moving_to.as_deref(), Some(two.version()));

    let seen = Mutex::new(Vec::new());
    let sums =
        run_move(&growing, 5, GRACE, &|sums| seen.lock().unwrap().push(sums[0].1.moved_documents)).await.unwrap();
    let a = &sums[0].1;
    assert_eq!((a.total_documents, a.moved_documents), (expected, expected), "{a:?}");
    assert!(a.moved_bytes > 0 && a.started_at.is_some() && a.updated_at >= a.started_at);
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.len() > 3, "progress only grows: {seen:?}");
    let placed = homes(&growing, &ids).await;
    for (id, home) in &placed {
        assert_eq!(*home, two.names()[two.shard_of_id(*id)], "document {id}");
    }
    assert_eq!(count(&p.b, "documents").await, expected, "nothing moved twice");

    // Reverted before the flip: the old table stays in force, b drains back to a.
    let reverting =
        Library::moving(Arc::clone(&one), Some(Arc::clone(&one)), vec!["b".into()], vec![p.a.clone(), p.b.clone()]);
    for id in &ids {
        assert!(reverting.at(*id, |shard| Box::pin(shard.get(&me, *id))).await.is_ok(), "{id} reached while reverting");
    }
    run_move(&reverting, 7, GRACE, &|_| {}).await.unwrap();
    assert!(homes(&reverting, &ids).await.values().all(|home| home == "a"));
    assert_eq!(count(&p.b, "documents").await, 0);
    assert_eq!(count(&p.a, "moved_documents").await, 0, "a's markers went as the documents came back");
    for shard in [&p.a, &p.b] {
        finish_move(shard.meta(), p.clock.now_ms()).await.unwrap();
        assert_eq!(progress(shard.meta()).await.unwrap().moving_to, None);
    }
    assert_eq!(count(&p.b, "moved_documents").await, 0);

    // Grown again and flipped, then b removed: 2 -> 1 drains it.
    run_move(&growing, 50, GRACE, &|_| {}).await.unwrap();
    let shrinking =
        Library::moving(Arc::clone(&two), Some(Arc::clone(&one)), Vec::new(), vec![p.a.clone(), p.b.clone()]);
    let sums = run_move(&shrinking, 50, GRACE, &|_| {}).await.unwrap();
    assert_eq!(sums[1].1.moved_documents, expected, "b handed every document over: {sums:?}");
    assert!(homes(&shrinking, &ids).await.values().all(|home| home == "a"));
    let after = Library::sharded(Arc::clone(&one), vec![p.a.clone()]);
    for id in &ids {
        assert!(after.at(*id, |shard| Box::pin(shard.get(&me, *id))).await.is_ok());
    }
}

#[tokio::test]
async fn a_paced_move_keeps_to_its_documents_per_second() {
    use vellum_core::resharding::run_move_paced;
    let p = platform().await;
    let me = alice();
    for i in 0..60 {
        let new = NewDocument { filename: format!("p{i}.txt"), ..NewDocument::default() };
        p.a.upload(&me, new, once(format!("paced {i}"))).await.unwrap();
    }
    let growing = Library::moving(
        Arc::new(ring(&["a"])),
        Some(Arc::new(ring(&["a", "b"]))),
        Vec::new(),
        vec![p.a.clone(), p.b.clone()],
    );
    let started = std::time::Instant::now();
    let sums = run_move_paced(&growing, 4, GRACE, Some(50), &|_| {}).await.unwrap();
    let moved = sums[0].1.moved_documents;
    assert!(moved > 15, "{moved} documents moved");
    // Never faster than the pace: the last batch waits out its share of the second too.
    #[allow(clippy::cast_precision_loss)]
    let least = std::time::Duration::from_secs_f64(moved as f64 / 50.0);
    assert!(started.elapsed() >= least, "{moved} documents in {:?}, under {least:?}", started.elapsed());
    assert_eq!(count(&p.b, "documents").await, moved);
}
